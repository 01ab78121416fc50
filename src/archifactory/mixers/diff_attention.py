"""Differential attention (Ye et al. 2024, "Differential Transformer", arXiv:2410.05258).

Each head computes two softmax attention maps from two halves of its query and key channels and takes
their difference, cancelling the attention "noise" both maps share (paper eq. 1):

    DiffAttn(X) = (softmax(Q1 K1^T / sqrt(d)) - lambda * softmax(Q2 K2^T / sqrt(d))) V

with ``d = head_dim`` the size of one half, V of ``2 * head_dim`` channels, and the scalar ``lambda``
re-parameterised (eq. 2) as ``exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init``, learnable vectors
``lq1, lk1, lq2, lk2`` of ``head_dim`` channels shared by the heads of a layer, and ``lambda_init =
0.8 - 0.6 * exp(-0.3 * l)`` growing with the layer index ``l`` (0-based, as the official code passes
it; the paper writes ``l - 1`` for 1-based layers). Each head's output is normalised on its own
(``GroupNorm`` in the paper: an RMSNorm over the head's ``2 * head_dim`` channels, eps 1e-5) and scaled
by ``1 - lambda_init`` (eq. 3), then the heads are concatenated and projected.

As in the official ``multihead_diffattn.py`` (microsoft/unilm, Diff-Transformer): ``n_heads`` counts
differential heads, each using two query/key heads, so ``n_heads`` is half a baseline Transformer's head
count at equal parameters; the query/key head of component c (0 or 1) of head h is number ``2h + c``,
and with GQA query head i reads key head ``i // (n_heads / n_kv_heads)`` of the ``2 * n_kv_heads`` key
heads. One difference: RoPE is the model's (half-split layout) rather than the interleaved layout.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from archifactory.config import MAX_COUNT, BuildContext, FieldError
from archifactory.mixers.attention import KVCache
from archifactory.mixers.base import Mixer, MixerConfig, check_position_head_dim, linear_flops
from archifactory.nn.init import init_linear
from archifactory.nn.norms import RMSNorm
from archifactory.nn.positions import relative_position_parts
from archifactory.nn.roles import VECTOR
from archifactory.registry import register_mixer


def lambda_init_for_layer(layer_idx: int) -> float:
    """``0.8 - 0.6 * exp(-0.3 * layer_idx)`` (Ye et al. 2024, section 2.1; layer index from 0)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


@register_mixer
class DiffAttentionConfig(MixerConfig):
    kind: Literal["diff_attention"] = "diff_attention"
    uses_positions: ClassVar[bool] = True
    n_heads: int = Field(4, ge=1, le=MAX_COUNT)
    """Differential heads (each two softmax maps): half the heads of a baseline Transformer of equal size."""
    n_kv_heads: int | None = Field(None, ge=1, le=MAX_COUNT)
    """Key/value heads (GQA), a divisor of ``n_heads``; ``None`` means ``n_heads``."""
    head_dim: int | None = Field(None, ge=1)
    """Channels of one query/key half ``d``; values have ``2 * head_dim``. ``None``: ``d_model // n_heads // 2``."""
    lambda_init: float | None = Field(None, gt=0, lt=1)
    """Constant added to the learned lambda and output scale ``1 - lambda_init`` (eq. 2-3); ``None`` means
    the paper's depth schedule ``0.8 - 0.6 * exp(-0.3 * layer_idx)``. In (0, 1), as the paper requires (Sec. 2.1;
    1e30 made the first gradients non-finite)."""
    lambda_std: float = Field(0.1, ge=0, le=1)
    """Std of the normal init of the lambda vectors ``lq1, lk1, lq2, lk2`` (0.1 in the official code); at most 1
    (lambda is ``exp(lq . lk)``: std 1e4 overflowed it)."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def resolved_head_dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads // 2

    def check(self, ctx: BuildContext) -> None:
        if self.head_dim is None and (ctx.d_model % (2 * self.n_heads) or ctx.d_model < 2 * self.n_heads):
            raise FieldError(
                "n_heads",
                f"2 * n_heads={2 * self.n_heads} must divide d_model={ctx.d_model} (each head splits into two halves "
                "of d_model // n_heads // 2 channels); choose fewer heads or set head_dim",
            )
        if self.n_heads % self.kv_heads:
            raise FieldError("n_kv_heads", f"n_kv_heads={self.kv_heads} does not divide n_heads={self.n_heads}")
        check_position_head_dim(ctx, self.resolved_head_dim(ctx.d_model), "head_dim")

    def build(self, ctx: BuildContext) -> "DiffAttention":
        return DiffAttention(self, ctx)

    @classmethod
    def contract_examples(cls, d_model: int) -> list["DiffAttentionConfig"]:
        return [cls(n_heads=2), cls(n_heads=4, n_kv_heads=2, head_dim=4, lambda_init=0.5)]


class DiffAttention(Mixer):
    def __init__(self, cfg: DiffAttentionConfig, ctx: BuildContext) -> None:
        super().__init__(ctx)
        d = ctx.d_model
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.kv_heads
        self.head_dim = hd = cfg.resolved_head_dim(d)
        self.scale = hd**-0.5
        self.lambda_init = cfg.lambda_init if cfg.lambda_init is not None else lambda_init_for_layer(ctx.layer_idx)
        self.lambda_std = cfg.lambda_std
        self.q_proj = nn.Linear(d, 2 * self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, 2 * self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * 2 * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * 2 * hd, d, bias=False)
        self.lambda_q1 = nn.Parameter(torch.empty(hd))
        self.lambda_k1 = nn.Parameter(torch.empty(hd))
        self.lambda_q2 = nn.Parameter(torch.empty(hd))
        self.lambda_k2 = nn.Parameter(torch.empty(hd))
        self.head_norm = RMSNorm(2 * hd, eps=1e-5)
        # ALiBi, if the model uses it, gives both maps of head h the slope of head h
        self.rotary, self.alibi = relative_position_parts(ctx.position, hd, self.n_heads)
        self.std, self.out_std = ctx.init.std, ctx.init.out_std(ctx.n_layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            init_linear(proj, self.std)
        init_linear(self.o_proj, self.out_std)
        for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(p, mean=0.0, std=self.lambda_std)
        self.head_norm.reset_parameters()

    def param_roles(self):
        return {name: VECTOR for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}

    def lambda_full(self) -> torch.Tensor:
        """``exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init`` (eq. 2), a scalar, in fp32 or wider."""
        compute = torch.promote_types(self.lambda_q1.dtype, torch.float32)
        dot1 = (self.lambda_q1.to(compute) * self.lambda_k1.to(compute)).sum()
        dot2 = (self.lambda_q2.to(compute) * self.lambda_k2.to(compute)).sum()
        return torch.exp(dot1) - torch.exp(dot2) + self.lambda_init

    def init_cache(self, batch_size: int, device, dtype) -> KVCache:
        return KVCache(window=None)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache | None]:
        B, T, _ = x.shape
        H, hd = self.n_heads, self.head_dim
        q = self.q_proj(x).view(B, T, 2 * H, hd).transpose(1, 2)  # (B, 2H, T, d): head h's halves at 2h, 2h+1
        k = self.k_proj(x).view(B, T, 2 * self.n_kv_heads, hd).transpose(1, 2)  # (B, 2Hkv, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, 2 * hd).transpose(1, 2)  # (B, Hkv, T, 2d)
        start = cache.pos if cache is not None else 0
        q_pos = torch.arange(start, start + T, device=x.device)
        if self.rotary is not None:
            q, k = self.rotary(q, k, q_pos)
        if cache is not None:
            k, v, k_pos = cache.update(k, v)
        else:
            k_pos = q_pos
        # query head i reads key head i // group; both halves of head h (query heads 2h, 2h+1) read the
        # value head of h, so values repeat once per half: value head j serves key heads 2j, 2j+1
        v2 = v.repeat_interleave(2, dim=1)  # (B, 2Hkv, S, 2d)
        mask = None
        if self.alibi is not None or len(q_pos) != len(k_pos):
            allowed = q_pos[:, None] >= k_pos[None, :]
            if self.alibi is None:
                mask = allowed
            else:
                bias = self.alibi.bias(q_pos, k_pos).repeat_interleave(2, dim=0)  # (2H, Tq, Tk)
                mask = bias.masked_fill(~allowed, float("-inf")).to(q.dtype)
        both = F.scaled_dot_product_attention(
            q, k, v2, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=self.n_kv_heads != H
        )  # (B, 2H, T, 2d): softmax(Q_c K_c^T) V for c = 0, 1
        both = both.view(B, H, 2, T, 2 * hd)
        lam = self.lambda_full().to(both.dtype)
        y = both[:, :, 0] - lam * both[:, :, 1]  # (B, H, T, 2d)
        y = self.head_norm(y) * (1.0 - self.lambda_init)
        y = y.transpose(1, 2).reshape(B, T, H * 2 * hd)
        return self.o_proj(y), cache

    def flops_per_token(self, seq_len: int) -> int:
        # two maps per head: QK^T over d channels and PV over 2d, for the mean (t + 1) causal keys
        mean_keys = (seq_len + 1) / 2
        scores = 2 * (2 * self.n_heads) * mean_keys * (self.head_dim + 2 * self.head_dim)
        return int(linear_flops(self.q_proj, self.k_proj, self.v_proj, self.o_proj) + scores)

    def state_bytes(self, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
        # keys: 2 * Hkv heads of d; values: Hkv heads of 2d
        return 4 * self.n_kv_heads * self.head_dim * seq_len * torch.finfo(dtype).bits // 8

    def kernel_path(self) -> str:
        return "torch.sdpa"
