"""Optional fused kernels (flash-linear-attention's Triton kernels on CUDA).

A mixer config with a ``backend`` field (``auto | torch | fla``) asks :func:`select_backend` on each
forward which path to run, from the backend and the device of its input alone: never from the input's
length. ``Mixer.kernel_path()`` reports the same choice for the device the mixer's parameters are on, so
runs and benchmarks record what actually ran.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Literal

import torch

Backend = Literal["auto", "torch", "fla"]


@functools.lru_cache(maxsize=None)
def fla_installed() -> bool:
    return importlib.util.find_spec("fla") is not None


def select_backend(backend: str, device: torch.device | str) -> str:
    """``"fla"`` or ``"torch"``: the path a mixer with ``backend`` runs on ``device``."""
    on_cuda = torch.device(device).type == "cuda"
    if backend == "torch":
        return "torch"
    if backend == "fla":
        if not (on_cuda and fla_installed()):
            raise RuntimeError(
                "backend='fla' needs a CUDA device and flash-linear-attention "
                f"(pip install 'archifactory[fla]'); this input is on {device} and fla is "
                f"{'installed' if fla_installed() else 'not installed'}. Use backend='auto' or 'torch'."
            )
        return "fla"
    if backend == "auto":
        return "fla" if on_cuda and fla_installed() else "torch"
    raise ValueError(f"unknown backend {backend!r}; valid: auto, torch, fla")


def parameter_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
