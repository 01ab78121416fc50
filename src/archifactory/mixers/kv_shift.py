"""KV shifting attention (Xu, Cheng, Wang & Chen 2024, "KV Shifting Attention Enhances Language Modeling",
arXiv 2411.19574, eq. 4-6 and Appendix F).

Softmax attention whose keys and values are each a learned mix of the current and the previous token's
projections, per key/value head:

    k'_t = a1 * k_t + a2 * k_{t-1},    v'_t = b1 * v_t + b2 * v_{t-1},    with k_{-1} = v_{-1} = 0

so a query that matches token i's key can read token i+1's neighbour value (or i-1's) in one layer: an
induction head without the usual two-layer circuit. Following the paper's code, the mix is applied to the
raw projections (after QK-norm when that is on) and RoPE rotates the mixed keys at their own position.
Init as in the paper: ``a1, b1 ~ U(0, 1)``, ``a2 = 1 - a1``, ``b2 = 1 - b1``.

Everything else (GQA, QK-norm, window, soft-cap, RoPE/ALiBi, SDPA) is :class:`Attention`'s; the cache is
its KV cache plus the previous token's unmixed key and value projections.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from archifactory.config import BuildContext
from archifactory.mixers.attention import Attention, AttentionConfig, KVCache
from archifactory.nn.roles import VECTOR
from archifactory.registry import register_mixer


@register_mixer
class KVShiftConfig(AttentionConfig):
    """All of :class:`AttentionConfig`'s fields, plus the learned shift (4 scalars per key/value head)."""

    kind: Literal["kv_shift"] = "kv_shift"

    def build(self, ctx: BuildContext) -> "KVShiftAttention":
        return KVShiftAttention(self, ctx)

    @classmethod
    def contract_examples(cls, d_model: int) -> list["KVShiftConfig"]:
        return [
            cls(n_heads=4),
            cls(n_heads=4, n_kv_heads=2, qk_norm=True, qkv_bias=True, window=3),
            cls(n_heads=2, logit_softcap=5.0),
        ]


@dataclasses.dataclass
class ShiftKVCache(KVCache):
    """Attention's cache of mixed keys/values, plus the last token's unmixed projections ``(B, H_kv, 1, hd)``
    that the next token mixes in (zeros before the first token: the paper's zero padding)."""

    prev_k: torch.Tensor | None = None
    prev_v: torch.Tensor | None = None


class KVShiftAttention(Attention):
    supports_documents = False  # the key/value shift reads the previous token, across a document boundary

    def __init__(self, cfg: KVShiftConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        # Column 0 weighs the current token, column 1 the previous one; one row per key/value head.
        self.k_shift = nn.Parameter(torch.empty(self.n_kv_heads, 2))
        self.v_shift = nn.Parameter(torch.empty(self.n_kv_heads, 2))
        self._reset_shift()

    def param_roles(self):
        # Two mixing coefficients per KV head (Xu et al. 2024, KV shifting attention): coefficients like
        # RWKV's token-shift mix, which RWKV-LM's configure_optimizers leaves undecayed; not matrices.
        return {**super().param_roles(), "k_shift": VECTOR, "v_shift": VECTOR}

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "k_shift"):  # Attention.__init__ resets before the shift parameters exist
            self._reset_shift()

    def _reset_shift(self) -> None:
        with torch.no_grad():
            for mix in (self.k_shift, self.v_shift):
                mix[:, 0].uniform_(0.0, 1.0)
                mix[:, 1].copy_(1.0 - mix[:, 0])

    def init_cache(self, batch_size: int, device, dtype) -> ShiftKVCache:
        zeros = torch.zeros(batch_size, self.n_kv_heads, 1, self.head_dim, device=device, dtype=dtype)
        return ShiftKVCache(window=self.window, prev_k=zeros, prev_v=zeros.clone())

    @staticmethod
    def _shift(x: torch.Tensor, prev: torch.Tensor | None, mix: torch.Tensor) -> torch.Tensor:
        """``mix[:, 0] * x_t + mix[:, 1] * x_{t-1}`` per head; x: (B, H_kv, T, hd), prev: (B, H_kv, 1, hd)."""
        if prev is None:
            prev = torch.zeros_like(x[:, :, :1])
        before = torch.cat([prev.to(x.dtype), x[:, :, :-1]], dim=2)  # x_{t-1}, (B, H_kv, T, hd)
        mix = mix.to(x.dtype)
        return mix[:, 0, None, None] * x + mix[:, 1, None, None] * before

    def transform_kv(self, k: torch.Tensor, v: torch.Tensor, cache: ShiftKVCache | None):
        """Mix each head's raw key/value with the previous token's (before RoPE, as in the paper's code)."""
        prev_k = prev_v = None
        if cache is not None:
            prev_k, prev_v = cache.prev_k, cache.prev_v
            cache.prev_k, cache.prev_v = k[:, :, -1:], v[:, :, -1:]
        return self._shift(k, prev_k, self.k_shift), self._shift(v, prev_v, self.v_shift)

    def flops_per_token(self, seq_len: int) -> int:
        # Attention's: the shift mix (2 multiplies and 1 add per channel of k and of v) is elementwise and,
        # like softmax and norms, not counted.
        return super().flops_per_token(seq_len)

    def state_bytes(self, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
        previous = 2 * self.n_kv_heads * self.head_dim * torch.finfo(dtype).bits // 8
        return super().state_bytes(seq_len, dtype) + previous
