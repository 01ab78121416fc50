"""From probe runs to reported figures: the grid point chosen per (variant, width, task setting) on
validation accuracy, the test accuracy at it with a 95% interval over seeds, and the MAD score.

Protocol (MAD-lab ``mad/analysis.py`` and Zoology, with one change): every grid point (lr x weight
decay) is trained on every seed; the point with the highest *validation* accuracy, averaged over the
seeds, is chosen (ties: the lowest lr, then the lowest weight decay); the reported accuracy is the *test* accuracy of the
chosen point. MAD and Zoology pick the best point by the test accuracy they report; here the test
examples never choose anything. The MAD score of a task is the mean, over its settings (baseline and
each harder setting), of that reported accuracy; a model's MAD score is the mean over its tasks.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Sequence

import numpy as np

from archifactory.eval.probes.store import ProbeRun
from archifactory.sweep.stats import MeanCI, mean_ci


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
