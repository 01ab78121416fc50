"""No FFN: a block of the sequence mixer alone. Zoology's MQAR models are two mixer layers with the
state mixer set to the identity ("2 layers without MLP", Arora et al. 2023); the block then leaves out
the FFN branch and its norm."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from archifactory.config import BuildContext
from archifactory.ffn.base import FFN, AuxLosses, FFNConfig
from archifactory.registry import register_ffn


@register_ffn
class NoFFNConfig(FFNConfig):
    """The FFN branch contributes nothing; the block skips its norm (so no parameter goes unused)."""

    kind: Literal["none"] = "none"
    has_branch: ClassVar[bool] = False

    def build(self, ctx: BuildContext) -> "NoFFN":
        return NoFFN()


class NoFFN(FFN):
    def reset_parameters(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, AuxLosses]:
        return torch.zeros_like(x), {}

    def flops_per_token(self) -> int:
        return 0
