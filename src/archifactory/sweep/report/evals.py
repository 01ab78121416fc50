"""The report's evaluation sections: zero-shot tasks, code (HumanEval) and synthetic probes, per training
stage, from the evaluation tables a sweep stores in its ``results.sqlite``
(:mod:`archifactory.eval.store`; joined to ``runs`` by ``run_id``).

Per stage (``runs.stage``: ``pretrain``, ``sft``, ``grpo``; ``pretrain`` in a store without the column),
task kind, task (and item limit) and metric, per variant:

- the mean over seeds and its 95% Student-t interval (:func:`archifactory.sweep.stats.mean_ci`);
- the paired difference from the baseline over the seeds both have, its 95% interval and the two-sided
  paired t-test, with the p-values Holm-corrected over the variants compared on that metric: the same
  test and correction the validation-loss comparison uses (:func:`archifactory.sweep.stats.compare_to_baseline`);
- the chance level and the null model's value (means over the variant's runs), beside it.

An overview heat map shows every variant x every metric of the stage, next to training throughput and
state memory: each column is the difference from the baseline, signed so that better is positive
(blue) and worse negative (red), divided by the column's largest absolute difference (so each column
spans [-1, 1] and the baseline's row is 0); each cell is labelled with the raw difference, ``*`` where the
Holm-corrected p is below 0.05.

Only the runs the loss comparison keeps enter (one lr per variant; lr-selection runs never do).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from archifactory.eval.store import MetricResult
from archifactory.results import RunRecord
from archifactory.sweep import stats as st
from archifactory.sweep.report.data import SweepData
from archifactory.sweep.report.document import Block, Paragraph, Section, Table
from archifactory.sweep.report import figures
from archifactory.sweep.report.figures import figure_block
from archifactory.sweep.report.format import fmt_bytes, fmt_count, fmt_interval, fmt_p

STAGE_ORDER = ("pretrain", "sft", "grpo")
"""Stages in pipeline order (others follow, by name)."""

TASK_KINDS: list[tuple[str, str, Callable[[str], bool]]] = [
    ("code", "Code (HumanEval)", lambda task: task.startswith("humaneval")),
    ("probes", "Synthetic probes", lambda task: task.startswith(("mqar", "mad", "probe"))),
    ("zero_shot", "Zero-shot tasks", lambda task: True),
]
"""``(kind, section title, does this task name belong to it)``: the first match decides; the sections
appear in the order of :data:`KIND_ORDER`."""

KIND_ORDER = ("zero_shot", "code", "probes")

HIGHER_IS_BETTER_DEFAULT = {"bpb": False, "ppl": False, "loss": False}
"""Direction of metrics stored without ``higher_is_better`` (by name; anything else: higher is better)."""


def task_kind(task: str) -> str:
    return next(kind for kind, _, belongs in TASK_KINDS if belongs(task))


def _stage_key(stage: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), stage)


# -------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class MetricKey:
    """One column of the evaluation: a task at an item limit, and one of its metrics."""

    task: str
    limit: int | None
    metric: str

    @property
    def task_label(self) -> str:
        return self.task if self.limit is None else f"{self.task} (limit {self.limit})"

    @property
    def label(self) -> str:
        return f"{self.task_label} {self.metric}"


@dataclass(frozen=True)
class VariantMetric:
    """A variant's value of one metric over seeds, and its comparison with the baseline."""

    variant: str
    value: st.MeanCI
    diff: st.PairedDifference | None
    """``variant − baseline``, paired by seed (``None`` for the baseline itself, or with no baseline)."""
    chance: float | None
    null_value: float | None
    n_items: int | None
    run_ids: list[str]


@dataclass(frozen=True)
class MetricComparison:
    key: MetricKey
    higher_is_better: bool
    versions: list[str]
    """Task versions the runs were evaluated with (more than one: not strictly comparable)."""
    variants: dict[str, VariantMetric]


@dataclass(frozen=True)
class CostColumn:
    """A cost column of the heat map: one value per variant."""

    name: str
    values: dict[str, float | None]
    higher_is_better: bool
    unit: str
    """``count`` (printed 1.2k) or ``bytes`` (printed 64 KiB)."""

    def label(self, d: float) -> str:
        if self.unit == "bytes":
            return ("+" if d > 0 else "−" if d < 0 else "") + fmt_bytes(abs(d))
        return fmt_count(d) if d <= 0 else "+" + fmt_count(d)


@dataclass(frozen=True)
class StageEvaluation:
    stage: str
    baseline: str | None
    order: list[str]
    metrics: list[MetricComparison]
    """Sorted by task kind, task, limit, metric."""
    costs: list[CostColumn]
    """What each variant costs, beside the metrics in the heat map: pretraining tokens/s and the KV-cache or
    recurrent-state bytes per sequence at the training length (means over the compared runs)."""


def _higher_is_better(results: Sequence[MetricResult]) -> bool:
    flags = {r.higher_is_better for r in results if r.higher_is_better is not None}
    if len(flags) == 1:
        return flags.pop()
    return HIGHER_IS_BETTER_DEFAULT.get(results[0].metric, True)


def _mean(values: Sequence[float | None]) -> float | None:
    x = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(x)) if x else None


def counted_runs(data: SweepData) -> dict[str, RunRecord]:
    """The runs whose evaluations the report compares, by id: finished, not lr-selection runs, and for a
    pretraining run of a variant with several lrs (a store from before lr-selection seeds), the kept lr."""
    kept_lr = {f.variant: f.lr for f in data.finals}
    return {r.run_id: r for r in data.stage_runs
            if r.status == "done" and not st.is_selection_run(r)
            and not (r.stage == "pretrain" and r.variant in kept_lr and r.lr != kept_lr[r.variant])}


def evaluation_by_stage(data: SweepData) -> list[StageEvaluation]:
    """The evaluation results of the compared runs, per stage, with their statistics (empty when the
    sweep stored no evaluation)."""
    runs = counted_runs(data)
    by_stage: dict[str, list[MetricResult]] = defaultdict(list)
    for m in data.evals:
        if m.run_id in runs and m.value is not None and math.isfinite(m.value):
            by_stage[runs[m.run_id].stage].append(m)
    out = []
    for stage in sorted(by_stage, key=_stage_key):
        results = by_stage[stage]
        baseline = next((r.variant for r in runs.values() if r.stage == stage and r.is_baseline), data.baseline)
        present = {runs[m.run_id].variant for m in results}
        order = [v for v in data.order if v in present] + sorted(present - set(data.order))
        groups: dict[MetricKey, list[MetricResult]] = defaultdict(list)
        for m in results:
            groups[MetricKey(m.task, m.limit, m.metric)].append(m)
        metrics = []
        for key in sorted(groups, key=lambda k: (KIND_ORDER.index(task_kind(k.task)), k.task,
                                                 -1 if k.limit is None else k.limit, k.metric)):
            rows = groups[key]
            table = [{"run_id": m.run_id, "variant": runs[m.run_id].variant, "seed": runs[m.run_id].seed,
                      "is_baseline": runs[m.run_id].variant == baseline, "value": m.value} for m in rows]
            diffs = st.compare_to_baseline(table, "value", baseline=baseline)
            by_variant = st.group_by_variant(table)
            variants = {}
            for variant in order:
                vrows = by_variant.get(variant)
                if not vrows:
                    continue
                ids = {r["run_id"] for r in vrows}
                mine = [m for m in rows if m.run_id in ids]
                variants[variant] = VariantMetric(
                    variant, st.mean_ci(r["value"] for r in vrows), diffs.get(variant),
                    _mean([m.chance for m in mine]), _mean([m.null_value for m in mine]),
                    round(_mean([m.n_items for m in mine])), sorted(ids))
            metrics.append(MetricComparison(key, _higher_is_better(rows), sorted({m.task_version for m in rows}),
                                            variants))
        # the architecture's costs, measured in pretraining (post-training does not change them)
        costs = {v: data.stats[v].costs for v in order if v in data.stats}
        out.append(StageEvaluation(stage, baseline, order, metrics, [
            CostColumn("train tokens/s", {v: c["tokens_per_s"] for v, c in costs.items()}, True, "count"),
            CostColumn("state memory", {v: c["state_bytes"] for v, c in costs.items()}, False, "bytes")]))
    return out


# ------------------------------------------------------------------------------------------ tables


def _fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _fmt_ci(ci: st.MeanCI) -> str:
    if ci.n == 0:
        return "—"
    return _fmt(ci.mean) if ci.half_width is None else f"{ci.mean:.4f} ± {ci.half_width:.4f}"


def metric_table(evaluation: StageEvaluation, metrics: Sequence[MetricComparison]) -> Table:
    header = ["metric", "variant", "seeds", "mean\n(95%\u00a0CI)", "Δ vs baseline\n[95%\u00a0CI]", "p\n(paired\u00a0t)",
              "p\n(Holm)", "significant\n(Holm)", "chance", "null\nmodel", "items"]
    table = Table(header, [], numeric={2, 3, 4, 5, 6, 8, 9, 10})
    for comparison in metrics:
        arrow = "↑" if comparison.higher_is_better else "↓"
        for variant, vm in comparison.variants.items():
            d = vm.diff
            if variant == evaluation.baseline:
                delta, p, p_holm, sig = "(baseline)", "", "", ""
            elif d is None:
                delta, p, p_holm, sig = "—", "—", "—", "no baseline run"
            else:
                delta = f"{_signed(d.mean_diff)}\n{fmt_interval(d.ci_low, d.ci_high)}".strip()
                p = fmt_p(d.p_value) if d.tested else d.short_note
                p_holm = fmt_p(d.p_adjusted) if d.tested else "—"
                sig = ("yes" if d.significant else "no") if d.tested else d.note
            table.rows.append([f"{comparison.key.metric} {arrow}", variant, str(vm.value.n), _fmt_ci(vm.value), delta,
                               p, p_holm, sig, _fmt(vm.chance), _fmt(vm.null_value),
                               "—" if vm.n_items is None else str(vm.n_items)])
            cls = "baseline" if variant == evaluation.baseline else ""
            if d is not None and d.tested and d.significant:
                cls += " better" if (d.mean_diff > 0) == comparison.higher_is_better else " worse"
            table.row_classes.append(cls.strip())
    return table


def _signed(x: float | None) -> str:
    return "—" if x is None else f"{x:+.4f}"


def _legend(evaluation: StageEvaluation, metrics: Sequence[MetricComparison]) -> Paragraph:
    n = max((d.n_compared for c in metrics for vm in c.variants.values() for d in [vm.diff]
             if d is not None and d.tested), default=0)
    return Paragraph(
        "Mean ± half width of the 95% Student-t interval over seeds; ↑: higher is better, ↓: lower is better. "
        "Δ is variant − baseline, paired by seed; p from a two-sided paired t-test, Holm-corrected over the "
        f"{n} variant(s) tested against the baseline on the same metric (as for the validation loss); "
        "significant when the corrected p is below α = 0.05. Chance: the expected score of a uniform pick among "
        "the choices; null model: the same task scored by the run's unigram (or uniform) model. Small models sit "
        "at chance on most accuracies: the continuous metrics (probability of the correct choice, bits per byte) "
        "are what moves.", "legend")


# -------------------------------------------------------------------------------------------- heat map


@dataclass(frozen=True)
class HeatMap:
    variants: list[str]
    columns: list[str]
    scores: np.ndarray
    """(variants, columns): signed difference from the baseline (better > 0) over the column's largest
    absolute difference, in [-1, 1]; NaN where a variant has no value."""
    labels: list[list[str]]
    """The raw difference per cell (``*``: Holm-significant); empty for the baseline and missing values."""
    n_metrics: int
    """The first ``n_metrics`` columns are evaluation metrics, the rest costs (tokens/s, state memory)."""


def heat_map(evaluation: StageEvaluation) -> HeatMap | None:
    """The overview: every variant x every metric of the stage, then its cost columns (tokens/s and state
    memory); ``None`` without a baseline or without a metric the baseline has."""
    if evaluation.baseline is None or not evaluation.metrics:
        return None
    variants = evaluation.order
    columns: list[str] = []
    raw: list[list[float]] = []
    labels: list[list[str]] = []
    signs: list[float] = []

    def add(name: str, values: dict[str, float | None], higher_is_better: bool, label: Callable[[str, float], str]):
        base = values.get(evaluation.baseline)
        if base is None:
            return
        columns.append(name)
        signs.append(1.0 if higher_is_better else -1.0)
        col, text = [], []
        for v in variants:
            x = values.get(v)
            # a difference at rounding level (means of the same values summed in another order) is no
            # difference: the column scaling below would otherwise stretch 1e-16 to a full-scale cell
            d = math.nan if x is None else 0.0 if math.isclose(x, base, rel_tol=1e-9, abs_tol=1e-12) else x - base
            col.append(d)
            text.append("" if x is None or v == evaluation.baseline else label(v, d))
        raw.append(col)
        labels.append(text)

    for c in evaluation.metrics:
        def label(v: str, d: float, c: MetricComparison = c) -> str:
            diff = c.variants[v].diff if v in c.variants else None
            star = "*" if diff is not None and diff.tested and diff.significant else ""
            return f"{d:+.3g}{star}"

        add(f"{c.key.label} {'↑' if c.higher_is_better else '↓'}",
            {v: vm.value.mean for v, vm in c.variants.items() if vm.value.n}, c.higher_is_better, label)
    n_metrics = len(columns)
    for cost in evaluation.costs:
        add(f"{cost.name} {'↑' if cost.higher_is_better else '↓'}", cost.values, cost.higher_is_better,
            lambda v, d, cost=cost: cost.label(d))
    if not n_metrics:
        return None
    scores = np.asarray(raw, dtype=np.float64).T * np.asarray(signs)  # (variants, columns), better > 0
    scale = np.nanmax(np.abs(scores), axis=0, initial=0.0)
    scores = np.divide(scores, scale, out=np.zeros_like(scores), where=scale > 0)
    scores[np.isnan(np.asarray(raw).T)] = math.nan
    return HeatMap(list(variants), columns, scores, [list(row) for row in zip(*labels)], n_metrics)


def heat_map_figure(hm: HeatMap, baseline: str) -> bytes:
    from matplotlib import colormaps

    width = min(22.0, 3.0 + 0.75 * len(hm.columns))
    fig, axes = figures.new_figure(width, 1.9 + 0.42 * len(hm.variants))
    ax = axes[0]
    ax.grid(False)
    cmap = colormaps["RdBu"].with_extremes(bad="#eeeeee")  # red: worse, blue: better, grey: no value
    image = ax.imshow(np.ma.masked_invalid(hm.scores), cmap=cmap, vmin=-1, vmax=1, aspect="auto")
    for i in range(len(hm.variants)):
        for j in range(len(hm.columns)):
            if hm.labels[i][j]:
                value = hm.scores[i, j]
                ax.text(j, i, hm.labels[i][j], ha="center", va="center", fontsize=7,
                        color="white" if abs(value) > 0.6 else "#1a1a1a")
    if hm.n_metrics < len(hm.columns):
        ax.axvline(hm.n_metrics - 0.5, color="white", linewidth=4)  # metrics | costs
    ax.set_xticks(range(len(hm.columns)), hm.columns, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(hm.variants)), [f"{v} ★" if v == baseline else v for v in hm.variants], fontsize=8.5)
    ax.spines[["left", "bottom"]].set_visible(False)
    fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01, label="worse ←  → better")
    return figures.to_png(fig)


# -------------------------------------------------------------------------------------------- sections


def _kind_sections(evaluation: StageEvaluation) -> list[Block]:
    blocks: list[Block] = []
    for kind in KIND_ORDER:
        metrics = [c for c in evaluation.metrics if task_kind(c.key.task) == kind]
        if not metrics:
            continue
        title = next(t for k, t, _ in TASK_KINDS if k == kind)
        tasks: dict[tuple[str, int | None], list[MetricComparison]] = defaultdict(list)
        for c in metrics:
            tasks[(c.key.task, c.key.limit)].append(c)
        parts: list[Block] = [_legend(evaluation, metrics)]
        for (task, limit), comparisons in tasks.items():
            versions = sorted({v for c in comparisons for v in c.versions})
            part: list[Block] = [metric_table(evaluation, comparisons)]
            if len(versions) > 1:
                part.append(Paragraph(f"Warning: the runs were evaluated with different task versions "
                                      f"({', '.join(versions)}): not strictly comparable.", "legend"))
            parts.append(Section(comparisons[0].key.task_label, part))
        blocks.append(Section(title, parts))
    return blocks


def _overview(evaluation: StageEvaluation, suffix: str) -> list[Block]:
    hm = heat_map(evaluation)
    if hm is None:
        return []
    name = "eval_overview" + (f"_{evaluation.stage}" if suffix else "")
    figure = figure_block(
        name, f"Evaluation overview{suffix}",
        "Each column is a metric's difference from the baseline (variant − baseline, mean over seeds), signed so "
        "that better is blue and worse red, divided by the column's largest absolute difference; the cells show "
        "the raw difference (* where the Holm-corrected paired p is below 0.05); grey: no value. Training "
        "tokens/s and state memory (KV cache or recurrent state per sequence) on the right.",
        lambda: heat_map_figure(hm, evaluation.baseline))
    return [figure] if figure is not None else []


def evaluation_sections(data: SweepData) -> list[Block] | None:
    """Section builder: the evaluation overview and one section per task kind (left out when empty), per
    training stage when the sweep has several (or any but ``pretrain``)."""
    stages = evaluation_by_stage(data)
    if not stages:
        return None
    if len(stages) == 1 and stages[0].stage == "pretrain":
        evaluation = stages[0]
        return [Section("Evaluation overview", _overview(evaluation, ""))] + _kind_sections(evaluation)
    return [Section(f"Evaluation after {e.stage}", _overview(e, f" after {e.stage}") + _kind_sections(e))
            for e in stages]
