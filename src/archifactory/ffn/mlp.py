"""Dense feed-forward layers: a two-layer MLP with a chosen activation, and gated linear units
(Shazeer 2020, "GLU Variants Improve Transformer"): SwiGLU and GeGLU."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from archifactory.config import BuildContext
from archifactory.ffn.base import ACTIVATIONS, FFN, AuxLosses, FFNConfig, glu_hidden
from archifactory.nn.init import init_linear
from archifactory.registry import register_ffn

Activation = Literal["gelu", "gelu_tanh", "relu", "relu2", "silu"]


@register_ffn
class MLPConfig(FFNConfig):
    """``down(act(up(x)))``. GELU (GPT-2 uses ``gelu_tanh``), ReLU, ReLU² (Primer) or SiLU."""

    kind: Literal["mlp"] = "mlp"
    hidden: int | None = Field(None, ge=1)
    """Hidden size; ``None`` means ``4 * d_model``."""
    activation: Activation = "gelu"
    bias: bool = False

    def build(self, ctx: BuildContext) -> "MLP":
        return MLP(ctx.d_model, self.hidden or 4 * ctx.d_model, self.activation, self.bias, ctx)

    @classmethod
    def contract_examples(cls, d_model: int) -> list["MLPConfig"]:
        return [cls(), cls(hidden=24, activation="relu2", bias=True)]


class MLP(FFN):
    def __init__(self, d_model: int, hidden: int, activation: str, bias: bool, ctx: BuildContext) -> None:
        super().__init__()
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)
        self.act = ACTIVATIONS[activation]
        self.std, self.out_std = ctx.init.std, ctx.init.out_std(ctx.n_layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_linear(self.up_proj, self.std)
        init_linear(self.down_proj, self.out_std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, AuxLosses]:
        return self.down_proj(self.act(self.up_proj(x))), {}

    def flops_per_token(self) -> int:
        return 2 * 2 * self.up_proj.in_features * self.up_proj.out_features


@register_ffn
class GLUConfig(FFNConfig):
    """``down(act(gate(x)) * up(x))`` with any activation."""

    kind: Literal["glu"] = "glu"
    hidden: int | None = Field(None, ge=1)
    """Hidden size; ``None`` means 8/3 * d_model rounded up to ``multiple_of``."""
    multiple_of: int = Field(64, ge=1)
    activation: Activation = "silu"
    bias: bool = False

    def resolved_hidden(self, d_model: int) -> int:
        return self.hidden or glu_hidden(d_model, self.multiple_of)

    def build(self, ctx: BuildContext) -> "GLU":
        return GLU(ctx.d_model, self.resolved_hidden(ctx.d_model), self.activation, self.bias, ctx)

    @classmethod
    def contract_examples(cls, d_model: int) -> list["GLUConfig"]:
        return [cls(hidden=24), cls(hidden=24, bias=True)]


@register_ffn
class SwiGLUConfig(GLUConfig):
    """GLU with SiLU (Swish) gating, as in PaLM and Llama."""

    kind: Literal["swiglu"] = "swiglu"
    activation: Literal["silu"] = "silu"


@register_ffn
class GeGLUConfig(GLUConfig):
    """GLU with GELU gating, as in T5 v1.1 and Gemma (which uses the tanh approximation)."""

    kind: Literal["geglu"] = "geglu"
    activation: Literal["gelu", "gelu_tanh"] = "gelu"


class GLU(FFN):
    def __init__(self, d_model: int, hidden: int, activation: str, bias: bool, ctx: BuildContext) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)
        self.act = ACTIVATIONS[activation]
        self.std, self.out_std = ctx.init.std, ctx.init.out_std(ctx.n_layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_linear(self.gate_proj, self.std)
        init_linear(self.up_proj, self.std)
        init_linear(self.down_proj, self.out_std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, AuxLosses]:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x)), {}

    def flops_per_token(self) -> int:
        return 3 * 2 * self.up_proj.in_features * self.up_proj.out_features
