"""Normalisation layers: RMSNorm (Zhang & Sennrich 2019), LayerNorm (Ba et al. 2016), or none."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from archifactory.config import Component
from archifactory.registry import register_norm
from archifactory.nn.roles import VECTOR


class NormConfig(Component):
    eps: float = Field(1e-6, gt=0)
    """Added to the mean square (variance) before the square root; > 0 keeps a zero input finite."""

    @classmethod
    def contract_examples(cls) -> list["NormConfig"]:
        """Configs the shared norm contract test (tests/test_component_contract.py) builds."""
        return [cls()]

    def build_for(self, dim: int) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def build(self, ctx) -> nn.Module:
        return self.build_for(ctx.d_model)


class RMSNorm(nn.Module):
    """``x / rms(x) * scale`` over the last dimension. ``unit_offset``: the weight ``w`` is stored as an
    offset from one and the scale is ``1 + w`` (Gemma; zero-initialised)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in at least fp32 (as Llama does) so bf16 activations do not lose the mean square;
        # fp64 stays fp64.
        compute = torch.promote_types(x.dtype, torch.float32)
        normed = F.rms_norm(x.to(compute), (x.shape[-1],), eps=self.eps)
        if self.unit_offset:
            # 1 + w formed and applied in fp32 and rounded once, as Gemma's reference does: in bf16, 1 + w
            # keeps only the bits of w above 2^-8 (w = 0.01 becomes 0.0078), a per-channel scale error.
            return (normed * (1.0 + self.weight.to(compute))).to(x.dtype)
        return normed.to(x.dtype) * self.weight.to(x.dtype)

    def param_roles(self):
        return {"weight": VECTOR}  # a gain: no weight decay, no Muon

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)


@register_norm
class RMSNormConfig(NormConfig):
    kind: Literal["rmsnorm"] = "rmsnorm"
    unit_offset: bool = False
    """Store the gain as ``w`` and scale by ``1 + w`` (computed in fp32), as Gemma does."""

    def build_for(self, dim: int) -> nn.Module:
        return RMSNorm(dim, self.eps, self.unit_offset)


@register_norm
class LayerNormConfig(NormConfig):
    kind: Literal["layernorm"] = "layernorm"
    eps: float = Field(1e-5, gt=0)
    bias: bool = True

    def build_for(self, dim: int) -> nn.Module:
        return nn.LayerNorm(dim, eps=self.eps, bias=self.bias)

    @classmethod
    def contract_examples(cls) -> list["LayerNormConfig"]:
        return [cls(), cls(bias=False)]


@register_norm
class NoNormConfig(NormConfig):
    """No normalisation (identity), for norm-free ablations."""

    kind: Literal["none"] = "none"

    def build_for(self, dim: int) -> nn.Module:
        return nn.Identity()
