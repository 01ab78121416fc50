"""RWKV-6 "Finch" time mixing (Peng et al. 2024, "Eagle and Finch: RWKV with Matrix-Valued States and
Dynamic Recurrence", Sec. 4), on the shared gated-linear-attention core (``ops_gla.py``).

Per token, with ``x_{t-1}`` the previous token's input (the "token shift"):

    ddlerp_c(x_t, x_{t-1}) = x_t + (x_{t-1} - x_t) * (lambda_c + tanh(xx_t A) B_c),   c in {w, k, v, r, g}
        with xx_t = x_t + (x_{t-1} - x_t) * mu_x                                      (data-dependent lerp)
    r_t, k_t, v_t = ddlerp_{r,k,v} W_{R,K,V};  g_t = silu(ddlerp_g W_G)
    w_t = exp(-exp(lambda_d + tanh(ddlerp_w A_d) B_d))                               (per-channel decay)
    S_t = diag(w_t) S_{t-1} + k_t^T v_t
    o_t = r_t (S_{t-1} + diag(u) k_t^T v_t)                                         (bonus u on the current token)
    y_t = (GroupNorm_h(o_t) * g_t) W_O

The recurrence is the GLA core's RWKV-style read (``bonus=u``); the cache holds the (K, V) state per head
and the last token's input for the shift. Parameter names follow the paper's symbols; the official code
(BlinkDL/RWKV-LM, ``RWKV_Tmix_x060``) calls them time_maa_* (mu, lambda), time_maa_w1/w2 (A, B),
time_decay (lambda_d), time_decay_w1/w2 (A_d, B_d) and time_faaaa (u).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from archifactory.config import MAX_COUNT, BuildContext
from archifactory.mixers.base import MixerConfig, check_heads_divide, compute_dtype, linear_flops
from archifactory.mixers.kernels import Backend
from archifactory.mixers.linear import GatedLinearMixer, HeadNormKind
from archifactory.mixers.ops_gla import HeadNorm
from archifactory.nn.init import init_linear
from archifactory.nn.roles import VECTOR
from archifactory.registry import register_mixer

N_LERPS = 5  # w, k, v, r, g: the five data-dependent interpolations, in the official code's order


@register_mixer
class RWKV6Config(MixerConfig):
    kind: Literal["rwkv6"] = "rwkv6"
    n_heads: int = Field(4, ge=1, le=MAX_COUNT)
    """Heads; each has ``d_model / n_heads`` key and value channels (the paper uses 64 per head)."""
    mix_low_rank: int = Field(32, ge=1)
    """Rank of the token-shift LoRA ``A, B`` (32 in the paper's models below 4096 wide)."""
    decay_low_rank: int = Field(64, ge=1)
    """Rank of the decay LoRA ``A_d, B_d`` (64 below 4096 wide)."""
    head_norm: HeadNormKind = "groupnorm"
    norm_eps: float = Field(64e-5, gt=0)
    """The official ``ln_x`` eps: 1e-5 * head_size_divisor**2 with divisor 8."""
    backend: Backend = "auto"

    def check(self, ctx: BuildContext) -> None:
        check_heads_divide(self.n_heads, ctx.d_model)

    def build(self, ctx: BuildContext) -> "RWKV6TimeMix":
        return RWKV6TimeMix(self, ctx)

    @classmethod
    def contract_examples(cls, d_model: int) -> list["RWKV6Config"]:
        return [cls(n_heads=4, mix_low_rank=8, decay_low_rank=8), cls(n_heads=2, head_norm="rmsnorm")]


@dataclasses.dataclass
class RWKV6State:
    state: torch.Tensor  # (B, H, K, V), fp32 (fp64 for fp64 models)
    shift: torch.Tensor  # (B, D): the last input token, for the next token's shift
    pos: int = 0


def layer_ratios(layer_idx: int, n_layers: int) -> tuple[float, float]:
    """The official init's depth ratios: 0 -> 1 over the layers, and 1 -> ~0."""
    ratio_0_to_1 = layer_idx / (n_layers - 1) if n_layers > 1 else 0.0
    return ratio_0_to_1, 1.0 - layer_idx / n_layers


class RWKV6TimeMix(GatedLinearMixer):
    fla_op = "chunk_rwkv6"
    per_channel_decay = True

    def __init__(self, cfg: RWKV6Config, ctx: BuildContext) -> None:
        d = ctx.d_model
        super().__init__(cfg, ctx, d // cfg.n_heads, d // cfg.n_heads)  # q/k/v/o_proj: W_R, W_K, W_V, W_O
        self.scale = 1.0  # RWKV does not scale r.k
        self.layer_idx, self.n_layers = ctx.layer_idx, ctx.n_layers  # the init depends on depth
        self.mix_rank = cfg.mix_low_rank
        self.mu_x = nn.Parameter(torch.empty(d))
        self.lerp_lambda = nn.Parameter(torch.empty(N_LERPS, d))  # lambda_{w,k,v,r,g}
        self.lerp_down = nn.Linear(d, N_LERPS * cfg.mix_low_rank, bias=False)  # A (all five side by side)
        self.lerp_up = nn.Parameter(torch.empty(N_LERPS, cfg.mix_low_rank, d))  # B_{w,k,v,r,g}
        self.decay_lambda = nn.Parameter(torch.empty(d))  # lambda_d
        self.decay_down = nn.Linear(d, cfg.decay_low_rank, bias=False)  # A_d
        self.decay_up = nn.Linear(cfg.decay_low_rank, d, bias=False)  # B_d
        self.bonus = nn.Parameter(torch.empty(self.n_heads, self.key_dim))  # u
        self.g_proj = nn.Linear(d, d, bias=False)  # W_G
        self.norm = HeadNorm(self.n_heads, self.value_dim, cfg.head_norm, cfg.norm_eps)
        self.reset_parameters()

    def param_roles(self):
        # RWKV-LM (RWKV-v5/src/model.py, configure_optimizers for x060): time_maa_* and time_decay (the
        # lambdas), time_faaaa (the bonus u) and the low-rank factors time_maa_w1/w2, time_decay_w1/w2 go
        # to the undecayed lr groups; only the `.weight` matrices (r, k, v, o, g) are decayed.
        undecayed = ("mu_x", "lerp_lambda", "lerp_up", "decay_lambda", "bonus", "lerp_down.weight",
                     "decay_down.weight", "decay_up.weight")
        return {name: VECTOR for name in undecayed}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official RWKV-6 init (RWKV_Tmix_x060): interpolation weights and decays ramp over channels
        and depth, so that channels span fast to slow memory from the start."""
        super().reset_parameters()
        init_linear(self.g_proj, self.std)
        d = self.d_model
        r01, r10 = layer_ratios(self.layer_idx, self.n_layers)
        ramp = torch.arange(d, dtype=torch.float64) / d
        self.mu_x.copy_(1.0 - ramp**r10)
        slow, fast = 1.0 - ramp**r10, 1.0 - ramp ** (0.5 * r10)
        self.lerp_lambda.copy_(torch.stack([slow, slow, slow - 0.3 * r01, fast, fast]))  # w, k, v, r, g
        # The official code zero-inits A and A_d, so the data-dependent terms start at exactly 0 and B, B_d
        # get no gradient on the first step; a small normal A starts them within ~1e-2 of that instead,
        # and every parameter learns from step one.
        init_linear(self.lerp_down, self.std)
        init_linear(self.decay_down, self.std)
        nn.init.uniform_(self.lerp_up, -0.01, 0.01)
        nn.init.uniform_(self.decay_up.weight, -0.01, 0.01)
        n = torch.arange(d, dtype=torch.float64) / max(d - 1, 1)
        # decay speeds from exp(-exp(-6)) ~ 0.998 (long memory) to exp(-exp(-1)) ~ 0.69 per token
        self.decay_lambda.copy_(-6.0 + 5.0 * n ** (0.7 + 1.3 * r01))
        zigzag = ((torch.arange(d) + 1) % 3 - 1) * 0.1
        self.bonus.copy_((r01 * (1.0 - n) + zigzag).view(self.n_heads, self.key_dim))
        self.norm.reset_parameters()
        # ln_x weight grows with depth (official generate_init_weight: ((1 + layer) / n_layers) ** 0.7)
        self.norm.weight.fill_(((1 + self.layer_idx) / self.n_layers) ** 0.7)

    def forward(
        self, x: torch.Tensor, cache: RWKV6State | None = None
    ) -> tuple[torch.Tensor, RWKV6State | None]:
        B, T, D = x.shape
        previous = cache.shift[:, None].to(x.dtype) if cache is not None else x.new_zeros(B, 1, D)
        delta = torch.cat([previous, x[:, :-1]], dim=1) - x  # (B, T, D): x_{t-1} - x_t
        # Data-dependent lerp: one shared A, one B per target, all five at once.
        low = torch.tanh(self.lerp_down(x + delta * self.mu_x)).view(B, T, N_LERPS, self.mix_rank)
        weights = torch.einsum("btnr,nrd->btnd", low, self.lerp_up.to(low.dtype)) + self.lerp_lambda  # (B,T,5,D)
        xw, xk, xv, xr, xg = (x[:, :, None] + delta[:, :, None] * weights).unbind(2)  # each (B, T, D)

        r = self._heads(self.q_proj(xr))  # (B, T, H, K)
        k = self._heads(self.k_proj(xk))
        v = self._heads(self.v_proj(xv))  # (B, T, H, V)
        gate = F.silu(self.g_proj(xg))  # (B, T, H * V)
        dtype = compute_dtype(x.dtype)  # decays in fp32 at least: they are exponentiated twice
        decay = self.decay_lambda.to(dtype) + self.decay_up(torch.tanh(self.decay_down(xw))).to(dtype)
        log_decay = -torch.exp(self._heads(decay))  # (B, T, H, K): log w_t

        o = self.mix(r, k, v, log_decay, cache, bonus=self.bonus)  # (B, T, H, V)
        if cache is not None:
            cache.shift = x[:, -1].to(cache.shift.dtype)
        o = self.norm(o) * gate.to(o.dtype)  # (B, T, H * V)
        return self.o_proj(o.to(x.dtype)), cache

    def fla_core(self, q, k, v, log_decay, initial_state, output_final_state):  # pragma: no cover - CUDA only
        from fla.ops.rwkv6 import chunk_rwkv6

        # w is the log-decay (B, T, H, K) and u the bonus (H, K); r.k is not scaled.
        return chunk_rwkv6(
            q, k, v, w=log_decay, u=self.bonus, scale=1.0, initial_state=initial_state,
            output_final_state=output_final_state,
        )

    def init_cache(self, batch_size: int, device, dtype) -> RWKV6State:
        shape = (batch_size, self.n_heads, self.key_dim, self.value_dim)
        return RWKV6State(
            state=torch.zeros(shape, device=device, dtype=compute_dtype(dtype)),
            shift=torch.zeros(batch_size, self.d_model, device=device, dtype=dtype),
        )

    def state_bytes(self, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
        return super().state_bytes(seq_len, dtype) + self.d_model * torch.finfo(dtype).bits // 8

    def flops_per_token(self, seq_len: int) -> int:
        # Projections (W_R, W_K, W_V, W_G, W_O, both LoRAs; 2 FLOPs per multiply-add) plus the chunked core
        # (ops_gla.core_flops_per_token); lerps, tanh, exp and the norm are elementwise and not counted.
        lerp_up = 2 * N_LERPS * self.mix_rank * self.d_model
        projections = linear_flops(
            self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.o_proj,
            self.lerp_down, self.decay_down, self.decay_up,
        )
        return projections + lerp_up + self.core_flops(seq_len)
