"""Zamba2-style hybrid layer (Glorioso et al. 2024, "The Zamba2 Suite: Technical Report",
arXiv:2411.15242; Zamba: arXiv:2405.16712): a Mamba-2 layer whose input first receives the output of a
transformer block (attention + GLU MLP) whose weights are **shared** by every hybrid layer of the model.

Per hybrid layer ``i`` with residual stream ``h`` and token embeddings ``e`` (Zamba2 eq. 6, fig. 2):

    u = RMSNorm([h, e])                          # the shared block reads h concatenated with e (2 d_model)
    a = Attn_shared(u; LoRA_i on q, k, v)        # o_proj maps back to d_model
    t = MLP_shared(RMSNorm(a); LoRA_i on gate/up)
    y = Mamba2_i(RMSNorm(h + W_i t))             # W_i: the layer's own d_model x d_model linear
    h <- h + y                                   # (the block adds y; then its FFN, if any)

The shared weights live once, in ``CausalLM.shared_blocks[shared_name]`` (counted once in parameters, one
optimizer state); each layer keeps its own LoRA adapters (rank ``adapter_rank``, both factors random as
Zamba2 initialises them), output linear ``W_i``, Mamba-2 and norm. The layer normalises its own input
(the shared block's norm and the Mamba input norm), so its block leaves out the pre-mixer norm.

Attention logits are scaled by ``(d_model / n_heads) ** -0.5``, Zamba2's ``(head_dim / 2) ** -0.5`` for
heads that are twice as wide because of the concatenation. Layers whose configs name the same
``shared_name`` share one block; different names give Zamba2's ``num_mem_blocks`` > 1. The tests compare
hybrid layers with transformers' ``Zamba2HybridLayer``, and a whole model's logits with
``Zamba2ForCausalLM``, on copied weights. Differences from Zamba2 as a whole model: every archifactory
block also has an FFN (Zamba2's layers have none; the whole-model test zeroes its output projection),
and Zamba2 clamps the step size ``dt`` at ``time_step_min`` (here unclamped, as the ``mamba2`` mixer).
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from archifactory.config import MAX_COUNT, BuildContext, FieldError
from archifactory.mixers.attention import KVCache
from archifactory.mixers.base import Mixer, MixerConfig, check_position_head_dim, linear_flops
from archifactory.mixers.mamba2 import Mamba2Config, SSMCache
from archifactory.nn.init import init_linear
from archifactory.nn.positions import relative_position_parts
from archifactory.registry import register_mixer


@register_mixer
class Zamba2Config(MixerConfig):
    kind: Literal["zamba2"] = "zamba2"
    uses_positions: ClassVar[bool] = True
    shared_name: str = "shared"
    """Hybrid layers naming the same block share its weights (Zamba2 alternates ``num_mem_blocks`` names)."""
    n_heads: int = Field(4, ge=1, le=MAX_COUNT)
    """Heads of the shared attention, over ``2 * d_model`` channels with ``concat_embeddings``."""
    n_kv_heads: int | None = Field(None, ge=1, le=MAX_COUNT)
    ffn_hidden: int | None = Field(None, ge=1)
    """Hidden width of the shared GLU MLP (GELU gate); ``None`` means ``4 * d_model`` (Zamba2's default)."""
    adapter_rank: int = Field(8, ge=0)
    """Rank of each layer's LoRA adapters on the shared q, k, v and gate/up projections; 0: none."""
    concat_embeddings: bool = True
    """Feed the shared block ``[h, e]`` (residual stream and the token embeddings), as Zamba does."""
    mamba: Mamba2Config = Field(default_factory=Mamba2Config)
    """The layer's own Mamba-2 (its fields as in the ``mamba2`` mixer)."""

    @field_validator("shared_name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"shared_name={value!r} must be an identifier (letters, digits, underscores)")
        return value

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def shared_width(self, d_model: int) -> int:
        return 2 * d_model if self.concat_embeddings else d_model

    def shared_spec(self, d_model: int) -> dict:
        """What fixes the shared block's weights: layers sharing a name must agree on it."""
        return {"n_heads": self.n_heads, "n_kv_heads": self.kv_heads, "concat_embeddings": self.concat_embeddings,
                "ffn_hidden": self.ffn_hidden or 4 * d_model}

    owns_input_norm: ClassVar[bool] = True

    def reads_token_embeddings(self) -> bool:
        return self.concat_embeddings

    def shared_block(self, d_model: int) -> tuple[str, dict]:
        return self.shared_name, self.shared_spec(d_model)

    def check(self, ctx: BuildContext) -> None:
        width = self.shared_width(ctx.d_model)
        if width % self.n_heads:
            raise FieldError("n_heads", f"n_heads={self.n_heads} does not divide the shared block's width {width}")
        if self.n_heads % self.kv_heads:
            raise FieldError("n_kv_heads", f"n_kv_heads={self.kv_heads} does not divide n_heads={self.n_heads}")
        check_position_head_dim(ctx, width // self.n_heads, "n_heads")
        try:
            self.mamba.check(ctx)
        except FieldError as err:
            raise FieldError(f"mamba.{err.field}", err.message) from None

    def build(self, ctx: BuildContext) -> "Zamba2Hybrid":
        return Zamba2Hybrid(self, ctx)

    @classmethod
    def contract_examples(cls, d_model: int) -> list["Zamba2Config"]:
        # The contract calls mixers without embeddings: the concatenation is covered by the model tests.
        small = Mamba2Config(head_dim=16, d_state=8, chunk_size=4)
        return [
            cls(concat_embeddings=False, adapter_rank=4, ffn_hidden=48, mamba=small),
            cls(concat_embeddings=False, n_heads=4, n_kv_heads=2, adapter_rank=0, mamba=small),
        ]


class SharedTransformer(nn.Module):
    """The shared block's weights: input norm, attention projections, MLP norm and GLU MLP."""

    def __init__(self, cfg: Zamba2Config, ctx: BuildContext) -> None:
        super().__init__()
        d, width = ctx.d_model, cfg.shared_width(ctx.d_model)
        self.spec = cfg.shared_spec(d)
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.kv_heads
        self.head_dim = width // cfg.n_heads
        self.ffn_hidden = self.spec["ffn_hidden"]
        self.input_norm = ctx.norm.build_for(width)
        self.q_proj = nn.Linear(width, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.ffn_norm = ctx.norm.build_for(d)
        self.gate_up_proj = nn.Linear(d, 2 * self.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(self.ffn_hidden, d, bias=False)
        self.std = ctx.init.std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.gate_up_proj, self.down_proj):
            init_linear(proj, self.std)
        for norm in (self.input_norm, self.ffn_norm):
            if hasattr(norm, "reset_parameters"):
                norm.reset_parameters()


class LoRA(nn.Module):
    """``up(down(x))``: a rank-``r`` update added to a shared projection (Zamba2's per-use adapter)."""

    def __init__(self, d_in: int, d_out: int, rank: int, std: float) -> None:
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=False)
        self.std = std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_linear(self.down, self.std)
        init_linear(self.up, self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


@dataclasses.dataclass
class Zamba2Cache:
    kv: KVCache  # the shared attention's keys/values at this layer
    ssm: SSMCache  # the layer's Mamba-2 state


class Zamba2Hybrid(Mixer):
    owns_input_norm = True
    uses_cross_layer = True  # the token embeddings arrive in the model's cross-layer dict

    def __init__(self, cfg: Zamba2Config, ctx: BuildContext) -> None:
        super().__init__(ctx)
        d = ctx.d_model
        self.reads_embeddings = cfg.concat_embeddings
        self.shared_name = cfg.shared_name
        store = ctx.shared
        if store is None:  # built alone (tests): the layer owns its block
            self.shared_owned = SharedTransformer(cfg, ctx)
            shared = self.shared_owned
        else:
            shared = store.get(cfg.shared_name)
            if shared is None:
                shared = store[cfg.shared_name] = SharedTransformer(cfg, ctx)
            elif shared.spec != cfg.shared_spec(d):
                raise ValueError(
                    f"layer {ctx.layer_idx}: zamba2 shared block {cfg.shared_name!r} is {shared.spec} in an earlier "
                    f"layer but {cfg.shared_spec(d)} here; give layers that share a block the same settings, or a "
                    "different shared_name"
                )
            self.shared_owned = None
        self._shared = (shared,)  # a reference, not a sub-module: the model registers the block once
        r = cfg.adapter_rank
        self.adapters = nn.ModuleDict()
        if r:
            width = cfg.shared_width(d)
            hd, Hq, Hkv = shared.head_dim, shared.n_heads, shared.n_kv_heads
            for name, d_in, d_out in (("q", width, Hq * hd), ("k", width, Hkv * hd), ("v", width, Hkv * hd),
                                      ("gate_up", d, 2 * shared.ffn_hidden)):
                self.adapters[name] = LoRA(d_in, d_out, r, ctx.init.std)
        self.out_linear = nn.Linear(d, d, bias=False)  # Zamba2's per-layer `linear`
        self.mamba_norm = ctx.norm.build_for(d)
        self.mamba = cfg.mamba.build(ctx)
        self.rotary, self.alibi = relative_position_parts(ctx.position, shared.head_dim, shared.n_heads)
        self.scale = (d // shared.n_heads) ** -0.5
        self.std = ctx.init.std
        self.reset_parameters()

    @property
    def shared(self) -> SharedTransformer:
        return self._shared[0]

    def reset_parameters(self) -> None:
        """The layer's own weights; the shared block is reset by its owner (the model, or this layer alone)."""
        if self.shared_owned is not None:
            self.shared_owned.reset_parameters()
        for adapter in self.adapters.values():
            adapter.reset_parameters()
        init_linear(self.out_linear, self.std)
        if hasattr(self.mamba_norm, "reset_parameters"):
            self.mamba_norm.reset_parameters()
        self.mamba.reset_parameters()

    def init_cache(self, batch_size: int, device, dtype) -> Zamba2Cache:
        return Zamba2Cache(kv=KVCache(window=None), ssm=self.mamba.init_cache(batch_size, device, dtype))

    def _adapted(self, name: str, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        out = proj(x)
        return out + self.adapters[name](x) if name in self.adapters else out

    def forward(
        self, x: torch.Tensor, cache: Zamba2Cache | None = None, cross_layer: dict | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Zamba2Cache | None]:
        """``x``: (B, T, D) the residual stream (not normalised: the layer normalises its own inputs);
        ``embeddings``: (B, T, D) the token embeddings at the same positions (needed with concat_embeddings),
        given directly or as ``cross_layer["embeddings"]`` (how ``CausalLM`` passes them)."""
        B, T, _ = x.shape
        s = self.shared
        if embeddings is None and cross_layer is not None:
            embeddings = cross_layer.get("embeddings")
        if self.reads_embeddings:
            if embeddings is None:
                raise ValueError("a zamba2 layer with concat_embeddings=true needs the token embeddings; call it "
                                 "through CausalLM, or pass embeddings=(B, T, d_model)")
            inp = torch.cat([x, embeddings.to(x.dtype)], dim=-1)  # (B, T, 2D)
        else:
            inp = x
        u = s.input_norm(inp)
        q = self._adapted("q", s.q_proj, u).view(B, T, s.n_heads, s.head_dim).transpose(1, 2)
        k = self._adapted("k", s.k_proj, u).view(B, T, s.n_kv_heads, s.head_dim).transpose(1, 2)
        v = self._adapted("v", s.v_proj, u).view(B, T, s.n_kv_heads, s.head_dim).transpose(1, 2)
        start = cache.kv.pos if cache is not None else 0
        q_pos = torch.arange(start, start + T, device=x.device)
        if self.rotary is not None:
            q, k = self.rotary(q, k, q_pos)
        if cache is not None:
            k, v, k_pos = cache.kv.update(k, v)
        else:
            k_pos = q_pos
        mask = None
        if self.alibi is not None or len(k_pos) != len(q_pos):
            allowed = q_pos[:, None] >= k_pos[None, :]
            mask = allowed if self.alibi is None else (
                self.alibi.bias(q_pos, k_pos).masked_fill(~allowed, float("-inf")).to(q.dtype))
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=s.n_kv_heads != s.n_heads
        )
        a = s.o_proj(a.transpose(1, 2).reshape(B, T, s.n_heads * s.head_dim))  # (B, T, D)
        f = s.ffn_norm(a)
        gate, up = self._adapted("gate_up", s.gate_up_proj, f).chunk(2, dim=-1)
        t = self.out_linear(s.down_proj(F.gelu(gate) * up))
        y, ssm = self.mamba(self.mamba_norm(x + t), cache.ssm if cache is not None else None)
        if cache is not None:
            cache.ssm = ssm
        return y, cache

    def flops_per_token(self, seq_len: int) -> int:
        s = self.shared
        lora = sum(linear_flops(a.down, a.up) for a in self.adapters.values())
        mean_keys = (seq_len + 1) / 2
        scores = 2 * s.n_heads * mean_keys * 2 * s.head_dim  # QK^T and PV
        shared = linear_flops(s.q_proj, s.k_proj, s.v_proj, s.o_proj, s.gate_up_proj, s.down_proj)
        return int(shared + lora + scores + linear_flops(self.out_linear) + self.mamba.flops_per_token(seq_len))

    def state_bytes(self, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
        kv = 2 * self.shared.n_kv_heads * self.shared.head_dim * seq_len * torch.finfo(dtype).bits // 8
        return kv + self.mamba.state_bytes(seq_len, dtype)

    def kernel_path(self) -> str:
        return f"torch.sdpa+{self.mamba.kernel_path()}"
