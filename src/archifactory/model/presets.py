"""Named model presets: the YAML files under ``configs/models/``."""

from __future__ import annotations

from pathlib import Path


def configs_dir() -> Path:
    """``configs/`` shipped in the wheel, or the repository's own in a source checkout."""
    packaged = Path(__file__).resolve().parents[1] / "configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in (configs_dir() / "models").glob("*.yaml"))


def resolve_model_source(source: str | Path) -> Path:
    """A YAML path as given, or the preset of that name."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"model config not found: {path}")
        return path
    preset = configs_dir() / "models" / f"{source}.yaml"
    if not preset.is_file():
        raise FileNotFoundError(f"{source!r} is neither a YAML file nor a preset; presets: {', '.join(preset_names())}")
    return preset
