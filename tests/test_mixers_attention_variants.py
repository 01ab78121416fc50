"""Differential attention and dilated attention against outside references (the mixer contract covers
causality, cached == full forward, state bytes and gradients).

- Differential attention: a re-statement of the official ``multihead_diffattn.py`` (microsoft/unilm,
  Diff-Transformer; explicit softmax maps, ``repeat_kv``, the ``(B, H, 2, T, S)`` split, sub-layer RMSNorm
  and ``1 - lambda_init`` scaling) run on copied weights, and the paper's lambda_init schedule.
- Dilated attention: LongNet's definition (arXiv:2307.02486 eq. 5-10) computed pattern by pattern, head
  by head with Python sets of positions, and the special cases that reduce to plain causal attention.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from archifactory.config import BuildContext
from archifactory.mixers.diff_attention import DiffAttentionConfig, lambda_init_for_layer
from archifactory.mixers.dilated_attention import DilatedAttentionConfig
from archifactory.nn.init import InitConfig
from archifactory.nn.norms import RMSNormConfig
from archifactory.nn.positions import ALiBiConfig, NoPositionConfig, alibi_slopes

D = 32


def context(layer_idx=0, position=None):
    return BuildContext(
        d_model=D, n_layers=4, layer_idx=layer_idx, max_seq_len=64, norm=RMSNormConfig(),
        position=position or NoPositionConfig(), init=InitConfig(std=0.2),
    )


# ----------------------------------------------------------------------------------- differential


def official_diff_attention(x, q_w, k_w, v_w, o_w, lq1, lk1, lq2, lk2, subln_w, n_heads, n_kv_heads, lambda_init):
    """The forward of microsoft/unilm Diff-Transformer/multihead_diffattn.py (no rotary), restated."""
    bsz, tgt_len, _ = x.shape
    head_dim = q_w.shape[0] // n_heads // 2
    n_rep = n_heads // n_kv_heads
    q = (x @ q_w.T).view(bsz, tgt_len, 2 * n_heads, head_dim).transpose(1, 2)
    k = (x @ k_w.T).view(bsz, tgt_len, 2 * n_kv_heads, head_dim).transpose(1, 2)
    v = (x @ v_w.T).view(bsz, tgt_len, n_kv_heads, 2 * head_dim).transpose(1, 2)

    def repeat_kv(t):
        b, h, s, d = t.shape
        return t[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)

    k, v = repeat_kv(k), repeat_kv(v)
    weights = (q * head_dim**-0.5) @ k.transpose(-1, -2)
    weights = weights + torch.triu(torch.full((tgt_len, tgt_len), float("-inf"), dtype=x.dtype), 1)
    weights = F.softmax(weights, dim=-1)
    lam = torch.exp((lq1 * lk1).sum()) - torch.exp((lq2 * lk2).sum()) + lambda_init
    weights = weights.view(bsz, n_heads, 2, tgt_len, tgt_len)
    weights = weights[:, :, 0] - lam * weights[:, :, 1]
    attn = weights @ v  # (B, H, T, 2d)
    attn = attn * torch.rsqrt(attn.pow(2).mean(-1, keepdim=True) + 1e-5) * subln_w
    attn = attn * (1 - lambda_init)
    return attn.transpose(1, 2).reshape(bsz, tgt_len, -1) @ o_w.T


@pytest.mark.parametrize(("n_heads", "n_kv_heads", "layer_idx"), [(2, None, 0), (4, 2, 3), (4, 1, 1)])
def test_diff_attention_matches_official_formulation(n_heads, n_kv_heads, layer_idx):
    torch.manual_seed(0)
    cfg = DiffAttentionConfig(n_heads=n_heads, n_kv_heads=n_kv_heads)
    m = cfg.build(context(layer_idx)).double()
    with torch.no_grad():
        m.head_norm.weight.add_(0.3 * torch.randn_like(m.head_norm.weight))
    x = torch.randn(2, 9, D, dtype=torch.float64)
    ref = official_diff_attention(
        x, m.q_proj.weight, m.k_proj.weight, m.v_proj.weight, m.o_proj.weight, m.lambda_q1, m.lambda_k1,
        m.lambda_q2, m.lambda_k2, m.head_norm.weight, n_heads, n_kv_heads or n_heads, lambda_init_for_layer(layer_idx),
    )
    torch.testing.assert_close(m(x)[0], ref, rtol=1e-10, atol=1e-10)


def test_diff_attention_lambda_init_schedule():
    # Ye et al. 2024 sec. 2.1: 0.8 - 0.6 exp(-0.3 (l - 1)) for l = 1..L, i.e. 0.2 at the first layer
    assert lambda_init_for_layer(0) == pytest.approx(0.2)
    assert lambda_init_for_layer(1) == pytest.approx(0.8 - 0.6 * math.exp(-0.3))
    assert lambda_init_for_layer(1000) == pytest.approx(0.8)
    m = DiffAttentionConfig(n_heads=2).build(context(layer_idx=2))
    assert m.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.6))
    assert DiffAttentionConfig(n_heads=2, lambda_init=0.5).build(context(2)).lambda_init == 0.5


def test_diff_attention_with_equal_maps_is_scaled_attention():
    """Hand computation: when both halves of every query/key are equal, both maps are the same softmax A
    and the head output is norm((1 - lambda) A V) (1 - lambda_init); with lambda = lambda_init and a
    unit gain that is sign(1 - lambda) * norm(A V) * (1 - lambda_init)."""
    torch.manual_seed(1)
    m = DiffAttentionConfig(n_heads=2).build(context(layer_idx=0)).double()
    hd = m.head_dim
    with torch.no_grad():
        for proj in (m.q_proj, m.k_proj):  # rows of half 1 of each head copy half 0
            w = proj.weight.view(-1, 2, hd, D)
            w[:, 1] = w[:, 0]
        m.lambda_q1.zero_(), m.lambda_q2.zero_()  # exp(0) - exp(0) = 0: lambda = lambda_init
    x = torch.randn(1, 6, D, dtype=torch.float64)
    q = (x @ m.q_proj.weight.T).view(1, 6, 4, hd)[:, :, 0::2].transpose(1, 2)
    k = (x @ m.k_proj.weight.T).view(1, 6, 4, hd)[:, :, 0::2].transpose(1, 2)
    v = (x @ m.v_proj.weight.T).view(1, 6, 2, 2 * hd).transpose(1, 2)
    av = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = F.rms_norm(av, (2 * hd,), eps=1e-5 / (1 - 0.2) ** 2) * (1 - 0.2)  # norm((1-l) y) = norm(y) up to eps
    expected = expected.transpose(1, 2).reshape(1, 6, -1) @ m.o_proj.weight.T
    torch.testing.assert_close(m(x)[0], expected, rtol=1e-9, atol=1e-9)


def test_diff_attention_rejects_odd_split():
    with pytest.raises(Exception, match="2 \\* n_heads=6 must divide d_model=32"):
        DiffAttentionConfig(n_heads=3).check(context())


# ---------------------------------------------------------------------------------------- dilated


def longnet_reference(q, k, v, patterns, slopes=None):
    """LongNet eq. 5-10 from the definition: per pattern and head, the selected positions of each segment
    attend causally among themselves; pattern outputs are mixed by their softmax denominators."""
    B, H, T, hd = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                num, den = torch.zeros(hd, dtype=q.dtype), torch.zeros((), dtype=q.dtype)
                for w, r in patterns:
                    seg = range((i // w) * w, min((i // w + 1) * w, T))
                    chosen = [j for j in seg if (j - seg.start) % r == h % r]
                    if i not in chosen:
                        continue
                    keys = [j for j in chosen if j <= i]
                    s = torch.stack([q[b, h, i] @ k[b, h, j] / math.sqrt(hd) for j in keys])
                    if slopes is not None:
                        s = s - slopes[h] * torch.tensor([i - j for j in keys], dtype=q.dtype)
                    e = torch.exp(s)
                    den = den + e.sum()  # s_k, the pattern's softmax denominator
                    num = num + (e[:, None] * v[b, h, keys]).sum(0)  # s_k * O_k
                if den > 0:
                    out[b, h, i] = num / den
    return out


@pytest.mark.parametrize(
    ("segments", "rates", "T"),
    [([4, 8], [1, 2], 13), ([2, 4, 8], [1, 2, 4], 16), ([6], [3], 11), ([16], [2], 7)],
)
@pytest.mark.parametrize("alibi", [False, True])
def test_dilated_attention_matches_longnet_definition(segments, rates, T, alibi):
    torch.manual_seed(0)
    pos = ALiBiConfig() if alibi else NoPositionConfig()
    m = DilatedAttentionConfig(n_heads=4, segment_lengths=segments, dilation_rates=rates).build(context(position=pos))
    m = m.double()
    x = torch.randn(2, T, D, dtype=torch.float64)
    q, k, v = (proj(x).view(2, T, 4, 8).transpose(1, 2) for proj in (m.q_proj, m.k_proj, m.v_proj))
    ref = longnet_reference(q, k, v, list(zip(segments, rates)), alibi_slopes(4).double() if alibi else None)
    ref = m.o_proj(ref.transpose(1, 2).reshape(2, T, D))
    torch.testing.assert_close(m(x)[0], ref, rtol=1e-9, atol=1e-9)


def test_dilated_attention_one_dense_segment_is_causal_attention():
    """Closed form: a single pattern with r = 1 and a segment covering the sequence is causal attention;
    with the same pattern listed twice every key counts twice, which leaves the softmax unchanged."""
    torch.manual_seed(0)
    T = 12
    x = torch.randn(2, T, D, dtype=torch.float64)
    for segs, rates in (([16], [1]), ([16, 16], [1, 1])):
        m = DilatedAttentionConfig(n_heads=4, segment_lengths=segs, dilation_rates=rates).build(context()).double()
        q, k, v = (proj(x).view(2, T, 4, 8).transpose(1, 2) for proj in (m.q_proj, m.k_proj, m.v_proj))
        ref = m.o_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, T, D))
        torch.testing.assert_close(m(x)[0], ref, rtol=1e-10, atol=1e-10)


def test_dilated_attention_cache_keeps_only_current_segment():
    m = DilatedAttentionConfig(n_heads=4, segment_lengths=[2, 4], dilation_rates=[1, 2]).build(context()).double()
    cache = m.init_cache(1, "cpu", torch.float64)
    for t in range(1, 10):
        m(torch.randn(1, 1, D, dtype=torch.float64), cache)
        assert cache.k.shape[2] == t % 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"segment_lengths": [4, 8], "dilation_rates": [1]}, "one dilation rate per segment length"),
        ({"segment_lengths": [6], "dilation_rates": [4]}, "does not divide its segment length 6"),
        ({"segment_lengths": [4, 6], "dilation_rates": [1, 2]}, "segment length 4 does not divide the largest"),
    ],
)
def test_dilated_attention_bad_patterns_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DilatedAttentionConfig(**kwargs)
