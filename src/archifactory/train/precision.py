"""The precision a run computes in.

``train.precision: auto`` (the default) resolves, once per run, to bf16 autocast where the device computes
bf16 natively and to fp32 everywhere else: emulated bf16 is slower than fp32 (2-10x for the ``tiny``
preset on a CPU without AVX512-BF16) and no more accurate, so a sweep run on a laptop, a Zen 3 server and
an H100 each gets the fast path its hardware has. The resolved precision is written to the run summary
and shown in the sweep report, so a comparison says what actually ran.

Native bf16:

- CUDA: ``torch.cuda.is_bf16_supported(including_emulation=False)`` (compute capability 8.0+: Ampere,
  Hopper, ...).
- CPU: oneDNN's effective ISA handles bf16 (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``, which honours
  ``ONEDNN_MAX_CPU_ISA``) *and*, on x86, the processor has bf16 instructions (AVX512-BF16 or AMX:
  Cooper Lake, Sapphire Rapids and later, AMD Zen 4 and later) *and* ATen's kernels were not capped below
  AVX-512 (``ATEN_CPU_CAPABILITY``) nor oneDNN's below AVX512_CORE_BF16 (``ONEDNN_MAX_CPU_ISA``; the
  pair ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` stands in for a CPU without AVX-512, such as
  AMD Zen 3). oneDNN alone also answers yes on plain AVX-512 (Skylake, Ice Lake),
  where it converts bf16 to fp32 for every product; that is emulation, not native.
- Anything else (MPS, XPU, ...): fp32, until a test on that device shows its bf16 path is the faster one.
"""

from __future__ import annotations

import os
import platform
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) below the first with bf16 instructions (AVX512_CORE_BF16)
_ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def cpu_has_native_bf16() -> bool:
    """Whether torch on this CPU computes bf16 matrix products with bf16 instructions (see module doc)."""
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False
    if not onednn:
        return False
    if not _x86():
        return True  # ARM: oneDNN asks the processor for its BF16 extension (Graviton 3, Neoverse V1+, ...)
    hardware = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    return hardware and cap not in _ONEDNN_ISAS_WITHOUT_BF16 and torch.backends.cpu.get_cpu_capability() not in (
        "DEFAULT", "AVX2")


def has_native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively (see the module doc for the test per device type)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_precision(requested: Precision, device: torch.device | str) -> Literal["fp32", "bf16", "fp16"]:
    """``auto`` -> ``bf16`` where :func:`has_native_bf16`, else ``fp32``; anything else is returned as is."""
    if requested == "auto":
        return "bf16" if has_native_bf16(device) else "fp32"
    if requested not in AUTOCAST_DTYPES:
        raise ValueError(f"train.precision={requested!r} is not one of auto, fp32, bf16, fp16")
    return requested
