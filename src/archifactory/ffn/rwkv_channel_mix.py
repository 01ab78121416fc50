"""RWKV-6 channel mixing (Peng et al. 2024, "Eagle and Finch", Sec. 4; BlinkDL/RWKV-LM ``RWKV_CMix_x060``),
the FFN of an RWKV block:

    xk_t = x_t + (x_{t-1} - x_t) * mu_k          xr_t = x_t + (x_{t-1} - x_t) * mu_r     (token shift)
    y_t  = sigmoid(xr_t W_R) * (relu(xk_t W_K)^2 W_V)

Unlike every other FFN it reads the previous token's input (``x_{t-1}``), so it is not a per-token map.

Limitation under the FFN contract. ``FFN.forward(x)`` gets no cache, so when a model decodes token by
token the FFN sees one token per call and cannot know ``x_{t-1}``: without a cache it shifts in zeros at
the start of every call, which is exact for a whole sequence (training, prefill) but NOT for cached
step-by-step generation. Exact decoding needs the block to hold an FFN cache: this module already takes
one (``forward(x, cache)`` with :class:`TokenShiftCache`, updated in place like the KV cache, and
``init_cache``); what is missing is ``Block``/``CausalLM`` creating it with the mixer caches and passing it
(see the tests, which check that step-by-step with the cache equals the full forward).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from archifactory.config import BuildContext
from archifactory.ffn.base import FFN, AuxLosses, FFNConfig
from archifactory.nn.init import init_linear
from archifactory.nn.roles import VECTOR
from archifactory.registry import register_ffn


@register_ffn
class RWKV6ChannelMixConfig(FFNConfig):
    kind: Literal["rwkv6_channel_mix"] = "rwkv6_channel_mix"
    hidden: int | None = Field(None, ge=1)
    """Key width; ``None`` means the official ``int(3.5 * d_model) // 32 * 32``."""

    def resolved_hidden(self, d_model: int) -> int:
        return self.hidden or max(32, int(3.5 * d_model) // 32 * 32)

    def build(self, ctx: BuildContext) -> "RWKV6ChannelMix":
        return RWKV6ChannelMix(ctx, self.resolved_hidden(ctx.d_model))


@dataclasses.dataclass
class TokenShiftCache:
    """The last input token seen, ``(B, D)``, so that the next call can shift it in."""

    last: torch.Tensor


def token_shift_delta(x: torch.Tensor, cache: TokenShiftCache | None) -> torch.Tensor:
    """``x_{t-1} - x_t`` for x: (B, T, D), the token before x[:, 0] being the cache's last input (zeros
    without a cache); the cache then holds x[:, -1]."""
    previous = cache.last[:, None].to(x.dtype) if cache is not None else torch.zeros_like(x[:, :1])
    delta = torch.cat([previous, x[:, :-1]], dim=1) - x  # (B, T, D)
    if cache is not None:
        cache.last = x[:, -1].to(cache.last.dtype)
    return delta


class RWKV6ChannelMix(FFN):
    def __init__(self, ctx: BuildContext, hidden: int) -> None:
        super().__init__()
        d = ctx.d_model
        self.d_model = d
        self.layer_idx, self.n_layers = ctx.layer_idx, ctx.n_layers
        self.mu_k = nn.Parameter(torch.empty(d))
        self.mu_r = nn.Parameter(torch.empty(d))
        self.key = nn.Linear(d, hidden, bias=False)  # W_K
        self.value = nn.Linear(hidden, d, bias=False)  # W_V: writes into the residual stream
        self.receptance = nn.Linear(d, d, bias=False)  # W_R
        self.std, self.out_std = ctx.init.std, ctx.init.out_std(ctx.n_layers)
        self.reset_parameters()

    def param_roles(self):
        # RWKV-LM: time_maa_k / time_maa_r are undecayed coefficients; key/value/receptance are nn.Linear
        # matrices (decayed there, Muon here).
        return {"mu_k": VECTOR, "mu_r": VECTOR}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Official init: mu = 1 - (i / d) ** (1 - layer / n_layers), shifting more in early layers.
        ramp = torch.arange(self.d_model, dtype=torch.float64) / self.d_model
        mu = 1.0 - ramp ** (1.0 - self.layer_idx / self.n_layers)
        self.mu_k.copy_(mu)
        self.mu_r.copy_(mu)
        init_linear(self.key, self.std)
        init_linear(self.receptance, self.std)
        init_linear(self.value, self.out_std)

    def init_cache(self, batch_size: int, device, dtype) -> TokenShiftCache:
        return TokenShiftCache(last=torch.zeros(batch_size, self.d_model, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, cache: TokenShiftCache | None = None) -> tuple[torch.Tensor, AuxLosses]:
        """x: (B, T, D). Without ``cache`` the token before x[:, 0] is taken to be zeros."""
        delta = token_shift_delta(x, cache)
        k = F.relu(self.key(x + delta * self.mu_k)).square()  # (B, T, hidden): squared ReLU (Primer)
        r = torch.sigmoid(self.receptance(x + delta * self.mu_r))  # (B, T, D)
        return r * self.value(k), {}

    def flops_per_token(self) -> int:
        return 2 * (self.key.in_features * self.key.out_features + self.value.in_features * self.value.out_features
                    + self.receptance.in_features * self.receptance.out_features)


@register_ffn
class RWKV7ChannelMixConfig(FFNConfig):
    """RWKV-7 channel mixing (BlinkDL/RWKV-LM ``RWKV_CMix_x070``; fla ``RWKV7FeedForward``)::

        xk_t = x_t + (x_{t-1} - x_t) * mu_k,        y_t = relu(xk_t W_K)^2 W_V

    RWKV-6's channel mix without the receptance gate, one token-shift mix, and a 4x hidden width.
    Decoding needs the block's FFN cache, as for :class:`RWKV6ChannelMixConfig`."""

    kind: Literal["rwkv7_channel_mix"] = "rwkv7_channel_mix"
    hidden: int | None = Field(None, ge=1)
    """Key width; ``None`` means the official ``4 * d_model`` rounded up to a multiple of 32."""

    def resolved_hidden(self, d_model: int) -> int:
        return self.hidden or 32 * -(-4 * d_model // 32)

    def build(self, ctx: BuildContext) -> "RWKV7ChannelMix":
        return RWKV7ChannelMix(ctx, self.resolved_hidden(ctx.d_model))

    @classmethod
    def contract_examples(cls, d_model: int) -> list["RWKV7ChannelMixConfig"]:
        return [cls(), cls(hidden=40)]


class RWKV7ChannelMix(FFN):
    def __init__(self, ctx: BuildContext, hidden: int) -> None:
        super().__init__()
        d = ctx.d_model
        self.d_model = d
        self.layer_idx, self.n_layers = ctx.layer_idx, ctx.n_layers
        self.mu_k = nn.Parameter(torch.empty(d))
        self.key = nn.Linear(d, hidden, bias=False)  # W_K
        self.value = nn.Linear(hidden, d, bias=False)  # W_V: writes into the residual stream
        self.std, self.out_std = ctx.init.std, ctx.init.out_std(ctx.n_layers)
        self.reset_parameters()

    def param_roles(self):
        return {"mu_k": VECTOR}  # RWKV-LM x070: x_k is an undecayed coefficient

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official mix, ``mu_k = 1 - (i / d) ** ((1 - layer / n_layers) ** 4)``; ``init.std`` for W_K and
        ``init.out_std`` for W_V (RWKV-LM uses orthogonal and zero matrices: the model's init recipe decides
        those here, as for every FFN)."""
        ramp = torch.arange(self.d_model, dtype=torch.float64) / self.d_model
        self.mu_k.copy_(1.0 - ramp ** ((1.0 - self.layer_idx / self.n_layers) ** 4))
        init_linear(self.key, self.std)
        init_linear(self.value, self.out_std)

    def init_cache(self, batch_size: int, device, dtype) -> TokenShiftCache:
        return TokenShiftCache(last=torch.zeros(batch_size, self.d_model, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, cache: TokenShiftCache | None = None) -> tuple[torch.Tensor, AuxLosses]:
        """x: (B, T, D). Without ``cache`` the token before x[:, 0] is taken to be zeros."""
        delta = token_shift_delta(x, cache)
        k = F.relu(self.key(torch.addcmul(x, delta, self.mu_k.to(x.dtype)))).square()  # (B, T, hidden)
        return self.value(k), {}

    def flops_per_token(self) -> int:
        return 2 * (self.key.in_features * self.key.out_features + self.value.in_features * self.value.out_features)
