"""Mamba-2 (SSD) and Hymba beyond the shared contract: parity with transformers' ``Mamba2Mixer`` (full
forward and cached decoding), the SSD core against flash-linear-attention's naive simple-GLA reference,
Hymba's fusion against its two branches built separately, and the hybrid presets training and generating.

Shared contract checks (causality, cache == full forward, state bytes, gradients, bf16) run for these
kinds in tests/test_mixer_contract.py.
"""

import importlib.util

import pytest
import torch

import archifactory as af
from archifactory.config import BuildContext, ConfigError
from archifactory.mixers.attention import AttentionConfig
from archifactory.mixers.hymba import HymbaConfig
from archifactory.mixers.mamba2 import Mamba2Config, ssd_chunked, ssd_step
from archifactory.nn.init import InitConfig
from archifactory.nn.norms import RMSNormConfig
from archifactory.nn.positions import NoPositionConfig, RoPEConfig


def context(d_model=32, position=None, eps=1e-5):
    return BuildContext(
        d_model=d_model, n_layers=2, layer_idx=0, max_seq_len=128, norm=RMSNormConfig(eps=eps),
        position=position or NoPositionConfig(), init=InitConfig(std=0.2),
    )


def perturb_vectors(module, scale=0.3):
    """Random 1-D parameters (norm scales, biases, D, dt_bias, A_log) so that every one matters."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(scale * torch.randn_like(p))


# ----------------------------------------------------------------------------- transformers Mamba2Mixer

hf_mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")


def hf_pair(cfg: Mamba2Config, d_model=32):
    """Our Mamba2 and transformers' Mamba2Mixer holding the same weights."""
    from transformers import Mamba2Config as HFMamba2Config

    # The fused CUDA kernels (mamba_ssm, causal_conv1d) would replace the torch path; on CPU they cannot
    # run, and here they are not installed: the reference is the pure-torch path.
    assert importlib.util.find_spec("mamba_ssm") is None and importlib.util.find_spec("causal_conv1d") is None
    ours = cfg.build(context(d_model))
    perturb_vectors(ours)
    heads = ours.heads
    hf_cfg = HFMamba2Config(
        hidden_size=d_model, expand=cfg.expand, num_heads=heads.n_heads, head_dim=cfg.head_dim,
        state_size=cfg.d_state, n_groups=cfg.n_groups, conv_kernel=cfg.d_conv, chunk_size=cfg.chunk_size,
        use_conv_bias=cfg.conv_bias, use_bias=cfg.proj_bias, layer_norm_epsilon=1e-5,
        num_hidden_layers=1, vocab_size=16,
    )
    hf = hf_mamba2.Mamba2Mixer(hf_cfg, layer_idx=0).eval()
    with torch.no_grad():
        for name, theirs in [
            ("in_proj", hf.in_proj), ("conv1d", hf.conv1d), ("norm", hf.norm),
        ]:
            for pname, p in theirs.named_parameters():
                p.copy_(getattr(getattr(heads, name), pname))
        for name in ("dt_bias", "A_log", "D"):
            getattr(hf, name).copy_(getattr(heads, name))
        for pname, p in hf.out_proj.named_parameters():
            p.copy_(getattr(ours.out_proj, pname))
    return ours, hf, hf_cfg


HF_CASES = [
    pytest.param(Mamba2Config(head_dim=8, d_state=16, n_groups=2, chunk_size=8), id="groups2-chunk8-padded"),
    pytest.param(Mamba2Config(head_dim=16, d_state=8, chunk_size=64), id="one-chunk"),
    pytest.param(
        Mamba2Config(expand=1, head_dim=4, d_state=4, n_groups=4, d_conv=3, conv_bias=False, proj_bias=True,
                     chunk_size=5),
        id="expand1-groups4-bias",
    ),
]


@pytest.mark.parametrize("cfg", HF_CASES)
def test_mamba2_matches_transformers_mixer(cfg):
    ours, hf, _ = hf_pair(cfg)
    x = torch.randn(2, 21, 32)
    with torch.no_grad():
        expected = hf(x)
        got = ours(x)[0]
    assert expected.abs().max() > 0.1  # the comparison is about numbers, not zeros
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", HF_CASES[:2])
def test_mamba2_cached_decoding_matches_transformers(cfg):
    from transformers.cache_utils import DynamicCache

    ours, hf, hf_cfg = hf_pair(cfg)
    x = torch.randn(2, 19, 32)
    hf_cache, our_cache = DynamicCache(config=hf_cfg), ours.init_cache(2, "cpu", torch.float32)
    with torch.no_grad():
        # prefill 13 tokens (the chunked form from an empty state), then one token at a time (the step)
        expected = [hf(x[:, :13], cache_params=hf_cache)]
        got = [ours(x[:, :13], our_cache)[0]]
        for t in range(13, 19):
            expected.append(hf(x[:, t : t + 1], cache_params=hf_cache))
            got.append(ours(x[:, t : t + 1], our_cache)[0])
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(expected, 1), rtol=1e-5, atol=1e-5)
    # Same states: transformers keeps the SSM state as (B, H, P, N) and the conv window as d_conv columns.
    hf_state = hf_cache.get_recurrent_state(0, state_idx=0)
    hf_conv = hf_cache.get_conv_state(0, state_idx=0)
    torch.testing.assert_close(our_cache.ssm, hf_state.transpose(-1, -2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_cache.conv, hf_conv[:, :, 1:], rtol=0, atol=0)


# -------------------------------------------------------------------- fla's naive simple-GLA reference


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_ssd_core_is_simple_gla(chunk_size):
    """SSD with (x, dt, A, B, C) is simple GLA with q = C, k = B, v = dt x, log-gate dt A, scale 1."""
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    b, T, H, P, G, N = 2, 23, 6, 5, 3, 4
    x, B, C = torch.randn(b, T, H, P), torch.randn(b, T, G, N), torch.randn(b, T, G, N)
    dt = torch.nn.functional.softplus(torch.randn(b, T, H))
    A = -torch.rand(H) * 2 - 0.1
    state0 = torch.randn(b, H, N, P)
    R = H // G
    q, k = C.repeat_interleave(R, dim=2), B.repeat_interleave(R, dim=2)
    expected, expected_state = naive_recurrent_simple_gla(
        q, k, x * dt[..., None], dt * A, scale=1.0, initial_state=state0.clone(), output_final_state=True
    )
    y, state = ssd_chunked(x, dt, A, B, C, chunk_size, state0)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, expected_state, rtol=1e-4, atol=1e-4)
    # the recurrent step, token by token, is the same recurrence
    S, steps = state0, []
    for t in range(T):
        y_t, S = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], S)
        steps.append(y_t)
    torch.testing.assert_close(torch.stack(steps, 1), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk_size,rate", [(4, 1.0), (64, 1.0), (8, 60.0)])
def test_ssd_core_gradients_match_simple_gla(chunk_size, rate):
    """Every input's gradient (x, dt, A, B, C, the initial state) equals the naive simple-GLA
    recurrence's; rate 60 makes each token's decay exp(-dt * 60) tiny, so that the segment sums above a
    chunk's diagonal would overflow exp if they were not masked (the gradients must stay finite)."""
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    b, T, H, P, G, N = 2, 19, 4, 3, 2, 5
    torch.manual_seed(1)
    leaves = {
        "x": torch.randn(b, T, H, P), "dt": torch.nn.functional.softplus(torch.randn(b, T, H)),
        "A": -(torch.rand(H) + 0.1) * rate, "B": torch.randn(b, T, G, N), "C": torch.randn(b, T, G, N),
        "state": torch.randn(b, H, N, P),
    }
    weights = torch.randn(b, T, H, P), torch.randn(b, H, N, P)  # a loss that weights every output

    def grads(fn):
        inputs = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        y, final = fn(**inputs)
        ((y * weights[0]).sum() + (final * weights[1]).sum()).backward()
        return {k: v.grad for k, v in inputs.items()}

    def reference(x, dt, A, B, C, state):
        R = H // G
        return naive_recurrent_simple_gla(
            C.repeat_interleave(R, dim=2), B.repeat_interleave(R, dim=2), x * dt[..., None], dt * A, scale=1.0,
            initial_state=state, output_final_state=True,
        )

    ours = grads(lambda x, dt, A, B, C, state: ssd_chunked(x, dt, A, B, C, chunk_size, state))
    expected = grads(reference)
    for name in leaves:
        assert torch.isfinite(ours[name]).all(), name
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-4, msg=name)


# ----------------------------------------------------------------------------------------------- Hymba


def test_hymba_fuses_normalised_attention_and_ssm_heads():
    """Hymba == out_proj((β1 ⊙ rmsnorm(attention heads) + gated-rmsnorm(SSM heads)) / 2), each branch
    rebuilt here from its own module with the same weights (expand=1 so that a plain Attention with an
    identity output projection yields the heads' output)."""
    ctx = context(32, RoPEConfig(theta=100.0), eps=1e-6)
    hymba = HymbaConfig(expand=1, attn_heads=4, attn_kv_heads=2, head_dim=8, d_state=8, chunk_size=4).build(ctx)
    perturb_vectors(hymba)
    attn = AttentionConfig(n_heads=4, n_kv_heads=2).build(ctx)
    mamba = Mamba2Config(expand=1, head_dim=8, d_state=8, chunk_size=4).build(ctx)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(attn, name).weight.copy_(getattr(hymba.attn, name).weight)
        attn.o_proj.weight.copy_(torch.eye(32))
        mamba.heads.load_state_dict(hymba.ssm.state_dict())
        mamba.out_proj.weight.copy_(torch.eye(32))
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        a = attn(x)[0]
        a = torch.nn.functional.rms_norm(a, (32,), eps=1e-6) * hymba.attn_norm.weight
        expected = hymba.out_proj((a + mamba(x)[0]) / 2)
        got = hymba(x)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_hymba_attention_widths_are_the_released_blocks():
    """As in the released HymbaBlock: queries and keys d_model wide, values d_inner = expand * d_model wide
    (so the attention output matches the SSM's), keys/values grouped. The attention branch is checked
    against softmax(q k^T / sqrt(d_qk) + causal mask) v written out here, with the key/value heads
    repeated per group and no positional encoding."""
    d, T = 32, 11
    hymba = HymbaConfig(attn_heads=4, attn_kv_heads=2, head_dim=8, d_state=8, chunk_size=4).build(context(d))
    attn = hymba.attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (32, 16, 32)
    assert (attn.head_dim, attn.v_head_dim) == (8, 16)
    x = torch.randn(2, T, d)
    with torch.no_grad():
        q = attn.q_proj(x).view(2, T, 4, 8).transpose(1, 2)
        k = attn.k_proj(x).view(2, T, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
        v = attn.v_proj(x).view(2, T, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
        logits = (q @ k.transpose(-1, -2)) / 8**0.5
        logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        expected = (torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(2, T, 64)  # (B, T, d_inner)
        torch.testing.assert_close(attn(x)[0], expected, rtol=1e-5, atol=1e-5)
    # FLOPs and the cache follow the widths: QK^T over 8 channels and PV over 16 per head
    mean_keys = (T + 1) / 2
    assert attn.score_flops(T) == 2 * 4 * (8 + 16) * mean_keys
    assert attn.state_bytes(T, torch.float32) == 2 * (8 + 16) * T * 4
    # the defaults: Hymba-1.5B's 64 query/key channels per head at d_model 256, GQA
    default = HymbaConfig().build(context(256)).attn
    assert (default.n_heads, default.n_kv_heads, default.head_dim, default.v_head_dim) == (4, 1, 64, 128)


def test_hymba_state_is_kv_cache_plus_ssm_state():
    ctx = context(32, RoPEConfig(theta=100.0))
    hymba = HymbaConfig(window=8).build(ctx)
    ssm_only = Mamba2Config(d_state=16).build(ctx).state_bytes(1000, torch.float32)
    # per token: 1 key/value head (the default), keys of d_model / 4 = 8 and values of d_inner / 4 = 16 channels
    kv = 1 * (8 + 16) * 4
    assert hymba.state_bytes(5, torch.float32) == ssm_only + 5 * kv
    assert hymba.state_bytes(1000, torch.float32) == ssm_only + 8 * kv  # the window bounds the KV cache


# -------------------------------------------------------------------------------------- config, paths


def test_mamba2_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"mixer\.head_dim: head_dim=24 does not divide d_inner"):
        af.load_model_config("mamba2-hybrid-tiny", ["mixer.head_dim=24"])
    with pytest.raises(ConfigError, match=r"mixer\.n_groups: .*choose one of \[1, 2, 4, 8\]"):
        af.load_model_config("mamba2-hybrid-tiny", ["mixer.n_groups=3"])
    # Hymba's messages use its own field names and list every head count that divides d_model (128)
    with pytest.raises(ConfigError, match=r"mixer\.attn_heads: attn_heads=3 does not divide d_model=128 .*"
                                          r"choose one of \[1, 2, 4, 8, 16, 32, 64, 128\]"):
        af.load_model_config("hymba-tiny", ["mixer.attn_heads=3"])
    with pytest.raises(ConfigError, match=r"mixer\.attn_kv_heads: attn_kv_heads=3 does not divide attn_heads=4"):
        af.load_model_config("hymba-tiny", ["mixer.attn_kv_heads=3"])


def test_mamba2_costs_and_kernel_path():
    ctx = context(128)
    m = Mamba2Config().build(ctx)  # d_inner 256: 8 heads of 32, state 64, conv over 256 + 2 * 64 channels
    assert m.state_bytes(1, torch.float32) == m.state_bytes(4096, torch.float32) == (384 * 3 + 8 * 64 * 32) * 4
    # linear time: beyond one chunk the per-token cost stops growing (attention's keeps growing)
    assert m.flops_per_token(8) < m.flops_per_token(64) == m.flops_per_token(4096)
    projections = 2 * 128 * (256 + 384 + 8) + 2 * 256 * 128
    assert projections < m.flops_per_token(64) < 2 * projections
    assert m.kernel_path() == "torch.chunk"
    fla_only = Mamba2Config(backend="fla").build(ctx)
    with pytest.raises(RuntimeError, match="backend='fla' needs a CUDA device"):
        fla_only(torch.randn(1, 4, 128))


# ---------------------------------------------------------------------------------------------- presets

PRESETS = ["mamba2-hybrid-tiny", "hymba-tiny"]


@pytest.mark.parametrize("name", PRESETS)
def test_hybrid_preset_trains(name):
    model = af.CausalLM.from_config(name)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    losses = []
    for _ in range(4):
        out = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert abs(losses[0] - torch.log(torch.tensor(2048.0)).item()) < 0.5  # ~uniform at init
    assert losses[-1] < losses[0] - 0.05, losses  # it learns the batch


@pytest.mark.parametrize("name", PRESETS)
def test_hybrid_preset_cached_generation_equals_full_forward(name):
    model = af.CausalLM.from_config(name).eval()
    # a prompt longer than hymba-tiny's window (64) and mamba2's chunk (64), then token-by-token decoding
    prompt = torch.randint(0, model.config.vocab_size, (2, 70))
    out = model.generate(prompt, max_new_tokens=6, temperature=0.0)
    with torch.no_grad():
        full = model(out[:, :-1]).logits  # (2, 75, V)
    # greedy decoding picked the argmax of the full forward at every generated position
    assert torch.equal(full[:, 69:].argmax(-1), out[:, 70:])
    # and the cached logits are the full forward's
    cache = model.init_cache(2)
    with torch.no_grad():
        steps = [model(out[:, :70], cache=cache).logits]
        steps += [model(out[:, t : t + 1], cache=cache).logits for t in range(70, 75)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
