"""RWKV-7 "Goose" time mixing (Peng et al. 2025, "RWKV-7 'Goose' with Expressive Dynamic State
Evolution"), in flash-linear-attention's layout and parameterisation (``fla.layers.rwkv7``).

Each head keeps a state ``S`` of shape ``(d_k, d_v)`` (fla's layout; the paper writes its transpose) and
updates it with a diagonal-plus-low-rank (DPLR) transition, the "generalised delta rule"::

    S_t = (diag(w_t) + b_t a_t^T) S_{t-1} + k_t v_t^T,      o_t = S_t^T r_t

with, per head, ``kappa_t = normalize(k_t * k_k)`` (the key the state forgets along),
``a_t = -kappa_t`` and ``b_t = kappa_t * iclr_t``: the transition removes ``iclr_t`` (the in-context
learning rate, per channel, in (0, 1)) of what ``S`` stores under ``kappa_t`` and decays every key
channel by ``w_t = exp(-e^{-0.5} sigmoid(.))`` in (0.545, 1). The pieces around it:

- token shift: every input is a per-channel blend of ``x_t`` and ``x_{t-1}`` (six learned mixes, for
  r, w, k, v, iclr and the gate); the cache holds ``x_{t-1}``;
- low-rank (LoRA-style) maps for the decay (tanh), the in-context learning rate and the gate (sigmoid);
- key scaling ``k_t <- k_t * (1 + (iclr_t - 1) * k_a)``;
- per-head GroupNorm of the output, the "bonus" ``(r_t . (k_t * r_k)) v_t`` for the current token, an
  output gate and projection.

- the value residual (``value_residual``): the layer-0 mixer's values ``v_first`` are blended into every
  later layer's, ``v_t <- lerp(v_t, v_first_t, sigmoid(v0 + LoRA_v(xv_t)))``; they travel through the
  model's per-call ``cross_layer`` dict (:attr:`Mixer.uses_cross_layer`), per token, so cached decoding needs
  nothing extra. A later layer without layer 0's values (no RWKV-7 at layer 0, or the mixer called on its
  own) is an error.

The low-rank maps are initialised as published (BlinkDL/RWKV-LM ``RWKV-v7/train_temp``; fla
``LoRA._initialize_weights``): the first factor zero, the second orthogonal with gain 0.1. At the first step
the second factor of a map whose activation is zero at zero (decay: tanh, learning rate and value: identity)
therefore gets no gradient; it gets one once the first factor has moved (:meth:`RWKV7.zero_gradient_at_init`).

The recurrence has two forms of one function (:func:`chunk_dplr`; :func:`recurrent_dplr` is the per-token
spec): chunks of ``chunk_size`` tokens whose intra-chunk interactions are dense matrix products plus one
batched triangular solve (the WY representation of the low-rank part), with a Python loop only over
chunks; decoding is the same function with one-token chunks. Everything inside runs in fp32 or wider.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from archifactory.config import MAX_COUNT, BuildContext
from archifactory.errors import InputError
from archifactory.mixers.base import Mixer, MixerConfig, check_heads_divide, compute_dtype, linear_flops, padded_length
from archifactory.mixers.kernels import Backend, parameter_device, select_backend
from archifactory.nn.init import init_linear
from archifactory.nn.roles import VECTOR
from archifactory.registry import register_mixer

LOG_DECAY_BOUND = math.exp(-0.5)
"""The log decay is ``-LOG_DECAY_BOUND * sigmoid(.)``, so every channel keeps at least e^{-0.607} = 0.545
of its state per token."""

# ------------------------------------------------------------------------------------ the recurrence


def recurrent_dplr(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    gk: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``S_t = (diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``, one token at a
    time (the specification; O(T) Python steps).

    q, k, a, b, gk: (B, T, H, d_k); v: (B, T, H, d_v); initial_state: (B, H, d_k, d_v).
    Returns o: (B, T, H, d_v) and the final state (B, H, d_k, d_v).
    """
    dtype = compute_dtype(q.dtype)
    q, k, v, a, b, gk = (t.to(dtype) for t in (q, k, v, a, b, gk))
    B, T, H, dk = q.shape
    S = q.new_zeros(B, H, dk, v.shape[-1]) if initial_state is None else initial_state.to(dtype)
    outs = []
    for t in range(T):
        read = torch.einsum("bhk,bhkv->bhv", a[:, t], S)  # a_t^T S_{t-1}: (B, H, d_v)
        S = gk[:, t].exp()[..., None] * S + b[:, t, :, :, None] * read[..., None, :] + k[:, t, :, :, None] * v[:, t, :, None]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    return torch.stack(outs, dim=1).to(v.dtype), S


def chunk_dplr(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    gk: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function as :func:`recurrent_dplr`, chunk by chunk (same arguments and results).

    Inside a chunk (positions i = 1..C, S_0 on entry, L_i = gk_1 + ... + gk_i per key channel) call
    ``x_i = a_i^T S_{i-1}`` (a row of d_v numbers) the low-rank read. Then
    ``S_i = diag(e^{L_i}) S_0 + sum_{j<=i} diag(e^{L_i - L_j}) (b_j x_j + k_j v_j^T)``, and substituting this
    into ``x_i`` gives a unit lower-triangular system for all reads at once::

        (I - A_ab) X = A_ak V + (a e^{L_prev}) S_0,    A_xy[i, j] = sum_c x_ic y_jc e^{L_{i-1,c} - L_jc}  (j < i)

    (L_prev: the decay up to i-1), solved once for every chunk as ``X = U + W S_0``. Then::

        O   = (q e^L) S_0 + A_qk V + A_qb X,           A_qy[i, j] = sum_c q_ic y_jc e^{L_ic - L_jc}  (j <= i)
        S_C = diag(e^{L_C}) S_0 + (k e^{L_C - L})^T V + (b e^{L_C - L})^T X

    The pairwise decays are factored as ``e^{L_i} e^{-L_j}``, which needs ``e^{-L}`` to stay finite: the
    log decay summed over a chunk must stay well above -88 in fp32. RWKV-7's decay is bounded
    (``gk >= -0.607``), so chunks up to 128 tokens are safe.
    """
    out_dtype = v.dtype
    dtype = compute_dtype(q.dtype)
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    c = min(chunk_size, T)
    pad = -T % c  # zero padding at the end: k = v = a = b = gk = 0 leaves the state untouched
    N = (T + pad) // c

    def chunked(t: torch.Tensor) -> torch.Tensor:  # (B, T, H, d) -> (N, B, H, c, d), chunk-major
        t = t.to(dtype)
        if pad:
            t = F.pad(t, (0, 0, 0, 0, 0, pad))
        return t.reshape(B, N, c, H, t.shape[-1]).permute(1, 0, 3, 2, 4).contiguous()

    with torch.autocast(q.device.type, enabled=False):
        q, k, v, a, b, gk = (chunked(t) for t in (q, k, v, a, b, gk))  # (N, B, H, c, d)
        L = gk.cumsum(-2)  # (N, B, H, c, d_k): log decay from the chunk start, through position i
        q_in = q * L.exp() if scale == 1.0 else q * scale * L.exp()  # what q_i sees of position 0's state
        a_in = a * (L - gk).exp()  # the read at i happens before step i's decay
        inv = (-L).exp()
        # the four pairwise matrices as the blocks of one product (fewer, larger kernels; CPU profile):
        # [q_in; a_in] [k_inv; b_inv]^T = [[A_qk, A_qb], [A_ak, A_ab]], each block masked as above
        left = torch.cat([q_in, a_in], dim=-2)  # (N, B, H, 2c, d_k)
        right = torch.cat([k, b], dim=-2) * torch.cat([inv, inv], dim=-2)
        ones = torch.ones(c, c, dtype=torch.bool, device=q.device)
        keep = torch.cat([torch.cat([ones.tril()] * 2, 1), torch.cat([ones.tril(-1)] * 2, 1)], 0)
        # masked_fill, not a product with the mask: above the diagonal e^{L_i - L_j} > 1 may be large
        A = (left @ right.transpose(-1, -2)).masked_fill(~keep, 0.0)  # (N, B, H, 2c, 2c)
        # blocks by split, not by indexing: the backward of a split is one concatenation, that of three
        # indexed blocks three zero-filled copies of A added up (CPU profile)
        A_with_k, A_with_b = A.split(c, dim=-1)  # [A_qk; A_ak], [A_qb; A_ab]: (N, B, H, 2c, c) each
        A_qb, A_ab = A_with_b.split(c, dim=-2)
        o_intra, A_ak_v = (A_with_k @ v).split(c, dim=-2)  # A_qk V and A_ak V: (N, B, H, c, d_v) each
        system = torch.eye(c, dtype=dtype, device=q.device) - A_ab
        rhs = torch.cat([A_ak_v, a_in], dim=-1)  # (N, B, H, c, d_v + d_k)
        U, W = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True).split([dv, dk], -1)

        L_end = L[..., -1:, :]  # (N, B, H, 1, d_k)
        to_end = (L_end - L).exp()  # position j seen from the chunk end (<= 1)
        kv_end = (k * to_end).transpose(-1, -2) @ v  # (N, B, H, d_k, d_v)
        b_end_t = (b * to_end).transpose(-1, -2)  # (N, B, H, d_k, c)
        decay_end = L_end.exp().transpose(-1, -2)  # (N, B, H, d_k, 1)

        S = q.new_zeros(B, H, dk, dv) if initial_state is None else initial_state.to(dtype)
        outs = []
        for U_n, W_n, q_n, A_qb_n, o_n, kv_n, b_n, decay_n in zip(
            *(t.unbind(0) for t in (U, W, q_in, A_qb, o_intra, kv_end, b_end_t, decay_end))
        ):  # carries the state across chunks: T / c steps of fused matrix products
            x = torch.baddbmm(U_n.flatten(0, 1), W_n.flatten(0, 1), S.flatten(0, 1))  # (B H, c, d_v): low-rank reads
            out = torch.baddbmm(o_n.flatten(0, 1), q_n.flatten(0, 1), S.flatten(0, 1))
            outs.append(torch.baddbmm(out, A_qb_n.flatten(0, 1), x).view(B, H, c, dv))
            S = torch.baddbmm(torch.addcmul(kv_n, decay_n, S).flatten(0, 1), b_n.flatten(0, 1), x).view(B, H, dk, dv)
        o = torch.stack(outs, dim=1)  # (B, N, H, c, d_v)
        o = o.transpose(2, 3).reshape(B, N * c, H, dv)
        if pad:
            o = o[:, :T]
    return o.to(out_dtype), S


def chunk_dplr_flops(chunk: int, d_k: int, d_v: int) -> int:
    """Forward FLOPs per token and head of :func:`chunk_dplr` with chunks of ``chunk`` tokens (2 per
    multiply-add; the triangular solve counted as c^2 multiply-adds per right-hand column)."""
    per_chunk = (
        4 * 2 * chunk * chunk * d_k  # the four pairwise matrices A_qk, A_qb, A_ak, A_ab
        + 3 * 2 * chunk * chunk * d_v  # A_ak V, A_qk V, A_qb X
        + chunk * chunk * (d_v + d_k)  # the triangular solve
        + 4 * 2 * chunk * d_k * d_v  # (k e)^T V, W S, q S, (b e)^T X
    )
    return per_chunk // chunk


# ------------------------------------------------------------------------------------------ config


@register_mixer
class RWKV7Config(MixerConfig):
    """RWKV-7 time mixing (Peng et al. 2025)."""

    kind: Literal["rwkv7"] = "rwkv7"
    n_heads: int = Field(4, ge=1, le=MAX_COUNT)
    head_dim: int | None = Field(None, ge=1)
    """Channels per head (keys and values alike); ``None`` means ``d_model // n_heads``. RWKV-7's models
    use 64."""
    decay_rank: int | None = Field(None, ge=1)
    """Rank of the decay's low-rank map; ``None``: fla's rule, ``max(32, round(2.5 sqrt(d) head_dim/64 / 32) * 32)``."""
    iclr_rank: int | None = Field(None, ge=1)
    """Rank of the in-context learning rate's map; ``None``: the same rule as ``decay_rank``."""
    gate_rank: int | None = Field(None, ge=1)
    """Rank of the output gate's map; ``None``: fla's rule, ``max(32, round(5 sqrt(d) / 32) * 32)``."""
    value_rank: int | None = Field(None, ge=1)
    """Rank of the value residual's mixing map; ``None``: fla's rule,
    ``max(32, round(1.7 sqrt(d) head_dim/64 / 32) * 32)``."""
    value_residual: bool = True
    """Blend the layer-0 RWKV-7 mixer's values into this layer's (RWKV-7 as published). Needs an RWKV-7
    mixer with ``value_residual`` at layer 0 of the model; ``false`` computes every layer's values alone."""
    chunk_size: int = Field(32, ge=1, le=128)
    """Tokens per chunk of the training form (32 measured a little faster than 64 on CPU). At most 128:
    the chunked form factors pairwise decays as ``e^{L_i} e^{-L_j}``, and 128 tokens of the strongest
    decay (e^{-0.607} each) reach e^{-78}, near the end of fp32's range (e^{-87})."""
    norm_eps: float = Field(1e-5, gt=0)
    """The GroupNorm's epsilon is ``head_dim * norm_eps`` (as in RWKV-7 and fla)."""
    backend: Backend = "auto"
    """``torch`` (the chunked form here), ``fla`` (``fla.ops.rwkv7.chunk_rwkv7``, CUDA only) or ``auto``."""

    def resolved_head_dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def ranks(self, d_model: int) -> tuple[int, int, int, int]:
        """(decay, iclr, gate, value) ranks."""
        factor = self.resolved_head_dim(d_model) / 64
        lora = max(32, int(round(2.5 * d_model**0.5 * factor / 32) * 32))
        gate = max(32, int(round(5 * d_model**0.5 / 32) * 32))
        value = max(32, int(round(1.7 * d_model**0.5 * factor / 32) * 32))
        return self.decay_rank or lora, self.iclr_rank or lora, self.gate_rank or gate, self.value_rank or value

    def check(self, ctx: BuildContext) -> None:
        check_heads_divide(self.n_heads, ctx.d_model, self.head_dim)

    def build(self, ctx: BuildContext) -> RWKV7:
        return RWKV7(self, ctx)

    @classmethod
    def contract_examples(cls, d_model: int) -> list[RWKV7Config]:
        # (the contract test builds layer 0, which provides v_first; later layers are tested in models)
        return [
            cls(n_heads=4, decay_rank=8, iclr_rank=4, gate_rank=8, chunk_size=4),
            cls(n_heads=2, decay_rank=4, iclr_rank=4, gate_rank=4, chunk_size=64),
            cls(n_heads=1, head_dim=16, chunk_size=3, value_residual=False),
        ]


# ------------------------------------------------------------------------------------------- module


class LowRank(nn.Module):
    """``up(act(down(x)))``: RWKV's cheap data-dependent maps (rank ``rank``); RWKV-LM's ``x @ w1`` is
    ``down``, ``w2`` is ``up`` and the offset (``w0``, ``a0``, ``v0``) is ``up.bias``."""

    def __init__(self, d_in: int, d_out: int, rank: int, activation: Callable[[torch.Tensor], torch.Tensor],
                 bias: bool) -> None:
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.activation(self.down(x)))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As published (RWKV-LM x070 ``w1 = 0``, ``w2 = ortho_init(0.1)``; fla ``LoRA``): ``down`` zero, ``up``
        orthogonal with gain ``0.1 * sqrt(rank / d_out)`` (``0.1`` when rank <= d_out), offset zero."""
        nn.init.zeros_(self.down.weight)
        rank, d_out = self.up.in_features, self.up.out_features
        gain = 0.1 * (math.sqrt(rank / d_out) if rank > d_out else 1.0)
        weight = torch.empty(self.up.weight.shape, dtype=torch.float32, device=self.up.weight.device)
        self.up.weight.copy_(nn.init.orthogonal_(weight, gain=gain))
        if self.up.bias is not None:
            nn.init.zeros_(self.up.bias)

    def zero_at_zero(self) -> bool:
        """Whether ``act(0) == 0``, so that ``up.weight`` gets no gradient while ``down`` is zero."""
        return float(self.activation(torch.zeros(()))) == 0.0

    def param_roles(self):
        # RWKV-LM (RWKV-v7/train_temp/src/model.py, configure_optimizers) decays only `.weight` matrices;
        # the LoRA factors w1/w2, a1/a2, v1/v2, g1/g2 and the offsets w0/a0/v0 are not decayed.
        return {"down.weight": VECTOR, "up.weight": VECTOR, "up.bias": VECTOR}


@dataclasses.dataclass
class RWKV7Cache:
    """shift: (B, D) the previous token's input (token shift); state: (B, H, d_k, d_v), at least fp32."""

    shift: torch.Tensor
    state: torch.Tensor


MIXES = ("r", "w", "k", "v", "a", "g")  # the token-shift blends, in the order of RWKV7.token_mix's rows


class RWKV7(Mixer):
    def __init__(self, cfg: RWKV7Config, ctx: BuildContext) -> None:
        super().__init__(ctx)
        d = ctx.d_model
        self.n_heads = H = cfg.n_heads
        self.head_dim = cfg.resolved_head_dim(d)
        self.inner = H * self.head_dim
        decay_rank, iclr_rank, gate_rank, value_rank = cfg.ranks(d)
        self.chunk_size, self.backend = cfg.chunk_size, cfg.backend
        self.fla_op = "chunk_rwkv7"  # for select_backend
        self.layer_idx, self.n_layers = ctx.layer_idx, ctx.n_layers

        # x_t + (x_{t-1} - x_t) * mix, one row per input (MIXES): (6, D)
        self.token_mix = nn.Parameter(torch.empty(len(MIXES), d))
        self.r_proj = nn.Linear(d, self.inner, bias=False)
        self.k_proj = nn.Linear(d, self.inner, bias=False)
        self.v_proj = nn.Linear(d, self.inner, bias=False)
        self.decay = LowRank(d, self.inner, decay_rank, torch.tanh, bias=True)  # bias: the base decay w0
        self.iclr = LowRank(d, self.inner, iclr_rank, nn.Identity(), bias=True)  # the paper's a_t, before sigmoid
        self.gate = LowRank(d, self.inner, gate_rank, torch.sigmoid, bias=False)
        # value residual: layer 0 provides v_first, later layers blend it in (bias: the offset v0)
        self.provides_v_first = cfg.value_residual and ctx.layer_idx == 0
        self.value_mix = (LowRank(d, self.inner, value_rank, nn.Identity(), bias=True)
                          if cfg.value_residual and ctx.layer_idx > 0 else None)
        self.k_k = nn.Parameter(torch.empty(self.inner))  # scales k into the removal key kappa
        self.k_a = nn.Parameter(torch.empty(self.inner))  # how much iclr scales the written key
        self.r_k = nn.Parameter(torch.empty(H, self.head_dim))  # the bonus term's weights
        self.norm_weight = nn.Parameter(torch.empty(self.inner))  # per-head GroupNorm
        self.norm_bias = nn.Parameter(torch.empty(self.inner))
        self.norm_eps = self.head_dim * cfg.norm_eps
        self.o_proj = nn.Linear(self.inner, d, bias=False)
        self.std, self.out_std = ctx.init.std, ctx.init.out_std(ctx.n_layers)
        self.reset_parameters()

    def param_roles(self):
        # RWKV-LM's configure_optimizers (x070): the token-shift mixes x_r..x_g, k_k, k_a, r_k and the
        # ln_x GroupNorm are undecayed; r/k/v/output `.weight` matrices are decayed.
        return {name: VECTOR for name in ("token_mix", "k_k", "k_a", "r_k", "norm_weight", "norm_bias")}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """RWKV-7's layer-dependent init (as in fla's ``RWKV7Attention``) for the token mixes, decay,
        learning-rate, value-residual and key parameters; the low-rank maps as published
        (:meth:`LowRank.reset_parameters`); ``init.std`` for the r/k/v projections and ``init.out_std`` for
        the output projection (the paper uses orthogonal and zero matrices: the model's init recipe decides
        those here, as for every mixer)."""
        d, hd, n = self.d_model, self.head_dim, self.inner
        depth = self.layer_idx / max(self.n_layers - 1, 1)  # 0 at the first layer, 1 at the last
        shallowness = 1.0 - self.layer_idx / self.n_layers  # 1 at the first layer, towards 0
        ramp = torch.arange(d) / d  # 0 .. 1 over the model channels
        powers = torch.tensor([0.2, 0.9, 0.7, 0.7, 0.9, 0.2])  # per MIXES
        self.token_mix.copy_(1.0 - ramp[None, :] ** (powers[:, None] * shallowness))

        channel = torch.arange(n)
        linear = channel / max(n - 1, 1) - 0.5  # -0.5 .. 0.5 over the inner channels
        within = (channel % hd - (hd - 1) / 2) / max((hd - 1) / 2, 1)  # -1 .. 1 within each head
        zigzag = within * within.abs()
        base_decay = -6 + 6 * (channel / max(n - 1, 1)) ** (1 + depth**0.3)
        for proj in (self.r_proj, self.k_proj, self.v_proj):
            init_linear(proj, self.std)
        init_linear(self.o_proj, self.out_std)
        for lora in self.low_rank_maps():
            lora.reset_parameters()
        self.decay.up.bias.copy_(base_decay + 0.5 + zigzag * 2.5)
        if self.value_mix is not None:
            self.value_mix.up.bias.copy_(0.73 - linear * 0.4)
        self.iclr.up.bias.copy_(-0.19 + zigzag * 0.3 + linear * 0.4)
        self.k_k.copy_(0.71 - linear * 0.1)
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        self.norm_weight.fill_(((self.layer_idx + 1) / self.n_layers) ** 0.7)
        self.norm_bias.zero_()

    def low_rank_maps(self) -> list[LowRank]:
        return [m for m in (self.decay, self.iclr, self.gate, self.value_mix) if m is not None]

    def zero_gradient_at_init(self) -> set[str]:
        names = {"decay": self.decay, "iclr": self.iclr, "gate": self.gate, "value_mix": self.value_mix}
        return {f"{name}.up.weight" for name, m in names.items() if m is not None and m.zero_at_zero()}

    # ---------------------------------------------------------------------------------------- cache

    def init_cache(self, batch_size: int, device, dtype) -> RWKV7Cache:
        return RWKV7Cache(
            shift=torch.zeros(batch_size, self.d_model, device=device, dtype=dtype),
            state=torch.zeros(batch_size, self.n_heads, self.head_dim, self.head_dim, device=device,
                              dtype=compute_dtype(dtype)),
        )

    def state_bytes(self, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
        # the previous input at the cache dtype, the state at least in fp32 (see init_cache)
        return self.d_model * dtype.itemsize + self.n_heads * self.head_dim**2 * compute_dtype(dtype).itemsize

    # -------------------------------------------------------------------------------------- forward

    uses_cross_layer = True

    def forward(
        self, x: torch.Tensor, cache: RWKV7Cache | None = None, cross_layer: dict | None = None
    ) -> tuple[torch.Tensor, RWKV7Cache | None]:
        """x: (B, T, D). ``cross_layer``: the model's per-call dict; layer 0 stores its values (B, T, H d)
        under ``"v_first"``, later layers with ``value_residual`` read them."""
        B, T, D = x.shape
        H, hd = self.n_heads, self.head_dim
        prev = cache.shift.to(x.dtype)[:, None] if cache is not None else x.new_zeros(B, 1, D)
        x_prev = torch.cat([prev, x[:, :-1]], dim=1)  # (B, T, D): token shift, x_{t-1}
        if cache is not None:
            cache.shift = x[:, -1].to(cache.shift.dtype)
        delta = x_prev - x
        mix = self.token_mix.to(x.dtype)
        # six (B, T, D) blends x + delta * mix_i; separate ops are faster on CPU than one (B, T, 6, D) tensor
        xr, xw, xk, xv, xa, xg = (torch.addcmul(x, delta, mix[i]) for i in range(len(MIXES)))

        fp = compute_dtype(x.dtype)
        r = self.r_proj(xr)  # (B, T, H d)
        k = self.k_proj(xk)
        v = self.v_proj(xv)
        if self.value_mix is not None:
            v_first = cross_layer.get("v_first") if cross_layer is not None else None
            if v_first is None or v_first.shape != v.shape:
                found = "none" if v_first is None else f"shape {tuple(v_first.shape)}"
                raise InputError(
                    f"RWKV-7 at layer {self.layer_idx} has value_residual=true and needs the layer-0 RWKV-7 "
                    f"mixer's values v_first of shape {tuple(v.shape)}, found {found}: make layer 0 an RWKV-7 "
                    "layer of the same width (value_residual=true) or set value_residual=false"
                )
            v = torch.lerp(v, v_first.to(v.dtype), torch.sigmoid(self.value_mix(xv)).to(v.dtype))
        elif self.provides_v_first and cross_layer is not None:
            cross_layer["v_first"] = v
        log_w = -LOG_DECAY_BOUND * torch.sigmoid(self.decay(xw).to(fp))  # log decay in (-0.607, 0)
        iclr = torch.sigmoid(self.iclr(xa))  # in-context learning rate, per channel in (0, 1)
        gate = self.gate(xg)
        kappa = F.normalize((k * self.k_k).view(B, T, H, hd).to(fp), dim=-1)  # (B, T, H, d): unit removal key
        k = k * (1 + (iclr - 1) * self.k_a)

        r, k, v, iclr, log_w = (t.view(B, T, H, hd) for t in (r, k, v, iclr, log_w))  # (B, T, H, d) each
        initial = cache.state if cache is not None else None
        if select_backend(self.backend, x.device, self.fla_op) == "fla":
            o, state = self._fla(r, log_w, k, v, kappa, iclr, initial)
        else:
            o, state = chunk_dplr(
                r, k, v, -kappa, kappa * iclr, log_w, scale=1.0, initial_state=initial, chunk_size=self.chunk_size
            )
        if cache is not None:
            cache.state = state.to(cache.state.dtype)

        o = F.group_norm(o.reshape(B * T, self.inner), H, self.norm_weight, self.norm_bias, self.norm_eps)
        bonus = (r * k * self.r_k).sum(-1, keepdim=True) * v  # (B, T, H, d): the current token, read directly
        o = (o.view(B, T, self.inner) + bonus.reshape(B, T, self.inner)) * gate
        return self.o_proj(o), cache

    def _fla(self, r, log_w, k, v, kappa, iclr, initial):
        """``fla.ops.rwkv7.chunk_rwkv7`` (CUDA): the same layout (B, T, H, d) and state (B, H, d_k, d_v);
        ``w`` is the log decay, ``a``/``b`` the low-rank factors; scale 1 as RWKV-7 reads the state unscaled."""
        from fla.ops.rwkv7 import chunk_rwkv7

        dt = r.dtype  # one dtype for every input, as fla's own layer passes them (k_a may have promoted k)
        return chunk_rwkv7(
            r=r, w=log_w.to(dt), k=k.to(dt), v=v.to(dt), a=(-kappa).to(dt), b=(kappa * iclr).to(dt), scale=1.0,
            initial_state=initial, output_final_state=True,
        )

    # ---------------------------------------------------------------------------------------- costs

    def flops_per_token(self, seq_len: int) -> int:
        # Matmul FLOPs (2 per multiply-add): projections and low-rank maps, plus the chunked recurrence
        # at the chunk it runs with, min(chunk_size, seq_len), including the zero padding of the last chunk.
        # Elementwise work (token shift, norms, gates) is not counted, as for attention's softmax.
        proj = linear_flops(self.r_proj, self.k_proj, self.v_proj, self.o_proj)
        lora = sum(linear_flops(m.down, m.up) for m in self.low_rank_maps())
        chunk = max(1, min(self.chunk_size, seq_len))
        core = self.n_heads * chunk_dplr_flops(chunk, self.head_dim, self.head_dim)
        return int(proj + lora + core * padded_length(seq_len, chunk) / seq_len)

    def kernel_path(self) -> str:
        backend = select_backend(self.backend, parameter_device(self), self.fla_op)
        return f"fla.{self.fla_op}" if backend == "fla" else "torch.chunk_dplr"
