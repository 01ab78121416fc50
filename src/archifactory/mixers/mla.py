"""Multi-head latent attention (MLA), DeepSeek-V2 (DeepSeek-AI 2024, arXiv 2405.04434, Sec. 2.1), as also
used by DeepSeek-V3 (arXiv 2412.19437).

Keys and values are not projected from the token directly but from a shared low-rank latent
``c_t = RMSNorm(W_DKV x_t)`` of ``kv_lora_rank`` channels (paper eq. 9-11): head h's key part is
``W_UK[h] c_t`` and its value ``W_UV[h] c_t``. RoPE cannot sit on those keys (it would not commute with the
up-projection, so the latent could not be cached), so each query/key also carries a small *decoupled*
rotary part (eq. 14-19): per-head rotary queries, and one rotary key ``k^R_t = RoPE(W_KR x_t)`` shared by
all heads. Queries are optionally compressed too (``q_lora_rank``, eq. 12-13).

What this buys is the cache: per token only ``c_t`` and ``k^R_t`` (``kv_lora_rank + qk_rope_head_dim``
numbers) instead of full keys and values for every head.

Two forms of the same function:

- training / uncached: the latent is expanded to per-head keys and values, then causal SDPA;
- with a cache (prefill in chunks, decoding): the latent is cached and never expanded. The key
  up-projection is absorbed into the query (``q_nope . W_UK c = (W_UK^T q_nope) . c``) and the value
  up-projection is applied after attending over the latents (``sum_j p_j W_UV c_j = W_UV sum_j p_j c_j``),
  the inference trick of the paper (Sec. 2.1.2).

The softmax scale is ``1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)``, times DeepSeek's YaRN correction
``(0.1 * mscale_all_dim * ln(factor) + 1) ** 2`` when ``mscale_all_dim`` is set with YaRN-scaled RoPE.
Without RoPE (position ``none``, or ``alibi``, whose bias is added to the logits) the rotary key part is
kept as an unrotated shared key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from archifactory.config import LOGIT_SCALE_MAX, LOGIT_SCALE_MIN, MAX_COUNT, BuildContext, FieldError
from archifactory.mixers.base import Mixer, MixerConfig, check_position_head_dim, linear_flops
from archifactory.nn.init import init_linear
from archifactory.nn.norms import RMSNorm
from archifactory.nn.positions import relative_position_parts
from archifactory.registry import register_mixer


@register_mixer
class MLAConfig(MixerConfig):
    """Unset sizes follow DeepSeek-V2's ratios to the head size ``d_h = d_model // n_heads``:
    ``qk_nope_head_dim = v_head_dim = d_h``, ``qk_rope_head_dim = d_h / 2``, ``kv_lora_rank = 4 d_h``."""

    kind: Literal["mla"] = "mla"
    uses_positions: ClassVar[bool] = True
    n_heads: int = Field(4, ge=1, le=MAX_COUNT)
    q_lora_rank: int | None = Field(None, ge=1)
    """Rank of the query compression (DeepSeek-V2: 1536); ``None`` projects queries directly from x."""
    kv_lora_rank: int | None = Field(None, ge=1)
    """Channels of the cached key/value latent c_t; ``None`` means ``4 * d_model // n_heads``."""
    qk_nope_head_dim: int | None = Field(None, ge=1)
    """Per-head query/key channels without position (from the latent); ``None`` means ``d_model // n_heads``."""
    qk_rope_head_dim: int | None = Field(None, ge=1)
    """Per-head rotary query channels and the shared rotary key's size; ``None`` means half the head size."""
    v_head_dim: int | None = Field(None, ge=1)
    """Per-head value channels; ``None`` means ``d_model // n_heads``."""
    bias: bool = False
    """Biases on the down-projections and the output projection (Hugging Face's ``attention_bias``)."""
    latent_norm_eps: float = Field(1e-6, gt=0)
    """Epsilon of the RMSNorms on the latents (DeepSeek uses 1e-6 whatever the model norm)."""
    scale: float | None = Field(None, ge=LOGIT_SCALE_MIN, le=LOGIT_SCALE_MAX)
    """Logit scale; ``None`` means ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5`` (times the YaRN mscale);
    in [1e-6, 100]."""
    mscale_all_dim: float = Field(0.0, ge=0)
    """DeepSeek's YaRN softmax correction: with RoPE scaling ``yarn`` of ``factor`` s, the scale is multiplied
    by ``(0.1 * mscale_all_dim * ln(s) + 1) ** 2``. DeepSeek-V2/V3 use 1.0 (with mscale = mscale_all_dim, so
    set the RoPE scaling's ``attention_factor: 1.0``); 0 turns it off."""

    def sizes(self, d_model: int) -> tuple[int, int, int, int]:
        """``(qk_nope_head_dim, qk_rope_head_dim, v_head_dim, kv_lora_rank)`` with defaults resolved."""
        head = d_model // self.n_heads
        nope = self.qk_nope_head_dim or head
        rope = self.qk_rope_head_dim or max(head // 2, 1)
        v = self.v_head_dim or head
        rank = self.kv_lora_rank or 4 * head
        return nope, rope, v, rank

    def check(self, ctx: BuildContext) -> None:
        defaults = (self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim, self.kv_lora_rank)
        if None in defaults and ctx.d_model // self.n_heads < 2:
            raise FieldError(
                "n_heads",
                f"n_heads={self.n_heads} leaves d_model // n_heads = {ctx.d_model // self.n_heads} channels per head; "
                f"use at most {ctx.d_model // 2} heads or set qk_nope_head_dim, qk_rope_head_dim, v_head_dim "
                f"and kv_lora_rank explicitly",
            )
        _, rope, _, _ = self.sizes(ctx.d_model)
        check_position_head_dim(ctx, rope, "qk_rope_head_dim", f" on qk_rope_head_dim={rope}")
        if self.mscale_all_dim:
            scaling = getattr(ctx.position, "scaling", None)
            if ctx.position.kind != "rope" or scaling is None or scaling.type != "yarn":
                raise FieldError(
                    "mscale_all_dim",
                    f"mscale_all_dim={self.mscale_all_dim} corrects YaRN-scaled RoPE only; this model's position is "
                    f"{ctx.position.kind!r}{'' if scaling is None else f' with {scaling.type} scaling'}. "
                    f"Set position.scaling.type=yarn or mscale_all_dim=0",
                )

    def build(self, ctx: BuildContext) -> "MultiHeadLatentAttention":
        return MultiHeadLatentAttention(self, ctx)

    @classmethod
    def contract_examples(cls, d_model: int) -> list["MLAConfig"]:
        return [
            cls(n_heads=4),
            cls(n_heads=2, q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5,
                bias=True),
        ]


@dataclasses.dataclass
class LatentCache:
    """What MLA keeps per token: the normalised latent ``(B, S, kv_lora_rank)`` and the rotated shared key
    ``(B, S, qk_rope_head_dim)``; never per-head keys or values."""

    latent: torch.Tensor | None = None
    k_rope: torch.Tensor | None = None
    pos: int = 0  # tokens seen

    def update(self, latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append this chunk; return every latent and rotary key seen so far, and their positions."""
        if self.latent is not None:
            latent, k_rope = torch.cat([self.latent, latent], dim=1), torch.cat([self.k_rope, k_rope], dim=1)
        self.latent, self.k_rope = latent, k_rope
        self.pos = latent.shape[1]
        return latent, k_rope, torch.arange(self.pos, device=latent.device)


class MultiHeadLatentAttention(Mixer):
    def __init__(self, cfg: MLAConfig, ctx: BuildContext) -> None:
        super().__init__(ctx)
        d, H = ctx.d_model, cfg.n_heads
        self.n_heads = H
        self.nope_dim, self.rope_dim, self.v_dim, self.kv_rank = cfg.sizes(d)
        qk_dim = self.nope_dim + self.rope_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, H * qk_dim, bias=False)
            self.q_a_proj = self.q_a_norm = self.q_b_proj = None
        else:  # eq. 12-13: c^Q = W_DQ x (normalised, as in the released models), q = W_UQ c^Q
            self.q_proj = None
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=cfg.bias)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.latent_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk_dim, bias=False)
        # One down-projection gives both the latent c^KV (W_DKV, eq. 9) and the shared rotary key (W_KR, eq. 17).
        self.kv_a_proj = nn.Linear(d, self.kv_rank + self.rope_dim, bias=cfg.bias)
        self.kv_a_norm = RMSNorm(self.kv_rank, cfg.latent_norm_eps)
        # W_UK and W_UV (eq. 10-11) stacked per head: rows [h * (nope + v), ...) are head h's key then value.
        self.kv_b_proj = nn.Linear(self.kv_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, d, bias=cfg.bias)
        self.rotary, self.alibi = relative_position_parts(ctx.position, self.rope_dim, H)
        self.scale = cfg.scale if cfg.scale is not None else qk_dim**-0.5
        if cfg.mscale_all_dim:
            mscale = 0.1 * cfg.mscale_all_dim * math.log(ctx.position.scaling.factor) + 1.0
            self.scale *= mscale * mscale
        self.std, self.out_std = ctx.init.std, ctx.init.out_std(ctx.n_layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.q_a_proj, self.q_b_proj, self.kv_a_proj, self.kv_b_proj):
            if proj is not None:
                init_linear(proj, self.std)
        init_linear(self.o_proj, self.out_std)
        for norm in (self.q_a_norm, self.kv_a_norm):
            if norm is not None:
                norm.reset_parameters()

    def init_cache(self, batch_size: int, device, dtype) -> LatentCache:
        return LatentCache()

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, cache: LatentCache | None = None) -> tuple[torch.Tensor, LatentCache | None]:
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_proj(x) if self.q_proj is not None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q = q.view(B, T, H, self.nope_dim + self.rope_dim).transpose(1, 2)  # (B, H, T, nope + rope)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj(x).split([self.kv_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_norm(latent)  # (B, T, kv_rank)
        start = cache.pos if cache is not None else 0
        q_pos = torch.arange(start, start + T, device=x.device)
        if self.rotary is not None:
            # k_rope as (B, 1, T, rope): one key broadcast over the heads
            q_rope, k_rope = self.rotary(q_rope, k_rope[:, None], q_pos)
            k_rope = k_rope[:, 0]
        if cache is None:
            y = self._attend_expanded(q_nope, q_rope, latent, k_rope, q_pos)
        else:
            latent, k_rope, k_pos = cache.update(latent, k_rope)
            y = self._attend_absorbed(q_nope, q_rope, latent, k_rope, q_pos, k_pos)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.v_dim)), cache  # y: (B, H, T, v)

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK ``(H, nope, kv_rank)`` and W_UV ``(H, v, kv_rank)``, views of ``kv_b_proj.weight``."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def _attend_expanded(self, q_nope, q_rope, latent, k_rope, q_pos) -> torch.Tensor:
        """Training form: per-head keys/values from the latent, then causal SDPA. Returns (B, H, T, v)."""
        B, S, _ = latent.shape
        kv = self.kv_b_proj(latent).view(B, S, self.n_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)  # (B, H, S, nope), (B, H, S, v)
        k = torch.cat([k_nope, k_rope[:, None].expand(-1, self.n_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        mask = self._mask(q_pos, q_pos, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)

    def _attend_absorbed(self, q_nope, q_rope, latent, k_rope, q_pos, k_pos) -> torch.Tensor:
        """Cached form: attend over the latents themselves, which is multi-query attention with one key
        ``[c_j, k^R_j]`` and one value ``c_j`` shared by every head. Returns (B, H, T, v)."""
        w_uk, w_uv = self._up_weights()
        q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk.to(q_nope.dtype))  # (B, H, T, kv_rank)
        q = torch.cat([q_latent, q_rope], dim=-1)  # (B, H, T, kv_rank + rope)
        k = torch.cat([latent, k_rope], dim=-1)[:, None]  # (B, 1, S, kv_rank + rope)
        v = latent[:, None]  # (B, 1, S, kv_rank)
        mask = self._mask(q_pos, k_pos, q.dtype)
        o_latent = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=self.n_heads > 1
        )  # (B, H, T, kv_rank)
        return torch.einsum("bhtr,hvr->bhtv", o_latent, w_uv.to(o_latent.dtype))

    def _mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """``None`` for plain causal attention over a fresh sequence; otherwise a boolean ``(Tq, Tk)`` mask, or
        an additive ``(H, Tq, Tk)`` one with ALiBi."""
        if self.alibi is None and len(q_pos) == len(k_pos):
            return None
        allowed = q_pos[:, None] >= k_pos[None, :]
        if self.alibi is None:
            return allowed
        return self.alibi.bias(q_pos, k_pos).masked_fill(~allowed, float("-inf")).to(dtype)

    # -------------------------------------------------------------------------------------------- costs

    def flops_per_token(self, seq_len: int) -> int:
        # Training form (what MFU counts): every projection once per token, 2 FLOPs per multiply-add, and
        # for the mean key count (T + 1) / 2 of a causal sequence, QK^T over nope + rope channels and PV
        # over v channels in every head. (Absorbed decoding trades kv_b_proj per key for kv_rank-wide dots.)
        projections = [p for p in (self.q_proj, self.q_a_proj, self.q_b_proj) if p is not None]
        projections += [self.kv_a_proj, self.kv_b_proj, self.o_proj]
        keys = (seq_len + 1) / 2
        attn = 2 * self.n_heads * (self.nope_dim + self.rope_dim + self.v_dim) * keys
        return int(linear_flops(*projections) + attn)

    def state_bytes(self, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
        return (self.kv_rank + self.rope_dim) * seq_len * torch.finfo(dtype).bits // 8

    def kernel_path(self) -> str:
        return "torch.sdpa"
