"""What every benchmark records beside its figures (when, the command, the machine) and how it writes the
record, in one place so that the records of different benchmarks say the same things the same way.

The scripts import it as ``_common`` (Python puts a script's own folder first on ``sys.path``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any


def utc_now() -> str:
    """The current time in UTC, ISO 8601 to the second (``2026-11-30T22:45:00+00:00``)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command() -> str:
    """The command line that ran the benchmark (``python benchmarks/x.py --flag ...``)."""
    return " ".join(["python", *sys.argv])


def record_header(benchmark: str | None = None) -> dict[str, Any]:
    """The fields every record starts with: ``benchmark`` (when named), ``date`` and ``command``."""
    header: dict[str, Any] = {"benchmark": benchmark} if benchmark is not None else {}
    return {**header, "date": utc_now(), "command": command()}


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (else what :mod:`platform` knows: ``x86_64``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa() -> str:
    """The instruction set ATen dispatches to, and whether it was capped (an emulated older CPU:
    ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``)."""
    import torch

    caps = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
            if k in os.environ}
    note = f" (emulated: {' '.join(f'{k}={v}' for k, v in caps.items())})" if caps else " (native)"
    return torch.backends.cpu.get_cpu_capability() + note


def load_average_1m() -> float:
    """The 1-minute load average, rounded to 2 decimals (other processes on a shared machine slow every figure)."""
    return round(os.getloadavg()[0], 2)


def write_record(path: Path | None, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path`` (nothing when ``None``): a ``.jsonl`` file gets it appended as one line
    (a history of runs), any other file is overwritten with it, indented."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    else:
        path.write_text(json.dumps(record, indent=2) + "\n")
