"""The report's "Synthetic probes" section, for a probe sweep (``kind: probe``): per task setting, each
variant's test accuracy at each width with its 95% interval over seeds and the grid point chosen on
validation accuracy; the MAD score table; accuracy against width; the paired comparison of every variant
with the baseline variant (difference over seeds, Holm-corrected p) and its overview heat map beside
throughput and state memory, as the zero-shot and code sections have them; every run.

Numbers come from :mod:`archifactory.sweep.probe_results` (the grid choice and the MAD score), computed
from the ``probe_runs`` table that :class:`~archifactory.eval.probes.store.ProbeStore` keeps.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from archifactory.sweep.probe_results import ProbeChoice, ProbeComparison, choose, compare_choices, mad_scores
from archifactory.sweep.report import figures
from archifactory.sweep.report.data import VARIANT_COLORS, SweepData
from archifactory.sweep.report.document import Block, CodeBlock, Details, Paragraph, Section, Table
from archifactory.sweep.report.evals import (
    CostColumn,
    MetricComparison,
    MetricKey,
    StageEvaluation,
    VariantMetric,
    heat_map,
    heat_map_figure,
    metric_table,
)
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
    listed = list(data.probe_spec.variants) if data.probe_spec is not None else []
    return list(dict.fromkeys(listed + [r.variant for r in data.probe_runs]))


def setting_title(task: str, setting: str) -> str:
    """A task setting as the report names it: the task, then any harder setting (``mqar · num_kv_pairs=16``)."""
    return task if setting == "baseline" else f"{task} · {setting}"


def _baseline(data: SweepData) -> str:
    """The spec's baseline variant; the first variant when the stored spec no longer validates."""
    return data.probe_spec.baseline_variant if data.probe_spec is not None else _variants(data)[0]


def _costs(data: SweepData) -> list[CostColumn]:
    """Per width: training tokens/s (mean over the variant's finished runs: examples x row length / wall
    time, evaluations included) and, when the spec validates, the state bytes per sequence at the first task
    setting's row length (the model built on the meta device: no memory, no compute)."""
    from archifactory.eval.probes.spec import model_for, task_settings

    spec = data.probe_spec
    settings = {(t.task_name, t.setting): t.task for t in task_settings(spec)} if spec is not None else {}
    widths = sorted({r.width for r in data.probe_runs})
    columns = []
    for width in widths:
        rates: dict[str, list[float]] = defaultdict(list)
        for r in data.probe_runs:
            task = settings.get((r.task, r.setting))
            if r.width == width and r.status == "done" and task is not None and r.examples and r.elapsed_s:
                rates[r.variant].append(r.examples * task.model_seq_len() / r.elapsed_s)
        columns.append(CostColumn(f"train tokens/s d={width}", {v: float(np.mean(x)) for v, x in rates.items()},
                                  True, "count"))
    if settings:
        import torch

        task = next(iter(settings.values()))
        for width in widths:
            state = {}
            for variant in _variants(data):
                try:
                    with torch.device("meta"):
                        model = model_for(spec, variant, width if spec.widths else None, task).build()
                    state[variant] = float(model.state_bytes(task.model_seq_len()))
                except Exception:  # a variant that no longer builds: no cost cell, not a failed report
                    continue
            columns.append(CostColumn(f"state memory d={width} (T={task.model_seq_len()})", state, False, "bytes"))
    return columns


def probe_evaluation(data: SweepData, choices: list[ProbeChoice]) -> StageEvaluation:
    """The probe results as the evaluation sections hold theirs: one metric per (task setting, width) and
    per width's MAD score, each variant paired with the baseline, and the cost columns."""
    baseline = _baseline(data)
    sizes = {(r.variant, r.width, r.task, r.setting): r.test_examples for r in data.probe_runs
             if r.test_examples is not None}
    metrics = []
    for comparison in compare_choices(choices, baseline, sizes):
        if comparison.setting:
            key = MetricKey(setting_title(comparison.task, comparison.setting), None, f"test acc d={comparison.width}")
        else:
            key = MetricKey(comparison.task, None, f"d={comparison.width}")
        metrics.append(MetricComparison(key, True, [], {
            v: VariantMetric(v, ci, comparison.diffs.get(v), None, None, comparison.n_items.get(v), [])
            for v in _variants(data) if (ci := comparison.values.get(v)) is not None}))
    return StageEvaluation("probe", baseline, _variants(data), metrics, _costs(data))


COMPARISON_LEGEND = (
    "Δ is variant − baseline in test accuracy at each one's chosen grid point (or in MAD score), paired by seed; "
    "p from a two-sided paired t-test, Holm-corrected over the variants compared on the same task setting and "
    "width (as the validation-loss and zero-shot comparisons are); significant when the corrected p is below "
    "α = 0.05. A test needs two seeds or more: with one seed (MAD's and Zoology's protocol) the difference stands "
    "alone (n<2). Items: test examples."
)


def _comparison_blocks(evaluation: StageEvaluation) -> list[Block]:
    if len(evaluation.order) < 2 or not evaluation.metrics:
        return []
    by_task: dict[str, list[MetricComparison]] = defaultdict(list)
    for c in evaluation.metrics:
        by_task[c.key.task].append(c)
    blocks: list[Block] = [Paragraph(f"Baseline: {evaluation.baseline}. {COMPARISON_LEGEND}", "legend")]
    for task, comparisons in by_task.items():
        table = metric_table(evaluation, comparisons)
        for i in (9, 8):  # no chance level or null model for generated probes
            table.header.pop(i)
            for row in table.rows:
                row.pop(i)
        table.numeric = {2, 3, 4, 5, 6, 8}
        blocks.append(Section(task, [table]))
    hm = heat_map(evaluation)
    if hm is not None:
        fig = figures.figure_block(
            "probe_overview", "Probe overview",
            "Each column is a probe metric's difference from the baseline (test accuracy or MAD score, mean over "
            "seeds; blue better, red worse), divided by the column's largest absolute difference; the cells show "
            "the raw difference (* where the Holm-corrected paired p is below 0.05); grey: no value. On the right: "
            "training tokens/s per width (whole runs, evaluations included, with the sweep's parallel runs "
            "sharing the machine) and the state (KV cache or recurrent state) per sequence.",
            lambda: heat_map_figure(hm, evaluation.baseline))
        if fig is not None:
            blocks.append(fig)
    return [Section("Paired comparison with the baseline", blocks)]


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


def _error_tail(error: str | None, lines: int = 6) -> str:
    """The last lines of a stored traceback (its exception line last), or a note when none was stored."""
    if not error:
        return "(no error text recorded)"
    return "\n".join(error.strip().splitlines()[-lines:])


def probes_section(data: SweepData) -> list[Block] | None:
    if not data.probe_runs:
        return None
    choices = _choices(data)
    runs = data.probe_runs
    done = sum(r.status == "done" for r in runs)
    failed = [r for r in runs if r.status == "failed"]
    blocks: list[Block] = [Paragraph(f"{done} of {len(runs)} probe runs finished, {len(failed)} failed. {PROTOCOL}")]
    for task, setting in sorted({(c.task, c.setting) for c in choices}):
        blocks.append(Section(setting_title(task, setting), [_setting_table(data, choices, task, setting)]))
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
    blocks += _comparison_blocks(probe_evaluation(data, choices))
    if failed:
        blocks.append(Section("Failed probe runs", [
            Paragraph("Each failed run's error (the end of its traceback); re-running the sweep retries them and "
                      "keeps the finished ones.", "legend"),
            *[Section(r.run_id, [CodeBlock(_error_tail(r.error))], badge="failed") for r in failed]]))
    rows = [[r.run_id, f"{r.lr:g}", f"{r.weight_decay:g}", str(r.seed), r.status,
             "—" if r.valid_acc is None else f"{r.valid_acc:.3f}", "—" if r.test_acc is None else f"{r.test_acc:.3f}",
             "—" if r.steps is None else str(r.steps), "yes" if r.stopped_early else "no",
             "—" if r.elapsed_s is None else f"{r.elapsed_s:.0f}"] for r in runs]
    blocks.append(Details("Every probe run", [Table(
        ["run", "lr", "wd", "seed", "status", "valid acc", "test acc", "steps", "stopped early", "wall time (s)"],
        rows, numeric={1, 2, 3, 5, 6, 7, 9}, fit=True)]))
    return [Section("Synthetic probes", blocks)]
