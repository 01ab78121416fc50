"""Initialisation settings. Each component applies them to its own parameters in ``reset_parameters``;
nothing here matches parameter names."""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from archifactory.config import Strict


class InitConfig(Strict):
    std: float = Field(0.02, ge=0, le=1)
    """Standard deviation of normal init for every input projection and, by default, the embedding
    (at most 1: larger values make the first loss non-finite)."""
    embedding_std: float | None = Field(None, ge=0, le=1)
    """Embedding std (at most 1, the largest any reference uses); ``None`` uses ``std``."""
    depth_scaled: bool = True
    """Output projections (those that write into the residual stream) get ``std / sqrt(2 * n_layers)``
    (GPT-2, Radford et al. 2019)."""
    zero_init_out: bool = False
    """Zero-initialise output projections, so every block starts as the identity (e.g. modded-nanoGPT)."""

    def out_std(self, n_layers: int) -> float:
        if self.zero_init_out:
            return 0.0
        return self.std / math.sqrt(2 * n_layers) if self.depth_scaled else self.std


def normal_(weight: torch.Tensor, std: float) -> None:
    if std == 0.0:
        nn.init.zeros_(weight)
    else:
        nn.init.normal_(weight, mean=0.0, std=std)


def init_linear(layer: nn.Linear, std: float) -> None:
    normal_(layer.weight, std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
