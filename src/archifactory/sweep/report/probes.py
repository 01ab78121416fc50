"""The report's "Synthetic probes" section, for a probe sweep (``kind: probe``): per task setting, each
variant's test accuracy at each width with its 95% interval over seeds and the grid point chosen on
validation accuracy; the MAD score table; accuracy against width; every run.

Numbers come from :mod:`archifactory.sweep.probe_results` (the grid choice and the MAD score), computed
from the ``probe_runs`` table that :class:`~archifactory.eval.probes.store.ProbeStore` keeps.
"""

from __future__ import annotations

from collections import defaultdict

from archifactory.sweep.probe_results import ProbeChoice, choose, mad_scores
from archifactory.sweep.report import figures
from archifactory.sweep.report.data import VARIANT_COLORS, SweepData
from archifactory.sweep.report.document import Block, Details, Paragraph, Section, Table
from archifactory.sweep.report.format import fmt_ci

PROTOCOL = (
    "Each variant is trained from scratch on generated examples at every grid point (lr x weight decay) and "
    "seed. Per (variant, width, task setting) the grid point with the highest validation accuracy (held-out "
    "examples, mean over seeds) is chosen, and its accuracy on the test examples, which choose nothing, is "
    "reported: mean ± half width of the 95% Student-t interval over seeds. Accuracy is taken on answer "
    "positions only; a run stops early once its validation accuracy reaches the spec's threshold."
)


def _choices(data: SweepData) -> list[ProbeChoice]:
    spec = data.probe_spec
    grid = len(spec.grid.lr) * len(spec.grid.weight_decay) if spec is not None else None
    return choose(data.probe_runs, grid, spec.seeds if spec is not None else None)


def _variants(data: SweepData) -> list[str]:
    return list(dict.fromkeys(r.variant for r in data.probe_runs))


def _setting_table(data: SweepData, choices: list[ProbeChoice], task: str, setting: str) -> Table:
    widths = sorted({c.width for c in choices})
    by_key = {(c.variant, c.width): c for c in choices if (c.task, c.setting) == (task, setting)}
    header = ["variant"] + [f"d={w}\ntest acc (95%\u00a0CI)" for w in widths] + ["chosen lr, wd\n(per width)"]
    rows = []
    for variant in _variants(data):
        cells = [variant]
        chosen = []
        for w in widths:
            c = by_key.get((variant, w))
            cells.append("—" if c is None else fmt_ci(c.test, 3) + ("" if c.complete else " *"))
            chosen.append("—" if c is None else f"{c.lr:g}, {c.weight_decay:g}")
        rows.append(cells + ["; ".join(chosen)])
    return Table(header, rows, numeric=set(range(1, len(widths) + 1)))


def accuracy_width_figure(data: SweepData, choices: list[ProbeChoice]) -> bytes | None:
    """Test accuracy (chosen grid point, mean over seeds, 95% interval as error bars) against d_model, one
    panel per task setting; ``None`` when there is a single width."""
    settings = sorted({(c.task, c.setting) for c in choices})
    widths = sorted({c.width for c in choices})
    if len(widths) < 2 or not settings:
        return None
    fig, axes = figures.new_figure(4.2 * len(settings), 3.4, ncols=len(settings))
    variants = _variants(data)
    palette = VARIANT_COLORS
    for ax, (task, setting) in zip(axes, settings):
        for i, variant in enumerate(variants):
            points = sorted((c.width, c.test) for c in choices
                            if (c.task, c.setting, c.variant) == (task, setting, variant))
            if not points:
                continue
            xs = [w for w, _ in points]
            ys = [ci.mean for _, ci in points]
            err = [[ci.mean - ci.low if ci.low is not None else 0 for _, ci in points],
                   [ci.high - ci.mean if ci.high is not None else 0 for _, ci in points]]
            ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=2, label=variant,
                        color=palette[i % len(palette)], linestyle="-" if i < len(palette) else "--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("d_model")
        ax.set_ylabel("test accuracy")
        ax.set_title(task if setting == "baseline" else f"{task} ({setting})", fontsize=9)
    axes[-1].legend(fontsize=7, frameon=False, loc="best")
    return figures.to_png(fig)


def probes_section(data: SweepData) -> list[Block] | None:
    if not data.probe_runs:
        return None
    choices = _choices(data)
    runs = data.probe_runs
    done = sum(r.status == "done" for r in runs)
    failed = [r for r in runs if r.status == "failed"]
    blocks: list[Block] = [Paragraph(f"{done} of {len(runs)} probe runs finished, {len(failed)} failed. {PROTOCOL}")]
    for task, setting in sorted({(c.task, c.setting) for c in choices}):
        title = task if setting == "baseline" else f"{task} · {setting}"
        blocks.append(Section(title, [_setting_table(data, choices, task, setting)]))
    if any(not c.complete for c in choices):
        blocks.append(Paragraph("* chosen among the grid points finished on every seed so far (the sweep is "
                                "incomplete).", "legend"))
    fig = figures.figure_block("probe_accuracy_vs_width", "Probe accuracy vs width",
                               "Test accuracy at the grid point chosen on validation accuracy; error bars span "
                               "the 95% interval over seeds (none with one seed).",
                               lambda: accuracy_width_figure(data, choices))
    if fig is not None:
        blocks.append(fig)
    tasks_with_settings = defaultdict(set)
    for c in choices:
        tasks_with_settings[c.task].add(c.setting)
    if len(tasks_with_settings) > 1 or any(len(s) > 1 for s in tasks_with_settings.values()):
        scores = mad_scores(choices)
        task_names = sorted(tasks_with_settings)
        rows = [[s.variant, str(s.width)] + [f"{s.per_task[t]:.3f}" if t in s.per_task else "—" for t in task_names]
                + [f"{s.mean:.3f}"] for s in scores]
        blocks.append(Section("MAD score", [
            Table(["variant", "width", *task_names, "mean"], rows, numeric=set(range(1, len(task_names) + 3))),
            Paragraph("Per task: the mean over its settings (baseline and each harder setting) of the chosen grid "
                      "point's test accuracy (mean over seeds); the last column is the mean over tasks (MAD-lab's "
                      "MAD score, with the grid point chosen on validation instead of test accuracy).", "legend"),
        ]))
    rows = [[r.run_id, f"{r.lr:g}", f"{r.weight_decay:g}", str(r.seed), r.status,
             "—" if r.valid_acc is None else f"{r.valid_acc:.3f}", "—" if r.test_acc is None else f"{r.test_acc:.3f}",
             "—" if r.steps is None else str(r.steps), "yes" if r.stopped_early else "no",
             "—" if r.elapsed_s is None else f"{r.elapsed_s:.0f}"] for r in runs]
    blocks.append(Details("Every probe run", [Table(
        ["run", "lr", "wd", "seed", "status", "valid acc", "test acc", "steps", "stopped early", "wall time (s)"],
        rows, numeric={1, 2, 3, 5, 6, 7, 9}, fit=True)]))
    return [Section("Synthetic probes", blocks)]
