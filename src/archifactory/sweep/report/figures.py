"""The report's figures, drawn with matplotlib's Agg renderer (no display, no global pyplot state) into PNG
bytes.

Every figure is drawn under :data:`LITERAL_TEXT`: variant and sweep names are user text, drawn as written,
never as mathtext or LaTeX. A figure function takes :class:`~archifactory.sweep.report.data.SweepData`
(or what it needs of it) and returns PNG bytes, or ``None`` when there is nothing to draw;
:func:`figure_block` wraps one into a document :class:`~archifactory.sweep.report.document.Figure`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import numpy as np

from archifactory.sweep import stats as st
from archifactory.sweep.report.data import BASELINE_COLOR, SweepData
from archifactory.sweep.report.document import Figure
from archifactory.sweep.report.format import fmt_count, fmt_p

def _xy(rows: Sequence[st.Row], x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
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


def new_figure(width: float, height: float, ncols: int = 1):
    """A matplotlib figure (``width`` x ``height`` inches, Agg canvas, no pyplot) with ``ncols`` axes in one
    row, in the report's style (light grid, no top/right spines); returns ``(figure, axes)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3, linewidth=0.6)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, axes


def to_png(fig) -> bytes:
    """The figure as PNG bytes (no timestamp or software metadata, so equal figures give equal bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _curve_bands(data: SweepData, curves: dict[str, list], x_key: str, y_key: str,
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


def _curve_figure(data: SweepData, curves: dict[str, list], x_key: str, y_key: str, xlabel: str, ylabel: str,
                  title: str, smooth_window: Callable[[int], int] | None = None) -> bytes | None:
    """Two panels: the whole run, and its second half (x from the middle of the range all variants span)
    with the y axis fitted to it, where the variants' differences are visible."""
    bands = _curve_bands(data, curves, x_key, y_key, smooth_window)
    if not bands:
        return None
    x_min = min(b[0][0] for b in bands.values())
    x_max = max(b[0][-1] for b in bands.values())
    x_half = x_min + 0.5 * (x_max - x_min)
    fig, axes = new_figure(11, 4.0, 2)
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
    return to_png(fig)


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
    fig, axes = new_figure(11, 0.9 + 0.45 * len(variants), 3 if has_diff else 2)
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
                else d.short_note
            ax.annotate(tag, (d.mean_diff, ypos[v]), xytext=(0, 7), textcoords="offset points", ha="center",
                        fontsize=7.5, color=color)
        ax.set_yticks(list(ypos.values()), ["" for _ in ypos])
        ax.set_ylim(-0.6, len(variants) - 0.4)
        ax.set_xlabel("Δ val loss vs baseline (paired, 95% CI)")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, symmetric=False))
    fig.suptitle("Final results: mean and 95% CI over seeds (dots: seeds; ★ and dashed line: baseline)", fontsize=11)
    return to_png(fig)


LITERAL_TEXT = {"text.parse_math": False, "text.usetex": False}
"""matplotlib settings under which every figure of the report is drawn: all text shown as written."""


def figure_block(name: str, title: str, caption: str, draw: Callable[[], bytes | None]) -> Figure | None:
    """Call ``draw`` under :data:`LITERAL_TEXT` and wrap its PNG into a document figure (``None`` when
    it drew nothing). Variant and sweep names are user text: drawn literally, never as mathtext
    (``cost$\\frac{$`` would raise) or LaTeX (a user's matplotlibrc may turn usetex on). The setting
    reaches every text the figure creates, tick labels included, since they are drawn inside the context."""
    import matplotlib

    with matplotlib.rc_context(LITERAL_TEXT):
        png = draw()
    return None if png is None else Figure(name, title, caption, png)


TRAIN_SMOOTHING = 0.08
"""The training-loss curves' centered moving average spans this fraction of the logged points."""

_BAND = "the line is the mean over seeds, the band spans the seeds' minimum to maximum"

LOSS_FIGURES: list[tuple[str, str, str, Callable[[SweepData], bytes | None]]] = [
    ("final", "Final validation loss per variant",
     ("Mean and 95% Student-t interval over seeds, each seed a dot; the right panel is the paired difference "
      "to the baseline with its 95% interval, not corrected for multiple comparisons; * marks a Holm-corrected "
      "p below 0.05."),
     final_figure),
    ("val_loss_vs_tokens", "Validation loss vs tokens", f"Evaluations during training; {_BAND}.",
     lambda data: _curve_figure(data, data.eval_curves, "tokens", "val_loss", "tokens", "val loss",
                                "Validation loss vs tokens")),
    ("val_loss_vs_time", "Validation loss vs wall time",
     f"Each seed interpolated onto a common time grid; {_BAND}.",
     lambda data: _curve_figure(data, data.eval_curves, "elapsed_s", "val_loss", "wall time (s)", "val loss",
                                "Validation loss vs wall time")),
    ("train_loss_vs_tokens", "Training loss vs tokens",
     f"Each seed smoothed by a centered moving average over {TRAIN_SMOOTHING:.0%} of its logged points; {_BAND}.",
     lambda data: _curve_figure(data, data.train_curves, "tokens", "loss", "tokens", "training loss",
                                "Training loss vs tokens (smoothed)",
                                smooth_window=lambda n: max(1, round(TRAIN_SMOOTHING * n)))),
    ("val_bpb_vs_tokens", "Validation bits per byte vs tokens", f"Evaluations during training; {_BAND}.",
     lambda data: _curve_figure(data, data.eval_curves, "tokens", "val_bpb", "tokens", "bits per byte",
                                "Validation bits per byte vs tokens")),
]
"""The "Plots" section's figures: ``(name, title, caption, draw(data) -> PNG bytes | None)``."""


def loss_figures(data: SweepData) -> list[Figure]:
    """The :data:`LOSS_FIGURES` that have something to show."""
    figures = [figure_block(name, title, caption, lambda draw=draw: draw(data))
               for name, title, caption, draw in LOSS_FIGURES]
    return [f for f in figures if f is not None]
