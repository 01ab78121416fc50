"""Hymba's hybrid-head mixer: Dong et al. 2024, "Hymba: A Hybrid-head Architecture for Small Language
Models" (arXiv:2411.13676).

Attention heads and SSM heads read the *same* input in parallel inside one layer, instead of attention
and SSM layers alternating. Attention recalls exact tokens ("snapshot memory"), the SSM summarises the
context ("fading memory"). The two outputs differ in scale, so each is normalised and given learned
per-channel scales (β1, β2) before they are combined and one output projection writes to the residual
stream; as in the released code, the combination is the average of the two normalised outputs::

    y = out_proj( (β1 ⊙ norm(attn_heads(x)) + β2 ⊙ norm(ssm_heads(x))) / 2 )

Both branches output ``d_inner = expand * d_model`` channels. The widths follow the released Hymba block
(``HymbaBlock`` in ``modeling_hymba.py`` of nvidia/Hymba-1.5B-Base: hidden 1600, 25 attention heads, 5
key/value heads, ``mamba_expand`` 2): queries and keys are ``d_model`` wide (``attn_heads`` heads of
``d_model / attn_heads`` channels: 64 in Hymba-1.5B), values ``d_inner`` wide (``d_inner / attn_heads``
channels per head: 128), so that the attention output matches the SSM's width; keys and values are
grouped (GQA, ``attn_kv_heads``). The attention heads (any of the model's positional encodings) come
from :mod:`archifactory.mixers.attention` without their output projection, and the SSM heads are
Mamba-2's (:class:`archifactory.mixers.mamba2.Mamba2Heads`, the SSD layer's gated RMSNorm supplying β2).
The cache is the attention KV cache plus the SSM's conv and recurrent state. (The release computes q, k,
v and the SSM inputs with one fused ``in_proj``; here they are separate projections of the same input,
the same function: on CPU one fused matmul measured no faster than the four.)

Left out of this mixer:

- meta tokens (128 learned tokens prepended to every sequence): they belong to the model's input, not
  to one layer's mixer;
- cross-layer KV sharing (consecutive layers reusing one KV cache): a model-level change the block
  contract (one cache per layer) does not express;
- the released Hymba's SSM heads are Mamba(-1) selective scans with a decay per channel; these are
  Mamba-2 (SSD) heads with a scalar decay per head, which train with the chunked form.

Hymba's mix of sliding-window attention with a few global-attention layers (first, middle, last) is
plain config: ``window`` on the default mixer and a layer override without it
(``configs/models/hymba-tiny.yaml``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from archifactory.config import MAX_COUNT, BuildContext, FieldError
from archifactory.mixers.attention import Attention, AttentionConfig, KVCache
from archifactory.mixers.base import Mixer, linear_flops
from archifactory.mixers.mamba2 import Mamba2Heads, SSDSettings, SSMCache
from archifactory.nn.init import init_linear
from archifactory.registry import register_mixer


@register_mixer
class HymbaConfig(SSDSettings):
    """SSM fields as in ``mamba2`` (``head_dim`` is the SSM heads' width); ``attn_*`` fields configure
    the attention heads: queries and keys ``d_model / attn_heads`` channels per head, values
    ``d_inner / attn_heads`` (as released: Hymba-1.5B has 25 heads of 64 q/k and 128 value channels)."""

    kind: Literal["hymba"] = "hymba"
    uses_positions: ClassVar[bool] = True
    d_state: int = Field(16, ge=1)
    """Hymba's SSM heads use a state of 16 (``mamba_d_state``)."""
    attn_heads: int = Field(4, ge=1, le=MAX_COUNT)
    """Query heads; the default 4 gives Hymba-1.5B's 64 query/key channels per head at d_model 256."""
    attn_kv_heads: int | None = Field(1, ge=1, le=MAX_COUNT)
    """Key/value heads of the attention branch (GQA when fewer than ``attn_heads``; ``None``: one per query
    head). Hymba-1.5B groups 5 query heads per key/value head (25 / 5); the default 1 (4 query heads per
    key/value head, as the benchmarks' GQA baseline groups them) is the nearest group size for 4 heads."""
    window: int | None = Field(None, ge=1)
    """Sliding-window attention (Hymba uses it in all but the first, middle and last layers)."""
    qk_norm: bool = False

    def attention_config(self, d_model: int) -> AttentionConfig:
        """The attention heads' config (queries and keys ``d_model / attn_heads`` wide); the value width
        is :meth:`v_head_dim`."""
        return AttentionConfig(
            n_heads=self.attn_heads,
            n_kv_heads=self.attn_kv_heads,
            head_dim=d_model // self.attn_heads,
            window=self.window,
            qk_norm=self.qk_norm,
        )

    def v_head_dim(self, d_model: int) -> int:
        return self.d_inner(d_model) // self.attn_heads

    def check(self, ctx: BuildContext) -> None:
        super().check(ctx)
        if ctx.d_model % self.attn_heads:  # then d_inner = expand * d_model is divisible too
            valid = [h for h in range(1, min(ctx.d_model, MAX_COUNT) + 1) if ctx.d_model % h == 0]
            raise FieldError(
                "attn_heads",
                f"attn_heads={self.attn_heads} does not divide d_model={ctx.d_model} (the attention's query/key "
                f"width); choose one of {valid}",
            )
        try:
            self.attention_config(ctx.d_model).check(ctx)
        except FieldError as err:  # the attention's names, as this config spells them
            names = {"n_kv_heads": "attn_kv_heads", "n_heads": "attn_heads", "head_dim": "attn_heads"}
            message = re.sub(r"\b(n_kv_heads|n_heads)\b", lambda m: names[m.group(1)], err.message)
            raise FieldError(names.get(err.field, err.field), message) from None

    def build(self, ctx: BuildContext) -> "Hymba":
        return Hymba(self, ctx)

    @classmethod
    def contract_examples(cls, d_model: int) -> list["HymbaConfig"]:
        return [
            cls(),
            cls(attn_heads=2, attn_kv_heads=1, window=4, qk_norm=True, head_dim=16, n_groups=2, chunk_size=4),
        ]


@dataclasses.dataclass
class HymbaCache:
    attn: KVCache
    ssm: SSMCache


class Hymba(Mixer):
    def __init__(self, cfg: HymbaConfig, ctx: BuildContext) -> None:
        super().__init__(ctx)
        d_inner = cfg.d_inner(ctx.d_model)
        # The attention heads: Attention with its output projection removed, so that it returns the
        # heads' output (B, T, d_inner); the one projection after the fusion is ``out_proj`` below.
        self.attn = Attention(
            cfg.attention_config(ctx.d_model), ctx, output_projection=False, v_head_dim=cfg.v_head_dim(ctx.d_model)
        )
        self.ssm = Mamba2Heads(cfg, ctx)
        # β1 ⊙ norm(.) of the attention branch; the SSM branch's gated RMSNorm carries β2.
        self.attn_norm = ctx.norm.build_for(d_inner)
        self.out_proj = nn.Linear(d_inner, ctx.d_model, bias=cfg.proj_bias)
        self.std, self.out_std = ctx.init.std, ctx.init.out_std(ctx.n_layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.attn.reset_parameters()
        if hasattr(self.attn_norm, "reset_parameters"):
            self.attn_norm.reset_parameters()
        self.ssm.reset_parameters()
        init_linear(self.out_proj, self.out_std)

    def init_cache(self, batch_size: int, device, dtype) -> HymbaCache:
        return HymbaCache(
            attn=self.attn.init_cache(batch_size, device, dtype), ssm=self.ssm.init_cache(batch_size, device, dtype)
        )

    def forward(self, x: torch.Tensor, cache: HymbaCache | None = None) -> tuple[torch.Tensor, HymbaCache | None]:
        attn_out, _ = self.attn(x, cache.attn if cache is not None else None)  # (B, T, d_inner)
        ssm_out, _ = self.ssm(x, cache.ssm if cache is not None else None)  # (B, T, d_inner), normalised
        fused = (self.attn_norm(attn_out) + ssm_out.to(attn_out.dtype)) / 2
        return self.out_proj(fused), cache

    def flops_per_token(self, seq_len: int) -> int:
        # the attention heads as Attention counts them (it has no o_proj here), the fused output
        # projection, and the SSM heads' own count (see Mamba2Heads.flops_per_token)
        return self.attn.flops_per_token(seq_len) + linear_flops(self.out_proj) + self.ssm.flops_per_token(seq_len)

    def state_bytes(self, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
        return self.attn.state_bytes(seq_len, dtype) + self.ssm.state_bytes(seq_len, dtype)

    def kernel_path(self) -> str:
        return f"{self.attn.kernel_path()}+{self.ssm.kernel_path()}"
