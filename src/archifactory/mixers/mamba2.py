"""Mamba-2: the state-space-duality (SSD) layer of Dao & Gu 2024, "Transformers are SSMs: Generalized
Models and Efficient Algorithms Through Structured State Space Duality" (arXiv:2405.21060).

Each of ``H`` heads keeps a state ``S_t`` of ``(d_state, head_dim)`` = ``(N, P)`` and, per token, runs the
selective SSM with a *scalar* decay per head (the SSD layer)::

    S_t = exp(dt_t * A) * S_{t-1} + B_t^T (dt_t * x_t)        B_t, C_t: (N,),  x_t: (P,)
    y_t = C_t S_t + D * x_t

``A = -exp(A_log)`` is a learned negative rate per head, ``dt_t = softplus(dt_raw_t + dt_bias)`` an
input-dependent step size per head, and ``B``, ``C`` are shared by the heads of each of ``n_groups`` groups
(the SSM analogue of grouped-query attention's shared keys). Around the SSM (the Mamba-2 block, Sec. 7) a
single ``in_proj`` produces ``(z, x, B, C, dt)``; a causal depthwise conv (width ``d_conv``) with SiLU runs
over ``(x, B, C)``; the output is ``out_proj(RMSNorm(y * silu(z)))``, the norm taken over groups of
``d_inner / n_groups`` channels (Mamba-2's ``RMSNormGated``, so that tensor parallelism by groups needs no
communication).

Two forms of the same function:

- training/prefill, :func:`ssd_chunked`: the sequence is cut into chunks of ``chunk_size`` tokens. Inside
  a chunk the output is quadratic "masked attention" ``(C B^T * decay) @ (dt x)`` where ``decay[i, j] =
  exp(a_{j+1} + ... + a_i)`` (``a = dt * A``, the segment sum); between chunks only the ``(N, P)`` states
  travel, through a short loop over chunks (Sec. 6, "SSD algorithm").
- generation, :func:`ssd_step`: the recurrence above, one token at a time.

With a cache, a call of one token runs the step; any longer call runs the chunked form from the cached
state. The cache is the last ``d_conv - 1`` conv inputs and the SSM state ``(H, N, P)`` per sequence.

The SSD recurrence is a "simple GLA" (scalar gate per head) with ``q = C``, ``k = B``, ``v = dt * x`` and
log-gate ``dt * A``, so the optional CUDA path (``backend: fla``) is flash-linear-attention's
``chunk_simple_gla``; the tests check this identity against fla's pure-torch ``naive`` reference.

The projection layout ``[z | x, B, C | dt]``, the conv over ``(x, B, C)``, the gated norm's group size and
the initialisation of ``A_log``, ``dt_bias`` and ``D`` follow the reference implementation
(``mamba_ssm.modules.mamba2``); tests match transformers' ``Mamba2Mixer`` with weights copied across.
:mod:`archifactory.mixers.hymba` reuses :class:`Mamba2Heads` as its SSM heads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from archifactory.config import BuildContext, FieldError
from archifactory.mixers.base import Mixer, MixerConfig, compute_dtype, linear_flops, padded_length
from archifactory.mixers.kernels import Backend, parameter_device, select_backend
from archifactory.nn.depthwise import causal_depthwise_conv
from archifactory.nn.init import init_linear
from archifactory.nn.roles import FILTER, VECTOR
from archifactory.registry import register_mixer

MAX_DT = 100.0
"""Largest dt_min / dt_max: Mamba initialises step sizes in [1e-3, 1e-1]; at 100 every decay exp(dt * A)
(A in [-16, -1] at init) is already subnormal or zero in fp32."""


class SSDSettings(MixerConfig):
    """The fields of the Mamba-2 SSM heads, shared by ``mamba2`` and ``hymba`` (not a registered kind).

    The paper's defaults are ``head_dim=64, d_state=128, chunk_size=256`` for d_model >= 768; they are
    scaled down here for the small models this workbench trains (d_model 32..512)."""

    expand: int = Field(2, ge=1)
    """Inner width ``d_inner = expand * d_model``, split into ``d_inner / head_dim`` heads."""
    head_dim: int = Field(32, ge=1)
    """Channels ``P`` of each SSM head."""
    d_state: int = Field(64, ge=1)
    """State size ``N`` (the width of ``B`` and ``C``)."""
    n_groups: int = Field(1, ge=1)
    """Groups of heads that share ``B`` and ``C`` (and one gated-norm group each)."""
    d_conv: int = Field(4, ge=2)
    """Width of the causal depthwise convolution over ``(x, B, C)``."""
    conv_bias: bool = True
    proj_bias: bool = False
    """Bias on the input and output projections (``use_bias`` in the reference; off by default)."""
    chunk_size: int = Field(64, ge=1)
    """Tokens per chunk of the training form; 32-64 keeps the quadratic part cheap on CPU."""
    dt_min: float = Field(1e-3, gt=0, le=MAX_DT)
    dt_max: float = Field(1e-1, gt=0, le=MAX_DT)
    """At init the step sizes ``softplus(dt_bias)`` are log-uniform in ``[dt_min, dt_max]`` (Mamba's [1e-3,
    1e-1]); at most 100 (1e308 made the loss NaN)."""
    backend: Backend = "auto"
    """``fla``: flash-linear-attention's ``chunk_simple_gla`` on CUDA for the chunked form; ``auto`` picks
    it on CUDA when fla is installed."""

    def d_inner(self, d_model: int) -> int:
        return self.expand * d_model

    def n_ssm_heads(self, d_model: int) -> int:
        return self.d_inner(d_model) // self.head_dim

    def check(self, ctx: BuildContext) -> None:
        d_inner = self.d_inner(ctx.d_model)
        if d_inner % self.head_dim:
            valid = [p for p in (8, 16, 32, 64, 128) if d_inner % p == 0]
            raise FieldError(
                "head_dim",
                f"head_dim={self.head_dim} does not divide d_inner = expand * d_model = {d_inner}; "
                f"choose one of {valid} or change expand",
            )
        heads = d_inner // self.head_dim
        if heads % self.n_groups:
            valid = [g for g in range(1, heads + 1) if heads % g == 0]
            raise FieldError(
                "n_groups", f"n_groups={self.n_groups} does not divide the {heads} SSM heads; choose one of {valid}"
            )
        if self.dt_min > self.dt_max:
            raise FieldError("dt_min", f"dt_min={self.dt_min} exceeds dt_max={self.dt_max}")


@register_mixer
class Mamba2Config(SSDSettings):
    kind: Literal["mamba2"] = "mamba2"

    def build(self, ctx: BuildContext) -> "Mamba2":
        return Mamba2(self, ctx)

    @classmethod
    def contract_examples(cls, d_model: int) -> list["Mamba2Config"]:
        return [
            cls(),  # one chunk at the contract test's length
            cls(head_dim=16, d_state=16, n_groups=2, chunk_size=4),  # several chunks, a padded last one
            cls(expand=1, head_dim=8, d_state=8, n_groups=4, d_conv=2, conv_bias=False, proj_bias=True, chunk_size=5),
        ]


# ---------------------------------------------------------------------------------------- the SSD core


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward hands on a contiguous gradient. A batched matmul's output that is
    then permuted receives a permuted gradient, and CPU ``bmm`` with such an operand falls back to a loop
    over the batch (measured 1.5-2.5x slower than copying the gradient first)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _DecayedScores(torch.autograd.Function):
    """``M = scores[..., None, :, :] * exp(clamp(a_i - a_j, max=0))``: the within-chunk matrix of step 1 of
    :func:`ssd_chunked`, ``(b, G, c, R, L, L)`` from ``scores`` (b, G, c, L, L), lower-triangular, and
    ``a_heads`` (b, G, c, R, L), each chunk's running log-decay (non-increasing: ``dt >= 0``, ``A <= 0``).

    The backward is written out because autograd's (through sub, clamp, exp and the broadcast product)
    makes about twice as many passes over the six-dimensional tensor, the largest of the layer:
    ``dM/d(a_i - a_j) = M`` (zero above the diagonal, where the clamp is active and ``scores`` is zero),
    so ``grad_a = (g * M).sum(-1) - (g * M).sum(-2)`` and ``grad_scores = (g * decay).sum(over heads)``."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, a_heads: torch.Tensor) -> torch.Tensor:
        decay = (a_heads[..., :, None] - a_heads[..., None, :]).clamp_(max=0).exp_()  # (b, G, c, R, L, L)
        decayed = scores[:, :, :, None] * decay
        ctx.save_for_backward(decay, decayed)
        return decayed

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decay, decayed = ctx.saved_tensors
        grad_scores = (grad * decay).sum(3)  # (b, G, c, L, L)
        grad_segsum = grad * decayed  # (b, G, c, R, L, L)
        grad_a = grad_segsum.sum(-1) - grad_segsum.sum(-2)  # a_i enters with +, a_j with -
        return grad_scores, grad_a


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD recurrence over a whole sequence, chunk by chunk (no ``D`` skip).

    ``x``: (b, T, H, P); ``dt``: (b, T, H) positive steps; ``A``: (H,) negative rates; ``B``, ``C``:
    (b, T, G, N) with ``H % G == 0`` (head h reads group ``h // (H / G)``); ``state``: (b, H, N, P) or
    ``None`` for zeros. Returns ``y`` (b, T, H, P) and the state after the last token (b, H, N, P).
    """
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G  # heads per group
    L = min(chunk_size, T)  # a sequence shorter than a chunk is one chunk, unpadded
    pad = -T % L
    c = (T + pad) // L  # number of chunks
    # Decays in at least fp32: they are exponentials of sums over many tokens.
    acc = torch.promote_types(x.dtype, torch.float32)
    a = dt.to(acc) * A.to(acc)  # (b, T, H): log of each token's decay, <= 0
    xdt = x * dt.to(acc)[..., None]  # (b, T, H, P): dt also discretises the input (zero-order hold)
    B, C = B.to(xdt.dtype), C.to(xdt.dtype)
    if pad:
        # Padded tokens have a = 0 (no decay) and dt * x = 0 (no input): the final state is unchanged.
        a, xdt = F.pad(a, (0, 0, 0, pad)), F.pad(xdt, (0, 0, 0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
    # Heads are split into (group, head in group) = (G, R): B and C are shared by the R heads of a group,
    # so they are never repeated; where a product is the same for all R heads, the heads ride along in
    # the matmul's last dimension (R * P) instead of its batch.
    xdt = xdt.view(b, c, L, G, R, P)
    a_cum = a.view(b, c, L, G, R).cumsum(dim=2)  # log-decay from the chunk start to token l, inclusive
    B = B.view(b, c, L, G, N).permute(0, 3, 1, 2, 4)  # (b, G, c, L, N)
    C = C.view(b, c, L, G, N).permute(0, 3, 1, 2, 4)  # (b, G, c, L, N)

    # 1. Within a chunk: y_i = sum_{j <= i} (C_i . B_j) exp(a_{j+1} + ... + a_i) dt_j x_j, a masked
    # attention whose mask holds the decays. The segment sums a_cum_i - a_cum_j are <= 0 for j <= i; above
    # the diagonal (where C B^T is zeroed) they are clamped to 0 so that exp never overflows (on CPU this
    # measured faster than masking them to -inf and dropping the tril).
    a_heads = a_cum.permute(0, 3, 1, 4, 2)  # (b, G, c, R, L)
    scores = (C @ B.transpose(-1, -2)).tril()  # (b, G, c, L, L): one per group
    decayed = _DecayedScores.apply(scores, a_heads)  # (b, G, c, R, L, L): scores * exp(segment sums)
    x_heads = xdt.permute(0, 3, 1, 4, 2, 5).contiguous()  # (b, G, c, R, L, P)
    y_diag = _ContiguousGrad.apply(decayed @ x_heads)  # (b, G, c, R, L, P)

    # 2. Each chunk's own contribution to the state at its end: sum_j exp(a_{j+1} + ... + a_L) B_j^T dt_j x_j.
    to_end = torch.exp(a_cum[:, :, -1:] - a_cum)  # (b, c, L, G, R)
    x_to_end = (xdt * to_end[..., None]).view(b, c, L, G, R * P).permute(0, 3, 1, 2, 4)  # (b, G, c, L, R*P)
    chunk_states = B.transpose(-1, -2) @ x_to_end  # (b, G, c, N, R*P)

    # 3. Across chunks, a loop over chunks (not tokens): the state entering chunk k + 1 is the one entering
    # chunk k decayed over the whole chunk, plus chunk k's own contribution.
    chunk_decay = torch.exp(a_cum[:, :, -1]).permute(0, 2, 1, 3)[:, :, :, None, :, None]  # (b, G, c, 1, R, 1)
    if state is None:
        S = xdt.new_zeros(b, G, N, R, P)
    else:
        S = state.view(b, G, R, N, P).transpose(2, 3).to(xdt.dtype)  # (b, G, N, R, P)
    starts = []
    # unbind, not indexing per chunk: its backward is one stack, not a zero-filled full-size gradient per chunk
    for decay_k, states_k in zip(chunk_decay.unbind(2), chunk_states.unbind(2)):
        starts.append(S)
        S = decay_k * S + states_k.view(b, G, N, R, P)
    start_states = torch.stack(starts, dim=2).view(b, G, c, N, R * P)

    # 4. The entering state read out at each token, decayed from the chunk start: C_i exp(a_1 + ... + a_i) S.
    y_off = _ContiguousGrad.apply(C @ start_states).view(b, G, c, L, R, P)
    y_off = y_off * torch.exp(a_cum).permute(0, 3, 1, 2, 4)[..., None]

    y = y_diag.permute(0, 2, 4, 1, 3, 5) + y_off.permute(0, 2, 3, 1, 4, 5)  # (b, c, L, G, R, P)
    y = y.reshape(b, c * L, H, P)[:, :T]
    return y, S.transpose(2, 3).reshape(b, H, N, P)


def ssd_step(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the SSD recurrence. ``x``: (b, H, P); ``dt``: (b, H); ``A``: (H,); ``B``, ``C``:
    (b, G, N); ``state``: (b, H, N, P). Returns ``y`` (b, H, P) (no ``D`` skip) and the new state."""
    b, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    R = H // G
    acc = torch.promote_types(x.dtype, torch.float32)
    dt = dt.to(acc)
    decay = torch.exp(dt * A.to(acc)).view(b, G, R, 1, 1)
    xdt = (x * dt[..., None]).view(b, G, R, 1, P)
    S = state.view(b, G, R, N, P).to(acc) * decay + B.view(b, G, 1, N, 1).to(acc) * xdt  # (b, G, R, N, P)
    y = C.view(b, G, 1, 1, N).to(acc) @ S  # (b, G, R, 1, P)
    return y.view(b, H, P), S.view(b, H, N, P)


def ssd_fla(x, dt, A, B, C, state, output_final_state):
    """The chunked form on flash-linear-attention's Triton kernel (CUDA only; not reachable on CPU).

    SSD is a simple GLA: ``q = C`` and ``k = B`` (repeated to every head of their group), ``v = dt * x``,
    log-gate ``g = dt * A``, no ``1/sqrt(N)`` scale. fla's layout is (b, T, H, .) and its state
    ``(b, H, K, V)`` = ``(b, H, N, P)``, the same as ours."""
    from fla.ops.simple_gla import chunk_simple_gla

    R = x.shape[2] // B.shape[2]
    q, k = C.repeat_interleave(R, dim=2), B.repeat_interleave(R, dim=2)  # (b, T, H, N)
    v = (x * dt[..., None]).to(x.dtype)  # (b, T, H, P)
    g = (dt * A).float()  # (b, T, H)
    y, final = chunk_simple_gla(
        q.contiguous(), k.contiguous(), v.contiguous(), g=g.contiguous(), scale=1.0,
        initial_state=state, output_final_state=output_final_state,
    )
    return y, final


# ------------------------------------------------------------------------------------------- modules


@dataclasses.dataclass
class SSMCache:
    """Per sequence: the last ``d_conv - 1`` inputs of the conv and the SSM state."""

    conv: torch.Tensor  # (B, conv_dim, d_conv - 1)
    ssm: torch.Tensor  # (B, H, N, P)


class GatedRMSNorm(nn.Module):
    """``RMSNorm(y * silu(z))`` over groups of ``group_size`` channels, with one learned scale per channel
    (Mamba-2's ``RMSNormGated`` with the gate applied before the norm)."""

    def __init__(self, dim: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(y.dtype, torch.float32)
        h = (y.to(acc) * F.silu(z.to(acc))).unflatten(-1, (-1, self.group_size))  # (..., groups, group_size)
        h = F.rms_norm(h, (self.group_size,), eps=self.eps).flatten(-2)
        return h.to(y.dtype) * self.weight.to(y.dtype)

    def param_roles(self):
        return {"weight": VECTOR}

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Mamba2Heads(nn.Module):
    """A Mamba-2 layer up to (not including) its output projection: ``x (B, T, D) -> (B, T, d_inner)``,
    the gated, normalised SSM output."""

    def __init__(self, cfg: SSDSettings, ctx: BuildContext) -> None:
        super().__init__()
        d_inner = cfg.d_inner(ctx.d_model)
        self.d_inner, self.head_dim, self.d_state = d_inner, cfg.head_dim, cfg.d_state
        self.n_heads, self.n_groups = d_inner // cfg.head_dim, cfg.n_groups
        self.d_conv, self.chunk_size, self.backend = cfg.d_conv, cfg.chunk_size, cfg.backend
        self.fla_op = "chunk_simple_gla"  # SSD as scalar-decay GLA (ssd_fla), for select_backend
        self.dt_min, self.dt_max = cfg.dt_min, cfg.dt_max
        self.conv_dim = d_inner + 2 * cfg.n_groups * cfg.d_state  # conv runs over (x, B, C)
        # One projection for [z | x, B, C | dt], in the reference's order (so weights copy across).
        self.in_proj = nn.Linear(ctx.d_model, d_inner + self.conv_dim + self.n_heads, bias=cfg.proj_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, bias=cfg.conv_bias
        )  # depthwise; causal by left-padding with the cached (or zero) past inputs
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        # The gated norm follows the model's norm setting: with norm kind 'none' the output is only gated,
        # as in the reference with rmsnorm=False.
        self.norm = (
            GatedRMSNorm(d_inner, d_inner // cfg.n_groups, ctx.norm.eps) if ctx.norm.kind != "none" else None
        )
        self.std = ctx.init.std
        self.reset_parameters()

    def param_roles(self):
        # Mamba's reference (mamba_ssm Mamba2) marks dt_bias, A_log and D `_no_weight_decay`; the depthwise
        # conv kernel is decayed there (only biases and norms are exempt in the paper's AdamW recipe) but
        # it is a bank of per-channel filters, not a matrix to orthogonalise.
        return {"dt_bias": VECTOR, "A_log": VECTOR, "D": VECTOR, "conv1d.weight": FILTER, "conv1d.bias": VECTOR}

    def reset_parameters(self) -> None:
        init_linear(self.in_proj, self.std)
        self.conv1d.reset_parameters()  # PyTorch's default, as the reference keeps it
        with torch.no_grad():
            # A ~ U[1, 16] per head (the reference's A_init_range): decay rates from fast to slow.
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
            # dt log-uniform in [dt_min, dt_max] (floored at 1e-4), stored as softplus^{-1}(dt).
            u = torch.rand_like(self.dt_bias)
            dt = torch.exp(u * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
            dt = dt.clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.D.fill_(1.0)
        if self.norm is not None:
            self.norm.reset_parameters()

    def init_cache(self, batch_size: int, device, dtype) -> SSMCache:
        # The conv cache holds past inputs, exact in the model's dtype; the SSM state sums over every token
        # so far and stays in at least fp32 (in bf16 it drifts from the full forward over long decodes).
        return SSMCache(
            conv=torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.n_heads, self.d_state, self.head_dim, device=device,
                            dtype=compute_dtype(dtype)),
        )

    def forward(self, x: torch.Tensor, cache: SSMCache | None = None) -> tuple[torch.Tensor, SSMCache | None]:
        b, T, _ = x.shape
        H, P, G, N = self.n_heads, self.head_dim, self.n_groups, self.d_state
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, H], dim=-1)
        xbc = F.silu(self._conv(xbc, cache))  # (b, T, conv_dim)
        xs, B, C = xbc.split([self.d_inner, G * N, G * N], dim=-1)
        xs, B, C = xs.view(b, T, H, P), B.view(b, T, G, N), C.view(b, T, G, N)
        acc = torch.promote_types(x.dtype, torch.float32)
        dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc))  # (b, T, H)
        A = -torch.exp(self.A_log.to(acc))  # (H,)

        if cache is not None and T == 1:  # generation: the recurrence itself
            y, state = ssd_step(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], cache.ssm)
            y = y[:, None]
        else:
            initial = cache.ssm if cache is not None else None
            if select_backend(self.backend, x.device, self.fla_op) == "fla":
                y, state = ssd_fla(xs, dt, A, B, C, initial, output_final_state=cache is not None)
            else:
                y, state = ssd_chunked(xs, dt, A, B, C, self.chunk_size, initial)
        if cache is not None:
            cache.ssm = state.to(cache.ssm.dtype)

        y = y + xs * self.D.to(acc)[:, None]  # (b, T, H, P): the skip connection D x
        y = y.reshape(b, T, self.d_inner)
        out = self.norm(y, z) if self.norm is not None else y * F.silu(z)
        return out.to(x.dtype), cache

    def _conv(self, xbc: torch.Tensor, cache: SSMCache | None) -> torch.Tensor:
        """Causal depthwise conv over time: ``(b, T, conv_dim) -> (b, T, conv_dim)``. The ``d_conv - 1``
        inputs before this call come from the cache (zeros at the start of a sequence)."""
        if cache is not None:
            full = torch.cat([cache.conv.to(xbc.dtype).transpose(1, 2), xbc], dim=1)  # (b, d_conv - 1 + T, conv_dim)
            cache.conv = full[:, -(self.d_conv - 1) :].transpose(1, 2).to(cache.conv.dtype)
        else:
            full = F.pad(xbc, (0, 0, self.d_conv - 1, 0))
        # nn.Conv1d's depthwise weight (conv_dim, 1, d_conv) as taps (d_conv, conv_dim), in the (b, T, C)
        # layout without transposes (same function as F.conv1d with groups=conv_dim; faster on CPU)
        weight = self.conv1d.weight.view(self.conv_dim, self.d_conv).t()
        return causal_depthwise_conv(full, weight, self.conv1d.bias)

    def flops_per_token(self, seq_len: int) -> int:
        # Convention: 2 FLOPs per multiply-add of the projection, the depthwise conv, and the chunked SSD
        # as computed (full L x L blocks, L = min(chunk_size, seq_len), the last chunk zero-padded); per
        # token and head: C B^T (per group) 2 L N, the masked product with dt x 2 L P, the chunk state
        # 2 N P, its read-out 2 N P. Elementwise work (decays, gates, norm) is not counted.
        L = min(self.chunk_size, seq_len)
        H, P, G, N = self.n_heads, self.head_dim, self.n_groups, self.d_state
        ssd = (2 * L * N * G + 2 * L * P * H + 4 * N * P * H) * padded_length(seq_len, L) / seq_len
        return int(linear_flops(self.in_proj) + 2 * self.d_conv * self.conv_dim + ssd)

    def state_bytes(self, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
        conv = self.conv_dim * (self.d_conv - 1) * torch.finfo(dtype).bits // 8
        return conv + self.n_heads * self.d_state * self.head_dim * torch.finfo(compute_dtype(dtype)).bits // 8

    def kernel_path(self) -> str:
        on_fla = select_backend(self.backend, parameter_device(self), self.fla_op) == "fla"
        return f"fla.{self.fla_op}" if on_fla else "torch.chunk"


class Mamba2(Mixer):
    def __init__(self, cfg: Mamba2Config, ctx: BuildContext) -> None:
        super().__init__(ctx)
        self.heads = Mamba2Heads(cfg, ctx)
        self.out_proj = nn.Linear(self.heads.d_inner, ctx.d_model, bias=cfg.proj_bias)
        self.out_std = ctx.init.out_std(ctx.n_layers)
        init_linear(self.out_proj, self.out_std)

    def reset_parameters(self) -> None:
        self.heads.reset_parameters()
        init_linear(self.out_proj, self.out_std)

    def init_cache(self, batch_size: int, device, dtype) -> SSMCache:
        return self.heads.init_cache(batch_size, device, dtype)

    def forward(self, x: torch.Tensor, cache: SSMCache | None = None) -> tuple[torch.Tensor, SSMCache | None]:
        y, cache = self.heads(x, cache)
        return self.out_proj(y), cache

    def flops_per_token(self, seq_len: int) -> int:
        return self.heads.flops_per_token(seq_len) + linear_flops(self.out_proj)

    def state_bytes(self, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
        return self.heads.state_bytes(seq_len, dtype)  # constant in seq_len

    def kernel_path(self) -> str:
        return self.heads.kernel_path()
