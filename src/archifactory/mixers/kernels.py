"""Optional fused kernels (flash-linear-attention's Triton kernels on CUDA).

A mixer config with a ``backend`` field (``auto | torch | fla``) asks :func:`select_backend` on each
forward which path to run, from the backend, the device of its input and the fla kernel it would call:
never from the input's length. ``Mixer.kernel_path()`` reports the same choice for the device the mixer's
parameters are on, so runs and benchmarks record what actually ran.

``auto`` picks an fla kernel only if it is listed in :data:`FLA_VERIFIED`: a kernel path that has never
been compared with the torch core on a GPU is not a default. ``backend: fla`` runs any of them (that is
how ``tests/test_kernels_cuda.py`` verifies them).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Literal

import torch

Backend = Literal["auto", "torch", "fla"]

#: fla kernels that ``backend: auto`` may choose on CUDA, each verified by ``tests/test_kernels_cuda.py``
#: against the torch core (outputs, final states and every gradient; fp32 and bf16; lengths that are and
#: are not multiples of the chunk size; batch 1), with the fla version, device and date of that run.
#: A kernel left out here runs only with ``backend: fla``; the reason it is left out is written beside it.
FLA_VERIFIED: dict[str, str] = {}

#: fla kernels that failed that comparison, with the reason (``auto`` never chooses them).
FLA_REJECTED: dict[str, str] = {}


@functools.lru_cache(maxsize=None)
def fla_installed() -> bool:
    return importlib.util.find_spec("fla") is not None


def select_backend(backend: str, device: torch.device | str, op: str) -> str:
    """``"fla"`` or ``"torch"``: the path a mixer with ``backend`` runs on ``device``.

    ``op`` is the fla kernel the mixer would call (e.g. ``"chunk_gla"``); ``auto`` takes it only on CUDA,
    with fla installed, and when the kernel is in :data:`FLA_VERIFIED`.

    Raises:
        RuntimeError: ``backend="fla"`` off CUDA or without flash-linear-attention installed.
        ValueError: an unknown backend.
    """
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
        return "fla" if on_cuda and op in FLA_VERIFIED and fla_installed() else "torch"
    raise ValueError(f"unknown backend {backend!r}; valid: auto, torch, fla")


def parameter_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
