"""The shared core of the gated-linear-attention family: linear attention, RetNet, GLA and RWKV-6.

Every member keeps a matrix state per head and updates it with a decay and a rank-one write:

    S_t = diag(alpha_t) S_{t-1} + k_t^T v_t          S: (K, V), k_t: (1, K), v_t: (1, V)
    o_t = q_t S_t                                     (GLA-style read: after the write)

with ``alpha_t = 1`` (linear attention, Katharopoulos et al. 2020), a fixed scalar per head (RetNet, Sun
et al. 2023), or data-dependent per channel (GLA, Yang et al. 2024; RWKV-6, Peng et al. 2024). RWKV-6 reads
the state *before* this token's write and adds the current token with a learned bonus ``u`` instead:

    o_t = q_t (S_{t-1} + diag(u) k_t^T v_t)           (RWKV-style read: bonus on the diagonal)

Two forms compute the same function:

- :func:`recurrent_gla` runs the recurrence one token at a time (decoding, and the readable spec);
- :func:`chunked_gla` is the training form (Yang et al. 2024, Sec. 3.3 "chunkwise parallel form"): the
  sequence is cut into chunks of ``chunk_size`` tokens; inside a chunk, outputs are attention-like
  matmuls with a decay mask; across chunks, only the (K, V) state is passed, in a Python loop over
  chunks (not tokens).

Numerical care for per-channel decays. The decay from key s to query t is ``exp(G_t - G_s)`` with ``G``
the cumulative log-decay. Splitting it into ``q_t exp(G_t)`` and ``k_s exp(-G_s)`` (the classic trick)
overflows as soon as a chunk's total log-decay passes ~88 in fp32, which RWKV-6's ``-exp(d)`` decays
reach easily. So every exponent here is a *difference* that is <= 0: ``G`` is taken relative to the chunk
start, the in-chunk decay is formed as ``exp(G_t - G_s)`` per pair (masked to -inf above the diagonal
before the exp), the query-side factor ``exp(G_t)`` (start -> t) and the key-side factor
``exp(G_last - G_s)`` (s -> chunk end) are both <= 1. All of it runs in fp32 (fp64 for fp64 inputs), with
autocast off. What remains is rounding: an exponent carries an absolute error of about
``|G| * 6e-8``, so small chunks also keep ``|G|`` small. Per-channel decays cost an elementwise
(C, C, K) tensor per chunk, which is the other reason their chunks are small (8); a scalar decay per
head factors out of the K sum, so its in-chunk scores stay a plain matmul (chunks of 32).

Layout follows flash-linear-attention's kernels: ``(B, T, H, K)`` for queries/keys/decays and
``(B, T, H, V)`` for values, states ``(B, H, K, V)``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from archifactory.mixers.base import compute_dtype
from archifactory.nn.roles import VECTOR

CHUNK_SIZE = 32
"""Tokens per chunk of the training form with no decay or one decay per head (in-chunk work is a matmul)."""
CHUNK_SIZE_PER_CHANNEL = 8
"""Tokens per chunk with per-channel decays: the in-chunk work is an elementwise (C, C, K) tensor, so it
grows with C while the carried states (one (K, V) per chunk) shrink with it; 8 balances the two on CPU.
Chunk sizes change speed and memory, not results (a test checks that)."""


def default_chunk_size(per_channel: bool) -> int:
    return CHUNK_SIZE_PER_CHANNEL if per_channel else CHUNK_SIZE


def _to_chunks(x: torch.Tensor, n_chunks: int, chunk: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, T, H, D) -> (B, H, N, C, D), zero-padding T up to N * C."""
    B, T, H, D = x.shape
    x = F.pad(x.to(dtype), (0, 0, 0, 0, 0, n_chunks * chunk - T))
    return x.view(B, n_chunks, chunk, H, D).permute(0, 3, 1, 2, 4)


def chunked_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    *,
    bonus: torch.Tensor | None = None,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel gated linear attention.

    q, k: (B, T, H, K); v: (B, T, H, V).
    log_decay: ``log alpha_t <= 0``, (B, T, H, K) per channel or (B, T, H, 1) per head; ``None``: no decay.
    bonus: RWKV-6's ``u`` (H, K): switches to the RWKV-style read (state before the write, plus the bonus
        on the current token); ``None``: GLA-style read.
    initial_state: (B, H, K, V) state carried in from earlier tokens, or ``None`` (zeros).
    chunk_size: tokens per chunk; ``None`` picks :func:`default_chunk_size` for the decay's shape.
    Returns the output (B, T, H, V) and the final state (B, H, K, V), both in :func:`compute_dtype`.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = compute_dtype(q.dtype)
    per_channel = log_decay is not None and log_decay.shape[-1] != 1
    C = min(chunk_size or default_chunk_size(per_channel), T)
    N = -(-T // C)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = _to_chunks(q, N, C, dtype) * scale  # (B, H, N, C, K)
        k = _to_chunks(k, N, C, dtype)  # (B, H, N, C, K)
        v = _to_chunks(v, N, C, dtype)  # (B, H, N, C, V)
        # Query t may read key s when s <= t (GLA-style) or s < t (RWKV-style, the diagonal is the bonus).
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1 if bonus is not None else 0)

        if log_decay is None:
            scores = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0)  # (B, H, N, C, C)
            q_inter, k_inter, chunk_decay = q, k, None
        else:
            step = _to_chunks(log_decay, N, C, dtype)  # (B, H, N, C, Kd), Kd in {1, K}; padding decays by 1
            g = step.cumsum(-2)  # log-decay from the chunk start through token t (inclusive)
            # RWKV's read happens before token t's own decay is applied: its query sees G_{t-1}. Shifting
            # g (rather than subtracting the step) keeps G_{t-1} - G_{t-1} exactly 0 however large G is.
            g_q = F.pad(g[..., :-1, :], (0, 0, 1, 0)) if bonus is not None else g
            g_last = g[..., -1:, :]  # (B, H, N, 1, Kd): the whole chunk's log-decay
            if not per_channel:
                # One decay per head: it factors out of the K sum, so scores stay a matmul.
                pair = (g_q - g.transpose(-1, -2)).masked_fill(~causal, float("-inf")).exp()  # (B,H,N,C,C)
                scores = (q @ k.transpose(-1, -2)) * pair
            else:
                # Per-channel: exp(G_t - G_s) per (t, s, channel), contracted with q_t and k_s.
                scores = PerChannelDecayScores.apply(q, k, g_q, g, causal)  # (B, H, N, C_t, C_s)
            q_inter = q * g_q.exp()  # decay from the chunk start to the read of token t
            k_inter = k * (g_last - g).exp()  # decay from token s to the chunk end
            chunk_decay = g_last.exp().transpose(-1, -2)  # (B, H, N, Kd, 1): scales the state's rows

        out = scores @ v  # (B, H, N, C, V): contributions from inside the chunk
        if bonus is not None:
            diag = (q * bonus.to(dtype)[:, None, None, :] * k).sum(-1, keepdim=True)  # (B, H, N, C, 1)
            out = out + diag * v

        # Carry the state across chunks: each chunk reads the state left by the chunks before it, then
        # decays it and adds its own keys and values. (unbind rather than indexing in the loop: its
        # backward is one stack, not a zero-filled copy per chunk.)
        state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
        decays = chunk_decay.unbind(2) if chunk_decay is not None else [None] * N
        reads = []
        for q_n, k_n, v_n, decay in zip(q_inter.unbind(2), k_inter.unbind(2), v.unbind(2), decays):
            reads.append(q_n @ state)  # (B, H, C, V)
            kept = (state if decay is None else decay * state).flatten(0, 1)  # (B H, K, V)
            # one fused kernel for the write (baddbmm), not a matmul and an add (CPU profile)
            state = torch.baddbmm(kept, k_n.transpose(-1, -2).flatten(0, 1), v_n.flatten(0, 1)).view(B, H, K, V)
        out = out + torch.stack(reads, dim=2)  # (B, H, N, C, V)

        out = out.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]
    return out, state


class PerChannelDecayScores(torch.autograd.Function):
    """In-chunk scores with a decay per key channel: ``S[t, s] = sum_c q_tc k_sc exp(g_q[t, c] - g[s, c])``
    where ``keep[t, s]``, else 0.

    q, g_q: (..., C, K) for the queries; k, g: (..., C, K) for the keys; keep: (C, C) bool. Returns (..., C, C).

    The same function as ``((exp(g_q[t] - g[s]) masked) * k_s) . q_t`` under autograd, with a hand-written
    backward: autograd of that expression makes about eight passes over the (C, C, K) tensor (sub, mask,
    exp and product backwards, each allocating), the largest elementwise cost of GLA and RWKV-6 on CPU
    (profile: ~40% of an RWKV-6 layer's forward + backward). With ``P = exp(g_q[t] - g[s])`` (masked to 0)
    and ``W = dS[t, s] P`` the gradients are sums over one (C, C, K) product each::

        dq[t] = sum_s W[t, s] k_s,   dk[s] = sum_t W[t, s] q_t,   dg_q = q dq,   dg = -k dk

    (``d S[t, s] / d g_q[t, c] = q_tc k_sc P_tsc``). Every exponent stays a difference <= 0 where kept,
    as in :func:`chunked_gla`. First-order only (no double backward).
    """

    @staticmethod
    def forward(ctx, q, k, g_q, g, keep):
        P = g_q.unsqueeze(-2) - g.unsqueeze(-3)  # (..., C_t, C_s, K)
        P.masked_fill_(~keep[..., None], float("-inf")).exp_()
        scores = ((P * k.unsqueeze(-3)) @ q.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(q, k, P)
        return scores

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_scores):
        q, k, P = ctx.saved_tensors
        W = P * d_scores.unsqueeze(-1)  # (not in place: a retained graph may run this backward twice)
        dq = (W * k.unsqueeze(-3)).sum(-2)
        dk = (W * q.unsqueeze(-2)).sum(-3)
        return dq, dk, q * dq, -(k * dk), None


def recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    *,
    bonus: torch.Tensor | None = None,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function as :func:`chunked_gla`, one token at a time (same arguments and returns)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = compute_dtype(q.dtype)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v = (q.to(dtype) * scale), k.to(dtype), v.to(dtype)
        state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
        outs = []
        for t in range(T):
            kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # (B, H, K, V)
            alpha = 1.0 if log_decay is None else log_decay[:, t].to(dtype).exp()[..., None]  # (B, H, Kd, 1)
            if bonus is None:
                state = alpha * state + kv
                read = state
            else:
                read = state + bonus.to(dtype)[..., None] * kv
                state = alpha * state + kv
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], read))
        out = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)
    return out, state


def core_flops_per_token(n_heads: int, key_dim: int, value_dim: int, chunk: int) -> int:
    """Matmul FLOPs per token of the chunked form (2 per multiply-add), per layer: in-chunk scores
    (``chunk`` keys x K) and their product with values (``chunk`` x V), the read of the carried state
    (K x V) and the token's share of the chunk's state write (K x V). Elementwise decay work is not
    counted, by the same convention as softmax in attention."""
    return 2 * n_heads * (chunk * key_dim + chunk * value_dim + 2 * key_dim * value_dim)


class HeadNorm(nn.Module):
    """Normalise each head's output on its own, then a per-channel affine over all heads.

    ``groupnorm`` is GroupNorm with one group per head (RetNet, Sun et al. 2023; RWKV-6's ``ln_x``):
    it keeps heads, whose decays give their outputs very different scales, from drowning one another.
    ``rmsnorm`` drops the mean and the bias (what flash-linear-attention's layers use).
    """

    def __init__(self, n_heads: int, head_dim: int, kind: Literal["groupnorm", "rmsnorm"], eps: float) -> None:
        super().__init__()
        self.head_dim, self.eps = head_dim, eps
        self.center = kind == "groupnorm"  # subtract each head's mean (and learn a bias)
        self.weight = nn.Parameter(torch.ones(n_heads * head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads * head_dim)) if self.center else None

    def param_roles(self):
        return {"weight": VECTOR, "bias": VECTOR}

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H, D) -> (B, T, H * D), normalised in fp32 at least."""
        dtype = compute_dtype(x.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(dtype)
            if self.center:
                y = F.layer_norm(x, (self.head_dim,), eps=self.eps)
            else:
                y = F.rms_norm(x, (self.head_dim,), eps=self.eps)
            y = y.flatten(-2) * self.weight.to(dtype)
            return y if self.bias is None else y + self.bias.to(dtype)
