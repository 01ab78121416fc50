"""Softmax attention: multi-head (Vaswani et al. 2017), grouped-query (Ainslie et al. 2023) and
multi-query (Shazeer 2019) by ``n_kv_heads``; QK-norm (Dehghani et al. 2023), QKV bias, sliding window
(Beltagy et al. 2020; Mistral), attention-logit soft-capping (Gemma 2) and a KV cache.

The fast path is ``F.scaled_dot_product_attention``; soft-capping needs the logits, so a config with
``logit_softcap`` builds the explicit path instead (chosen once, at build time).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from archifactory.config import (
    LOGIT_SCALE_MAX,
    LOGIT_SCALE_MIN,
    MAX_COUNT,
    SOFTCAP_MAX,
    SOFTCAP_MIN,
    BuildContext,
    FieldError,
)
from archifactory.mixers.base import Mixer, MixerConfig, check_heads_divide, check_position_head_dim, linear_flops
from archifactory.nn.init import init_linear
from archifactory.nn.positions import relative_position_parts
from archifactory.registry import register_mixer


@register_mixer
class AttentionConfig(MixerConfig):
    kind: Literal["attention"] = "attention"
    uses_positions: ClassVar[bool] = True
    n_heads: int = Field(4, ge=1, le=MAX_COUNT)
    n_kv_heads: int | None = Field(None, ge=1, le=MAX_COUNT)
    """Key/value heads: ``n_heads`` (MHA, the default), a divisor of it (GQA), or 1 (MQA)."""
    head_dim: int | None = Field(None, ge=1)
    """Channels per head; ``None`` means ``d_model // n_heads``."""
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False
    """Normalise queries and keys per head (with the model's norm) before RoPE, as Qwen3 and OLMo-2 do."""
    window: int | None = Field(None, ge=1)
    """Sliding window: query i attends to keys j with ``i - window < j <= i``."""
    logit_softcap: float | None = Field(None, ge=SOFTCAP_MIN, le=SOFTCAP_MAX)
    """Attention logits become ``cap * tanh(logits / cap)`` (Gemma 2 uses 50); in [1e-2, 1e4]."""
    scale: float | None = Field(None, ge=LOGIT_SCALE_MIN, le=LOGIT_SCALE_MAX)
    """Logit scale; ``None`` means ``head_dim ** -0.5``; in [1e-6, 100]."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def resolved_head_dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def check(self, ctx: BuildContext) -> None:
        check_heads_divide(self.n_heads, ctx.d_model, self.head_dim)
        if self.n_heads % self.kv_heads:
            valid = [h for h in range(1, self.n_heads + 1) if self.n_heads % h == 0]
            raise FieldError(
                "n_kv_heads", f"n_kv_heads={self.kv_heads} does not divide n_heads={self.n_heads}; choose one of {valid}"
            )
        check_position_head_dim(ctx, self.resolved_head_dim(ctx.d_model), "head_dim")
        if self.qk_norm and ctx.norm.kind == "none":
            raise FieldError("qk_norm", "qk_norm=true needs a model norm (rmsnorm or layernorm), not norm kind 'none'")

    def build(self, ctx: BuildContext) -> "Attention":
        return Attention(self, ctx)

    @classmethod
    def contract_examples(cls, d_model: int) -> list["AttentionConfig"]:
        return [
            cls(n_heads=4),
            cls(n_heads=4, n_kv_heads=2, qk_norm=True, qkv_bias=True),
            cls(n_heads=4, n_kv_heads=1, window=3),
            cls(n_heads=2, logit_softcap=5.0, out_bias=True),
        ]


@dataclasses.dataclass
class KVCache:
    """Keys and values seen so far, ``(B, H_kv, S, head_dim)``; with a window only the last ``window``."""

    window: int | None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    pos: int = 0  # tokens seen

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append this chunk; return every key/value the chunk may attend to, and their positions."""
        n_new = k.shape[2]
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.pos += n_new
        k_pos = torch.arange(self.pos - k.shape[2], self.pos, device=k.device)
        if self.window is not None:
            self.k, self.v = k[:, :, -self.window :], v[:, :, -self.window :]
        else:
            self.k, self.v = k, v
        return k, v, k_pos


class Attention(Mixer):
    """With ``output_projection=False`` the module returns the concatenated heads ``(B, T, H * hd_v)``
    without ``o_proj``, for mixers that fuse attention with other heads before one projection (Hymba).
    ``v_head_dim`` (default: ``head_dim``) sets the value heads' width apart from the query/key heads'
    (Hymba's values are ``expand`` times wider than its queries and keys).

    Packed documents (``forward(x, documents=ids)``) are kept apart by masking attention across them
    (document masking). RoPE and ALiBi depend only on the distance between query and key, so positions
    need no reset: a packed document computes what it computes alone, up to rounding."""

    supports_documents = True

    def __init__(
        self, cfg: AttentionConfig, ctx: BuildContext, output_projection: bool = True, v_head_dim: int | None = None
    ) -> None:
        super().__init__(ctx)
        d = ctx.d_model
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.kv_heads
        self.head_dim = cfg.resolved_head_dim(d)
        self.v_head_dim = v_head_dim or self.head_dim
        self.window, self.softcap = cfg.window, cfg.logit_softcap
        self.scale = cfg.scale if cfg.scale is not None else self.head_dim**-0.5
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.v_head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.v_head_dim, d, bias=cfg.out_bias) if output_projection else None
        self.q_norm = ctx.norm.build_for(self.head_dim) if cfg.qk_norm else None
        self.k_norm = ctx.norm.build_for(self.head_dim) if cfg.qk_norm else None
        self.rotary, self.alibi = relative_position_parts(ctx.position, self.head_dim, self.n_heads)
        self.std, self.out_std = ctx.init.std, ctx.init.out_std(ctx.n_layers)
        self.attend = self._attend_sdpa if self.softcap is None else self._attend_explicit
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            init_linear(proj, self.std)
        if self.o_proj is not None:
            init_linear(self.o_proj, self.out_std)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    def init_cache(self, batch_size: int, device, dtype) -> KVCache:
        return KVCache(window=self.window)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, documents: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, KVCache | None]:
        """``documents``: optional (B, T) ids of the packed document each token belongs to (training only)."""
        B, T, _ = x.shape
        if documents is not None and cache is not None:
            raise ValueError("documents (packed sequences) are for training forwards; decode one sequence per row")
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.v_head_dim).transpose(1, 2)  # (B, Hkv, T, hd_v)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        k, v = self.transform_kv(k, v, cache)
        start = cache.pos if cache is not None else 0
        q_pos = torch.arange(start, start + T, device=x.device)
        if self.rotary is not None:
            q, k = self.rotary(q, k, q_pos)
        if cache is not None:
            k, v, k_pos = cache.update(k, v)
        else:
            k_pos = q_pos
        y = self.attend(q, k, v, q_pos, k_pos, documents).transpose(1, 2).reshape(B, T, self.n_heads * self.v_head_dim)
        return (y if self.o_proj is None else self.o_proj(y)), cache

    def transform_kv(self, k: torch.Tensor, v: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook between the key/value projections (after QK-norm) and RoPE; the identity here.
        KV-shifting attention mixes in the previous token's keys and values."""
        return k, v

    def _mask(
        self, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype, documents: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """``None`` for plain causal attention over a fresh sequence; otherwise a boolean ``(Tq, Tk)``
        mask, or an additive ``(H, Tq, Tk)`` one when ALiBi is on; with ``documents`` (B, T) a leading
        batch dimension ``(B, 1 or H, Tq, Tk)`` that also blocks keys of other documents."""
        plain = self.window is None and self.alibi is None and len(q_pos) == len(k_pos) and documents is None
        if plain:
            return None
        offset = q_pos[:, None] - k_pos[None, :]  # (Tq, Tk)
        allowed = offset >= 0
        if self.window is not None:
            allowed = allowed & (offset < self.window)
        if documents is not None:
            allowed = allowed & (documents[:, None, :, None] == documents[:, None, None, :])  # (B, 1, Tq, Tk)
        if self.alibi is None:
            return allowed
        return self.alibi.bias(q_pos, k_pos).masked_fill(~allowed, float("-inf")).to(dtype)

    def _attend_sdpa(self, q, k, v, q_pos, k_pos, documents=None) -> torch.Tensor:
        mask = self._mask(q_pos, k_pos, q.dtype, documents)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )

    def _attend_explicit(self, q, k, v, q_pos, k_pos, documents=None) -> torch.Tensor:
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, Tq, Tk)
        logits = self.softcap * torch.tanh(logits / self.softcap)
        mask = self._mask(q_pos, k_pos, logits.dtype, documents)
        if mask is None:
            mask = q_pos[:, None] >= k_pos[None, :]
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask
        probs = torch.softmax(logits.float(), dim=-1).to(v.dtype)
        return probs @ v

    def score_flops(self, seq_len: int) -> float:
        """QK^T and PV per token, 2 FLOPs per multiply-add each, over every head's query/key and value
        channels. Through SDPA
        query position t counts the min(t + 1, window) keys it attends to (useful work: fused kernels skip
        masked blocks, and the count must not depend on which backend ran); the explicit soft-capping path
        multiplies every (query, key) pair of the sequence before masking, and is counted as computed."""
        if self.softcap is not None:
            return 2 * self.n_heads * (self.head_dim + self.v_head_dim) * seq_len
        w = seq_len if self.window is None else min(self.window, seq_len)
        mean_keys = (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len  # sum_t min(t + 1, w) / T
        return 2 * self.n_heads * (self.head_dim + self.v_head_dim) * mean_keys

    def flops_per_token(self, seq_len: int) -> int:
        projections = [self.q_proj, self.k_proj, self.v_proj] + ([self.o_proj] if self.o_proj is not None else [])
        return int(linear_flops(*projections) + self.score_flops(seq_len))

    def state_bytes(self, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
        kept = seq_len if self.window is None else min(seq_len, self.window)
        return self.n_kv_heads * (self.head_dim + self.v_head_dim) * kept * torch.finfo(dtype).bits // 8

    def kernel_path(self) -> str:
        return "torch.sdpa" if self.softcap is None else "torch.explicit"
