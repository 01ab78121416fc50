"""Linear attention and its decayed descendants, sharing one chunked core (``ops_gla.py``):

- ``linear_attn``: linear attention, Katharopoulos et al. 2020, "Transformers are RNNs": softmax replaced
  by a feature map ``phi`` (``elu(x) + 1`` in the paper), optionally normalised by ``phi(q_t) . sum_s phi(k_s)``.
- ``retnet``: multi-scale retention, Sun et al. 2023, "Retentive Network": a fixed decay
  ``gamma_h = 1 - 2^(-5-h)`` per head, a rotation of queries/keys by position (the rotation half of
  xPos, i.e. RoPE; its decay half *is* gamma), GroupNorm per head and a swish output gate.
- ``gla``: gated linear attention, Yang et al. 2024, "Gated Linear Attention Transformers with
  Hardware-Efficient Training": a data-dependent decay per key channel from a low-rank projection,
  ``alpha_t = sigmoid(x W1 W2 + b)^(1/16)``, a per-head norm and a swish output gate.

All three keep a (K, V) matrix per head as their state, so generation costs O(1) per token in memory and
time. RWKV-6 (``rwkv6.py``) reuses :class:`GatedLinearMixer`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from archifactory.config import MAX_COUNT, MAX_WIDTH_EXPAND, BuildContext, FieldError
from archifactory.mixers.base import Mixer, MixerConfig, linear_flops, padded_length
from archifactory.mixers.kernels import Backend, parameter_device, select_backend
from archifactory.mixers.ops_gla import (
    HeadNorm,
    chunked_gla,
    compute_dtype,
    core_flops_per_token,
    default_chunk_size,
    recurrent_gla,
)
from archifactory.nn.init import init_linear
from archifactory.nn.positions import Rotary, rotate_half
from archifactory.registry import register_mixer

HeadNormKind = Literal["groupnorm", "rmsnorm"]


class GatedLinearConfig(MixerConfig):
    """Fields shared by the family: heads, key/value widths relative to ``d_model``, the kernel backend."""

    n_heads: int = Field(4, ge=1, le=MAX_COUNT)
    expand_k: float = Field(1.0, gt=0, le=MAX_WIDTH_EXPAND)
    """Total key width (all heads) is ``expand_k * d_model``."""
    expand_v: float = Field(1.0, gt=0, le=MAX_WIDTH_EXPAND)
    """Total value width (all heads) is ``expand_v * d_model``."""
    backend: Backend = "auto"
    """``fla`` runs flash-linear-attention's chunk kernel (CUDA only); ``torch`` the readable core."""

    def widths(self, d_model: int) -> tuple[int, int]:
        """Per-head key and value widths."""
        return round(d_model * self.expand_k) // self.n_heads, round(d_model * self.expand_v) // self.n_heads

    def check(self, ctx: BuildContext) -> None:
        for name, expand in (("expand_k", self.expand_k), ("expand_v", self.expand_v)):
            width = ctx.d_model * expand
            if not math.isclose(width, round(width)):
                raise FieldError(
                    name, f"{name}={expand} * d_model={ctx.d_model} = {width:g} is not a whole number of channels"
                )
            if round(width) % self.n_heads:
                valid = [h for h in range(1, 65) if round(width) % h == 0]
                raise FieldError(
                    "n_heads",
                    f"n_heads={self.n_heads} does not divide {name} * d_model = {round(width)} channels; "
                    f"choose one of {valid}",
                )


@dataclasses.dataclass
class RecurrentState:
    """The recurrence's state after ``pos`` tokens: a (K, V) matrix per head, ``(B, H, K, V)``, kept in
    fp32 (fp64 for an fp64 model) whatever the activation dtype, since it sums over the whole history."""

    state: torch.Tensor
    key_sum: torch.Tensor | None = None  # (B, H, K): sum of phi(k) so far, for normalised linear attention
    pos: int = 0


class GatedLinearMixer(Mixer):
    """What the family shares: q/k/v/output projections, the choice between fla's kernel, the chunked
    core and the one-token recurrent step, the state cache and the cost accounting. Subclasses compute
    their queries, keys, values and decays and say how fla should be called."""

    fla_op: str = ""  # name of the fla kernel this family calls, for kernel_path()
    per_channel_decay: bool = False  # decays per key channel (GLA, RWKV-6) rather than per head or none

    def __init__(self, cfg: GatedLinearConfig, ctx: BuildContext, key_dim: int, value_dim: int) -> None:
        super().__init__(ctx)
        d = ctx.d_model
        self.n_heads, self.key_dim, self.value_dim = cfg.n_heads, key_dim, value_dim
        self.backend = cfg.backend
        self.scale = key_dim**-0.5  # as in fla's kernels; a scalar the output norms mostly absorb
        self.q_proj = nn.Linear(d, self.n_heads * key_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_heads * key_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_heads * value_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * value_dim, d, bias=False)
        self.std, self.out_std = ctx.init.std, ctx.init.out_std(ctx.n_layers)

    def _heads(self, y: torch.Tensor) -> torch.Tensor:
        """(B, T, H * D) -> (B, T, H, D)."""
        return y.view(*y.shape[:2], self.n_heads, -1)

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            init_linear(proj, self.std)
        init_linear(self.o_proj, self.out_std)

    # --------------------------------------------------------------------------------- recurrence

    def mix(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        log_decay: torch.Tensor | None,
        cache: RecurrentState | None,
        bonus: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the recurrence on (B, T, H, K/V) inputs from the cached state; update the cache in place.

        With a cache and one token (generation) the recurrent step runs; otherwise the chunked form,
        from the cached state if any. Both compute the same function (the contract test checks it).
        """
        initial = cache.state if cache is not None else None
        if select_backend(self.backend, q.device, self.fla_op) == "fla":
            out, state = self.fla_core(q, k, v, log_decay, initial, output_final_state=cache is not None)
        elif cache is not None and q.shape[1] == 1:
            out, state = recurrent_gla(q, k, v, log_decay, bonus=bonus, scale=self.scale, initial_state=initial)
        else:
            out, state = chunked_gla(q, k, v, log_decay, bonus=bonus, scale=self.scale, initial_state=initial)
        if cache is not None:
            cache.state = state.to(cache.state.dtype)
            cache.pos += q.shape[1]
        return out

    def fla_core(self, q, k, v, log_decay, initial_state, output_final_state):  # pragma: no cover - CUDA only
        raise NotImplementedError

    def init_cache(self, batch_size: int, device, dtype) -> RecurrentState:
        shape = (batch_size, self.n_heads, self.key_dim, self.value_dim)
        return RecurrentState(state=torch.zeros(shape, device=device, dtype=compute_dtype(dtype)))

    def state_bytes(self, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
        return self.n_heads * self.key_dim * self.value_dim * torch.finfo(compute_dtype(dtype)).bits // 8

    def core_flops(self, seq_len: int) -> int:
        chunk = min(default_chunk_size(self.per_channel_decay), seq_len)
        per_token = core_flops_per_token(self.n_heads, self.key_dim, self.value_dim, chunk)
        return int(per_token * padded_length(seq_len, chunk) / seq_len)  # the zero-padded last chunk is computed

    def kernel_path(self) -> str:
        if select_backend(self.backend, parameter_device(self), self.fla_op) == "fla":
            return f"fla.{self.fla_op}"
        return "torch.chunk"  # (one-token decoding with a cache runs the recurrent step of the same core)


# ------------------------------------------------------------------------------------------ linear_attn


FEATURE_MAPS = {
    "elu1": lambda x: F.elu(x) + 1.0,  # Katharopoulos et al. 2020, Eq. 7: positive, so the normaliser is too
    "relu": F.relu,
    "identity": lambda x: x,
}


@register_mixer
class LinearAttentionConfig(GatedLinearConfig):
    """Linear attention (Katharopoulos et al. 2020): ``o_t = phi(q_t) S_t`` with ``S_t = S_{t-1} +
    phi(k_t)^T v_t``, divided by ``phi(q_t) . z_t`` with ``z_t = sum_{s<=t} phi(k_s)`` when ``normalize``."""

    kind: Literal["linear_attn"] = "linear_attn"
    feature_map: Literal["elu1", "relu", "identity"] = "elu1"
    normalize: bool = True
    """Divide by ``phi(q_t) . sum_{s<=t} phi(k_s)`` (the paper's Eq. 6); needs a non-negative feature map."""
    output_norm: bool = False
    """Normalise each head's output (RMSNorm) before the output projection instead of, or besides, the
    denominator: TransNormer's remedy for unbounded outputs (Qin et al. 2022), fla's default."""
    norm_eps: float = Field(1e-5, gt=0)

    def check(self, ctx: BuildContext) -> None:
        super().check(ctx)
        if self.normalize and self.feature_map == "identity":
            raise FieldError(
                "feature_map",
                "normalize=true divides by phi(q).sum(phi(k)), which can be zero or negative with "
                "feature_map='identity'; use 'elu1' or 'relu', or set normalize=false",
            )

    def build(self, ctx: BuildContext) -> "LinearAttention":
        return LinearAttention(self, ctx)

    @classmethod
    def contract_examples(cls, d_model: int) -> list["LinearAttentionConfig"]:
        return [
            cls(n_heads=4),
            cls(n_heads=2, feature_map="identity", normalize=False, output_norm=True),
            cls(n_heads=4, feature_map="relu", expand_v=2.0),
        ]


class LinearAttention(GatedLinearMixer):
    fla_op = "chunk_linear_attn"
    # Only guards an exactly-zero denominator: with non-negative features the output is a convex
    # combination of values, bounded without it. fla's value (the paper's code uses 1e-6).
    DENOMINATOR_EPS = 1e-10

    def __init__(self, cfg: LinearAttentionConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx, *cfg.widths(ctx.d_model))
        self.feature_map = FEATURE_MAPS[cfg.feature_map]
        self.normalize = cfg.normalize
        self.out_norm = HeadNorm(self.n_heads, self.value_dim, "rmsnorm", cfg.norm_eps) if cfg.output_norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.out_norm is not None:
            self.out_norm.reset_parameters()

    def forward(
        self, x: torch.Tensor, cache: RecurrentState | None = None
    ) -> tuple[torch.Tensor, RecurrentState | None]:
        q = self.feature_map(self._heads(self.q_proj(x)))  # (B, T, H, K)
        k = self.feature_map(self._heads(self.k_proj(x)))  # (B, T, H, K)
        v = self._heads(self.v_proj(x))  # (B, T, H, V)
        key_sum = cache.key_sum if cache is not None else None
        o = self.mix(q, k, v, None, cache)  # (B, T, H, V), fp32
        if self.normalize:
            # z_t = sum_{s<=t} phi(k_s), carried across calls; the denominator uses the same scaled q as
            # the numerator (as fla's normalize does), so the scale cancels.
            dtype = compute_dtype(o.dtype)
            with torch.autocast(device_type=x.device.type, enabled=False):
                z = k.to(dtype).cumsum(1)  # (B, T, H, K)
                if key_sum is not None:
                    z = z + key_sum.to(dtype)[:, None]
                    cache.key_sum = z[:, -1].to(key_sum.dtype)
                o = o.to(dtype) / ((q.to(dtype) * self.scale * z).sum(-1, keepdim=True) + self.DENOMINATOR_EPS)
        o = o.flatten(-2) if self.out_norm is None else self.out_norm(o)  # (B, T, H * V)
        return self.o_proj(o.to(x.dtype)), cache

    def fla_core(self, q, k, v, log_decay, initial_state, output_final_state):  # pragma: no cover - CUDA only
        from fla.ops.linear_attn import chunk_linear_attn

        # The denominator is applied by forward() on both paths, so fla runs the plain sum.
        return chunk_linear_attn(
            q, k, v, scale=self.scale, initial_state=initial_state,
            output_final_state=output_final_state, normalize=False,
        )

    def init_cache(self, batch_size: int, device, dtype) -> RecurrentState:
        cache = super().init_cache(batch_size, device, dtype)
        if self.normalize:
            cache.key_sum = torch.zeros(batch_size, self.n_heads, self.key_dim, device=device, dtype=cache.state.dtype)
        return cache

    def state_bytes(self, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
        key_sum = self.n_heads * self.key_dim * torch.finfo(compute_dtype(dtype)).bits // 8 if self.normalize else 0
        return super().state_bytes(seq_len, dtype) + key_sum

    def flops_per_token(self, seq_len: int) -> int:
        # Projections plus the chunked core (ops_gla.core_flops_per_token); the denominator is elementwise.
        return linear_flops(self.q_proj, self.k_proj, self.v_proj, self.o_proj) + self.core_flops(seq_len)


# ----------------------------------------------------------------------------------------------- RetNet


@register_mixer
class RetNetConfig(GatedLinearConfig):
    """Multi-scale retention (Sun et al. 2023, Sec. 2): per head ``o_t = q_t S_t``,
    ``S_t = gamma_h S_{t-1} + k_t^T v_t``, ``gamma_h = 1 - 2^(-5-h)``; queries and keys rotated by position;
    ``MSR(X) = (swish(X W_G) * GroupNorm_h(retention)) W_O``. The paper's extra scalings of the scores
    (decay and retention normalisation, Sec. 2.2) are per-row positive factors that the per-head
    GroupNorm removes, so they are left out."""

    kind: Literal["retnet"] = "retnet"
    expand_k: float = Field(1.0, gt=0, le=MAX_WIDTH_EXPAND)
    expand_v: float = Field(2.0, gt=0, le=MAX_WIDTH_EXPAND)
    """The paper's value width is 2 d_model (keys d_model), with a smaller FFN to keep parameters equal."""
    rotary: bool = True
    """Rotate queries/keys by position (xPos's rotation, Sun et al. 2023 Eq. 3); ``false`` leaves the
    decay as the only positional signal."""
    rope_theta: float = Field(10000.0, gt=1)
    """Base of the rotation wavelengths, > 1 like the RoPE position's ``theta`` (0 made the loss NaN)."""
    head_norm: HeadNormKind = "groupnorm"
    norm_eps: float = Field(1e-5, gt=0)

    def check(self, ctx: BuildContext) -> None:
        super().check(ctx)
        key_dim = self.widths(ctx.d_model)[0]
        if self.rotary and key_dim % 2:
            raise FieldError("rotary", f"rotary=true needs an even key width per head, got {key_dim}; "
                             "change expand_k or n_heads, or set rotary=false")

    def build(self, ctx: BuildContext) -> "RetNet":
        return RetNet(self, ctx)

    @classmethod
    def contract_examples(cls, d_model: int) -> list["RetNetConfig"]:
        return [cls(n_heads=4), cls(n_heads=2, rotary=False, head_norm="rmsnorm", expand_v=1.0)]


def retention_log_decays(n_heads: int) -> torch.Tensor:
    """``log gamma_h`` with ``gamma_h = 1 - 2^(-5-h)`` (Sun et al. 2023, Sec. 2.2): head 0 forgets over ~32
    tokens, each next head twice as slowly. (H,), fp32."""
    return torch.log1p(-(2.0 ** (-5.0 - torch.arange(n_heads, dtype=torch.float64)))).float()


class RetNet(GatedLinearMixer):
    fla_op = "chunk_simple_gla"

    def __init__(self, cfg: RetNetConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx, *cfg.widths(ctx.d_model))
        self.g_proj = nn.Linear(ctx.d_model, self.n_heads * self.value_dim, bias=False)
        self.norm = HeadNorm(self.n_heads, self.value_dim, cfg.head_norm, cfg.norm_eps)
        self.rotary = Rotary(self.key_dim, self.key_dim, cfg.rope_theta, None) if cfg.rotary else None
        self.register_buffer("log_gamma", retention_log_decays(self.n_heads), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        init_linear(self.g_proj, self.std)
        self.norm.reset_parameters()

    def forward(
        self, x: torch.Tensor, cache: RecurrentState | None = None
    ) -> tuple[torch.Tensor, RecurrentState | None]:
        B, T, _ = x.shape
        q = self._heads(self.q_proj(x))  # (B, T, H, K)
        k = self._heads(self.k_proj(x))
        v = self._heads(self.v_proj(x))  # (B, T, H, V)
        if self.rotary is not None:
            start = cache.pos if cache is not None else 0
            cos, sin = self.rotary.cos_sin(torch.arange(start, start + T, device=x.device), q.dtype)  # (T, K)
            cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        log_decay = self.log_gamma.view(1, 1, -1, 1).expand(B, T, -1, 1)  # (B, T, H, 1)
        o = self.mix(q, k, v, log_decay, cache)  # (B, T, H, V)
        o = self.norm(o) * F.silu(self.g_proj(x)).to(o.dtype)  # (B, T, H * V)
        return self.o_proj(o.to(x.dtype)), cache

    def fla_core(self, q, k, v, log_decay, initial_state, output_final_state):  # pragma: no cover - CUDA only
        from fla.ops.simple_gla import chunk_simple_gla

        # g_gamma: one data-independent log-decay per head, (H,) fp32.
        return chunk_simple_gla(
            q, k, v, g_gamma=self.log_gamma, scale=self.scale, initial_state=initial_state,
            output_final_state=output_final_state,
        )

    def flops_per_token(self, seq_len: int) -> int:
        # Projections plus the chunked core (ops_gla.core_flops_per_token); rotation, norm, gate elementwise.
        return linear_flops(self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.o_proj) + self.core_flops(seq_len)


# -------------------------------------------------------------------------------------------------- GLA


@register_mixer
class GLAConfig(GatedLinearConfig):
    """Gated linear attention (Yang et al. 2024, Sec. 4.4): ``S_t = diag(alpha_t) S_{t-1} + k_t^T v_t``,
    ``o_t = q_t S_t``, with ``alpha_t = sigmoid(x_t W_a1 W_a2 + b_a)^(1/tau)`` per key channel;
    ``y_t = (swish(x_t W_r + b_r) * Norm_h(o_t)) W_O``."""

    kind: Literal["gla"] = "gla"
    expand_k: float = Field(0.5, gt=0, le=MAX_WIDTH_EXPAND)
    """The paper's key width is d_model / 2 (values d_model): the state and the in-chunk decay tensors
    scale with it."""
    gate_low_rank: int = Field(16, ge=1)
    """Rank of the decay projection ``W_a1 W_a2`` (16 in the paper)."""
    gate_logit_normalizer: float = Field(16.0, ge=1)
    """``tau``: ``log alpha = logsigmoid(.) / tau`` keeps decays near 1 at init (0.5^(1/16) = 0.958); at least
    1 (below it the log-decays grow beyond logsigmoid's range: 1e-300 made the loss NaN)."""
    head_norm: HeadNormKind = "groupnorm"
    norm_eps: float = Field(1e-5, gt=0)

    def build(self, ctx: BuildContext) -> "GLA":
        return GLA(self, ctx)

    @classmethod
    def contract_examples(cls, d_model: int) -> list["GLAConfig"]:
        return [cls(n_heads=4), cls(n_heads=2, expand_k=1.0, gate_low_rank=4, head_norm="rmsnorm")]


class GLA(GatedLinearMixer):
    fla_op = "chunk_gla"
    per_channel_decay = True

    def __init__(self, cfg: GLAConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx, *cfg.widths(ctx.d_model))
        d, key_width = ctx.d_model, self.n_heads * self.key_dim
        self.gate_down = nn.Linear(d, cfg.gate_low_rank, bias=False)  # W_a1
        self.gate_up = nn.Linear(cfg.gate_low_rank, key_width, bias=True)  # W_a2, b_a
        self.tau = cfg.gate_logit_normalizer
        self.r_proj = nn.Linear(d, self.n_heads * self.value_dim, bias=True)  # output gate W_r, b_r
        self.norm = HeadNorm(self.n_heads, self.value_dim, cfg.head_norm, cfg.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for proj in (self.gate_down, self.gate_up, self.r_proj):
            init_linear(proj, self.std)
        self.norm.reset_parameters()

    def forward(
        self, x: torch.Tensor, cache: RecurrentState | None = None
    ) -> tuple[torch.Tensor, RecurrentState | None]:
        q = self._heads(self.q_proj(x))  # (B, T, H, K)
        k = self._heads(self.k_proj(x))
        v = self._heads(self.v_proj(x))  # (B, T, H, V)
        # log alpha_t in fp32 at least: logsigmoid keeps it finite and <= 0 for any logit.
        gate_logits = self._heads(self.gate_up(self.gate_down(x))).to(compute_dtype(x.dtype))
        log_decay = F.logsigmoid(gate_logits) / self.tau  # (B, T, H, K)
        o = self.mix(q, k, v, log_decay, cache)  # (B, T, H, V)
        o = self.norm(o) * F.silu(self.r_proj(x)).to(o.dtype)  # (B, T, H * V)
        return self.o_proj(o.to(x.dtype)), cache

    def fla_core(self, q, k, v, log_decay, initial_state, output_final_state):  # pragma: no cover - CUDA only
        from fla.ops.gla import chunk_gla

        # g: per-channel log-decay (B, T, H, K); state layout (B, H, K, V) (state_v_first=False).
        return chunk_gla(
            q, k, v, g=log_decay, scale=self.scale, initial_state=initial_state,
            output_final_state=output_final_state,
        )

    def flops_per_token(self, seq_len: int) -> int:
        projections = linear_flops(
            self.q_proj, self.k_proj, self.v_proj, self.gate_down, self.gate_up, self.r_proj, self.o_proj
        )
        return projections + self.core_flops(seq_len)
