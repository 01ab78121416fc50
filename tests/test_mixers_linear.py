"""The gated-linear-attention family (linear_attn, retnet, gla, rwkv6 and RWKV-6 channel mixing) against
references outside this package: flash-linear-attention's pure-torch ``naive`` recurrences (which compute
in fp32), torch's own GroupNorm, and RWKV-6's time/channel mixing written out the way the official code
(BlinkDL/RWKV-LM, ``RWKV_Tmix_x060`` / ``RWKV_CMix_x060``) computes it. The shared contract test covers
causality, full == cached, state bytes, gradients and autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fla.ops.gla.naive import naive_recurrent_gla
from fla.ops.linear_attn.naive import naive_recurrent_linear_attn
from fla.ops.retention.naive import naive_retention
from fla.ops.rwkv6.recurrent_naive import naive_recurrent_rwkv6
from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

from archifactory.config import BuildContext, FieldError
from archifactory.ffn.rwkv_channel_mix import RWKV6ChannelMixConfig
from archifactory.mixers.linear import GLAConfig, LinearAttentionConfig, RetNetConfig
from archifactory.mixers.ops_gla import PerChannelDecayScores, chunked_gla, recurrent_gla
from archifactory.mixers.rwkv6 import RWKV6Config
from archifactory.model.config import ModelConfig
from archifactory.model.lm import CausalLM
from archifactory.nn.init import InitConfig
from archifactory.nn.norms import RMSNormConfig
from archifactory.nn.positions import NoPositionConfig

from numerics import reduction_atol  # tests/numerics.py

D, B, T = 32, 2, 21
TOL = dict(rtol=1e-4, atol=1e-5)  # fla's naive references run in fp32


def ctx(d_model: int = D, layer_idx: int = 0, n_layers: int = 2) -> BuildContext:
    return BuildContext(
        d_model=d_model, n_layers=n_layers, layer_idx=layer_idx, max_seq_len=64, norm=RMSNormConfig(),
        position=NoPositionConfig(), init=InitConfig(std=0.2),
    )


def randomized(module: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Perturb every parameter, so that biases, norm affines and zero-ish inits all matter."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn_like(p))
    return module


def heads(y: torch.Tensor, n_heads: int) -> torch.Tensor:
    return y.view(*y.shape[:2], n_heads, -1)


def split_heads_norm(o: torch.Tensor, norm) -> torch.Tensor:
    """torch's GroupNorm with one group per head, on (B, T, H, V) -> (B, T, H * V)."""
    Bn, Tn, H, V = o.shape
    y = F.group_norm(o.reshape(Bn * Tn, H * V), H, norm.weight, norm.bias, norm.eps)
    return y.view(Bn, Tn, H * V)


# ------------------------------------------------------------------------------------------ the core


def qkv(T_: int = T, H: int = 3, K: int = 8, V: int = 6):
    return torch.randn(B, T_, H, K), torch.randn(B, T_, H, K), torch.randn(B, T_, H, V)


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 32])
def test_core_gla_matches_fla_naive_with_state(chunk_size):
    q, k, v = qkv()
    log_decay = F.logsigmoid(3 * torch.randn(B, T, 3, 8))
    h0 = torch.randn(B, 3, 8, 6)
    ref, ref_state = naive_recurrent_gla(q, k, v, log_decay, initial_state=h0, output_final_state=True)
    out, state = chunked_gla(q, k, v, log_decay, scale=8**-0.5, initial_state=h0, chunk_size=chunk_size)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(state, ref_state, **TOL)
    out, state = recurrent_gla(q, k, v, log_decay, scale=8**-0.5, initial_state=h0)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(state, ref_state, **TOL)


@pytest.mark.parametrize("chunk_size", [1, 8, 32])
def test_core_rwkv_read_matches_fla_naive_rwkv6(chunk_size):
    q, k, v = qkv()
    log_decay = -torch.exp(torch.randn(B, T, 3, 8))
    bonus = torch.randn(3, 8)
    h0 = torch.randn(B, 3, 8, 6)
    ref, ref_state = naive_recurrent_rwkv6(
        *(x.transpose(1, 2) for x in (q, k, v, log_decay)), bonus, scale=1.0, initial_state=h0, output_final_state=True
    )
    out, state = chunked_gla(q, k, v, log_decay, bonus=bonus, initial_state=h0, chunk_size=chunk_size)
    torch.testing.assert_close(out, ref.transpose(1, 2), **TOL)
    torch.testing.assert_close(state, ref_state, **TOL)
    out, _ = recurrent_gla(q, k, v, log_decay, bonus=bonus, initial_state=h0)
    torch.testing.assert_close(out, ref.transpose(1, 2), **TOL)


def test_core_scalar_decay_matches_fla_simple_gla_with_state():
    q, k, v = qkv()
    log_decay = F.logsigmoid(torch.randn(B, T, 3, 1))
    h0 = torch.randn(B, 3, 8, 6)
    ref, ref_state = naive_recurrent_simple_gla(q, k, v, log_decay[..., 0], initial_state=h0, output_final_state=True)
    out, state = chunked_gla(q, k, v, log_decay, scale=8**-0.5, initial_state=h0, chunk_size=8)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(state, ref_state, **TOL)


@pytest.mark.parametrize("bonus", [False, True])
def test_core_is_finite_and_exact_under_extreme_per_channel_decays(bonus):
    """Log-decays down to -60 per step: a chunk's total reaches ~-250 at the default 8 tokens (and
    thousands over a sequence), where the classic factorisation q*exp(G_t) . k*exp(-G_s) overflows fp32;
    differences of cumulative log-decays stay finite. Their fp32 rounding grows with |G| (about
    |G| * 6e-8 in the exponent), hence a looser absolute tolerance than elsewhere."""
    q, k, v = qkv(T_=40)
    log_decay = -60 * torch.rand(B, 40, 3, 8)
    u = torch.randn(3, 8) if bonus else None
    scale = 1.0 if bonus else 8**-0.5  # fla's naive RWKV-6 runs with scale=1 here, its naive GLA with K^-0.5
    out, state = chunked_gla(q, k, v, log_decay, bonus=u, scale=scale)
    assert torch.isfinite(out).all() and torch.isfinite(state).all()
    if bonus:
        ref, ref_state = naive_recurrent_rwkv6(
            *(x.transpose(1, 2) for x in (q, k, v, log_decay)), u, scale=1.0, output_final_state=True
        )
        ref = ref.transpose(1, 2)
    else:
        ref, ref_state = naive_recurrent_gla(q, k, v, log_decay, output_final_state=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, ref_state, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bonus", [False, True])
@pytest.mark.parametrize("chunk_size", [3, 8])
@pytest.mark.parametrize("strength", [1.0, 30.0])
def test_core_gradients_match_fla_naive(bonus, chunk_size, strength):
    """Gradients of the chunked form (its per-channel in-chunk scores have a hand-written backward,
    :class:`PerChannelDecayScores`) against autograd through fla's naive per-token recurrences, for every
    input: q, k, v, the per-channel log decays, the RWKV bonus and the initial state."""
    T_ = 19
    q, k, v = qkv(T_=T_)
    log_decay = -strength * torch.rand(B, T_, 3, 8)
    u = torch.randn(3, 8) if bonus else None
    h0 = torch.randn(B, 3, 8, 6)
    probe_o, probe_s = torch.randn(B, T_, 3, 6), torch.randn(B, 3, 8, 6)
    scale = 1.0 if bonus else 8**-0.5

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, log_decay, h0)] + (
            [u.clone().requires_grad_()] if bonus else [])
        out, state = fn(*leaves)
        ((out * probe_o).sum() + (state * probe_s).sum()).backward()
        return [t.grad for t in leaves]

    ours = grads(lambda q_, k_, v_, g_, h_, *u_: chunked_gla(
        q_, k_, v_, g_, bonus=u_[0] if u_ else None, scale=scale, initial_state=h_, chunk_size=chunk_size))
    if bonus:
        def naive(q_, k_, v_, g_, h_, u_):
            o, s = naive_recurrent_rwkv6(*(x.transpose(1, 2) for x in (q_, k_, v_, g_)), u_, scale=1.0,
                                         initial_state=h_, output_final_state=True)
            return o.transpose(1, 2), s
    else:
        def naive(q_, k_, v_, g_, h_):
            return naive_recurrent_gla(q_, k_, v_, g_, initial_state=h_, output_final_state=True)
    ref = grads(naive)
    for name, got, want in zip(["q", "k", "v", "log_decay", "h0", "u"], ours, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * strength, msg=f"gradient of {name}")


@pytest.mark.parametrize("strict", [False, True])
def test_per_channel_scores_backward_matches_finite_differences(strict):
    """The hand-written backward against torch.autograd.gradcheck's finite differences (fp64)."""
    C, K = 5, 3
    keep = torch.ones(C, C, dtype=torch.bool).tril(-1 if strict else 0)
    g = -torch.rand(2, C, K, dtype=torch.float64).cumsum(-2)
    g_q = F.pad(g[..., :-1, :], (0, 0, 1, 0)) if strict else g.clone()
    args = [torch.randn(2, C, K, dtype=torch.float64), torch.randn(2, C, K, dtype=torch.float64), g_q, g]
    args = [t.requires_grad_() for t in args]
    assert torch.autograd.gradcheck(lambda *a: PerChannelDecayScores.apply(*a, keep), args)


# ------------------------------------------------------------------------------------------ the mixers


@pytest.mark.parametrize(
    ("feature_map", "normalize", "phi"),
    [("elu1", True, lambda x: F.elu(x) + 1), ("relu", True, F.relu), ("identity", False, lambda x: x)],
)
def test_linear_attention_matches_fla_naive(feature_map, normalize, phi):
    mixer = randomized(LinearAttentionConfig(n_heads=4, feature_map=feature_map, normalize=normalize).build(ctx()))
    x = torch.randn(B, T, D)
    q, k, v = (heads(p(x), 4) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
    q, k = phi(q), phi(k)
    ref, _ = naive_recurrent_linear_attn(q, k, v, normalize=normalize)
    torch.testing.assert_close(mixer(x)[0], mixer.o_proj(ref.flatten(-2)), **TOL)

    # The cache after a prefix is fla's final state (and running key sum, when normalising), and the
    # suffix continued from it is fla's continued from that state.
    split = 8
    _, (ref_state, ref_key_sum) = naive_recurrent_linear_attn(
        q[:, :split], k[:, :split], v[:, :split], normalize=True, output_final_state=True
    )
    cache = mixer.init_cache(B, "cpu", torch.float32)
    mixer(x[:, :split], cache)
    torch.testing.assert_close(cache.state, ref_state, **TOL)
    if normalize:
        torch.testing.assert_close(cache.key_sum, ref_key_sum[:, 0], **TOL)
    ref_suffix, _ = naive_recurrent_linear_attn(
        q[:, split:], k[:, split:], v[:, split:], normalize=normalize,
        initial_state=(ref_state, ref_key_sum) if normalize else ref_state,
    )
    torch.testing.assert_close(mixer(x[:, split:], cache)[0], mixer.o_proj(ref_suffix.flatten(-2)), **TOL)


def test_linear_attention_normalize_needs_a_positive_feature_map():
    with pytest.raises(FieldError, match="feature_map"):
        LinearAttentionConfig(feature_map="identity", normalize=True).check(ctx())


@pytest.mark.parametrize("rotary", [False, True])
def test_retnet_matches_fla_naive_retention(rotary):
    cfg = RetNetConfig(n_heads=4, rotary=rotary)
    mixer = randomized(cfg.build(ctx()))
    x = torch.randn(B, T, D)
    q, k, v = (heads(p(x), 4).transpose(1, 2) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))  # (B, H, T, .)
    if rotary:  # RoPE, half-split layout, theta 10000, written out
        K = q.shape[-1]
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, K, 2).float() / K)
        angle = torch.arange(T).float()[:, None] * inv_freq[None, :]
        cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)

        def rotate(z):
            z1, z2 = z[..., : K // 2], z[..., K // 2 :]
            return z * cos + torch.cat([-z2, z1], -1) * sin

        q, k = rotate(q), rotate(k)
    retention = naive_retention(q, k, v).transpose(1, 2)  # fla's gammas: 1 - 2^(-5-h)
    ref = mixer.o_proj(split_heads_norm(retention, mixer.norm) * F.silu(mixer.g_proj(x)))
    torch.testing.assert_close(mixer(x)[0], ref, **TOL)


def test_retnet_decays_follow_the_paper():
    mixer = RetNetConfig(n_heads=4).build(ctx())
    expected = torch.tensor([1 - 2.0**-5, 1 - 2.0**-6, 1 - 2.0**-7, 1 - 2.0**-8])
    torch.testing.assert_close(mixer.log_gamma.exp(), expected)


@pytest.mark.parametrize("head_norm", ["groupnorm", "rmsnorm"])
def test_gla_matches_fla_naive(head_norm):
    cfg = GLAConfig(n_heads=2, gate_low_rank=4, head_norm=head_norm)
    mixer = randomized(cfg.build(ctx()))
    x = torch.randn(B, T, D)
    q, k, v = (heads(p(x), 2) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
    log_alpha = F.logsigmoid(heads(mixer.gate_up(mixer.gate_down(x)), 2)) / 16  # Yang et al. 2024, tau = 16
    o, _ = naive_recurrent_gla(q, k, v, log_alpha)
    if head_norm == "groupnorm":
        normed = split_heads_norm(o, mixer.norm)
    else:
        normed = (o * torch.rsqrt(o.square().mean(-1, keepdim=True) + mixer.norm.eps)).flatten(-2) * mixer.norm.weight
    ref = mixer.o_proj(normed * F.silu(mixer.r_proj(x)))
    torch.testing.assert_close(mixer(x)[0], ref, **TOL)


def official_rwkv6_time_mix(mixer, x: torch.Tensor) -> torch.Tensor:
    """RWKV_Tmix_x060.forward, with our parameters under the official names, and fla's naive WKV."""
    Bn, Tn, C = x.shape
    H = mixer.n_heads
    time_maa_x = mixer.mu_x
    time_maa_w, time_maa_k, time_maa_v, time_maa_r, time_maa_g = mixer.lerp_lambda
    time_maa_w1, time_maa_w2 = mixer.lerp_down.weight.T, mixer.lerp_up
    time_decay, time_decay_w1, time_decay_w2 = mixer.decay_lambda, mixer.decay_down.weight.T, mixer.decay_up.weight.T

    xx = torch.nn.ZeroPad2d((0, 0, 1, -1))(x) - x
    xxx = x + xx * time_maa_x
    xxx = torch.tanh(xxx @ time_maa_w1).view(Bn * Tn, 5, -1).transpose(0, 1)
    xxx = torch.bmm(xxx, time_maa_w2).view(5, Bn, Tn, -1)
    mw, mk, mv, mr, mg = xxx.unbind(dim=0)
    xw, xk = x + xx * (time_maa_w + mw), x + xx * (time_maa_k + mk)
    xv, xr, xg = x + xx * (time_maa_v + mv), x + xx * (time_maa_r + mr), x + xx * (time_maa_g + mg)
    r, k, v = mixer.q_proj(xr), mixer.k_proj(xk), mixer.v_proj(xv)
    g = F.silu(mixer.g_proj(xg))
    w = time_decay + torch.tanh(xw @ time_decay_w1) @ time_decay_w2
    # the CUDA kernel's decay is exp(-exp(w)); fla's naive takes its log
    to_bhtk = lambda z: z.view(Bn, Tn, H, -1).transpose(1, 2)  # noqa: E731
    y, _ = naive_recurrent_rwkv6(to_bhtk(r), to_bhtk(k), to_bhtk(v), to_bhtk(-torch.exp(w)), mixer.bonus, scale=1.0)
    y = y.transpose(1, 2).reshape(Bn * Tn, C)
    ln_x = torch.nn.GroupNorm(H, C, eps=mixer.norm.eps)
    with torch.no_grad():
        ln_x.weight.copy_(mixer.norm.weight)
        ln_x.bias.copy_(mixer.norm.bias)
    return mixer.o_proj(ln_x(y).view(Bn, Tn, C) * g)


def test_rwkv6_time_mix_matches_the_official_formulation():
    mixer = randomized(RWKV6Config(n_heads=4, mix_low_rank=4, decay_low_rank=6).build(ctx()))
    x = torch.randn(B, T, D)
    torch.testing.assert_close(mixer(x)[0], official_rwkv6_time_mix(mixer, x), **TOL)


def test_rwkv6_init_follows_the_official_ramps():
    mixer = RWKV6Config(n_heads=4).build(ctx(d_model=64, layer_idx=0, n_layers=4))
    decay = torch.exp(-torch.exp(mixer.decay_lambda.detach()))
    assert decay.max().item() == pytest.approx(math.exp(-math.exp(-6.0)))  # slowest channel
    assert decay.min().item() == pytest.approx(math.exp(-math.exp(-1.0)))  # fastest channel
    assert mixer.mu_x[0].item() == 1.0 and mixer.mu_x[-1].item() == pytest.approx(1 / 64)  # 1 - (i/d)^1 at layer 0
    # u at layer 0 is the zigzag alone: 0, 0.1, -0.1, 0, ...
    torch.testing.assert_close(mixer.bonus.flatten()[:4], torch.tensor([0.0, 0.1, -0.1, 0.0]))


# -------------------------------------------------------------------------------------- channel mixing


def test_rwkv6_channel_mix_matches_the_official_formulation():
    ffn = randomized(RWKV6ChannelMixConfig().build(ctx()))
    assert ffn.key.out_features == 96  # int(3.5 * 32) // 32 * 32
    x = torch.randn(B, T, D)
    xx = torch.nn.ZeroPad2d((0, 0, 1, -1))(x) - x
    xk, xr = x + xx * ffn.mu_k, x + xx * ffn.mu_r
    ref = torch.sigmoid(ffn.receptance(xr)) * ffn.value(torch.relu(ffn.key(xk)) ** 2)
    y, aux = ffn(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert aux == {}


def test_rwkv6_channel_mix_is_exact_step_by_step_only_with_its_cache():
    """With its token-shift cache, one token at a time equals the whole sequence. The FFN contract passes
    no cache, and then each call shifts in zeros: the documented limitation (see the module)."""
    ffn = randomized(RWKV6ChannelMixConfig(hidden=40).build(ctx()))
    x = torch.randn(B, T, D)
    full, _ = ffn(x)
    cache = ffn.init_cache(B, "cpu", torch.float32)
    steps = torch.cat([ffn(x[:, t : t + 1], cache)[0] for t in range(T)], dim=1)
    # One row at a time runs other matmul kernels than T rows at once: equal up to summation order of
    # the key (D, squared) and value (hidden) products, not bit for bit (MKL on AVX2 differs by 2e-5).
    magnitude = float(full.detach().abs().max())
    torch.testing.assert_close(steps, full, rtol=0, atol=reduction_atol(torch.float32, 2 * D + 40, magnitude))
    uncached = torch.cat([ffn(x[:, t : t + 1])[0] for t in range(T)], dim=1)
    assert (uncached[:, 1:] - full[:, 1:]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------- in a model, backends


def test_rwkv6_model_trains():
    config = ModelConfig(vocab_size=50, d_model=D, n_layers=2, mixer={"kind": "rwkv6", "n_heads": 2},
                         ffn={"kind": "rwkv6_channel_mix"})
    model = CausalLM(config)
    ids = torch.randint(0, 50, (2, 12))
    out = model(ids, targets=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.flops_per_token(12) > 0 and model.state_bytes(12) > 0


@pytest.mark.parametrize("cfg", [LinearAttentionConfig(), RetNetConfig(), GLAConfig(), RWKV6Config()])
def test_backends_on_cpu(cfg):
    mixer = cfg.build(ctx())
    assert mixer.kernel_path() == "torch.chunk"
    refused = cfg.model_copy(update={"backend": "fla"}).build(ctx())
    with pytest.raises(RuntimeError, match="CUDA"):
        refused(torch.randn(1, 3, D))


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        (LinearAttentionConfig(n_heads=3), "n_heads"),
        (GLAConfig(expand_k=0.3), "expand_k"),
        (RetNetConfig(n_heads=4, expand_k=0.125), "rotary"),  # one key channel per head cannot rotate
        (RWKV6Config(n_heads=5), "n_heads"),
    ],
)
def test_impossible_configs_name_their_field(cfg, field):
    with pytest.raises(FieldError) as err:
        cfg.check(ctx())
    assert err.value.field == field
