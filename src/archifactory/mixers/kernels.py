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

from archifactory.errors import UnavailableError

Backend = Literal["auto", "torch", "fla"]

#: fla kernels that ``backend: auto`` may choose on CUDA, each verified by ``tests/test_kernels_cuda.py``
#: against the torch core (outputs, final states and every gradient; fp32 and bf16; lengths that are and
#: are not multiples of the chunk size; batch 1), with the fla version, device and date of that run.
#: A kernel left out here runs only with ``backend: fla``; the reason it is left out is written beside it.
#: ``auto`` needs both fp32 and bf16 verified: ``kernel_path()`` cannot see whether autocast is on.
#: Figures: ``benchmarks/results/fla_kernels_h200.jsonl`` (relative L2 error against an fp64 torch run).
FLA_VERIFIED: dict[str, str] = {
    "chunk_linear_attn": "fla 0.6.0, triton 3.6.0, torch 2.11, H200, 2026-11-30: every case passed; worst "
    "fp32 2.5e-3 (tf32 dots; torch core 9e-7), bf16 2.0e-2 (torch core 1.7e-2)",
}

#: fla kernels that ``auto`` does not choose, with the reason (each still runs with ``backend: fla``).
FLA_REJECTED: dict[str, str] = {
    "chunk_delta_rule": "fla 0.6.0 refuses fp32 inputs ('ChunkDeltaRuleFunction does not support float32'); "
    "bf16 passed every case on an H200 (worst 1.2e-2, torch core 1.1e-2)",
    "chunk_gated_delta_rule": "fla 0.6.0 refuses to run its gated backward on Hopper with Triton >= 3.4, < 3.7.1 "
    "(fla issue #640: wrong chunk_bwd_dqkwg); not verified (H200, triton 3.6.0)",
    "chunk_simple_gla": "with a per-token gate (Mamba2, Hymba) fla 0.6.0 refuses the same Hopper/Triton "
    "combination (#640); RetNet's constant decay passed fp32 (worst 7.6e-4) but bf16 was not reached",
    "chunk_gla": "not verified: first-call autotuning did not finish inside the GPU time of the run",
    "chunk_rwkv6": "not verified: first-call autotuning did not finish inside the GPU time of the run",
    "chunk_rwkv7": "not verified: first-call autotuning did not finish inside the GPU time of the run",
}


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
            raise UnavailableError(
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
