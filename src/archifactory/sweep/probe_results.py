"""From probe runs to reported figures: the grid point chosen per (variant, width, task setting) on
validation accuracy, the test accuracy at it with a 95% interval over seeds, and the MAD score.

Protocol (MAD-lab ``mad/analysis.py`` and Zoology, with one change): every grid point (lr x weight
decay) is trained on every seed; the point with the highest *validation* accuracy, averaged over the
seeds, is chosen (ties: the lowest lr, then the lowest weight decay); the reported accuracy is the *test* accuracy of the
chosen point. MAD and Zoology pick the best point by the test accuracy they report; here the test
examples never choose anything. The MAD score of a task is the mean, over its settings (baseline and
each harder setting), of that reported accuracy; a model's MAD score is the mean over its tasks.

Comparison with the baseline variant (:func:`compare_choices`): per (task setting, width), each variant's
test accuracy at its chosen point minus the baseline's at its own, paired by seed, with the two-sided paired
t-test and the p-values Holm-corrected over the variants compared on that setting and width; the same test
and correction as the sweep's validation-loss and zero-shot comparisons
(:func:`archifactory.sweep.stats.compare_to_baseline`). The MAD score is compared the same way, per seed
(each seed's MAD score from that seed's test accuracies at the chosen points). MAD and Zoology report one
seed and no test; with one seed the difference is given without a p-value.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Sequence

import numpy as np

from archifactory.eval.probes.store import ProbeRun
from archifactory.sweep.stats import MeanCI, PairedDifference, compare_to_baseline, mean_ci


@dataclasses.dataclass
class ProbeChoice:
    variant: str
    width: int
    task: str
    setting: str
    lr: float
    weight_decay: float
    valid_acc: float
    """Mean validation accuracy over seeds at the chosen point (what chose it)."""
    test: MeanCI
    """Test accuracy at the chosen point: mean and 95% interval over seeds."""
    test_by_seed: dict[int, float]
    grid_valid: dict[tuple[float, float], float]
    """Mean validation accuracy of every complete grid point."""
    complete: bool
    """Whether every grid point has every seed (else the choice is among the complete points)."""


def choose(runs: Sequence[ProbeRun], n_grid: int | None = None, seeds: Sequence[int] | None = None) -> list[ProbeChoice]:
    """One :class:`ProbeChoice` per (variant, width, task, setting) with at least one grid point finished
    on all of ``seeds`` (default: the seeds present). Failed or pending runs are left out."""
    done = [r for r in runs if r.status == "done" and r.valid_acc is not None]
    groups: dict[tuple, list[ProbeRun]] = defaultdict(list)
    for r in done:
        groups[(r.variant, r.width, r.task, r.setting)].append(r)
    all_seeds = sorted({r.seed for r in done}) if seeds is None else sorted(seeds)
    out = []
    for (variant, width, task, setting), rows in groups.items():
        points: dict[tuple[float, float], dict[int, ProbeRun]] = defaultdict(dict)
        for r in rows:
            points[(r.lr, r.weight_decay)][r.seed] = r
        full = {p: by_seed for p, by_seed in points.items() if all(s in by_seed for s in all_seeds)}
        if not full:
            continue
        grid_valid = {p: float(np.mean([by_seed[s].valid_acc for s in all_seeds])) for p, by_seed in full.items()}
        best = max(sorted(grid_valid), key=lambda p: grid_valid[p])  # ties: lowest lr, then lowest decay
        test = {s: full[best][s].test_acc for s in all_seeds}
        out.append(ProbeChoice(variant, width, task, setting, best[0], best[1], grid_valid[best],
                               mean_ci(test.values()), test, grid_valid,
                               complete=len(full) == (n_grid or len(points))))
    return sorted(out, key=lambda c: (c.task, c.setting, c.variant, c.width))


@dataclasses.dataclass
class MADScore:
    variant: str
    width: int
    per_task: dict[str, float]
    """Task -> mean over its settings of the reported (test) accuracy, mean over seeds."""
    settings: dict[str, int]
    """Task -> number of settings averaged."""

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.per_task.values()))) if self.per_task else float("nan")


def mad_scores(choices: Sequence[ProbeChoice]) -> list[MADScore]:
    """MAD score per (variant, width): per task, the mean over settings of the chosen point's mean test
    accuracy; overall (:attr:`MADScore.mean`) the mean over tasks."""
    by_model: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in choices:
        by_model[(c.variant, c.width)][c.task].append(c.test.mean)
    return [MADScore(v, w, {t: float(np.mean(a)) for t, a in tasks.items()}, {t: len(a) for t, a in tasks.items()})
            for (v, w), tasks in sorted(by_model.items())]


def mad_scores_by_seed(choices: Sequence[ProbeChoice]) -> dict[tuple[str, int], dict[int, float]]:
    """``(variant, width) -> {seed: MAD score}``: for each seed, per task the mean over its settings of that
    seed's test accuracy at the chosen point, then the mean over tasks (the seeds every choice has)."""
    by_model: dict[tuple[str, int], list[ProbeChoice]] = defaultdict(list)
    for c in choices:
        by_model[(c.variant, c.width)].append(c)
    out = {}
    for key, rows in sorted(by_model.items()):
        seeds = sorted(set.intersection(*(set(c.test_by_seed) for c in rows)))
        per_seed = {}
        for seed in seeds:
            per_task: dict[str, list[float]] = defaultdict(list)
            for c in rows:
                per_task[c.task].append(c.test_by_seed[seed])
            per_seed[seed] = float(np.mean([np.mean(a) for a in per_task.values()]))
        out[key] = per_seed
    return out


@dataclasses.dataclass
class ProbeComparison:
    """One reported probe metric of every variant, and each variant's paired difference from the baseline."""

    task: str
    """A task name, or ``"MAD score"``."""
    setting: str
    """The task setting (``baseline`` or ``field=value``); empty for the MAD score."""
    width: int
    values: dict[str, MeanCI]
    """Variant -> mean and 95% interval over seeds."""
    diffs: dict[str, PairedDifference]
    """Variant -> ``variant − baseline`` paired by seed (the baseline itself has none)."""
    n_items: dict[str, int | None]
    """Variant -> test examples (``None`` for the MAD score or an old store)."""

    @property
    def label(self) -> str:
        if not self.setting:
            return f"{self.task} d={self.width}"
        name = self.task if self.setting == "baseline" else f"{self.task} ({self.setting})"
        return f"{name} d={self.width}"


def _compare(values_by_seed: dict[str, dict[int, float]], baseline: str) -> dict[str, PairedDifference]:
    rows = [{"variant": v, "seed": seed, "value": x, "is_baseline": v == baseline}
            for v, by_seed in values_by_seed.items() for seed, x in by_seed.items()]
    return compare_to_baseline(rows, "value", baseline=baseline)


def compare_choices(choices: Sequence[ProbeChoice], baseline: str,
                    test_examples: dict[tuple[str, int, str, str], int] | None = None) -> list[ProbeComparison]:
    """Per (task, setting, width): every variant's test accuracy at its chosen point, and its paired
    difference from ``baseline`` (Holm over the variants of that setting and width); then per width, when
    the sweep has several task settings, the MAD score the same way. Settings the baseline lacks (not yet
    finished) carry no differences. ``test_examples`` maps (variant, width, task, setting) to the test-set size.
    """
    groups: dict[tuple[str, str, int], list[ProbeChoice]] = defaultdict(list)
    for c in choices:
        groups[(c.task, c.setting, c.width)].append(c)
    out = []
    for (task, setting, width), rows in sorted(groups.items()):
        by_seed = {c.variant: c.test_by_seed for c in rows}
        out.append(ProbeComparison(task, setting, width, {c.variant: c.test for c in rows}, _compare(by_seed, baseline),
                                   {c.variant: (test_examples or {}).get((c.variant, width, task, setting))
                                    for c in rows}))
    if len({(c.task, c.setting) for c in choices}) > 1:
        scores = mad_scores_by_seed(choices)
        for width in sorted({w for _, w in scores}):
            by_seed = {v: s for (v, w), s in scores.items() if w == width and s}
            out.append(ProbeComparison("MAD score", "", width, {v: mean_ci(s.values()) for v, s in by_seed.items()},
                                       _compare(by_seed, baseline), {v: None for v in by_seed}))
    return out
