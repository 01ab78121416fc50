"""The delta rule: DeltaNet (Schlag et al. 2021, "Linear Transformers Are Secretly Fast Weight
Programmers"; Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence
Length") and Gated DeltaNet (Yang et al. 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule").

Each head keeps a fast-weight matrix ``S`` of shape ``(d_k, d_v)`` (flash-linear-attention's layout) and
reads it with its query, ``o_t = S_t^T q_t``. Linear attention only ever adds ``k_t v_t^T``; the delta
rule first *removes* what ``S`` currently stores under ``k_t`` and writes a blend of old and new value
with strength ``beta_t`` in (0, 1)::

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T

DeltaNet has ``alpha_t = 1``; Gated DeltaNet adds a scalar per-head decay ``alpha_t = exp(g_t)``,
parameterised as in Mamba2: ``g_t = -exp(A_log) * softplus(W_a x_t + dt_bias)``. Keys are
L2-normalised so that ``I - beta k k^T`` is a contraction (its eigenvalues are 1 and ``1 - beta``).

The layer around the recurrence follows flash-linear-attention's ``DeltaNet`` / ``GatedDeltaNet``
layers: q/k/v projections, a short causal depthwise convolution with SiLU on each, L2-normalised q/k,
``beta = sigmoid(W_b x)``, a per-head RMSNorm on the output (times ``silu(W_g x)`` with the output
gate), and an output projection.

Two forms of one function (:func:`chunk_delta_rule`; :func:`recurrent_delta_rule` is the readable
per-token spec the tests hold it to):

- **chunked** (training, prefill, and decoding): the sequence is cut into chunks of ``chunk_size``
  tokens. Inside a chunk, the values each token actually writes (``u``) depend on each other through a
  unit lower-triangular system, the WY/UT representation of the product of Householder-like factors;
  it is solved for all chunks at once with one batched triangular solve. Only the hand-over of ``S``
  from chunk to chunk is a Python loop, over ``T / chunk_size`` steps of matrix products.
- **recurrent step**: decoding one token is the same function with a chunk of one token (the
  triangular system is then 1x1); the cache holds ``S`` and the last ``conv_size - 1`` projected inputs
  of the short convolution.

Everything inside the recurrence runs in fp32 (fp64 stays fp64), with autocast off, as fla does.
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
from archifactory.mixers.base import (
    Mixer,
    MixerConfig,
    check_heads_divide,
    compute_dtype,
    linear_flops,
    padded_length,
)
from archifactory.mixers.kernels import Backend, parameter_device, select_backend
from archifactory.nn.depthwise import causal_depthwise_conv
from archifactory.nn.init import init_linear
from archifactory.nn.norms import RMSNorm
from archifactory.nn.roles import FILTER, VECTOR
from archifactory.registry import register_mixer

# ------------------------------------------------------------------------------------ the recurrence


def recurrent_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (gated) delta rule one token at a time: the specification, O(T) Python steps.

    q, k: (B, T, H, d_k); v: (B, T, H, d_v); beta, g: (B, T, H) (``g`` is the log decay, ``None`` for
    none); initial_state: (B, H, d_k, d_v). Returns o: (B, T, H, d_v) and the final state.
    """
    dtype = compute_dtype(q.dtype)
    q, k, v, beta = (t.to(dtype) for t in (q, k, v, beta))
    B, T, H, dk = q.shape
    S = q.new_zeros(B, H, dk, v.shape[-1]) if initial_state is None else initial_state.to(dtype)
    outs = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t].to(dtype).exp()[..., None, None]
        k_t = k[:, t]  # (B, H, d_k)
        # the value stored under k_t now, replaced by a beta-blend of itself and v_t
        old = torch.einsum("bhk,bhkv->bhv", k_t, S)
        u = beta[:, t, :, None] * (v[:, t] - old)  # (B, H, d_v)
        S = S + k_t[..., :, None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    return torch.stack(outs, dim=1).to(v.dtype), S


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function as :func:`recurrent_delta_rule`, chunk by chunk (same arguments and results).

    Within a chunk (positions i = 1..C, state S_0 on entry, G_i = g_1 + ... + g_i) write the recurrence as
    ``S_i = e^{g_i} S_{i-1} + k_i u_i^T`` with ``u_i = beta_i (v_i - e^{g_i} S_{i-1}^T k_i)`` the value
    actually written. Unrolling ``S_{i-1}`` gives, for all i at once::

        (I + A) U = beta V - (beta e^G K) S_0,     A_ij = beta_i e^{G_i - G_j} k_i.k_j  (j < i)

    so with ``M = (I + A)^{-1}`` (unit lower-triangular: a triangular solve, no inverse)
    ``U = M (beta V) - M (beta e^G K) S_0``, and then::

        O   = (e^G Q) S_0 + (Q K^T * e^{G_i - G_j}, j <= i) U
        S_C = e^{G_C} S_0 + (e^{G_C - G} K)^T U

    Everything that does not involve S_0 is computed for every chunk in one batch; the loop carries S.
    """
    out_dtype = v.dtype
    dtype = compute_dtype(q.dtype)
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    c = min(chunk_size, T)
    pad = -T % c  # zero padding at the end: k = v = beta = g = 0 leaves the state untouched
    N = (T + pad) // c

    def chunked(t: torch.Tensor) -> torch.Tensor:
        # (B, T, H, ...) -> (N, B, H, c, ...): chunk-major, so that each step of the loop below reads
        # contiguous slices
        t = t.to(dtype)
        if pad:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        t = t.reshape(B, N, c, H, *t.shape[3:])
        return t.permute(1, 0, 3, 2, *range(4, t.dim())).contiguous()

    with torch.autocast(q.device.type, enabled=False):
        q, k, v = chunked(q) * scale, chunked(k), chunked(v)  # (N, B, H, c, d)
        beta = chunked(beta)[..., None]  # (N, B, H, c, 1)
        if g is None:
            decay_chunk = q.new_ones(N, 1, 1, 1, 1)
        else:
            G = chunked(g).cumsum(-1)  # (N, B, H, c), log decay from the chunk start
            causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
            # e^{G_i - G_j} for j <= i (<= 1); -inf above the diagonal so exp gives exact zeros
            diff = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf"))
            pair_decay = diff.exp()  # (N, B, H, c, c)
            decay_in = G.exp()[..., None]  # S_0 seen from position i
            decay_out = (G[..., -1:] - G).exp()[..., None]  # position j seen from the chunk end
            decay_chunk = G[..., -1:, None].exp()  # (N, B, H, 1, 1)

        # The WY/UT step: solve (I + A) [U0 | W] = [beta V | beta e^G K] for every chunk at once.
        beta_k = beta * k
        A = beta_k @ k.transpose(-1, -2)  # (N, B, H, c, c)
        scores = q @ k.transpose(-1, -2)
        if g is None:
            scores = scores.tril()  # zero above the diagonal: causal
        else:
            A, scores = A * pair_decay, scores * pair_decay  # pair_decay is zero above the diagonal
            beta_k = beta_k * decay_in
        system = torch.eye(c, dtype=dtype, device=q.device) + A.tril(-1)
        rhs = torch.cat([beta * v, beta_k], dim=-1)  # (N, B, H, c, d_v + d_k)
        U0, W = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True).split([dv, dk], -1)
        q_in = q if g is None else q * decay_in
        k_out_t = (k if g is None else k * decay_out).transpose(-1, -2)  # (N, B, H, d_k, c)

        S = q.new_zeros(B, H, dk, dv) if initial_state is None else initial_state.to(dtype)
        outs = []
        # unbind once rather than index in the loop: one backward op instead of a zero-filled tensor per slice
        for U0_n, W_n, q_n, scores_n, k_n, decay_n in zip(
            U0.unbind(0), W.unbind(0), q_in.unbind(0), scores.unbind(0), k_out_t.unbind(0), decay_chunk.unbind(0)
        ):  # carries the state across chunks: T / c steps of fused matrix products (baddbmm: fewer CPU kernels)
            S3 = S.flatten(0, 1)  # (B H, d_k, d_v)
            u = torch.baddbmm(U0_n.flatten(0, 1), W_n.flatten(0, 1), S3, alpha=-1)  # (B H, c, d_v): values written
            outs.append(torch.baddbmm(torch.bmm(q_n.flatten(0, 1), S3), scores_n.flatten(0, 1), u).view(B, H, c, dv))
            S = torch.baddbmm((S * decay_n).flatten(0, 1), k_n.flatten(0, 1), u).view(B, H, dk, dv)
        o = torch.stack(outs, dim=1)  # (B, N, H, c, d_v)
        o = o.transpose(2, 3).reshape(B, N * c, H, dv)[:, :T]
    return o.to(out_dtype), S


def chunk_delta_rule_flops(chunk: int, d_k: int, d_v: int) -> int:
    """Forward FLOPs per token and head of :func:`chunk_delta_rule` with chunks of ``chunk`` tokens
    (2 per multiply-add; the triangular solve counted as c^2 multiply-adds per right-hand column)."""
    per_chunk = (
        2 * chunk * chunk * d_k * 2  # beta K K^T and Q K^T
        + chunk * chunk * (d_v + d_k)  # the triangular solve
        + 2 * chunk * chunk * d_v  # scores @ U
        + 2 * chunk * d_k * d_v * 3  # W S, Q S, K^T U
    )
    return per_chunk // chunk


# --------------------------------------------------------------------------------- the short conv


class ShortConv(nn.Module):
    """Causal depthwise convolution over time followed by SiLU (as fla's ``ShortConvolution``).

    It gives q/k/v a few tokens of local context before the recurrence, which Yang et al. (2024) found
    important for DeltaNet. The cache holds the last ``kernel_size - 1`` inputs.
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.channels, self.kernel_size = channels, kernel_size
        self.weight = nn.Parameter(torch.empty(kernel_size, channels))  # (K, C): tap j looks K-1-j tokens back

    def param_roles(self):
        # fla's ShortConvolution is a plain depthwise nn.Conv1d, decayed by flame's AdamW like every weight;
        # per-channel taps are not a matrix, so never Muon.
        return {"weight": FILTER}

    def reset_parameters(self) -> None:
        # nn.Conv1d's default for a depthwise filter: fan_in = kernel_size
        bound = 1 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, past: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, C); past: (B, K-1, C) previous inputs or ``None`` (zeros). Returns y: (B, T, C) and
        the last K-1 inputs, for the next call."""
        K, T = self.kernel_size, x.shape[1]
        if past is None:
            padded = F.pad(x, (0, 0, K - 1, 0))
        else:
            padded = torch.cat([past.to(x.dtype), x], dim=1)  # (B, K-1+T, C)
        # depthwise: channel c is the cross-correlation of padded[:, :, c] with weight[:, c]
        y = causal_depthwise_conv(padded, self.weight)  # (B, T, C)
        return F.silu(y), padded[:, T:]


# ------------------------------------------------------------------------------------------ configs


class _DeltaRuleConfig(MixerConfig):
    n_heads: int = Field(4, ge=1, le=MAX_COUNT)
    head_dim: int | None = Field(None, ge=1)
    """Key channels per head; ``None`` means ``d_model // n_heads``."""
    expand_v: float = Field(1.0, gt=0, le=MAX_WIDTH_EXPAND)
    """Value channels per head = ``expand_v * head_dim`` (Gated DeltaNet's paper uses 2 with a narrower
    ``n_heads * head_dim = 0.75 d_model``; 1 keeps the projections the size of attention's)."""
    conv_size: int | None = Field(4, ge=2)
    """Kernel of the short causal convolution on q, k and v; ``None`` for none (then plain SiLU)."""
    use_gate: bool
    """Output gate: the normed output is multiplied by ``silu(W_g x)``."""
    allow_neg_eigval: bool = False
    """``beta`` in (0, 2) instead of (0, 1), so ``I - beta k k^T`` can have a negative eigenvalue
    (Grazzi et al. 2025, "Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues")."""
    chunk_size: int = Field(64, ge=1)
    """Tokens per chunk of the training form; only speed (and rounding) depends on it."""
    norm_eps: float = Field(1e-5, gt=0)
    backend: Backend = "auto"
    """``torch`` (the chunked form here), ``fla`` (flash-linear-attention's Triton kernel, CUDA only) or
    ``auto`` (fla when on CUDA with fla installed)."""

    def resolved_head_dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def value_head_dim(self, d_model: int) -> int:
        return round(self.expand_v * self.resolved_head_dim(d_model))

    def check(self, ctx: BuildContext) -> None:
        check_heads_divide(self.n_heads, ctx.d_model, self.head_dim)
        head_dim, v_head_dim = self.resolved_head_dim(ctx.d_model), self.value_head_dim(ctx.d_model)
        if v_head_dim < 1 or not math.isclose(self.expand_v * head_dim, v_head_dim):
            raise FieldError(
                "expand_v",
                f"expand_v={self.expand_v} times head_dim={head_dim} is not a positive whole number of value "
                f"channels; choose expand_v so that expand_v * {head_dim} is an integer (e.g. 1, 2, 0.5)",
            )

    def build(self, ctx: BuildContext) -> DeltaNet:
        return DeltaNet(self, ctx)


@register_mixer
class DeltaNetConfig(_DeltaRuleConfig):
    """DeltaNet: the delta rule without decay (Schlag et al. 2021; Yang et al. 2024)."""

    kind: Literal["deltanet"] = "deltanet"
    use_gate: bool = False

    @classmethod
    def contract_examples(cls, d_model: int) -> list[DeltaNetConfig]:
        return [
            cls(n_heads=4, chunk_size=4),
            cls(n_heads=2, expand_v=2.0, use_gate=True, allow_neg_eigval=True, chunk_size=3),
            cls(n_heads=4, conv_size=None),
        ]


@register_mixer
class GatedDeltaNetConfig(_DeltaRuleConfig):
    """Gated DeltaNet: the delta rule with a Mamba2-style scalar decay per head (Yang et al. 2025)."""

    kind: Literal["gated_deltanet"] = "gated_deltanet"
    use_gate: bool = True

    @classmethod
    def contract_examples(cls, d_model: int) -> list[GatedDeltaNetConfig]:
        return [
            cls(n_heads=4, chunk_size=4),
            cls(n_heads=2, expand_v=2.0, use_gate=False, allow_neg_eigval=True, chunk_size=64),
            cls(n_heads=1, conv_size=None),
        ]


# ------------------------------------------------------------------------------------------- module


@dataclasses.dataclass
class DeltaCache:
    """conv: (B, conv_size - 1, 2 H d_k + H d_v) last projected q/k/v inputs (``None`` without a conv);
    state: (B, H, d_k, d_v) the fast weights, kept in at least fp32."""

    conv: torch.Tensor | None
    state: torch.Tensor


class DeltaNet(Mixer):
    """DeltaNet, or Gated DeltaNet when built from a :class:`GatedDeltaNetConfig`."""

    def __init__(self, cfg: _DeltaRuleConfig, ctx: BuildContext) -> None:
        super().__init__(ctx)
        d = ctx.d_model
        self.gated = isinstance(cfg, GatedDeltaNetConfig)  # decided once, at build time
        self.n_heads = H = cfg.n_heads
        self.head_dim = cfg.resolved_head_dim(d)
        self.v_head_dim = cfg.value_head_dim(d)
        self.key_dim, self.value_dim = H * self.head_dim, H * self.v_head_dim
        self.scale = self.head_dim**-0.5  # fla's default query scale, applied after the L2 norm
        self.beta_scale = 2.0 if cfg.allow_neg_eigval else 1.0
        self.chunk_size, self.backend = cfg.chunk_size, cfg.backend
        self.fla_op = "chunk_gated_delta_rule" if self.gated else "chunk_delta_rule"  # for select_backend

        # q, k and v in one matmul (and one conv): (B, T, 2 H d_k + H d_v)
        self.qkv_proj = nn.Linear(d, 2 * self.key_dim + self.value_dim, bias=False)
        self.conv = ShortConv(2 * self.key_dim + self.value_dim, cfg.conv_size) if cfg.conv_size else None
        self.b_proj = nn.Linear(d, H, bias=False)
        # Gated DeltaNet's decay, as Mamba2's: g = -exp(A_log) * softplus(W_a x + dt_bias), a log decay <= 0
        self.a_proj = nn.Linear(d, H, bias=False) if self.gated else None
        if self.gated:
            self.A_log = nn.Parameter(torch.empty(H))  # (H,)
            self.dt_bias = nn.Parameter(torch.empty(H))
        self.g_proj = nn.Linear(d, self.value_dim, bias=False) if cfg.use_gate else None
        self.o_norm = RMSNorm(self.v_head_dim, cfg.norm_eps)  # per head
        self.o_proj = nn.Linear(self.value_dim, d, bias=False)
        self.std, self.out_std = ctx.init.std, ctx.init.out_std(ctx.n_layers)
        self.reset_parameters()

    def param_roles(self):
        # fla's GatedDeltaNet marks A_log and dt_bias `_no_weight_decay` (Mamba-2's decay parameters);
        # the projections are nn.Linear matrices, the short convs and the output norm declare their own.
        return {"A_log": VECTOR, "dt_bias": VECTOR} if self.gated else {}

    def reset_parameters(self) -> None:
        for proj in (self.qkv_proj, self.b_proj, self.a_proj, self.g_proj):
            if proj is not None:
                init_linear(proj, self.std)
        init_linear(self.o_proj, self.out_std)
        if self.conv is not None:
            self.conv.reset_parameters()
        self.o_norm.reset_parameters()
        if self.gated:
            with torch.no_grad():
                # Mamba2's init: A ~ U(1, 16); dt log-uniform in [1e-3, 1e-1], stored through softplus^-1
                self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
                dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
                dt = dt.clamp(min=1e-4)
                self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    # ---------------------------------------------------------------------------------------- cache

    def init_cache(self, batch_size: int, device, dtype) -> DeltaCache:
        conv = None
        if self.conv is not None:
            conv = torch.zeros(batch_size, self.conv.kernel_size - 1, self.conv.channels, device=device, dtype=dtype)
        state = torch.zeros(batch_size, self.n_heads, self.head_dim, self.v_head_dim, device=device,
                            dtype=compute_dtype(dtype))
        return DeltaCache(conv=conv, state=state)

    def state_bytes(self, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
        # the conv inputs at the cache dtype, the state at least in fp32 (see init_cache)
        conv = 0 if self.conv is None else (self.conv.kernel_size - 1) * self.conv.channels * dtype.itemsize
        return conv + self.n_heads * self.head_dim * self.v_head_dim * compute_dtype(dtype).itemsize

    # -------------------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, cache: DeltaCache | None = None) -> tuple[torch.Tensor, DeltaCache | None]:
        B, T, _ = x.shape
        H, dk, dv = self.n_heads, self.head_dim, self.v_head_dim
        qkv = self.qkv_proj(x)  # (B, T, 2 H d_k + H d_v)
        if self.conv is not None:
            qkv, conv_state = self.conv(qkv, cache.conv if cache is not None else None)
            if cache is not None:
                cache.conv = conv_state.to(cache.conv.dtype)
        else:
            qkv = F.silu(qkv)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        fp = compute_dtype(qkv.dtype)  # normalise and build decays in at least fp32
        q = F.normalize(q.view(B, T, H, dk).to(fp), dim=-1).to(q.dtype)  # (B, T, H, d_k), unit norm
        k = F.normalize(k.view(B, T, H, dk).to(fp), dim=-1).to(k.dtype)
        v = v.view(B, T, H, dv)
        beta = self.beta_scale * torch.sigmoid(self.b_proj(x))  # (B, T, H)
        g = None
        if self.gated:
            g = -self.A_log.to(fp).exp() * F.softplus(self.a_proj(x).to(fp) + self.dt_bias.to(fp))  # (B, T, H)

        initial = cache.state if cache is not None else None
        if select_backend(self.backend, x.device, self.fla_op) == "fla":
            o, state = self._fla(q, k, v, beta, g, initial)
        else:
            o, state = chunk_delta_rule(
                q, k, v, beta, g, scale=self.scale, initial_state=initial, chunk_size=self.chunk_size
            )
        if cache is not None:
            cache.state = state.to(cache.state.dtype)

        o = self.o_norm(o)  # (B, T, H, d_v)
        if self.g_proj is not None:
            o = o * F.silu(self.g_proj(x)).view(B, T, H, dv)
        return self.o_proj(o.reshape(B, T, self.value_dim)), cache

    def _fla(self, q, k, v, beta, g, initial):
        """flash-linear-attention's chunk kernels (CUDA): same layout (B, T, H, d), state (B, H, d_k, d_v).
        q/k arrive L2-normalised, beta after the sigmoid and g as a log decay, so none of the kernels'
        in-kernel options (l2norm, beta sigmoid, gate activation) is switched on."""
        if self.gated:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule

            # note the order: fla's chunk kernel takes g before beta (keywords make it explicit)
            return chunk_gated_delta_rule(
                q=q, k=k, v=v, g=g, beta=beta.to(q.dtype), scale=self.scale,
                initial_state=initial, output_final_state=True,
            )
        from fla.ops.delta_rule import chunk_delta_rule as fla_chunk_delta_rule

        return fla_chunk_delta_rule(
            q=q, k=k, v=v, beta=beta.to(q.dtype), scale=self.scale, initial_state=initial, output_final_state=True
        )

    # ---------------------------------------------------------------------------------------- costs

    def flops_per_token(self, seq_len: int) -> int:
        # Matmul FLOPs (2 per multiply-add) of the projections, plus the chunked recurrence at the chunk
        # it runs with, min(chunk_size, seq_len), including the zero padding of the last chunk; the conv
        # counts 2 per tap per channel. Elementwise work (norms, gates, decays) is not counted, as for
        # attention's softmax.
        layers = (self.qkv_proj, self.b_proj, self.a_proj, self.g_proj, self.o_proj)
        proj = linear_flops(*(layer for layer in layers if layer is not None))
        conv = 0 if self.conv is None else 2 * self.conv.kernel_size * self.conv.channels
        chunk = max(1, min(self.chunk_size, seq_len))
        core = self.n_heads * chunk_delta_rule_flops(chunk, self.head_dim, self.v_head_dim)
        return int(proj + conv + core * padded_length(seq_len, chunk) / seq_len)

    def kernel_path(self) -> str:
        return f"{select_backend(self.backend, parameter_device(self), self.fla_op)}.{self.fla_op}"
