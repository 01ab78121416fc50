"""The report of a sweep: a self-contained HTML page and a Markdown file, from ``results.sqlite`` alone.

``write_report(sweep_dir)`` reads the results store (:mod:`archifactory.sweep.store`), computes the
statistics (:mod:`archifactory.sweep.stats`), draws the plots with matplotlib's Agg renderer, and writes

- ``sweep_dir/report.html``: one file, the images embedded as base64 ``data:image/png`` URIs
  (RFC 2397), inline CSS, no script and no external resource, so it can be mailed or archived as is;
- ``sweep_dir/report.md`` with its images in ``sweep_dir/report_files/``.

Every string that comes from the database (variant names, overrides, error text, the spec, the
environment) is shown as written: HTML-escaped in both files, Markdown punctuation escaped (or inside code
spans) in the Markdown, and drawn without mathtext or LaTeX in the plots.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from archifactory.sweep import stats as st
from archifactory.sweep.store import Store

RESULTS_FILE = "results.sqlite"
HTML_FILE = "report.html"
MARKDOWN_FILE = "report.md"
FILES_DIR = "report_files"

BASELINE_COLOR = "#1a1a1a"
VARIANT_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
                  "#7f7f7f"]


# ---------------------------------------------------------------------------------------- the data


@dataclass
class SweepData:
    """Everything the report shows, read from the store and computed once."""

    name: str
    created_at: float | None
    spec_yaml: str
    env: dict[str, Any]
    runs: list[dict[str, Any]]
    order: list[str]
    """Variants, the baseline first, then in the order the runner registered them."""
    baseline: str | None
    finals: list[dict[str, Any]]
    """Finished runs, one lr per variant (the best, where a variant ran a grid)."""
    all_finals: list[dict[str, Any]]
    lr_choices: dict[str, st.LrChoice]
    stats: dict[str, st.VariantStats]
    diff_loss: dict[str, st.PairedDifference]
    diff_bpb: dict[str, st.PairedDifference]
    fairness: st.FairnessCheck
    eval_curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    train_curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def runs_of(self, variant: str, lr_selection: bool = False) -> list[dict[str, Any]]:
        """The variant's compared runs (with ``lr_selection``: its lr-selection runs as well)."""
        return [r for r in self.runs if r["variant"] == variant and (lr_selection or not st.is_selection_run(r))]

    def n_compared(self, metric: str = "val_loss") -> int:
        """How many tested comparisons with the baseline the Holm correction spans."""
        diffs = self.diff_loss if metric == "val_loss" else self.diff_bpb
        return max((d.n_compared for d in diffs.values() if d.tested), default=0)

    def color(self, variant: str) -> str:
        if variant == self.baseline:
            return BASELINE_COLOR
        others = [v for v in self.order if v != self.baseline]
        return VARIANT_COLORS[others.index(variant) % len(VARIANT_COLORS)]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r["status"] == "failed"]

    @property
    def unfinished(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r["status"] not in ("done", "failed")]

    def seq_len(self) -> int | None:
        for run in self.runs:
            value = ((st.loads_or_none(run.get("config_json")) or {}).get("train") or {}).get("seq_len")
            if value:
                return int(value)
        return None


def _registration_order(store: Store) -> list[str]:
    with store.connect() as db:
        return [r[0] for r in db.execute("SELECT variant FROM runs GROUP BY variant ORDER BY MIN(rowid)")]


def read_sweep_results(sweep_dir: str | Path) -> SweepData:
    """Read ``sweep_dir/results.sqlite`` and compute the report's statistics."""
    path = Path(sweep_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no results store at {path}: run the sweep first (archifactory sweep SPEC)")
    store = Store(path, read_only=True)
    sweep = store.sweep() or {}
    runs = store.runs()
    all_finals = store.finals()
    finals, lr_choices = st.best_lr_runs(all_finals)
    baseline = st.baseline_variant(runs)
    order = _registration_order(store)
    if baseline in order:
        order = [baseline] + [v for v in order if v != baseline]
    kept = {r["run_id"] for r in finals}
    eval_curves: dict[str, list[dict]] = {}
    train_curves: dict[str, list[dict]] = {}
    for row in store.metrics(kind="eval"):
        if row["run_id"] in kept:
            eval_curves.setdefault(row["run_id"], []).append(row)
    for row in store.metrics(kind="train"):
        if row["run_id"] in kept:
            train_curves.setdefault(row["run_id"], []).append(row)
    return SweepData(
        name=sweep.get("name") or Path(sweep_dir).resolve().name,
        created_at=sweep.get("created_at"),
        spec_yaml=sweep.get("spec_yaml") or "",
        env=st.loads_or_none(sweep.get("env_json")) or {},
        runs=runs,
        order=order,
        baseline=baseline,
        finals=finals,
        all_finals=all_finals,
        lr_choices=lr_choices,
        stats=st.variant_stats(finals),
        diff_loss=st.compare_to_baseline(finals, "val_loss", baseline=baseline),
        diff_bpb=st.compare_to_baseline(finals, "val_bpb", baseline=baseline),
        fairness=st.fairness(runs, finals, sweep.get("spec_yaml")),
        eval_curves=eval_curves,
        train_curves=train_curves,
    )


# ------------------------------------------------------------------------------------- formatting


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
            return f"{x / scale:.3g} {suffix}"
    return f"{x:.0f} B"


def fmt_lr(lr: float | None) -> str:
    return "—" if lr is None else f"{lr:g}"


def fmt_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, st._Missing):
        return str(value)
    return json.dumps(value)


@dataclass
class Changes:
    """A variant's ``runs.changes_json``: its overrides, description and iso-parameter matching."""

    overrides: list[str]
    description: str
    match_params: Any

    def match_text(self) -> str:
        """``{"changed": {"model.ffn.hidden": [344, 300]}, "params_before": .., "params_after": ..,
        "target": ..}`` -> ``model.ffn.hidden 344 → 300; params 1.05M → 1.00M (target 1.00M)``."""
        m = self.match_params
        if not m:
            return ""
        if not isinstance(m, dict) or not {"params_before", "params_after", "target"} <= set(m):
            return m if isinstance(m, str) else json.dumps(m, sort_keys=True)
        changed = "; ".join(f"{k} {fmt_value(v[0])} → {fmt_value(v[1])}" if isinstance(v, list) and len(v) == 2
                            else f"{k}: {fmt_value(v)}" for k, v in (m.get("changed") or {}).items())
        params = (f"params {fmt_count(m['params_before'])} → {fmt_count(m['params_after'])} "
                  f"(target {fmt_count(m['target'])})")
        return f"{changed}; {params}" if changed else f"already within tolerance: {params}"


def describe_changes(changes_json: str | None) -> Changes:
    changes = st.loads_or_none(changes_json) or {}
    overrides = changes.get("overrides") or []
    if isinstance(overrides, dict):
        overrides = [f"{k}={fmt_value(v)}" for k, v in overrides.items()]
    return Changes([str(o) for o in overrides], str(changes.get("description") or ""), changes.get("match_params"))


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


# --------------------------------------------------------------------------------------- the tables


@dataclass
class Table:
    """A table as plain strings (not yet escaped); ``classes`` give per-row CSS classes for HTML."""

    header: list[str]
    rows: list[list[str]]
    numeric: set[int] = field(default_factory=set)
    row_classes: list[str] = field(default_factory=list)
    notes_header: str | None = None
    """With ``notes``: a second, smaller line under each row's first cell in HTML, and a column of its own
    (after the first) in Markdown."""
    notes: list[str] = field(default_factory=list)


def _changes_text(data: SweepData, variant: str) -> str:
    if variant == data.baseline:
        return "(the baseline)"
    runs = data.runs_of(variant)
    if not runs:
        return ""
    changes = describe_changes(runs[0].get("changes_json"))
    text = ",\n".join(changes.overrides) or "(no overrides)"
    if changes.match_params:
        text += ";\niso-params: " + changes.match_text()
    return text


def stats_table(data: SweepData) -> Table:
    seq_len = data.seq_len()
    with_lr = any(r.get("lr") is not None for r in data.all_finals)
    # a line break in a header is a space in Markdown, and so is a no-break space
    header = ["variant", "seeds", "val loss\n(95%\u00a0CI)", "bits/byte\n(95%\u00a0CI)",
              "Δ loss vs baseline\n[95%\u00a0CI]", "p\n(paired\u00a0t)", "p\n(Holm)", "significant\n(Holm)", "params",
              "active\nparams",
              "FLOPs/token\n(train)", "tokens/s", "peak\nmemory",
              f"state bytes\n(T={seq_len})" if seq_len else "state\nbytes"]
    if with_lr:
        header.insert(2, "lr")
    table = Table(header, [], numeric={i for i, h in enumerate(header) if h not in ("variant", "significant\n(Holm)")},
                  notes_header="changes")
    for variant in data.order:
        s = data.stats.get(variant)
        n_runs = len(data.runs_of(variant))
        diff = data.diff_loss.get(variant)
        if variant == data.baseline:
            delta, p, p_holm, sig = "(baseline)", "", "", ""
        elif diff is None:
            delta, p, p_holm, sig = "—", "—", "—", "no baseline run" if data.baseline else "no baseline"
        else:
            delta = f"{fmt_signed(diff.mean_diff)}\n{fmt_interval(diff.ci_low, diff.ci_high)}".strip()
            p = fmt_p(diff.p_value) if diff.tested else diff.note.split(" ")[0]
            p_holm = fmt_p(diff.p_adjusted) if diff.tested else "—"
            sig = ("yes" if diff.significant else "no") if diff.tested else diff.note
        if s is None:
            row = [variant, f"0 / {n_runs}", "—", "—", delta, p, p_holm, sig] + ["—"] * 6
        else:
            c = s.costs
            row = [variant, f"{s.n_seeds} / {n_runs}", fmt_ci(s.val_loss),
                   fmt_ci(s.val_bpb), delta, p, p_holm, sig, fmt_count(c["params"]), fmt_count(c["active_params"]),
                   fmt_count(c["flops_per_token"]), fmt_count(c["tokens_per_s"]), fmt_bytes(c["peak_mem_bytes"]),
                   fmt_bytes(c["state_bytes"])]
        if with_lr:
            row.insert(2, fmt_lr(s.lr) if s else "—")
        table.rows.append(row)
        table.notes.append(_changes_text(data, variant))
        cls = "baseline" if variant == data.baseline else ""
        if diff is not None and diff.tested and diff.significant:
            cls += " better" if diff.mean_diff < 0 else " worse"
        table.row_classes.append(cls.strip())
    return table


def comparison_table(data: SweepData) -> Table:
    header = ["variant", "pairs (seeds)", "Δ val loss", "95% CI", "t", "p", "p (Holm)", "significant (Holm, α=0.05)",
              "Δ bits/byte", "95% CI", "p", "p (Holm)", "significant (Holm, α=0.05)"]
    table = Table(header, [], numeric={1, 2, 3, 4, 5, 6, 8, 9, 10, 11})
    for variant in data.order:
        if variant == data.baseline or variant not in data.diff_loss:
            continue
        row = [variant]
        for i, diff in enumerate((data.diff_loss[variant], data.diff_bpb.get(variant))):
            if diff is None:
                row += ["—"] * (6 if i == 0 else 5)
                continue
            if i == 0:
                row.append(f"{diff.n_pairs} ({', '.join(map(str, diff.seeds))})")
            row += [fmt_signed(diff.mean_diff), fmt_interval(diff.ci_low, diff.ci_high)]
            if i == 0:
                row.append("—" if diff.t_statistic is None else f"{diff.t_statistic:+.3f}")
            row += [fmt_p(diff.p_value) if diff.tested else "—", fmt_p(diff.p_adjusted) if diff.tested else "—",
                    (("yes" if diff.significant else "no") if diff.tested else diff.note)]
        table.rows.append(row)
        d = data.diff_loss[variant]
        table.row_classes.append(("better" if d.mean_diff < 0 else "worse") if d.tested and d.significant else "")
    return table


def seeds_table(data: SweepData) -> Table:
    """Every finished run's final figures (the chosen lr), for checking the summary by hand."""
    header = ["variant", "seed", "lr", "run", "val loss", "bits/byte", "tokens", "wall time (s)", "stream hash"]
    table = Table(header, [], numeric={1, 2, 4, 5, 6, 7})
    by_variant = st.group_by_variant(data.finals)
    for variant in data.order:
        for r in sorted(by_variant.get(variant, []), key=lambda r: r["seed"]):
            table.rows.append([variant, str(r["seed"]), fmt_lr(r.get("lr")), r["run_id"], fmt_loss(r.get("val_loss")),
                               fmt_loss(r.get("val_bpb")), fmt_count(r.get("tokens")),
                               "—" if r.get("elapsed_s") is None else f"{r['elapsed_s']:.1f}",
                               r.get("stream_hash") or "(none)"])
            table.row_classes.append("baseline" if variant == data.baseline else "")
    return table


def lr_table(data: SweepData) -> Table | None:
    if not data.lr_choices:
        return None
    table = Table(["variant", "lr", "runs", "chosen on seeds", "mean final val loss", "kept"], [], numeric={1, 2, 4})
    for variant in data.order:
        choice = data.lr_choices.get(variant)
        if choice is None:
            continue
        seeds = ", ".join(map(str, choice.selection_seeds))
        where = seeds if choice.held_out else f"{seeds} (the compared seeds)"
        for lr in sorted(choice.mean_val_loss_by_lr, key=lambda v: (v is None, v or 0.0)):
            kept = "✓ lowest" if lr == choice.chosen_lr else ""
            table.rows.append([variant, fmt_lr(lr), str(choice.n_seeds_by_lr[lr]), where,
                               fmt_loss(choice.mean_val_loss_by_lr[lr]), kept])
            table.row_classes.append("chosen" if lr == choice.chosen_lr else "")
    return table


def lr_choice_text(data: SweepData) -> str:
    """How the learning rates were chosen, in words (plain text)."""
    held_out = sorted(v for v, c in data.lr_choices.items() if c.held_out)
    not_held_out = sorted(v for v, c in data.lr_choices.items() if not c.held_out)
    text = []
    if held_out:
        seeds = sorted({s for v in held_out for s in data.lr_choices[v].selection_seeds})
        text.append(f"Variants with a learning-rate grid ({', '.join(held_out)}) ran it on the lr-selection seeds "
                    f"{', '.join(map(str, seeds))}; the lr with the lowest mean final validation loss there was then "
                    "run on the compared seeds, and only those runs enter the comparison above.")
    if not_held_out:
        text.append(f"Warning: {', '.join(not_held_out)} chose the lr on the very seeds the report compares (this "
                    "sweep has no lr-selection runs), which biases the comparison in the tuned variant's favour; set "
                    "lr_selection_seeds in the sweep spec.")
    return " ".join(text)


def config_diffs(data: SweepData) -> list[tuple[str, Changes, list[tuple[str, Any, Any]] | None]]:
    """Per non-baseline variant: its overrides, its iso-parameter matching, and the real difference of
    its resolved config against the baseline's (for a seed both ran, at the kept lr where possible)."""
    if data.baseline is None:
        return []
    kept = {r["run_id"] for r in data.finals}

    def pick(variant: str, seed: int | None = None) -> dict | None:
        runs = data.runs_of(variant)
        runs = sorted(runs, key=lambda r: (r["run_id"] not in kept, seed is not None and r["seed"] != seed, r["seed"]))
        return runs[0] if runs else None

    out = []
    for variant in data.order:
        if variant == data.baseline:
            continue
        run = pick(variant)
        if run is None:
            continue
        base = pick(data.baseline, run["seed"])
        diff = None
        if base is not None:
            diff = st.config_diff(st.loads_or_none(run.get("config_json")) or {},
                                  st.loads_or_none(base.get("config_json")) or {})
        out.append((variant, describe_changes(run.get("changes_json")), diff))
    return out


def fairness_rows(data: SweepData) -> list[tuple[str, str, bool | None]]:
    """``(check, finding, ok)`` lines of the fairness section."""
    f = data.fairness
    n = len(data.finals)
    rows = []
    if not n:
        return [("finished runs", "none: nothing to compare", None)]
    if f.stream_hash_identical:
        rows.append(("token stream", f"identical in all {n} finished runs (stream hash {f.reference_hash})", True))
    elif f.reference_hash is None:
        rows.append(("token stream", f"no stream hash recorded in any of the {n} finished runs: cannot tell", False))
    else:
        source = "baseline's" if data.baseline in data.stats else "most common"
        finding = (f"{len(f.differing)} of {n} runs differ from the {source} stream hash {f.reference_hash} "
                   "(or recorded none): see the list below")
        rows.append(("token stream", finding, False))
    for key, same in f.identical_fields.items():
        rows.append((key.replace("_", " "), "identical in all runs" if same else "differs between runs", same))
    tokens = sorted({t for t in f.tokens_by_run.values() if t is not None})
    if f.tokens_identical and tokens:
        rows.append(("tokens seen", f"{tokens[0]:,} in every run", True))
    else:
        low, high = (tokens[0], tokens[-1]) if tokens else (None, None)
        rows.append(("tokens seen", f"differ between runs: {low:,} to {high:,} (expected only under a time or FLOPs "
                                    "budget; see the per-run table)" if tokens else "not recorded", None))
    budgets = sorted({json.dumps(b, sort_keys=True) for b in f.budgets_by_run.values()})
    budget_text = "; ".join(", ".join(f"{k}={v}" for k, v in json.loads(b).items() if v is not None) or "none"
                            for b in budgets)
    rows.append(("run budget (train.max_steps / max_tokens / max_time_s)",
                 ("identical: " if f.budgets_identical else "differs: ") + budget_text, f.budgets_identical))
    if f.spec_budget is not None:
        rows.append(("sweep budget (spec)", describe_budget(f.spec_budget), None))
    if data.lr_choices:
        biased = sorted(v for v, c in data.lr_choices.items() if not c.held_out)
        if biased:
            rows.append(("learning-rate choice", f"{', '.join(biased)} chose the lr on the compared seeds "
                                                 "(no lr-selection runs): biased in their favour", False))
        else:
            seeds = sorted({s for c in data.lr_choices.values() for s in c.selection_seeds})
            rows.append(("learning-rate choice", f"on held-out seeds {', '.join(map(str, seeds))}, not among the "
                                                 "compared ones", True))
    return rows


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


def env_rows(data: SweepData) -> list[tuple[str, str]]:
    return [(str(k), "(unknown)" if v is None else fmt_value(v)) for k, v in data.env.items()]


KERNEL_COLUMNS = ["variant", "device × processes", "precision", "kernel path per layer"]


def kernel_rows(data: SweepData) -> list[tuple[str, str, str, str]]:
    """Per variant: device(s), the precision the runs resolved to (``auto`` -> bf16 or fp32) and the
    kernel paths its runs recorded (distinct values joined)."""
    out = []
    for variant in data.order:
        envs = [st.loads_or_none(r.get("env_json")) for r in data.runs_of(variant)]
        envs = [e for e in envs if e]
        if not envs:
            out.append((variant, "—", "—", "—"))
            continue
        devices = sorted({f"{e.get('device')} ×{e.get('world_size') or 1}" for e in envs})
        precisions = sorted({e.get("precision") or "(not recorded)" for e in envs})
        paths = sorted({summarize_kernel_paths(e.get("kernel_paths")) for e in envs})
        out.append((variant, ", ".join(devices), ", ".join(precisions), " | ".join(paths)))
    return out


def headline(data: SweepData) -> list[str]:
    """One sentence per variant: what the paired comparison says (plain text)."""
    lines = []
    for variant in data.order:
        if variant == data.baseline:
            continue
        s, d = data.stats.get(variant), data.diff_loss.get(variant)
        if s is None:
            lines.append(f"{variant}: no finished run.")
            continue
        if d is None:
            lines.append(f"{variant}: val loss {fmt_ci(s.val_loss)} (no baseline to compare with).")
            continue
        if d.mean_diff is None:
            lines.append(f"{variant}: val loss {fmt_ci(s.val_loss)}; no seed in common with the baseline: "
                         "no comparison.")
            continue
        word = "lower" if d.mean_diff < 0 else "higher"
        text = f"{variant}: val loss {abs(d.mean_diff):.4f} {word} than the baseline over {d.n_pairs} paired seed(s)"
        if d.tested:
            verdict = "significant" if d.significant else "not significant"
            text += (f", p = {fmt_p(d.p_value)}, Holm-corrected over {d.n_compared} comparison(s) "
                     f"p = {fmt_p(d.p_adjusted)} ({verdict} at α = {d.alpha:g}).")
        else:
            text += f"; {d.note}."
        lines.append(text)
    return lines


# ------------------------------------------------------------------------------------------ figures


def _xy(rows: list[dict], x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = []
    for r in rows:
        x, y = r.get(x_key), r.get(y_key)
        if x is None and x_key == "elapsed_s" and r.get("step") == 0:
            x = 0.0  # the evaluation before the first step has no elapsed time
        if x is not None and y is not None and math.isfinite(y):
            pts.append((float(x), float(y)))
    pts.sort()
    return np.asarray([p[0] for p in pts]), np.asarray([p[1] for p in pts])


def mean_band(curves: Sequence[tuple[np.ndarray, np.ndarray]], n_grid: int = 200):
    """Mean and min–max of several seeds' curves: on their shared x values when they all have the same
    ones (eval steps at an equal token budget), else interpolated onto a common grid over the range every
    seed covers (wall time). Returns ``(x, mean, low, high)`` or ``None``."""
    curves = [(x, y) for x, y in curves if len(x)]
    if not curves:
        return None
    x0 = curves[0][0]
    if all(len(x) == len(x0) and np.allclose(x, x0) for x, _ in curves):
        x, ys = x0, np.stack([y for _, y in curves])
    else:
        lo, hi = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
        if hi <= lo:
            x, y = curves[0]
            return x, y, y, y
        x = np.linspace(lo, hi, n_grid)
        ys = np.stack([np.interp(x, cx, cy) for cx, cy in curves])
    return x, ys.mean(0), ys.min(0), ys.max(0)


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centered moving average that shrinks its window at the ends (no lag, no edge droop)."""
    if window <= 1 or len(y) < 3:
        return y
    kernel = np.ones(window)
    return np.convolve(y, kernel, mode="same") / np.convolve(np.ones_like(y), kernel, mode="same")


def _new_figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3, linewidth=0.6)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _curve_bands(data: SweepData, curves: dict[str, list[dict]], x_key: str, y_key: str,
                 smooth_window: Callable[[int], int] | None) -> dict[str, tuple]:
    bands: dict[str, tuple] = {}
    for variant in data.order:
        s = data.stats.get(variant)
        if s is None:
            continue
        seeds = []
        for run_id in s.run_ids:
            x, y = _xy(curves.get(run_id, []), x_key, y_key)
            if smooth_window is not None:
                y = smooth(y, smooth_window(len(y)))
            seeds.append((x, y))
        band = mean_band(seeds)
        if band is not None:
            bands[variant] = band
    return bands


def _curve_figure(data: SweepData, curves: dict[str, list[dict]], x_key: str, y_key: str, xlabel: str, ylabel: str,
                  title: str, smooth_window: Callable[[int], int] | None = None) -> bytes | None:
    """Two panels: the whole run, and its second half (x from the middle of the range all variants span)
    with the y axis fitted to it, where the variants' differences are visible."""
    bands = _curve_bands(data, curves, x_key, y_key, smooth_window)
    if not bands:
        return None
    x_min = min(b[0][0] for b in bands.values())
    x_max = max(b[0][-1] for b in bands.values())
    x_half = x_min + 0.5 * (x_max - x_min)
    fig, axes = _new_figure(11, 4.0, 2)
    for ax, zoom in zip(axes, (False, True)):
        lows, highs = [], []
        for variant, (x, mean, low, high) in bands.items():
            if zoom:
                keep = x >= x_half
                if not keep.any():
                    continue
                x, mean, low, high = x[keep], mean[keep], low[keep], high[keep]
                lows.append(low.min())
                highs.append(high.max())
            color, is_base = data.color(variant), variant == data.baseline
            n = data.stats[variant].n_seeds
            ax.plot(x, mean, color=color, linewidth=2.2 if is_base else 1.6, marker="." if len(x) < 30 else None,
                    markersize=4, label=f"{variant}{' ★' if is_base else ''} (n={n})", zorder=3 if is_base else 2)
            if n > 1:
                ax.fill_between(x, low, high, color=color, alpha=0.15, linewidth=0)
        if zoom and lows:
            pad = 0.06 * ((max(highs) - min(lows)) or abs(max(highs)) or 1.0)
            ax.set_ylim(min(lows) - pad, max(highs) + pad)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if x_key == "tokens":
            ax.xaxis.set_major_formatter(_count_formatter())
        ax.set_title("second half (zoom)" if zoom else "whole run", fontsize=10)
    axes[0].legend(fontsize=8.5, frameon=False)
    fig.suptitle(title, fontsize=11.5)
    return _png(fig)


def _count_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: fmt_count(v) if v else "0")


def final_figure(data: SweepData) -> bytes | None:
    """Final val loss and bits per byte per variant (mean, 95% CI, each seed as a dot), and the paired
    difference to the baseline with its 95% CI (uncorrected) and Holm-corrected p-value (``*``: significant)."""
    variants = [v for v in data.order if v in data.stats]
    if not variants:
        return None
    from matplotlib.ticker import MaxNLocator

    has_diff = any(d.mean_diff is not None for d in data.diff_loss.values())
    fig, axes = _new_figure(11, 0.9 + 0.45 * len(variants), 3 if has_diff else 2)
    ypos = {v: len(variants) - 1 - i for i, v in enumerate(variants)}
    by_variant = st.group_by_variant(data.finals)
    for ax, metric, label in ((axes[0], "val_loss", "final val loss"), (axes[1], "val_bpb", "final bits per byte")):
        base = data.stats.get(data.baseline) if data.baseline else None
        if base is not None:
            ci = getattr(base, metric)
            if ci.low is not None:
                ax.axvspan(ci.low, ci.high, color=BASELINE_COLOR, alpha=0.07, linewidth=0)
            ax.axvline(ci.mean, color=BASELINE_COLOR, linestyle="--", linewidth=0.9)
        for v in variants:
            ci, color = getattr(data.stats[v], metric), data.color(v)
            seeds = [r[metric] for r in by_variant.get(v, []) if r.get(metric) is not None]
            ax.scatter(seeds, [ypos[v]] * len(seeds), s=14, color=color, alpha=0.45, zorder=2, linewidths=0)
            err = None if ci.low is None else [[ci.mean - ci.low], [ci.high - ci.mean]]
            ax.errorbar([ci.mean], [ypos[v]], xerr=err, fmt="D" if v == data.baseline else "o", color=color,
                        markersize=7 if v == data.baseline else 6, capsize=4, linewidth=1.6, zorder=3)
        ax.set_yticks(list(ypos.values()), [f"{v} ★" if v == data.baseline else v for v in ypos])
        ax.set_xlabel(label)
        ax.set_ylim(-0.6, len(variants) - 0.4)
    if has_diff:
        ax = axes[2]
        ax.axvline(0.0, color=BASELINE_COLOR, linewidth=1.0)
        for v in variants:
            d = data.diff_loss.get(v)
            if d is None or d.mean_diff is None:
                continue
            color = data.color(v)
            err = None if d.ci_low is None else [[d.mean_diff - d.ci_low], [d.ci_high - d.mean_diff]]
            ax.errorbar([d.mean_diff], [ypos[v]], xerr=err, fmt="o", color=color, capsize=4, linewidth=1.6)
            tag = (f"p_Holm={fmt_p(d.p_adjusted)}" + (" *" if d.significant else "")) if d.tested \
                else d.note.split(" ")[0]
            ax.annotate(tag, (d.mean_diff, ypos[v]), xytext=(0, 7), textcoords="offset points", ha="center",
                        fontsize=7.5, color=color)
        ax.set_yticks(list(ypos.values()), ["" for _ in ypos])
        ax.set_ylim(-0.6, len(variants) - 0.4)
        ax.set_xlabel("Δ val loss vs baseline (paired, 95% CI)")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, symmetric=False))
    fig.suptitle("Final results: mean and 95% CI over seeds (dots: seeds; ★ and dashed line: baseline)", fontsize=11)
    return _png(fig)


@dataclass
class ReportFigure:
    name: str
    title: str
    caption: str
    png: bytes


TRAIN_SMOOTHING = 0.08
"""The training-loss curves' centered moving average spans this fraction of the logged points."""


def make_figures(data: SweepData) -> list[ReportFigure]:
    band = "the line is the mean over seeds, the band spans the seeds' minimum to maximum"
    specs = [
        ("final", "Final validation loss per variant",
         ("Mean and 95% Student-t interval over seeds, each seed a dot; the right panel is the paired difference "
          "to the baseline with its 95% interval, not corrected for multiple comparisons; * marks a Holm-corrected "
          "p below 0.05."),
         lambda: final_figure(data)),
        ("val_loss_vs_tokens", "Validation loss vs tokens", f"Evaluations during training; {band}.",
         lambda: _curve_figure(data, data.eval_curves, "tokens", "val_loss", "tokens", "val loss",
                               "Validation loss vs tokens")),
        ("val_loss_vs_time", "Validation loss vs wall time",
         f"Each seed interpolated onto a common time grid; {band}.",
         lambda: _curve_figure(data, data.eval_curves, "elapsed_s", "val_loss", "wall time (s)", "val loss",
                               "Validation loss vs wall time")),
        ("train_loss_vs_tokens", "Training loss vs tokens",
         f"Each seed smoothed by a centered moving average over {TRAIN_SMOOTHING:.0%} of its logged points; {band}.",
         lambda: _curve_figure(data, data.train_curves, "tokens", "loss", "tokens", "training loss",
                               "Training loss vs tokens (smoothed)",
                               smooth_window=lambda n: max(1, round(TRAIN_SMOOTHING * n)))),
        ("val_bpb_vs_tokens", "Validation bits per byte vs tokens", f"Evaluations during training; {band}.",
         lambda: _curve_figure(data, data.eval_curves, "tokens", "val_bpb", "tokens", "bits per byte",
                               "Validation bits per byte vs tokens")),
    ]
    import matplotlib

    figures = []
    # Variant and sweep names are user text: drawn literally, never as mathtext ("cost$\\frac{$" would
    # raise) or LaTeX (a user's matplotlibrc may turn usetex on). The setting reaches every text the
    # figures create, tick labels included, since they are drawn inside the context too.
    with matplotlib.rc_context(LITERAL_TEXT):
        for name, title, caption, draw in specs:
            png = draw()
            if png is not None:
                figures.append(ReportFigure(name, title, caption, png))
    return figures


LITERAL_TEXT = {"text.parse_math": False, "text.usetex": False}
"""matplotlib settings under which every figure of the report is drawn: all text shown as written."""


# -------------------------------------------------------------------------------------------- HTML

CSS = """
:root { --fg: #1d1f23; --muted: #5f6670; --line: #d9dde3; --head: #f3f5f8; --base: #fff8dc; --good: #e6f4ea;
        --bad: #fdecea; --accent: #1f5fbf; }
* { box-sizing: border-box; }
body { font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); margin: 0; background: #fff; }
main { max-width: 1320px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 22px 0 6px; }
.meta { color: var(--muted); margin: 0 0 12px; }
.meta code { color: var(--fg); }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
pre { background: #f6f8fa; border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px;
      overflow-x: auto; white-space: pre-wrap; word-break: break-word; margin: 6px 0 14px; }
.scroll { overflow-x: auto; margin: 8px 0 6px; border: 1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; width: 100%; font-size: 12.5px; }
th, td { padding: 5px 7px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--head); font-weight: 600; vertical-align: bottom; }
.sub { color: var(--muted); font-size: 11.5px; }
.scroll.fit { display: inline-block; max-width: 100%; }
table.fit { width: auto; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
tr:last-child td { border-bottom: none; }
tr.baseline td { background: var(--base); }
tr.baseline td:first-child { font-weight: 600; }
tr.better td:first-child { border-left: 4px solid #2e8b57; }
tr.worse td:first-child { border-left: 4px solid #c0392b; }
tr.chosen td { font-weight: 600; }
td .note { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 11px;
           color: var(--muted); font-weight: normal; margin-top: 2px; max-width: 320px; overflow-wrap: break-word; }
td.changes { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; max-width: 300px;
             overflow-wrap: break-word; }
.legend { color: var(--muted); font-size: 12.5px; margin: 4px 0 0; }
.summary { background: #f7f9fc; border: 1px solid var(--line); border-radius: 6px; padding: 10px 16px 10px 32px; }
.summary li { margin: 2px 0; }
figure { margin: 18px 0 26px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 12.5px; margin-top: 5px; }
.ok { color: #1e7b3c; font-weight: 600; }
.warn { color: #b3261e; font-weight: 600; }
.info { color: var(--muted); font-weight: 600; }
ul.checks { list-style: none; padding-left: 4px; }
ul.checks li { margin: 3px 0; }
.variant-diff { margin-bottom: 18px; }
ul.overrides { margin: 4px 0 8px; padding-left: 20px; }
details { margin: 8px 0; }
summary { cursor: pointer; color: var(--accent); }
.badge { display: inline-block; border-radius: 10px; padding: 0 8px; font-size: 12px; margin-left: 6px; }
.badge.bad { background: var(--bad); color: #b3261e; }
.badge.good { background: var(--good); color: #1e7b3c; }
"""


def e(value: Any) -> str:
    """HTML-escape anything (strings from the database included)."""
    return html.escape("" if value is None else str(value), quote=True)


def _html_cell(text: str, numeric: bool) -> str:
    """Escaped cell text; a line break becomes ``<br>`` (a numeric cell's further lines are muted)."""
    first, *rest = text.split("\n")
    if not rest:
        return e(first)
    if numeric:
        return e(first) + "".join(f'<br><span class="sub">{e(line)}</span>' for line in rest)
    return "<br>".join(e(line) for line in [first, *rest])


def html_table(table: Table, cell_class: dict[int, str] | None = None, fit: bool = False) -> str:
    """``fit``: as wide as the content (key/value tables), not the page."""
    cell_class = cell_class or {}
    head = "".join(f'<th class="num">{_html_cell(h, False)}</th>' if i in table.numeric
                   else f"<th>{_html_cell(h, False)}</th>" for i, h in enumerate(table.header))
    body = []
    for r, row in enumerate(table.rows):
        cls = table.row_classes[r] if r < len(table.row_classes) else ""
        cells = []
        for i, cell in enumerate(row):
            classes = " ".join(c for c in ("num" if i in table.numeric else "", cell_class.get(i, "")) if c)
            content = _html_cell(cell, i in table.numeric)
            if i == 0 and table.notes and table.notes[r]:
                note = _html_cell(table.notes[r], False).replace(".", ".<wbr>")  # dotted keys may break there
                content += f'<div class="note">{note}</div>'

            cells.append(f'<td class="{classes}">{content}</td>' if classes else f"<td>{content}</td>")
        body.append(f'<tr class="{e(cls)}">' + "".join(cells) + "</tr>" if cls else "<tr>" + "".join(cells) + "</tr>")
    table_tag = '<table class="fit">' if fit else "<table>"
    return (f'<div class="scroll{" fit" if fit else ""}">{table_tag}<thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _status_span(ok: bool | None) -> str:
    if ok is True:
        return '<span class="ok">✓</span>'
    if ok is False:
        return '<span class="warn">✗</span>'
    return '<span class="info">○</span>'


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "unknown"
    return dt.datetime.fromtimestamp(timestamp, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _counts(data: SweepData) -> str:
    done = sum(r["status"] == "done" for r in data.runs)
    return (f"{len(data.order)} variants, {len(data.runs)} runs: {done} finished, {len(data.failed)} failed, "
            f"{len(data.unfinished)} not finished")


def render_html(data: SweepData, figures: Sequence[ReportFigure]) -> str:
    out: list[str] = []
    add = out.append
    add(f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>Sweep report: {e(data.name)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n")
    add(f"<h1>Sweep report: {e(data.name)}</h1>\n")
    add(f'<p class="meta">Created {e(_when(data.created_at))} · {e(_counts(data))} · baseline '
        f'<code>{e(data.baseline or "(none)")}</code></p>\n')
    lines = headline(data)
    if lines:
        add('<ul class="summary">' + "".join(f"<li>{e(line)}</li>" for line in lines) + "</ul>\n")

    add("<h2>Results</h2>\n")
    table = stats_table(data)
    add(html_table(table))
    add('<p class="legend">Mean ± half width of the 95% Student-t interval over seeds. Δ is variant − baseline, '
        "paired by seed (negative: lower loss than the baseline); p from a two-sided paired t-test, and Holm-corrected "
        f"over the {data.n_compared()} variant(s) tested against the baseline; significant when the corrected p is below "
        "α = 0.05. Seeds: finished / registered runs. Costs are means over seeds; "
        "a green (red) left edge marks a significantly lower (higher) loss.</p>\n")

    comparison = comparison_table(data)
    if comparison.rows:
        add("<h3>Paired comparison with the baseline</h3>\n")
        add(html_table(comparison))

    add("<h2>Plots</h2>\n")
    for fig in figures:
        uri = "data:image/png;base64," + base64.b64encode(fig.png).decode("ascii")
        add(f'<figure id="fig-{e(fig.name)}"><img src="{uri}" alt="{e(fig.title)}">'
            f"<figcaption>{e(fig.title)}. {e(fig.caption)}</figcaption></figure>\n")

    lrs = lr_table(data)
    if lrs is not None:
        add(f"<h2>Learning-rate choice</h2>\n<p>{e(lr_choice_text(data))}</p>\n")
        add(html_table(lrs, fit=True))

    add("<h2>What each variant changes</h2>\n")
    diffs = config_diffs(data)
    if not diffs:
        add("<p>No variant besides the baseline.</p>\n")
    for variant, changes, diff in diffs:
        add(f'<div class="variant-diff"><h3>{e(variant)}</h3>\n')
        if changes.description:
            add(f"<p>{e(changes.description)}</p>\n")
        if changes.overrides:
            add("<p>Overrides:</p>" + '<ul class="overrides">'
                + "".join(f"<li><code>{e(o)}</code></li>" for o in changes.overrides) + "</ul>\n")
        else:
            add("<p>No overrides recorded.</p>\n")
        if changes.match_params:
            add(f"<p>Iso-parameter matching: <code>{e(changes.match_text())}</code></p>\n")
        if diff is None:
            add("<p>No baseline config to compare with.</p>\n")
        elif not diff:
            add("<p>The resolved config is identical to the baseline's (apart from name, output directory and seed)."
                "</p>\n")
        else:
            rows = [[k, fmt_value(b), fmt_value(v)] for k, b, v in diff]
            add(html_table(Table(["resolved config key", "baseline", variant], rows),
                           {0: "changes", 1: "changes", 2: "changes"}, fit=True))
        add("</div>\n")

    add("<h2>Failed and unfinished runs</h2>\n")
    if not data.failed and not data.unfinished:
        add("<p>None: every registered run finished.</p>\n")
    for run in data.failed:
        add(f'<h3>{e(run["variant"])} · seed {e(run["seed"])}'
            + (f' · lr {e(fmt_lr(run.get("lr")))}' if run.get("lr") is not None else "")
            + f' <span class="badge bad">failed</span></h3>\n'
            f'<p class="meta">run <code>{e(run["run_id"])}</code> in <code>{e(run["run_dir"])}</code></p>\n'
            f'<pre>{e(run.get("error") or "(no error text recorded)")}</pre>\n')
    if data.unfinished:
        rows = [[r["variant"], str(r["seed"]), fmt_lr(r.get("lr")), r["run_id"], r["status"]] for r in data.unfinished]
        table = Table(["variant", "seed", "lr", "run", "status"], rows, {1, 2})
        add("<h3>Not finished</h3>\n" + html_table(table, fit=True))

    add('<h2>Fairness</h2>\n<ul class="checks">')
    for check, finding, ok in fairness_rows(data):
        add(f"<li>{_status_span(ok)} <b>{e(check)}</b>: {e(finding)}</li>")
    add("</ul>\n")
    if data.fairness.differing:
        rows = [[d["variant"], str(d["seed"]), d["run_id"], d["stream_hash"] or "(none)"]
                for d in data.fairness.differing]
        add("<h3>Runs whose token stream differs</h3>\n" + html_table(Table(["variant", "seed", "run", "stream hash"],
                                                                           rows, {1}), fit=True))
    add("<details><summary>Per-run final figures (kept lr)</summary>\n" + html_table(seeds_table(data))
        + "</details>\n")

    add("<h2>Environment</h2>\n")
    env = env_rows(data)
    if env:
        add(html_table(Table(["sweep environment", "value"], [[k, v] for k, v in env], set()), {1: "changes"},
                       fit=True))
    add("<h3>Devices, precision and kernel paths per variant</h3>\n")
    add(html_table(Table(KERNEL_COLUMNS, [list(r) for r in kernel_rows(data)]), {3: "changes"}, fit=True))
    if data.spec_yaml:
        add(f"<details><summary>Sweep spec (YAML)</summary><pre>{e(data.spec_yaml)}</pre></details>\n")
    add('<p class="legend">Generated by archifactory from results.sqlite.</p>\n</main>\n</body>\n</html>\n')
    return "".join(out)


# ---------------------------------------------------------------------------------------- Markdown


MD_PUNCTUATION = re.compile(r"([\\`*_\[\]#|~$])")
"""ASCII punctuation that Markdown (CommonMark, GitHub's tables, strikethrough and math) may read as syntax
inside a line (``(`` and ``!`` only matter after ``]`` or before ``[``, escaped here); a backslash before
any ASCII punctuation shows it literally (CommonMark 0.31, section 2.4)."""


MD_LIST_MARKER = re.compile(r"^(\s*\d{0,9})([-+.)])(?=\s|$)")


def md_cell(value: Any) -> str:
    """Text shown literally on one line (a table cell, a heading, a list item): Markdown punctuation
    backslash-escaped, HTML-escaped (Markdown passes raw HTML through), a leading list or quote marker
    escaped, line breaks turned into spaces."""
    text = ("" if value is None else str(value)).replace("\r", " ").replace("\n", " ").replace("\u00a0", " ")
    text = MD_PUNCTUATION.sub(r"\\\1", text)
    text = MD_LIST_MARKER.sub(r"\1\\\2", text)  # "- x", "1. x" would start a nested list
    return html.escape(text, quote=False)


def md_table(table: Table) -> str:
    if table.notes_header is not None:
        table = Table([table.header[0], table.notes_header, *table.header[1:]],
                      [[row[0], table.notes[r] if r < len(table.notes) else "", *row[1:]]
                       for r, row in enumerate(table.rows)],
                      numeric={i + 1 for i in table.numeric if i > 0} | ({0} if 0 in table.numeric else set()))
    align = ["---:" if i in table.numeric else "---" for i in range(len(table.header))]
    lines = ["| " + " | ".join(md_cell(h) for h in table.header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines) + "\n"


def md_code(text: str, lang: str = "") -> str:
    """A fenced block whose fence is longer than any backtick run inside ``text``."""
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}\n"


def _longest_backtick_run(text: str) -> int:
    run = best = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        best = max(best, run)
    return best


def md_inline_code(text: Any) -> str:
    """An inline code span outside tables (its content is shown literally, so it needs no HTML escaping)."""
    text = str(text).replace("\r", " ").replace("\n", " ")
    fence = "`" * (_longest_backtick_run(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def render_markdown(data: SweepData, image_paths: dict[str, str], figures: Sequence[ReportFigure]) -> str:
    out: list[str] = []
    add = out.append
    add(f"# Sweep report: {md_cell(data.name)}\n\n")
    baseline = md_inline_code(data.baseline or "(none)")
    add(f"Created {_when(data.created_at)} · {_counts(data)} · baseline {baseline}\n\n")
    for line in headline(data):
        add(f"- {md_cell(line)}\n")
    add("\n## Results\n\n")
    add(md_table(stats_table(data)))
    add("\nMean ± half width of the 95% Student-t interval over seeds. Δ is variant − baseline, paired by seed "
        "(negative: lower loss); p from a two-sided paired t-test, and Holm-corrected over the "
        f"{data.n_compared()} variant(s) tested against the baseline; significant when the corrected p is below "
        "α = 0.05. "
        "Seeds: finished / registered runs.\n")
    comparison = comparison_table(data)
    if comparison.rows:
        add("\n### Paired comparison with the baseline\n\n" + md_table(comparison))
    add("\n## Plots\n\n")
    for fig in figures:
        add(f"![{md_cell(fig.title)}]({image_paths[fig.name]})\n\n*{md_cell(fig.title)}. {md_cell(fig.caption)}*\n\n")
    lrs = lr_table(data)
    if lrs is not None:
        add(f"## Learning-rate choice\n\n{md_cell(lr_choice_text(data))}\n\n" + md_table(lrs))
    add("\n## What each variant changes\n\n")
    diffs = config_diffs(data)
    if not diffs:
        add("No variant besides the baseline.\n\n")
    for variant, changes, diff in diffs:
        add(f"### {md_cell(variant)}\n\n")
        if changes.description:
            add(f"{md_cell(changes.description)}\n\n")
        if changes.overrides:
            add("Overrides:\n\n" + "".join(f"- {md_inline_code(o)}\n" for o in changes.overrides))
        else:
            add("No overrides recorded.\n")
        if changes.match_params:
            add(f"\nIso-parameter matching: {md_inline_code(changes.match_text())}\n")
        if diff is None:
            add("\nNo baseline config to compare with.\n\n")
        elif not diff:
            add("\nThe resolved config is identical to the baseline's (apart from name, output directory and "
                "seed).\n\n")
        else:
            add("\n" + md_table(Table(["resolved config key", "baseline", variant],
                                      [[k, fmt_value(b), fmt_value(v)] for k, b, v in diff])) + "\n")
    add("## Failed and unfinished runs\n\n")
    if not data.failed and not data.unfinished:
        add("None: every registered run finished.\n\n")
    for run in data.failed:
        lr = f" · lr {fmt_lr(run.get('lr'))}" if run.get("lr") is not None else ""
        add(f"### {md_cell(run['variant'])} · seed {run['seed']}{lr} (failed)\n\n"
            f"Run {md_inline_code(run['run_id'])} in {md_inline_code(run['run_dir'])}:\n\n"
            + md_code(run.get("error") or "(no error text recorded)") + "\n")
    if data.unfinished:
        rows = [[r["variant"], str(r["seed"]), fmt_lr(r.get("lr")), r["run_id"], r["status"]] for r in data.unfinished]
        add("### Not finished\n\n" + md_table(Table(["variant", "seed", "lr", "run", "status"], rows, {1, 2})) + "\n")
    add("## Fairness\n\n")
    for check, finding, ok in fairness_rows(data):
        mark = {True: "✓", False: "✗", None: "○"}[ok]
        add(f"- {mark} **{md_cell(check)}**: {md_cell(finding)}\n")
    if data.fairness.differing:
        rows = [[d["variant"], str(d["seed"]), d["run_id"], d["stream_hash"] or "(none)"]
                for d in data.fairness.differing]
        add("\n### Runs whose token stream differs\n\n" + md_table(Table(["variant", "seed", "run", "stream hash"],
                                                                         rows, {1})))
    add("\n### Per-run final figures (kept lr)\n\n" + md_table(seeds_table(data)))
    add("\n## Environment\n\n")
    env = env_rows(data)
    if env:
        add(md_table(Table(["sweep environment", "value"], [[k, v] for k, v in env])) + "\n")
    add("### Devices, precision and kernel paths per variant\n\n")
    add(md_table(Table(KERNEL_COLUMNS, [list(r) for r in kernel_rows(data)])))
    if data.spec_yaml:
        add("\n### Sweep spec\n\n" + md_code(data.spec_yaml, "yaml"))
    return "".join(out)


# ------------------------------------------------------------------------------------------ writing


def write_report(sweep_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` (+ ``report_files/*.png``) into
    ``sweep_dir`` from ``sweep_dir/results.sqlite``; returns ``(html_path, md_path)``."""
    sweep_dir = Path(sweep_dir)
    data = read_sweep_results(sweep_dir)
    figures = make_figures(data)
    files_dir = sweep_dir / FILES_DIR
    files_dir.mkdir(parents=True, exist_ok=True)
    image_paths = {}
    for fig in figures:
        (files_dir / f"{fig.name}.png").write_bytes(fig.png)
        image_paths[fig.name] = f"{FILES_DIR}/{fig.name}.png"
    html_path, md_path = sweep_dir / HTML_FILE, sweep_dir / MARKDOWN_FILE
    _write_atomic(html_path, render_html(data, figures))
    _write_atomic(md_path, render_markdown(data, image_paths, figures))
    return html_path, md_path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
