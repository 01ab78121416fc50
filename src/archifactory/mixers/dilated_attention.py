"""Dilated attention (Ding et al. 2023, "LongNet: Scaling Transformers to 1,000,000,000 Tokens",
arXiv:2307.02486), causal.

The sequence is cut into segments of ``w`` tokens; within a segment only every ``r``-th token takes part
(dilation ``r``), and the selected tokens attend to each other causally (section 2.2, eq. 5-7). Head ``h``
selects the tokens at offsets ``h mod r, h mod r + r, ...`` of each segment, so that the heads together
cover every position (section 2.4, multi-head dilated attention). Several patterns ``(w_k, r_k)`` run side
by side, and their outputs are mixed with weights proportional to each pattern's softmax denominator
(eq. 8-10): ``O = sum_k s_k O_k / sum_k s_k``. A query that no pattern of head ``h`` selects gets a zero
output from that head.

That mixture equals one softmax over all keys with an additive logit bias ``log m_ij``, ``m_ij`` being
the number of patterns in which query i and key j fall in the same segment and are both selected
(``-inf`` where 0); the tests check the segment form against this dense closed form, and decoding with a
cache uses it directly. Every segment length must divide the largest one, so the keys a query can reach
lie in its current segment of the largest length: the cache keeps only that segment.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from archifactory.config import MAX_COUNT, BuildContext
from archifactory.mixers.base import Mixer, MixerConfig, check_heads_divide, check_position_head_dim, linear_flops
from archifactory.nn.init import init_linear
from archifactory.nn.positions import relative_position_parts
from archifactory.registry import register_mixer


@register_mixer
class DilatedAttentionConfig(MixerConfig):
    kind: Literal["dilated_attention"] = "dilated_attention"
    uses_positions: ClassVar[bool] = True
    n_heads: int = Field(4, ge=1, le=MAX_COUNT)
    segment_lengths: list[int] = Field(default_factory=lambda: [64, 128, 256], min_length=1, max_length=16)
    """Segment length ``w_k`` of each pattern (LongNet eq. 5); each must divide the largest."""
    dilation_rates: list[int] = Field(default_factory=lambda: [1, 2, 4], min_length=1, max_length=16)
    """Dilation ``r_k`` of each pattern, one per segment length; each must divide its segment length.
    LongNet grows both geometrically (w = 2048, 4096, ...; r = 1, 2, ...)."""

    @model_validator(mode="after")
    def _check_patterns(self):
        if len(self.segment_lengths) != len(self.dilation_rates):
            raise ValueError(
                f"segment_lengths has {len(self.segment_lengths)} entries but dilation_rates has "
                f"{len(self.dilation_rates)}; give one dilation rate per segment length"
            )
        largest = max(self.segment_lengths)
        for w, r in zip(self.segment_lengths, self.dilation_rates):
            if w < 1 or r < 1:
                raise ValueError(f"segment length {w} and dilation rate {r} must be >= 1")
            if w % r:
                raise ValueError(f"dilation rate {r} does not divide its segment length {w}")
            if largest % w:
                raise ValueError(
                    f"segment length {w} does not divide the largest segment length {largest}; segments must nest "
                    "(LongNet uses a geometric sequence such as 64, 128, 256)"
                )
        return self

    def check(self, ctx: BuildContext) -> None:
        check_heads_divide(self.n_heads, ctx.d_model)
        check_position_head_dim(ctx, ctx.d_model // self.n_heads, "n_heads")

    def build(self, ctx: BuildContext) -> "DilatedAttention":
        return DilatedAttention(self, ctx)

    @classmethod
    def contract_examples(cls, d_model: int) -> list["DilatedAttentionConfig"]:
        return [
            cls(n_heads=4, segment_lengths=[4, 8], dilation_rates=[1, 2]),
            cls(n_heads=4, segment_lengths=[2, 4, 8], dilation_rates=[1, 2, 4]),
            cls(n_heads=2, segment_lengths=[6], dilation_rates=[3]),  # not every (head, query) covered
        ]


@dataclasses.dataclass
class SegmentKVCache:
    """Keys and values ``(B, H, S, head_dim)`` of the current segment of the largest length."""

    segment: int
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    pos: int = 0  # tokens seen

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.pos += k.shape[2]
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        k_pos = torch.arange(self.pos - k.shape[2], self.pos, device=k.device)
        keep = self.pos % self.segment  # the next token starts at pos; earlier segments are never read again
        self.k, self.v = k[:, :, k.shape[2] - keep :], v[:, :, v.shape[2] - keep :]
        return k, v, k_pos


class DilatedAttention(Mixer):
    def __init__(self, cfg: DilatedAttentionConfig, ctx: BuildContext) -> None:
        super().__init__(ctx)
        d = ctx.d_model
        self.n_heads = cfg.n_heads
        self.head_dim = d // cfg.n_heads
        self.scale = self.head_dim**-0.5
        self.patterns = list(zip(cfg.segment_lengths, cfg.dilation_rates))
        self.largest_segment = max(cfg.segment_lengths)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.rotary, self.alibi = relative_position_parts(ctx.position, self.head_dim, self.n_heads)
        self.std, self.out_std = ctx.init.std, ctx.init.out_std(ctx.n_layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            init_linear(proj, self.std)
        init_linear(self.o_proj, self.out_std)

    def init_cache(self, batch_size: int, device, dtype) -> SegmentKVCache:
        return SegmentKVCache(segment=self.largest_segment)

    def forward(self, x: torch.Tensor, cache: SegmentKVCache | None = None) -> tuple[torch.Tensor, SegmentKVCache | None]:
        B, T, D = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        start = cache.pos if cache is not None else 0
        q_pos = torch.arange(start, start + T, device=x.device)
        if self.rotary is not None:
            q, k = self.rotary(q, k, q_pos)
        if cache is None:
            y = self._segments(q, k, v)
        else:
            k, v, k_pos = cache.update(k, v)
            y = self._dense(q, k, v, q_pos, k_pos)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D)), cache

    # ------------------------------------------------------------------------- segment form (training)

    @staticmethod
    def effective_segment(w: int, r: int, seq_len: int) -> int:
        """A sequence shorter than one segment is one segment, cut to ``seq_len`` rounded up to ``r``
        (the same tokens are selected; less padding is computed)."""
        return min(w, -(-seq_len // r) * r)

    def _segments(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Each pattern on its own (gather the selected tokens of every segment, causal attention within
        the segment), mixed by softmax denominators (LongNet eq. 8-10). q, k, v: (B, H, T, hd).

        Two passes: each pattern's attention and log-denominator ``lse_k`` on its gathered tokens; then
        ``y_i = sum_k exp(lse_k(i) - logsumexp_k lse_k(i)) o_k(i)``, added back into sequence order."""
        B, H, T, hd = q.shape
        qkv = torch.cat([q, k, v], dim=-1)  # (B, H, T, 3 hd): one gather per pattern
        compute = torch.promote_types(q.dtype, torch.float32)
        found = []  # per pattern: (gather index (H, n_seg * L), o (B, H, n_seg * L, hd), lse (B, H, n_seg * L))
        lse_seq = []  # per pattern: lse in sequence order (B, H, T), -inf where the head does not select
        for w_full, r in self.patterns:
            w = self.effective_segment(w_full, r, T)
            L, n_seg = w // r, -(-T // w)
            # positions head h selects: segment s, slot m -> s * w + (h mod r) + m * r
            slots = torch.arange(L, device=q.device) * r
            starts = torch.arange(n_seg, device=q.device) * w
            offsets = torch.arange(H, device=q.device) % r
            idx = (starts[None, :, None] + offsets[:, None, None] + slots[None, None, :]).reshape(H, n_seg * L)
            sel = F.pad(qkv, (0, 0, 0, n_seg * w - T)).gather(2, idx[None, :, :, None].expand(B, H, n_seg * L, 3 * hd))
            qs, ks, vs = sel.view(B, H, n_seg, L, 3 * hd).split(hd, dim=-1)
            logits = ((qs @ ks.transpose(-2, -1)) * self.scale).to(compute)  # (B, H, n_seg, L, L)
            if self.alibi is not None:
                # selected tokens m and m' of a segment are (m - m') * r apart
                dist = (slots[:, None] - slots[None, :]).to(compute)
                logits = logits - self.alibi.slopes.to(compute)[:, None, None, None] * dist
            causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
            logits = logits.masked_fill(~causal, float("-inf"))
            lse = torch.logsumexp(logits, dim=-1)  # (B, H, n_seg, L)
            o = torch.exp(logits - lse[..., None]).to(vs.dtype) @ vs  # (B, H, n_seg, L, hd)
            lse = lse.reshape(B, H, n_seg * L)
            seq = torch.full((B, H, n_seg * w), float("-inf"), dtype=compute, device=q.device)
            lse_seq.append(seq.scatter(2, idx[None].expand(B, H, n_seg * L), lse)[:, :, :T])
            found.append((idx, o.reshape(B, H, n_seg * L, hd), lse))
        total = torch.logsumexp(torch.stack(lse_seq), dim=0)  # (B, H, T); -inf where no pattern selects
        total = F.pad(total.masked_fill(torch.isinf(total), 0.0), (0, self.largest_segment))
        y = q.new_zeros(B, H, T + self.largest_segment, hd)
        for idx, o, lse in found:
            weight = torch.exp(lse - total.gather(2, idx[None].expand(B, H, idx.shape[1])))  # (B, H, n_seg * L)
            y = y.scatter_add(2, idx[None, :, :, None].expand(B, H, idx.shape[1], hd), weight[..., None].to(o.dtype) * o)
        return y[:, :, :T]

    # --------------------------------------------------------------- dense closed form (decoding)

    def log_multiplicity(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """``log m`` (H, Tq, Tk): ``m`` counts the patterns in which query and key share a segment and are
        both selected by the head, with the key not after the query; ``-inf`` where ``m = 0``."""
        heads = torch.arange(self.n_heads, device=q_pos.device)[:, None, None]
        i, j = q_pos[None, :, None], k_pos[None, None, :]
        count = torch.zeros(self.n_heads, len(q_pos), len(k_pos), device=q_pos.device)
        for w, r in self.patterns:
            selected = (i // w == j // w) & ((i % w) % r == heads % r) & ((j % w) % r == heads % r) & (j <= i)
            count = count + selected
        return count.log()

    def _dense(self, q, k, v, q_pos, k_pos) -> torch.Tensor:
        logits = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, Tq, Tk)
        compute = torch.promote_types(logits.dtype, torch.float32)
        logits = logits.to(compute) + self.log_multiplicity(q_pos, k_pos).to(compute)
        if self.alibi is not None:
            logits = logits + self.alibi.bias(q_pos, k_pos).to(compute)
        covered = torch.isfinite(logits).any(-1, keepdim=True)
        probs = torch.softmax(logits.masked_fill(~covered, 0.0), dim=-1) * covered
        return probs.to(v.dtype) @ v

    # ------------------------------------------------------------------------------------ costs

    def flops_per_token(self, seq_len: int) -> int:
        """Projections, plus QK^T and PV over every (slot, slot) pair of each pattern's segments, as the
        segment form computes them (the upper triangles and the padded last segment included)."""
        scores = 0
        for w_full, r in self.patterns:
            w = self.effective_segment(w_full, r, seq_len)
            n_seg, L = -(-seq_len // w), w // r
            scores += 4 * self.n_heads * self.head_dim * n_seg * L * L
        return int(linear_flops(self.q_proj, self.k_proj, self.v_proj, self.o_proj) + scores / seq_len)

    def state_bytes(self, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
        kept = seq_len % self.largest_segment
        return 2 * self.n_heads * self.head_dim * kept * torch.finfo(dtype).bits // 8

    def kernel_path(self) -> str:
        return "torch.segments"
