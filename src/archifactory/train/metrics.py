"""Run metrics: a JSONL file per run, optional TensorBoard / W&B / MLflow loggers, device peaks for MFU,
and peak memory."""

from __future__ import annotations

import json
import os
import resource
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from archifactory.errors import MissingDependencyError

# Dense bf16 peak FLOP/s by device name (vendor data sheets); MFU is reported only where known.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
    "RTX 4090": 165e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_FLOPS.items():
        if key in name:
            return peak
    return None


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class MetricsWriter:
    """Appends one JSON object per line; a resumed run appends to the same file."""

    def __init__(self, path: Path, loggers: list[str], run_dir: Path, config: dict, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled and self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:  # a killed writer may have left a partial last line: end it
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        self.loggers = [_make_logger(name, run_dir, config) for name in loggers] if enabled else []

    def write(self, record: dict[str, Any], replace: bool = False) -> None:
        """Append ``record``; with ``replace``, the file's earlier records of the same ``kind`` and ``step``
        are dropped first (a run that evaluates a step again keeps one line for it)."""
        if not self.enabled:
            return
        if replace:
            key = (record.get("kind"), record.get("step"))
            self._rewrite(lambda r: (r.get("kind"), r.get("step")) != key)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for logger in self.loggers:
            logger(record)

    def keep_through(self, step: int | None) -> int:
        """Drop the records that a restarted run writes again: those of steps after ``step`` (the
        checkpoint it resumes from), or every record when ``step`` is ``None`` (it starts over), and a
        damaged last line (torn by the kill: it was being written after the last checkpoint). ``nonfinite``
        records stay: they tell why the run was restarted (a step meeting it again replaces its line).
        Other damaged lines are kept. Returns the number dropped."""
        if not self.enabled:
            return 0
        return self._rewrite(lambda r: r.get("kind") == "nonfinite" or (step is not None and int(r["step"]) <= step),
                             drop_torn_end=True)

    def _rewrite(self, keep, drop_torn_end: bool = False) -> int:
        """Rewrite the file (atomically) without the records ``keep`` rejects (and, with ``drop_torn_end``,
        without a damaged last line); returns how many lines were dropped."""
        if not self.path.is_file():
            return 0
        lines, dropped = [], 0
        raw = self.path.read_bytes().splitlines(keepends=True)
        for number, line in enumerate(raw, 1):
            try:
                record = json.loads(line.decode("utf-8"))
                is_record = isinstance(record, dict) and isinstance(record.get("step"), int)
            except ValueError:
                is_record = False
            torn_end = drop_torn_end and number == len(raw) and not is_record and line.strip()
            if (is_record and not keep(record)) or torn_end:
                dropped += 1
            else:
                lines.append(line)
        if dropped:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_bytes(b"".join(lines))
            os.replace(tmp, self.path)
        return dropped

    def close(self) -> None:
        for logger in self.loggers:
            getattr(logger, "close", lambda: None)()


def _warn(message: str) -> None:
    from archifactory.errors import ArchifactoryWarning

    warnings.warn(message, ArchifactoryWarning, stacklevel=3)


def read_metrics(path: Path, warn=None) -> list[dict]:
    """The records of a metrics.jsonl file. A damaged line (a partial write from a killed process, bad
    bytes) is skipped with a warning naming the file and line (through ``warn``, default
    :func:`warnings.warn`), so that the records around it are kept."""
    path = Path(path)
    if not path.is_file():
        return []
    records, damaged = [], []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a metrics record")
            records.append(record)
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            damaged.append(number)
    if damaged:
        (warn or _warn)(f"{path}: skipped {len(damaged)} damaged line(s) ({', '.join(map(str, damaged[:5]))})")
    return records


def _make_logger(name: str, run_dir: Path, config: dict):
    step_of = lambda r: int(r.get("step", 0))  # noqa: E731
    numeric = lambda r: {k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "step"}  # noqa: E731
    if name == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MissingDependencyError("the tensorboard logger needs: pip install 'archifactory[loggers]'") from None
        writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

        def log(record):
            for k, v in numeric(record).items():
                writer.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step_of(record))

        log.close = writer.close
        return log
    if name == "wandb":
        try:
            import wandb
        except ImportError:
            raise MissingDependencyError("the wandb logger needs: pip install 'archifactory[loggers]'") from None
        run = wandb.init(project="archifactory", config=config, dir=str(run_dir))

        def log(record):
            run.log({f"{record.get('kind', 'train')}/{k}": v for k, v in numeric(record).items()}, step=step_of(record))

        log.close = run.finish
        return log
    if name == "mlflow":
        try:
            import mlflow
        except ImportError:
            raise MissingDependencyError("the mlflow logger needs: pip install 'archifactory[loggers]'") from None
        mlflow.start_run()

        def log(record):
            mlflow.log_metrics({f"{record.get('kind', 'train')}.{k}": v for k, v in numeric(record).items()},
                               step=step_of(record))

        log.close = mlflow.end_run
        return log
    raise ValueError(f"unknown logger {name!r}; valid: tensorboard, wandb, mlflow")
