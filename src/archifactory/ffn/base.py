"""The FFN contract: ``forward(x) -> (y, aux_losses)`` (``forward(x, cache)`` for FFNs with state). Auxiliary losses (MoE balancing, router z-loss)
are returned, already weighted, so the model sums them into the training loss; nothing is kept in
globals."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from archifactory.config import BuildContext, Component
from archifactory.nn.roles import ParamRole

AuxLosses = dict[str, torch.Tensor]


class FFNConfig(Component):
    has_branch: ClassVar[bool] = True
    """False for ``ffn: {kind: none}``: the block then builds no FFN norm (a mixer-only layer)."""

    @classmethod
    def contract_examples(cls, d_model: int) -> list["FFNConfig"]:
        """Small configs the shared FFN contract test (tests/test_ffn_contract.py) builds at ``d_model``;
        override to cover options."""
        return [cls()]


class FFN(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, AuxLosses]:  # pragma: no cover
        raise NotImplementedError

    def init_cache(self, batch_size: int, device, dtype):
        """State carried between decoding steps, or ``None`` for a position-wise FFN. An FFN with state
        (e.g. RWKV's token-shifting channel mix) takes it as ``forward(x, cache)`` and updates it."""
        return None

    def reorder_cache(self, cache, index: torch.Tensor):
        """The cache of batch rows ``index`` (see :meth:`archifactory.mixers.base.Mixer.reorder_cache`)."""
        from archifactory.mixers.base import select_cache_rows

        return select_cache_rows(cache, index)

    def flops_per_token(self) -> int:  # pragma: no cover
        raise NotImplementedError

    def param_roles(self) -> dict[str, ParamRole]:
        """Optimizer roles of the parameters this module registers itself (``nn.Parameter`` attributes),
        and of sub-layers' parameters it wants trained otherwise than their default, by dotted name.
        Plain ``nn.Linear`` / norm sub-layers need no entry. See :mod:`archifactory.nn.roles`."""
        return {}

    def active_params(self) -> int:
        """Parameters one token uses (all of them, except in a mixture of experts)."""
        return sum(p.numel() for p in self.parameters())


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """ReLU² (So et al. 2021, Primer)."""
    return F.relu(x).square()


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": gelu_tanh,
    "relu": F.relu,
    "relu2": relu_squared,
    "silu": F.silu,
}


def glu_hidden(d_model: int, multiple_of: int) -> int:
    """Default GLU hidden size: 8/3 d (keeps parameters equal to a 4d MLP, Shazeer 2020), rounded up to
    a multiple of ``multiple_of``."""
    hidden = int(8 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


__all__ = ["ACTIVATIONS", "AuxLosses", "BuildContext", "FFN", "FFNConfig", "glu_hidden"]
