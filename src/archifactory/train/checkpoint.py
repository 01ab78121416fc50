"""Checkpoints: weights in safetensors, everything else (optimizer, step, data position, RNG) in a file
read back with ``torch.load(weights_only=True)``. Each checkpoint is written into a temporary directory
and renamed into place, so a killed process never leaves a half-written one; the last N are kept."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


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
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(_plain(state), tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, device: torch.device | str) -> dict:
    from safetensors.torch import load_model

    path = Path(path)
    for name in ("model.safetensors", "state.pt"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {name} is missing")
    load_model(model, str(path / "model.safetensors"), device=str(device))
    try:
        return torch.load(path / "state.pt", map_location=device, weights_only=True)
    except Exception as err:
        raise RuntimeError(f"checkpoint {path}/state.pt cannot be read ({err}); delete it to resume from the one before") from None


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load, keeping group settings the checkpoint could not store (e.g. functions) from the live optimizer."""
    before = [dict(g) for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, old in zip(optimizer.param_groups, before):
        for key, value in old.items():
            group.setdefault(key, value)
