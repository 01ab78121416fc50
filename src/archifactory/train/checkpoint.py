"""Checkpoints: weights in safetensors, everything else (optimizer, step, data position, RNG) in a file
read back with ``torch.load(weights_only=True)``, and both files' sizes and digests in
``checksums.json``. Each checkpoint is written into a temporary directory and renamed into place, so a
killed process never leaves a half-written one, and a failed write (a full disk) removes its temporary
directory; the last N are kept. Loading verifies the checksums and that every tensor is finite: a
damaged checkpoint raises :class:`CheckpointError` and is never used."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

from archifactory.errors import UserError
from archifactory.integrity import verify_checksums, write_checksums

STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is incomplete, damaged, or holds non-finite values."""


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def checkpoint_step(path: Path) -> int:
    return int(STEP_DIR.match(Path(path).name).group(1))


def _plain(value: Any) -> Any:
    """Drop what ``weights_only`` loading cannot read (functions in some optimizers' param groups)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if _loadable(v)}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _loadable(value: Any) -> bool:
    if isinstance(value, (dict, list, tuple)):
        return True
    return value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device))


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, state: dict, keep: int) -> Path:
    from safetensors.torch import save_model

    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    for stale in root.glob(".step_*.tmp"):  # left by a killed process (the run directory has one writer)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(_plain(state), tmp / "state.pt")
        write_checksums(tmp, ["model.safetensors", "state.pt"])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. a full disk: leave nothing half-written behind
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def nonfinite_tensors(tensors, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (nested) dict / list that hold NaN or infinity. Sharded
    (DTensor) values are checked on their local shard."""
    bad: list[str] = []
    if isinstance(tensors, dict):
        for key, value in tensors.items():
            bad += nonfinite_tensors(value, f"{prefix}{key}.")
    elif isinstance(tensors, (list, tuple)):
        for i, value in enumerate(tensors):
            bad += nonfinite_tensors(value, f"{prefix}{i}.")
    elif isinstance(tensors, torch.Tensor):
        local = tensors.to_local() if hasattr(tensors, "to_local") else tensors
        if local.is_floating_point() and not bool(torch.isfinite(local.detach()).all()):
            bad.append(prefix.rstrip("."))
    return bad


def verify_checkpoint(path: Path) -> list[str]:
    """Problems with checkpoint ``path``'s files (sizes and digests; empty list: intact)."""
    return verify_checksums(path, required=("model.safetensors", "state.pt")) or []


def load_checkpoint(path: Path, model: torch.nn.Module, device: torch.device | str) -> dict:
    """Load checkpoint ``path`` into ``model`` and return its state; raises :class:`CheckpointError` when
    a file is missing, damaged, unreadable, or holds NaN / infinity."""
    from safetensors.torch import load_model

    path = Path(path)
    problems = verify_checkpoint(path)
    if problems:
        raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(problems)}")
    try:
        load_model(model, str(path / "model.safetensors"), device=str(device))
    except Exception as err:  # safetensors raises its own error types for a damaged header or shape
        raise CheckpointError(f"checkpoint {path}/model.safetensors cannot be read ({type(err).__name__}: {err})") from None
    try:
        state = torch.load(path / "state.pt", map_location=device, weights_only=True)
    except Exception as err:  # a damaged zip / pickle raises any of several types
        raise CheckpointError(f"checkpoint {path}/state.pt cannot be read ({type(err).__name__}: {err})") from None
    bad = nonfinite_tensors(dict(model.state_dict())) + nonfinite_tensors(state.get("optimizer", {}), "optimizer.")
    if bad:
        raise CheckpointError(f"checkpoint {path} holds NaN or infinite values ({', '.join(bad[:3])})")
    return state


CONFIG_GROUP_KEYS = ("base_lr",)
"""Param-group entries that come from the run's config, not from training: the live optimizer's values win
over the checkpoint's, so that a resume with a changed ``optimizer.lr`` (the advice after a divergence)
trains at the new peak rate. ``set_lr`` scales ``base_lr`` at every step, so the rate itself follows."""


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load the checkpoint's optimizer state (moments, step counts, group hyperparameters), keeping from the
    live optimizer the group settings the checkpoint could not store (e.g. functions) and the peak learning
    rate the current config sets (``CONFIG_GROUP_KEYS``)."""
    before = [dict(g) for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, old in zip(optimizer.param_groups, before):
        for key, value in old.items():
            if key in CONFIG_GROUP_KEYS:
                group[key] = value
            else:
                group.setdefault(key, value)
