"""Positional encodings against references outside this package: transformers' RoPE initialisers and
``apply_rotary_pos_emb`` (Llama), Bloom's ALiBi tensor, and the closed forms of the papers."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from archifactory.model.config import ModelConfig
from archifactory.model.lm import CausalLM
from archifactory.nn.positions import (
    ALiBi,
    ALiBiConfig,
    LearnedPositionConfig,
    RoPEConfig,
    RopeScaling,
    Rotary,
    SinusoidalPositionConfig,
    alibi_slopes,
    rope_inv_freq,
    sinusoidal_table,
)

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.bloom.modeling_bloom import build_alibi_tensor  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402


def hf_config(head_dim: int, rope_parameters: dict, max_position_embeddings: int = 64) -> LlamaConfig:
    n_heads = 2
    return LlamaConfig(
        hidden_size=head_dim * n_heads,
        num_attention_heads=n_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=rope_parameters,
    )


# --------------------------------------------------------------------------------- RoPE frequencies


@pytest.mark.parametrize("head_dim", [8, 16, 64])
@pytest.mark.parametrize("theta", [10000.0, 500000.0, 37.5])
def test_default_inv_freq_matches_llama(head_dim, theta):
    config = hf_config(head_dim, {"rope_type": "default", "rope_theta": theta})
    ref, ref_factor = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    ours, factor = rope_inv_freq(head_dim, theta, None)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    assert factor == ref_factor == 1.0


@pytest.mark.parametrize("head_dim", [8, 32])
@pytest.mark.parametrize("factor", [1.0, 2.0, 8.0, 2.5])
def test_linear_inv_freq_matches_hf(head_dim, factor):
    theta = 10000.0
    config = hf_config(head_dim, {"rope_type": "linear", "rope_theta": theta, "factor": factor})
    ref, ref_factor = ROPE_INIT_FUNCTIONS["linear"](config)
    ours, attn = rope_inv_freq(head_dim, theta, RopeScaling(type="linear", factor=factor))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    assert attn == ref_factor == 1.0


def test_partial_rotary_inv_freq_matches_hf_partial_rotary_factor():
    head_dim, theta = 16, 500.0
    config = hf_config(
        head_dim, {"rope_type": "linear", "rope_theta": theta, "factor": 2.0, "partial_rotary_factor": 0.5}
    )
    ref, _ = ROPE_INIT_FUNCTIONS["linear"](config)
    rotary = RoPEConfig(theta=theta, fraction=0.5, scaling={"type": "linear", "factor": 2.0}).build_relative(head_dim, 2)
    assert rotary.rot_dim == 8
    torch.testing.assert_close(rotary.inv_freq, ref, rtol=1e-6, atol=0)


YARN_CASES = [
    # head_dim, theta, factor, original_max, beta_fast, beta_slow, attention_factor
    (16, 10000.0, 4.0, 64, 32.0, 1.0, None),
    (64, 10000.0, 8.0, 4096, 32.0, 1.0, None),
    (64, 500000.0, 16.0, 8192, 32.0, 1.0, None),
    (32, 10000.0, 2.0, 256, 16.0, 2.0, None),
    (32, 10000.0, 4.0, 256, 32.0, 1.0, 1.25),
    (16, 10000.0, 4.0, 4, 32.0, 1.0, None),  # tiny context: the correction range collapses (clamped)
    (128, 1e6, 32.0, 32768, 32.0, 1.0, None),
]


@pytest.mark.parametrize("head_dim,theta,factor,original,beta_fast,beta_slow,attention_factor", YARN_CASES)
def test_yarn_inv_freq_and_attention_factor_match_hf(
    head_dim, theta, factor, original, beta_fast, beta_slow, attention_factor
):
    params = {
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": factor,
        "original_max_position_embeddings": original,
        "beta_fast": beta_fast,
        "beta_slow": beta_slow,
    }
    if attention_factor is not None:
        params["attention_factor"] = attention_factor
    config = hf_config(head_dim, params, max_position_embeddings=int(original * factor))
    ref, ref_attn = ROPE_INIT_FUNCTIONS["yarn"](config)
    scaling = RopeScaling(
        type="yarn",
        factor=factor,
        original_max_seq_len=original,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
        attention_factor=attention_factor,
    )
    ours, attn = rope_inv_freq(head_dim, theta, scaling)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    assert attn == pytest.approx(ref_attn, rel=1e-12)
    if attention_factor is None:  # YaRN paper, Eq. (22): sqrt(1/t) = 0.1 ln(s) + 1
        assert attn == pytest.approx(0.1 * math.log(factor) + 1.0)


@pytest.mark.parametrize("head_dim", [8, 16, 64])
@pytest.mark.parametrize("factor", [2.0, 4.0, 8.0])
def test_ntk_inv_freq_closed_form_and_hf_dynamic(head_dim, factor):
    theta = 10000.0
    ours, attn = rope_inv_freq(head_dim, theta, RopeScaling(type="ntk", factor=factor))
    assert attn == 1.0
    # bloc97's NTK-aware base: theta * factor^(d / (d - 2)); frequencies theta'^(-2i/d)
    base = theta * factor ** (head_dim / (head_dim - 2))
    closed = torch.tensor([base ** (-2 * i / head_dim) for i in range(head_dim // 2)], dtype=torch.float64)
    torch.testing.assert_close(ours.double(), closed, rtol=2e-6, atol=0)
    # HF's dynamic NTK uses factor' = factor * L / L_max - (factor - 1), which equals factor at
    # L = L_max * (2 - 1 / factor).
    max_pos = 64
    seq_len = max_pos * (2 - 1 / factor)
    assert seq_len == int(seq_len)
    config = hf_config(head_dim, {"rope_type": "dynamic", "rope_theta": theta, "factor": factor}, max_pos)
    ref, ref_attn = ROPE_INIT_FUNCTIONS["dynamic"](config, seq_len=int(seq_len))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    assert ref_attn == 1.0
    # and differs from it elsewhere (the comparison can fail)
    other, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, seq_len=int(seq_len) + 16)
    assert not torch.allclose(ours, other, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "head_dim,theta,factor,low,high,original",
    [(128, 500000.0, 8.0, 1.0, 4.0, 8192), (64, 10000.0, 4.0, 1.0, 4.0, 256), (32, 500.0, 16.0, 2.0, 8.0, 64)],
)
def test_llama3_inv_freq_matches_hf_and_meta_reference(head_dim, theta, factor, low, high, original):
    params = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low,
              "high_freq_factor": high, "original_max_position_embeddings": original}
    ref, ref_attn = ROPE_INIT_FUNCTIONS["llama3"](hf_config(head_dim, params, max_position_embeddings=4 * original))
    scaling = RopeScaling(type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                          original_max_seq_len=original)
    ours, attn = rope_inv_freq(head_dim, theta, scaling)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    assert attn == ref_attn == 1.0
    # Meta's apply_scaling, written out per frequency in float64 (llama-models, llama3_1 reference)
    for i in range(head_dim // 2):
        freq = theta ** (-2 * i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            expected = freq
        elif wavelen > original / low:
            expected = freq / factor
        else:
            smooth = (original / wavelen - low) / (high - low)
            expected = (1 - smooth) * freq / factor + smooth * freq
        assert ours[i].item() == pytest.approx(expected, rel=2e-6)
    assert (ours < rope_inv_freq(head_dim, theta, None)[0]).any()  # some band really is interpolated


@pytest.mark.parametrize("head_dim,factor", [(16, 2.0), (64, 8.0)])
@pytest.mark.parametrize("length", [1, 20, 32, 33, 100])
def test_dynamic_ntk_frequencies_match_hf_at_every_length(head_dim, factor, length):
    theta, trained = 10000.0, 32
    config = hf_config(head_dim, {"rope_type": "dynamic", "rope_theta": theta, "factor": factor}, trained)
    ref, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, seq_len=length)
    scaling = RopeScaling(type="dynamic", factor=factor, original_max_seq_len=trained)
    rotary = RoPEConfig(theta=theta, scaling=scaling).build_relative(head_dim, 2)
    ours = rotary.dynamic_inv_freq(torch.arange(max(0, length - 5), length))  # the largest position counts
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    plain = rope_inv_freq(head_dim, theta, None)[0]
    assert torch.equal(rotary.inv_freq, plain)
    assert torch.allclose(ours, plain, rtol=1e-6) == (length <= trained)


def test_rope_scaling_validation():
    with pytest.raises(ValueError, match="factor"):
        RopeScaling(type="linear", factor=0.5)
    for kind in ("yarn", "llama3", "dynamic"):
        with pytest.raises(ValueError, match="original_max_seq_len"):
            RopeScaling(type=kind, factor=4.0)
    with pytest.raises(ValueError, match="high_freq_factor"):
        RopeScaling(type="llama3", factor=4.0, original_max_seq_len=64, low_freq_factor=4.0, high_freq_factor=1.0)
    with pytest.raises(ValueError, match="fraction"):
        RoPEConfig(fraction=0.0)
    with pytest.raises(ValueError, match="even"):
        RoPEConfig(fraction=0.25).check_head_dim(12)  # int(12 * 0.25) = 3


# ---------------------------------------------------------------------------------- RoPE application


def hf_rotary(head_dim: int, rope_parameters: dict, positions: torch.Tensor, dtype=torch.float32, max_pos: int = 64):
    emb = LlamaRotaryEmbedding(hf_config(head_dim, rope_parameters, max_pos))
    x = torch.zeros(1, dtype=dtype)
    return emb(x, positions[None])


SCALINGS = [
    (None, {"rope_type": "default"}),
    ({"type": "linear", "factor": 4.0}, {"rope_type": "linear", "factor": 4.0}),
    (
        {"type": "yarn", "factor": 4.0, "original_max_seq_len": 32},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    ),
]


@pytest.mark.parametrize("ours_scaling,hf_params", SCALINGS, ids=["default", "linear", "yarn"])
@pytest.mark.parametrize("start", [0, 7])
def test_rotary_matches_hf_apply_rotary_pos_emb(ours_scaling, hf_params, start):
    torch.manual_seed(0)
    B, H, T, hd, theta = 2, 3, 11, 16, 10000.0
    positions = torch.arange(start, start + T)
    q, k = torch.randn(B, H, T, hd), torch.randn(B, H, T, hd)
    rotary = RoPEConfig(theta=theta, scaling=ours_scaling).build_relative(hd, H)
    ours_q, ours_k = rotary(q, k, positions)
    cos, sin = hf_rotary(hd, {**hf_params, "rope_theta": theta}, positions, max_pos=128)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(ours_q, ref_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_k, ref_k, rtol=1e-5, atol=1e-6)
    # the rotation actually changes the input (except at position 0)
    assert not torch.allclose(ours_q[:, :, 1:], q[:, :, 1:])


def test_rotary_matches_closed_form_rotation():
    """Su et al. 2021: channel pair (i, i + d/2) rotates by the angle p * theta^(-2i/d)."""
    torch.manual_seed(1)
    hd, theta = 8, 100.0
    rotary = Rotary(hd, hd, theta, None)
    x = torch.randn(1, 1, 5, hd, dtype=torch.float64)
    positions = torch.tensor([0, 1, 3, 10, 42])
    out, _ = rotary(x, x, positions)
    half = hd // 2
    for t, p in enumerate(positions.tolist()):
        for i in range(half):
            angle = p * theta ** (-2 * i / hd)
            a, b = x[0, 0, t, i].item(), x[0, 0, t, i + half].item()
            assert out[0, 0, t, i].item() == pytest.approx(a * math.cos(angle) - b * math.sin(angle), abs=1e-5)
            assert out[0, 0, t, i + half].item() == pytest.approx(b * math.cos(angle) + a * math.sin(angle), abs=1e-5)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rotary_relative_position_property(fraction):
    torch.manual_seed(2)
    hd = 16
    rotary = RoPEConfig(theta=10000.0, fraction=fraction).build_relative(hd, 1)
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def score(m: int, n: int) -> float:
        rq, _ = rotary(q, q, torch.tensor([m]))
        _, rk = rotary(k, k, torch.tensor([n]))
        return float((rq * rk).sum())

    for m, n in [(3, 0), (5, 5), (0, 9), (17, 4)]:
        for shift in (1, 13, 250):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
    # it depends on the offset m - n (otherwise the test above would be vacuous)
    assert abs(score(3, 0) - score(7, 0)) > 1e-3


def test_partial_rotary_keeps_tail_and_rotates_head_like_full_rope():
    torch.manual_seed(3)
    B, H, T, hd, theta = 2, 2, 6, 16, 10000.0
    rotary = RoPEConfig(theta=theta, fraction=0.5).build_relative(hd, H)
    assert rotary.rot_dim == 8
    q, k = torch.randn(B, H, T, hd), torch.randn(B, H, T, hd)
    positions = torch.arange(3, 3 + T)
    out_q, out_k = rotary(q, k, positions)
    # last channels untouched, bit for bit
    assert torch.equal(out_q[..., 8:], q[..., 8:])
    assert torch.equal(out_k[..., 8:], k[..., 8:])
    # first channels: full RoPE on a head of 8 channels, per transformers
    cos, sin = hf_rotary(8, {"rope_type": "default", "rope_theta": theta}, positions)
    ref_q, ref_k = apply_rotary_pos_emb(q[..., :8], k[..., :8], cos, sin)
    torch.testing.assert_close(out_q[..., :8], ref_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_k[..., :8], ref_k, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out_q[..., :8], q[..., :8])


def test_rotary_in_bf16_stays_close_to_fp32_reference():
    torch.manual_seed(4)
    rotary = Rotary(16, 16, 10000.0, None)
    q = torch.randn(1, 2, 9, 16)
    positions = torch.arange(100, 109)
    ref, _ = rotary(q, q, positions)
    low, _ = rotary(q.bfloat16(), q.bfloat16(), positions)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------------------------- ALiBi


@pytest.mark.parametrize("n_heads", list(range(1, 17)))
def test_alibi_slopes_match_bloom(n_heads):
    L = 6
    alibi = build_alibi_tensor(torch.ones(1, L, dtype=torch.long), n_heads, torch.float32)  # (H, 1, L)
    # Bloom's bias is slope_h * j for key j; slope = value at j = 1
    ref = alibi[:, 0, 1]
    torch.testing.assert_close(alibi_slopes(n_heads).float(), ref, rtol=1e-6, atol=0)
    # consistency of the derivation: the row is linear in j
    torch.testing.assert_close(alibi[:, 0, :], ref[:, None] * torch.arange(L).float(), rtol=1e-6, atol=0)


def test_alibi_slopes_paper_closed_form_power_of_two():
    # Press et al. 2022: for 8 heads the slopes are 1/2, 1/4, ..., 1/256
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))


@pytest.mark.parametrize("n_heads", [3, 4, 6])
def test_alibi_bias_is_minus_slope_times_distance_and_softmax_matches_bloom(n_heads):
    T = 7
    alibi = ALiBiConfig().build_relative(16, n_heads)
    assert isinstance(alibi, ALiBi)
    pos = torch.arange(T)
    bias = alibi.bias(pos, pos)  # (H, T, T)
    bloom = build_alibi_tensor(torch.ones(1, T, dtype=torch.long), n_heads, torch.float32)[:, 0]  # (H, T)
    slopes = bloom[:, 1]
    for h in range(n_heads):
        for i in range(T):
            for j in range(T):
                assert bias[h, i, j].item() == pytest.approx(-slopes[h].item() * (i - j), rel=1e-6, abs=1e-7)
    # Bloom adds slope * j and relies on softmax being shift invariant per row: the causal softmax is the same
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    ours = bias.masked_fill(~causal, float("-inf")).softmax(-1)
    ref = bloom[:, None, :].expand(n_heads, T, T).masked_fill(~causal, float("-inf")).softmax(-1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_alibi_bias_with_cache_offsets():
    alibi = ALiBi(2)
    q_pos, k_pos = torch.tensor([10, 11]), torch.arange(0, 12)
    bias = alibi.bias(q_pos, k_pos)
    slopes = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), 2, torch.float32)[:, 0, 1]
    expected = -slopes[:, None, None] * (q_pos[:, None] - k_pos[None, :]).float()
    torch.testing.assert_close(bias, expected)


# ---------------------------------------------------------------------------------------- sinusoidal


@pytest.mark.parametrize("d_model", [8, 12, 5])
@pytest.mark.parametrize("base", [10000.0, 100.0])
def test_sinusoidal_table_matches_vaswani_closed_form(d_model, base):
    n = 40
    table = sinusoidal_table(n, d_model, base)
    assert table.shape == (n, d_model)
    for p in range(n):
        for c in range(d_model):
            i = c // 2
            angle = p / base ** (2 * i / d_model)
            expected = math.sin(angle) if c % 2 == 0 else math.cos(angle)
            assert table[p, c].item() == pytest.approx(expected, abs=1e-6)


def test_sinusoidal_model_adds_table_and_rejects_out_of_range():
    config = ModelConfig(
        vocab_size=16, d_model=8, n_layers=1, max_seq_len=6, mixer={"kind": "attention", "n_heads": 2},
        position=SinusoidalPositionConfig(), ffn={"kind": "mlp", "hidden": 16},
    )
    model = CausalLM(config)
    positions = torch.arange(6)
    torch.testing.assert_close(model.pos_embed(positions), sinusoidal_table(6, 8))
    with pytest.raises(ValueError, match="max_seq_len=6"):
        model(torch.zeros(1, 7, dtype=torch.long))


# ------------------------------------------------------------------------------------------- learned


def learned_model(max_seq_len: int = 8) -> CausalLM:
    config = ModelConfig(
        vocab_size=16, d_model=8, n_layers=1, max_seq_len=max_seq_len,
        mixer={"kind": "attention", "n_heads": 2}, position=LearnedPositionConfig(),
        ffn={"kind": "mlp", "hidden": 16},
    )
    return CausalLM(config)


def test_learned_positions_raise_past_max_seq_len():
    torch.manual_seed(5)
    model = learned_model(8)
    out = model(torch.zeros(1, 8, dtype=torch.long))  # exactly max_seq_len is fine
    assert torch.isfinite(out.logits).all()
    with pytest.raises(ValueError, match=r"position 8 is beyond .*max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    # also when the overflow comes from a cache offset
    cache = model.init_cache(1)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model.generate([1, 2, 3], max_new_tokens=6)


def test_learned_positions_are_the_table_rows():
    torch.manual_seed(6)
    model = learned_model(8)
    positions = torch.tensor([0, 3, 7])
    assert torch.equal(model.pos_embed(positions), model.pos_embed.weight[positions])


def test_absolute_positions_trace_without_graph_breaks():
    """The range check uses Python ints: no ``positions.max()`` read, so no device sync per step and no
    graph break under torch.compile (which cost gpt2-124m's compiled training on a GPU a split graph)."""
    torch.manual_seed(7)
    model = learned_model(8)
    ids = torch.zeros(1, 8, dtype=torch.long)
    traced = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    torch.testing.assert_close(traced(ids).logits, model(ids).logits)
