"""Numbers and store values as the report's text (plain strings; the renderers escape them)."""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

from archifactory.results import VariantChanges
from archifactory.sweep import stats as st


def fmt_loss(x: float | None, digits: int = 4) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def fmt_signed(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:+.{digits}f}"


def fmt_ci(ci: st.MeanCI, digits: int = 4) -> str:
    """``3.2145 ± 0.0123`` (the half width of the 95% interval), or the mean alone for one seed."""
    if ci.n == 0:
        return "—"
    if ci.half_width is None:
        return f"{ci.mean:.{digits}f}"
    return f"{ci.mean:.{digits}f} ± {ci.half_width:.{digits}f}"


def fmt_interval(low: float | None, high: float | None, digits: int = 4) -> str:
    return "" if low is None or high is None else f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "—"
    return "<1e-4" if p < 1e-4 else f"{p:.4f}"


def fmt_count(x: float | None) -> str:
    """1234567 -> ``1.23M`` (decimal prefixes, for parameters, FLOPs, tokens)."""
    if x is None:
        return "—"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def fmt_bytes(x: float | None) -> str:
    """Binary prefixes: 1536 -> ``1.5 KiB``; ``—`` when not recorded (e.g. CPU peak memory)."""
    if x is None:
        return "—"
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(x) >= scale:
            value = x / scale
            return f"{value:.3g} {suffix}" if abs(value) < 1000 else f"{value:.0f} {suffix}"  # not 1.01e+03
    return f"{x:.0f} B"


def fmt_lr(lr: float | None) -> str:
    return "—" if lr is None else f"{lr:g}"


def fmt_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, st._Missing):
        return str(value)
    return json.dumps(value)


def fmt_when(timestamp: float | None) -> str:
    if not timestamp:
        return "unknown"
    return dt.datetime.fromtimestamp(timestamp, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def match_text(changes: VariantChanges) -> str:
    """``{"changed": {"model.ffn.hidden": [344, 300]}, "params_before": .., "params_after": ..,
    "target": ..}`` -> ``model.ffn.hidden 344 → 300; params 1.05M → 1.00M (target 1.00M)``."""
    m = changes.match_params
    if not m:
        return ""
    if not isinstance(m, dict) or not {"params_before", "params_after", "target"} <= set(m):
        return m if isinstance(m, str) else json.dumps(m, sort_keys=True)
    changed = "; ".join(f"{k} {fmt_value(v[0])} → {fmt_value(v[1])}" if isinstance(v, list) and len(v) == 2
                        else f"{k}: {fmt_value(v)}" for k, v in (m.get("changed") or {}).items())
    params = (f"params {fmt_count(m['params_before'])} → {fmt_count(m['params_after'])} "
              f"(target {fmt_count(m['target'])})")
    return f"{changed}; {params}" if changed else f"already within tolerance: {params}"


def summarize_kernel_paths(paths: dict[str, str] | None) -> str:
    """``{"0": "torch", "1": "torch", "2": "fla"}`` -> ``layers 0–1: torch; 2: fla``."""
    if not paths:
        return "—"
    items = sorted(((int(k) if str(k).isdigit() else k, v) for k, v in paths.items()),
                   key=lambda kv: str(kv[0]).zfill(6))
    if len({v for _, v in items}) == 1:
        return f"all {len(items)} layers: {items[0][1]}"
    parts, start, prev, value = [], None, None, None
    for layer, path in items + [(None, None)]:
        if path != value or not (isinstance(layer, int) and isinstance(prev, int) and layer == prev + 1):
            if value is not None:
                parts.append(f"{start}–{prev}: {value}" if start != prev else f"{start}: {value}")
            start, value = layer, path
        prev = layer
    return "layers " + "; ".join(parts)


def describe_budget(budget: Any) -> str:
    """The spec's ``budget`` mapping (``{tokens: 2e6, flops: null, seconds: null}``) in words."""
    if not isinstance(budget, dict):
        return str(budget)
    words = {"tokens": "{:,.0f} tokens per run", "flops": "{:.3g} training FLOPs per run",
             "seconds": "{:,.0f} s of training per run"}
    parts = []
    for key, value in budget.items():
        if value is None:
            continue
        try:
            parts.append(words[key].format(float(value)) if key in words else f"{key}: {value}")
        except (TypeError, ValueError):
            parts.append(f"{key}: {value}")
    return ", ".join(parts) or "none given"
