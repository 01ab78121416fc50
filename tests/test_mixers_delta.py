"""DeltaNet, Gated DeltaNet and RWKV-7 against flash-linear-attention's pure-torch references.

- the chunked recurrences (``chunk_delta_rule``, ``chunk_dplr``) against fla's ``naive`` per-token
  functions, outputs and final states, with a non-zero initial state and lengths that are not a multiple
  of the chunk;
- chunked == our own per-token spec in fp64, values and gradients, for several chunk sizes;
- whole layers against the same computation written with fla's reference pieces (and ``nn.Conv1d`` for
  the short convolution), with the layer's own weights.

fla's naive functions compute in fp32, so the comparisons with them are at fp32 tolerances.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from fla.modules.layernorm import rms_norm_ref
from fla.modules.token_shift import token_shift_ref
from fla.ops.delta_rule.naive import delta_rule_recurrence
from fla.ops.gated_delta_rule.gate import naive_gdn_gate
from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule, naive_recurrent_gated_delta_rule
from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence
from fla.ops.rwkv7.fused_addcmul import torch_addcmul_rwkv7
from fla.ops.rwkv7.fused_k_update import k_update_ref
from fla.ops.rwkv7.gate_output_correction import gate_output_correction_ref

from archifactory.config import BuildContext, FieldError
from archifactory.mixers.delta import (
    DeltaNetConfig,
    GatedDeltaNetConfig,
    ShortConv,
    chunk_delta_rule,
    recurrent_delta_rule,
)
from archifactory.mixers.rwkv7 import RWKV7Config, chunk_dplr, recurrent_dplr
from archifactory.nn.init import InitConfig
from archifactory.nn.norms import RMSNormConfig
from archifactory.nn.positions import NoPositionConfig

B, T, H, DK, DV = 2, 21, 3, 8, 6
FP32 = {"rtol": 2e-5, "atol": 2e-5}
FP64 = {"rtol": 1e-10, "atol": 1e-10}


def heads_first(t):  # (B, T, H, ...) <-> (B, H, T, ...): the older naive functions' layout
    return t.transpose(1, 2)


def delta_inputs(dtype=torch.float32, requires_grad=False):
    q = torch.randn(B, T, H, DK, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, DK, dtype=dtype), dim=-1)  # the delta rule's keys are unit vectors
    v = torch.randn(B, T, H, DV, dtype=dtype)
    beta = torch.rand(B, T, H, dtype=dtype)
    g = -2 * torch.rand(B, T, H, dtype=dtype)  # log decays, some strong
    state = torch.randn(B, H, DK, DV, dtype=dtype)
    tensors = (q, k, v, beta, g, state)
    return [t.requires_grad_(requires_grad) for t in tensors]


def dplr_inputs(dtype=torch.float32, rwkv=True, requires_grad=False):
    q, k = torch.randn(B, T, H, DK, dtype=dtype), torch.randn(B, T, H, DK, dtype=dtype)
    v = torch.randn(B, T, H, DV, dtype=dtype)
    if rwkv:  # RWKV-7's factors: a = -kappa, b = kappa * iclr
        kappa = F.normalize(torch.randn(B, T, H, DK, dtype=dtype), dim=-1)
        a, b = -kappa, kappa * torch.rand(B, T, H, DK, dtype=dtype)
    else:  # generic factors, so that swapping the roles of a and b would show
        a, b = 0.3 * torch.randn(B, T, H, DK, dtype=dtype), 0.3 * torch.randn(B, T, H, DK, dtype=dtype)
    gk = -math.exp(-0.5) * torch.sigmoid(3 * torch.randn(B, T, H, DK, dtype=dtype))
    state = torch.randn(B, H, DK, DV, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, a, b, gk, state)]


# ------------------------------------------------------------------------------ the recurrences vs fla


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_chunk_delta_rule_matches_fla_delta_rule_recurrence(chunk):
    q, k, v, beta, _, state = delta_inputs()
    # fla's reference: (B, H, T, d) layout, expects unit keys, scales q by d_k^-0.5, state (B, H, d_k, d_v)
    ref_o, ref_state = delta_rule_recurrence(
        heads_first(q), heads_first(k), heads_first(v), heads_first(beta), initial_state=state.clone()
    )
    o, final = chunk_delta_rule(q, k, v, beta, scale=DK**-0.5, initial_state=state, chunk_size=chunk)
    torch.testing.assert_close(o, heads_first(ref_o), **FP32)
    torch.testing.assert_close(final, ref_state, **FP32)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunk_gated_delta_rule_matches_fla_naive(chunk):
    q, k, v, beta, g, state = delta_inputs()
    ref_o, ref_state = naive_recurrent_gated_delta_rule(
        q, k, v, beta, g, scale=DK**-0.5, initial_state=state, output_final_state=True
    )
    o, final = chunk_delta_rule(q, k, v, beta, g, scale=DK**-0.5, initial_state=state, chunk_size=chunk)
    torch.testing.assert_close(o, ref_o, **FP32)
    torch.testing.assert_close(final, ref_state, **FP32)
    # fla's chunked twin takes g *before* beta: keywords keep the roles straight
    chunk_o, chunk_state = naive_chunk_gated_delta_rule(
        q, k, v, g=g, beta=beta, chunk_size=16, scale=DK**-0.5, initial_state=state, output_final_state=True
    )
    torch.testing.assert_close(o, chunk_o, **FP32)
    torch.testing.assert_close(final, chunk_state, **FP32)


@pytest.mark.parametrize("rwkv", [True, False], ids=["rwkv7-factors", "generic-factors"])
@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_chunk_dplr_matches_fla_dplr_recurrence(chunk, rwkv):
    q, k, v, a, b, gk, state = dplr_inputs(rwkv=rwkv)
    # fla's dplr_recurrence: S <- diag(exp(gk)) S + beta (alpha^T S) + k v^T, (B, H, T, d), q scaled by d_k^-0.5
    ref_o, ref_state = dplr_recurrence(
        *(heads_first(t) for t in (q, k, v, a, b, gk)), initial_state=state.clone()
    )
    o, final = chunk_dplr(q, k, v, a, b, gk, scale=DK**-0.5, initial_state=state, chunk_size=chunk)
    torch.testing.assert_close(o, heads_first(ref_o), **FP32)
    torch.testing.assert_close(final, ref_state, **FP32)


# ------------------------------------------------------------------- chunked == per-token spec, in fp64


@pytest.mark.parametrize("gated", [False, True])
def test_chunk_delta_rule_values_and_gradients_match_recurrent(gated):
    q, k, v, beta, g, state = delta_inputs(torch.float64, requires_grad=True)
    g = g if gated else None
    ref_o, ref_s = recurrent_delta_rule(q, k, v, beta, g, scale=0.3, initial_state=state)
    probe_o, probe_s = torch.randn_like(ref_o), torch.randn_like(ref_s)
    inputs = [t for t in (q, k, v, beta, g, state) if t is not None]
    ref_grads = torch.autograd.grad((ref_o * probe_o).sum() + (ref_s * probe_s).sum(), inputs)
    for chunk in (2, 7, 32):
        o, s = chunk_delta_rule(q, k, v, beta, g, scale=0.3, initial_state=state, chunk_size=chunk)
        torch.testing.assert_close(o, ref_o, **FP64)
        torch.testing.assert_close(s, ref_s, **FP64)
        grads = torch.autograd.grad((o * probe_o).sum() + (s * probe_s).sum(), inputs)
        for grad, ref in zip(grads, ref_grads):
            torch.testing.assert_close(grad, ref, **FP64)


def test_chunk_dplr_values_and_gradients_match_recurrent():
    inputs = dplr_inputs(torch.float64, rwkv=False, requires_grad=True)
    q, k, v, a, b, gk, state = inputs
    ref_o, ref_s = recurrent_dplr(q, k, v, a, b, gk, scale=0.5, initial_state=state)
    probe_o, probe_s = torch.randn_like(ref_o), torch.randn_like(ref_s)
    ref_grads = torch.autograd.grad((ref_o * probe_o).sum() + (ref_s * probe_s).sum(), inputs)
    for chunk in (3, 16):
        o, s = chunk_dplr(q, k, v, a, b, gk, scale=0.5, initial_state=state, chunk_size=chunk)
        torch.testing.assert_close(o, ref_o, **FP64)
        torch.testing.assert_close(s, ref_s, **FP64)
        grads = torch.autograd.grad((o * probe_o).sum() + (s * probe_s).sum(), inputs)
        for grad, ref in zip(grads, ref_grads):
            torch.testing.assert_close(grad, ref, **FP64)


def test_chunk_dplr_holds_at_the_longest_chunk_and_strongest_decay():
    # the factored pairwise decays e^{L_i} e^{-L_j} must stay finite and accurate in fp32 at chunk 128
    q, k, v, a, b, _, state = dplr_inputs(rwkv=True)
    T_long = 128
    rep = lambda t: t.repeat(1, 7, 1, 1)[:, :T_long]
    q, k, v, a, b = map(rep, (q, k, v, a, b))
    gk = torch.full_like(q, -math.exp(-0.5))
    ref_o, ref_s = recurrent_dplr(*(t.double() for t in (q, k, v, a, b, gk)), scale=1.0, initial_state=state.double())
    o, s = chunk_dplr(q, k, v, a, b, gk, scale=1.0, initial_state=state, chunk_size=128)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o.double(), ref_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), ref_s, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- layers vs references


def build(cfg, d_model=24, layer_idx=0, n_layers=2, dtype=torch.float32):
    ctx = BuildContext(
        d_model=d_model, n_layers=n_layers, layer_idx=layer_idx, max_seq_len=64, norm=RMSNormConfig(),
        position=NoPositionConfig(), init=InitConfig(std=0.2),
    )
    cfg.check(ctx)
    mixer = cfg.build(ctx).to(dtype)
    with torch.no_grad():  # random vectors too, so that every parameter shows in the output
        for p in mixer.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return mixer


def test_short_conv_is_a_causal_depthwise_conv1d():
    conv = ShortConv(5, 4)
    conv.reset_parameters()
    x = torch.randn(2, 9, 5)
    ref = torch.nn.Conv1d(5, 5, 4, groups=5, padding=3, bias=False)
    with torch.no_grad():
        ref.weight.copy_(conv.weight.t()[:, None, :])  # ours: (K, C), tap j looks K-1-j tokens back
    expected = F.silu(ref(x.transpose(1, 2))[..., :9]).transpose(1, 2)
    y, past = conv(x, None)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(past, x[:, -3:])


def delta_layer_reference(mixer, x):
    """The layer written with fla's reference pieces and torch modules, from ``mixer``'s weights."""
    Bx, Tx, _ = x.shape
    nh, dk, dv = mixer.n_heads, mixer.head_dim, mixer.v_head_dim
    qkv = F.linear(x, mixer.qkv_proj.weight)
    if mixer.conv is not None:
        K = mixer.conv.kernel_size
        weight = mixer.conv.weight.t()[:, None, :]  # as nn.Conv1d / fla's ShortConvolution hold it: (C, 1, K)
        qkv = F.conv1d(qkv.transpose(1, 2), weight, padding=K - 1, groups=qkv.shape[-1])[..., :Tx].transpose(1, 2)
    qkv = F.silu(qkv)
    q, k, v = qkv.split([nh * dk, nh * dk, nh * dv], dim=-1)
    q, k = (F.normalize(t.reshape(Bx, Tx, nh, dk), dim=-1) for t in (q, k))
    v = v.reshape(Bx, Tx, nh, dv)
    beta = mixer.beta_scale * torch.sigmoid(F.linear(x, mixer.b_proj.weight))
    if mixer.gated:
        g = naive_gdn_gate(F.linear(x, mixer.a_proj.weight), mixer.A_log, mixer.dt_bias)
        o, _ = naive_recurrent_gated_delta_rule(q, k, v, beta, g)
    else:
        o, _ = delta_rule_recurrence(heads_first(q), heads_first(k), heads_first(v), heads_first(beta))
        o = heads_first(o)
    gate = None if mixer.g_proj is None else F.silu(F.linear(x, mixer.g_proj.weight)).reshape(Bx, Tx, nh, dv)
    o = rms_norm_ref(o, mixer.o_norm.weight, None, eps=mixer.o_norm.eps)
    if gate is not None:
        o = o * gate
    return F.linear(o.reshape(Bx, Tx, nh * dv), mixer.o_proj.weight)


@pytest.mark.parametrize(
    "cfg",
    [
        DeltaNetConfig(n_heads=3, chunk_size=8),
        DeltaNetConfig(n_heads=2, expand_v=0.5, use_gate=True, allow_neg_eigval=True, conv_size=None),
        GatedDeltaNetConfig(n_heads=3, chunk_size=8),
        GatedDeltaNetConfig(n_heads=2, expand_v=2.0, use_gate=False, conv_size=3),
    ],
    ids=["deltanet", "deltanet-gate-negeig-noconv", "gated_deltanet", "gated_deltanet-nogate-v2"],
)
def test_delta_layers_match_reference(cfg):
    mixer = build(cfg)
    x = torch.randn(2, 19, 24)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x)[0], delta_layer_reference(mixer, x), **FP32)


def rwkv7_reference(mixer, x, v_first=None):
    """RWKV-7 time mixing composed as fla's ``RWKV7Attention`` does (``fuse_norm=False``; the value residual
    ``torch.lerp(v, v_first, sigmoid(v_lora(xv)))`` after layer 0), with fla's reference functions, from
    ``mixer``'s weights."""
    Bx, Tx, _ = x.shape
    nh, hd = mixer.n_heads, mixer.head_dim
    delta = token_shift_ref(x)  # x_{t-1} - x_t
    xr, xw, xk, xv, xa, xg = torch_addcmul_rwkv7(x, delta, *mixer.token_mix)
    lora = lambda m, t, act: F.linear(act(F.linear(t, m.down.weight)), m.up.weight, m.up.bias)
    r = F.linear(xr, mixer.r_proj.weight)
    w = -0.6065306597126334 * lora(mixer.decay, xw, torch.tanh).sigmoid()
    k = F.linear(xk, mixer.k_proj.weight)
    v = F.linear(xv, mixer.v_proj.weight)
    if v_first is not None:
        v = torch.lerp(v, v_first, lora(mixer.value_mix, xv, lambda t: t).sigmoid())
    a = lora(mixer.iclr, xa, lambda t: t).sigmoid()
    g = lora(mixer.gate, xg, torch.sigmoid)
    kk = F.normalize((k * mixer.k_k).reshape(Bx, Tx, nh, hd), dim=-1)
    k = k_update_ref(k, a, mixer.k_a)
    r, w, k, a, v = (t.reshape(Bx, Tx, nh, hd) for t in (r, w, k, a, v))
    # fla's layer calls chunk_rwkv7(r, w, k, v, a=-kk, b=kk*a, scale=1), the DPLR recurrence with gk = w;
    # the naive reference scales q by hd^-0.5, so r is pre-multiplied by hd^0.5
    o, _ = dplr_recurrence(*(heads_first(t) for t in (r * hd**0.5, k, v, -kk, kk * a, w)))
    o = F.group_norm(heads_first(o).reshape(Bx * Tx, nh * hd), nh, mixer.norm_weight, mixer.norm_bias, hd * 1e-5)
    o = gate_output_correction_ref(o.reshape(Bx, Tx, nh * hd), r, k, mixer.r_k, v, g)
    return F.linear(o, mixer.o_proj.weight)


@pytest.mark.parametrize(
    "cfg, layer_idx",
    [
        (RWKV7Config(n_heads=3, decay_rank=8, iclr_rank=4, gate_rank=8, chunk_size=8), 0),
        (RWKV7Config(n_heads=2, chunk_size=64), 1),
    ],
)
def test_rwkv7_layer_matches_reference(cfg, layer_idx):
    mixer = build(cfg, layer_idx=layer_idx)
    with torch.no_grad():  # the low-rank maps' first factors start at zero (as published): move them
        for lora in mixer.low_rank_maps():
            lora.down.weight.normal_(0, 0.3)
    x = torch.randn(2, 19, 24)
    v_first = torch.randn(2, 19, 24) if layer_idx else None
    with torch.no_grad():
        cross_layer = {} if v_first is None else {"v_first": v_first}
        torch.testing.assert_close(mixer(x, cross_layer=cross_layer)[0], rwkv7_reference(mixer, x, v_first), **FP32)
        assert "v_first" in cross_layer  # layer 0 stored its values; a later layer read the given ones


# ------------------------------------------------------------------------------------ configs, costs


def test_output_does_not_depend_on_chunk_size():
    x = torch.randn(2, 23, 24, dtype=torch.float64)
    for cfg in (GatedDeltaNetConfig(n_heads=3), RWKV7Config(n_heads=3, decay_rank=4, iclr_rank=4, gate_rank=4)):
        torch.manual_seed(1)
        mixer = build(cfg, dtype=torch.float64)
        ref = mixer(x)[0]
        for chunk in (1, 5, 23):
            mixer.chunk_size = chunk
            torch.testing.assert_close(mixer(x)[0], ref, **FP64)


def test_bf16_cache_keeps_the_state_in_fp32_and_state_bytes_says_so():
    for cfg in (DeltaNetConfig(n_heads=3), RWKV7Config(n_heads=3, decay_rank=4, iclr_rank=4, gate_rank=4)):
        mixer = build(cfg)
        cache = mixer.init_cache(1, "cpu", torch.bfloat16)
        assert cache.state.dtype == torch.float32
        held = sum(t.numel() * t.element_size() for t in vars(cache).values() if isinstance(t, torch.Tensor))
        assert held == mixer.state_bytes(100, torch.bfloat16)


def test_checks_name_the_field_and_valid_choices():
    ctx = BuildContext(d_model=24, n_layers=2, layer_idx=0, max_seq_len=64, norm=RMSNormConfig(),
                       position=NoPositionConfig(), init=InitConfig())
    with pytest.raises(FieldError, match="n_heads=5 does not divide d_model=24"):
        GatedDeltaNetConfig(n_heads=5).check(ctx)
    with pytest.raises(FieldError, match="expand_v"):
        DeltaNetConfig(n_heads=3, expand_v=0.3).check(ctx)
    with pytest.raises(FieldError, match="n_heads=7"):
        RWKV7Config(n_heads=7).check(ctx)
    with pytest.raises(ValueError):
        RWKV7Config(chunk_size=256)


def test_kernel_path_and_fla_backend_on_cpu():
    mixers = [build(DeltaNetConfig(n_heads=3)), build(GatedDeltaNetConfig(n_heads=3)), build(RWKV7Config(n_heads=3))]
    assert [m.kernel_path() for m in mixers] == ["torch.chunk_delta_rule", "torch.chunk_gated_delta_rule",
                                                 "torch.chunk_dplr"]
    forced = build(DeltaNetConfig(n_heads=3, backend="fla"))
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        forced(torch.randn(1, 4, 24))


def test_flops_count_the_projections_and_the_chunked_recurrence():
    mixer = build(DeltaNetConfig(n_heads=3, chunk_size=16))  # d_model 24: q, k, v and o are 24x24
    projections = 2 * 24 * (3 * 24 + 3) + 2 * 24 * 24
    assert mixer.flops_per_token(1) > projections
    # the chunked form's per-token cost grows with the chunk it runs at, then stays
    assert mixer.flops_per_token(4) < mixer.flops_per_token(16) == mixer.flops_per_token(1024)
