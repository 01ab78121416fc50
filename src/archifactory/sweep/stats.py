"""Statistics of a sweep, computed from the results store's rows alone.

The rows are the typed records of :mod:`archifactory.results` (:class:`~archifactory.results.FinalRecord`:
one per finished run, ``run_id``, ``variant``, ``seed``, ``lr``, ``is_baseline`` and the ``final`` table's
columns; :class:`~archifactory.results.RunRecord`: every run, with ``status``, ``error``, ``config``,
``changes``, ``env``), as :meth:`Store.finals` and :meth:`Store.runs` return them. The figure statistics
take any row that answers ``row["key"]`` and ``row.get("key")``; :func:`fairness` reads the records' parsed
``config`` and ``summary``.

- Per variant, over seeds: the mean and the 95% Student-t confidence interval of the final validation
  loss and bits per byte, ``mean ± t_{0.975, n-1} · s / √n`` (``scipy.stats.t.interval`` with the
  standard error ``s / √n``); the cost figures (parameters, FLOPs per token, tokens/s, memory, state
  bytes) as means.
- Against the baseline: a paired t-test across seeds (seed ``k`` of a variant and seed ``k`` of the
  baseline share the initialisation seed and the token stream, so their difference removes the
  seed-to-seed variation the two have in common; ``scipy.stats.ttest_rel``), with the mean difference
  and its 95% interval. Fewer than two pairs, or differences with no spread, give no test and say why.
  See e.g. NIST/SEMATECH e-Handbook of Statistical Methods, section 7.3.1 (two-sample and paired t);
  Dror et al., "The Hitchhiker's Guide to Testing Statistical Significance in NLP" (ACL 2018).
- Several variants against one baseline: the paired tests' p-values are also given with Holm's
  step-down correction for the number of variants compared (:func:`holm_adjust`; Holm, "A simple
  sequentially rejective multiple test procedure", Scand. J. Statist. 6, 1979), and a difference is
  called significant by the corrected value, which keeps the chance of any false "significant" in the
  sweep at most alpha.
- A learning-rate grid: :func:`choose_lrs` picks, per variant, the lr with the lowest mean final
  validation loss over the *lr-selection* runs (``purpose = "lr_selection"``: the spec's
  ``lr_selection_seeds``), and only the chosen lr is then run on the compared seeds; choosing on the
  compared seeds themselves would carry the luck of those seeds into the comparison (a selection bias
  in the tuned variant's favour). :func:`best_lr_runs` handles stores of sweeps that did exactly that
  (no selection runs), and records that the choice was not held out.
- Fairness: whether every run read the identical token stream (``stream_hash``), the tokens each run
  saw, and the budget.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats as sps

if TYPE_CHECKING:
    from archifactory.results import FinalRecord, RunRecord

Row = Mapping[str, Any]

CONFIDENCE = 0.95
ALPHA = 0.05

COST_FIELDS = ("params", "active_params", "flops_per_token_train", "tokens_per_s", "peak_mem_bytes", "state_bytes",
               "tokens", "elapsed_s")
"""``final`` columns averaged over seeds (they barely vary with the seed; tokens/s and memory do a little)."""

BUDGET_KEYS = ("max_steps", "max_tokens", "max_time_s")


# ----------------------------------------------------------------------------------------- intervals


@dataclass(frozen=True)
class MeanCI:
    """A sample mean with its Student-t confidence interval; ``low``/``high`` are ``None`` when ``n < 2``."""

    mean: float
    low: float | None
    high: float | None
    n: int
    std: float | None = None
    """Sample standard deviation (ddof=1); ``None`` when ``n < 2``."""

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.high is None else (self.high - self.low) / 2


def mean_ci(values: Iterable[float | None], confidence: float = CONFIDENCE) -> MeanCI:
    """Mean and Student-t interval ``mean ± t_{(1+c)/2, n-1} · s/√n`` of ``values`` (``None`` dropped).

    With one value there is no interval (``low = high = None``); with values that are all equal the
    interval has zero width.
    """
    x = np.asarray([float(v) for v in values if v is not None], dtype=np.float64)
    n = len(x)
    if n == 0:
        return MeanCI(math.nan, None, None, 0)
    mean = float(x.mean())
    if n < 2:
        return MeanCI(mean, None, None, 1)
    std = float(x.std(ddof=1))
    sem = std / math.sqrt(n)
    if sem == 0.0:
        return MeanCI(mean, mean, mean, n, std)
    low, high = sps.t.interval(confidence, df=n - 1, loc=mean, scale=sem)
    return MeanCI(mean, float(low), float(high), n, std)


# ---------------------------------------------------------------------------------------- lr choice


LR_SELECTION = "lr_selection"
"""``runs.purpose`` of a run that only serves to choose its variant's learning rate."""
COMPARE = "compare"
"""``runs.purpose`` of a run whose result the report compares."""


def is_selection_run(row: Row) -> bool:
    return row.get("purpose") == LR_SELECTION


@dataclass(frozen=True)
class LrChoice:
    """The learning rate kept for a variant that ran several, and the mean final loss of each."""

    variant: str
    chosen_lr: float | None
    mean_val_loss_by_lr: dict[float | None, float]
    n_seeds_by_lr: dict[float | None, int]
    selection_seeds: list[int] = field(default_factory=list)
    """The seeds whose runs chose the lr."""
    held_out: bool = True
    """``True``: the selection seeds are not among the compared ones. ``False``: the lr was chosen on the
    very runs the report compares (a store written before lr-selection seeds existed)."""


def _lowest_mean(variant: str, by_lr: Mapping[float | None, Sequence[Row]], metric: str) -> tuple[float | None, dict]:
    means = {lr: mean_ci(r.get(metric) for r in rows).mean for lr, rows in by_lr.items()}
    finite = {lr: m for lr, m in means.items() if not math.isnan(m)}
    if not finite:
        raise ValueError(f"variant {variant!r}: no run of any lr has a final {metric}; cannot choose an lr")
    # ties go to the smaller lr (a deterministic rule)
    return min(finite, key=lambda lr: (finite[lr], math.inf if lr is None else lr)), means


def choose_lrs(selection_finals: Sequence[Row], metric: str = "val_loss") -> dict[str, LrChoice]:
    """Per variant, the lr whose lr-selection runs have the lowest mean final ``metric`` over seeds (a
    run without the metric, e.g. one that diverged, does not count towards its lr's mean; an lr with no
    such run cannot be chosen). ``selection_finals``: finished runs with ``purpose = "lr_selection"``."""
    by_variant: dict[str, dict[float | None, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for row in selection_finals:
        by_variant[row["variant"]][row.get("lr")].append(row)
    choices = {}
    for variant, by_lr in by_variant.items():
        if not any(r.get(metric) is not None for rows in by_lr.values() for r in rows):
            continue  # nothing to choose from yet
        best, means = _lowest_mean(variant, by_lr, metric)
        seeds = sorted({r["seed"] for rows in by_lr.values() for r in rows})
        choices[variant] = LrChoice(variant, best, means, {lr: len(rows) for lr, rows in by_lr.items()}, seeds, True)
    return choices


def best_lr_runs(finals: Sequence[Row], metric: str = "val_loss") -> tuple[list[Row], dict[str, LrChoice]]:
    """The compared runs, one lr per variant, and how each variant's lr was chosen.

    A variant with lr-selection runs (``purpose = "lr_selection"``) keeps its compared runs, which ran
    at the lr :func:`choose_lrs` picked on the selection seeds; its :class:`LrChoice` is ``held_out``.
    A variant whose compared runs hold several lrs (a sweep stored before lr-selection seeds) keeps the
    runs of the lr with the lowest mean final ``metric`` over those same seeds, and its choice is
    recorded with ``held_out=False``. Variants with a single lr pass through unchanged. Returns the kept
    rows (in the input order, selection runs left out) and the choices.
    """
    compared = [r for r in finals if not is_selection_run(r)]
    choices = choose_lrs([r for r in finals if is_selection_run(r)], metric)
    by_variant: dict[str, dict[float | None, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for row in compared:
        by_variant[row["variant"]][row.get("lr")].append(row)
    chosen: dict[str, float | None] = {}
    for variant, by_lr in by_variant.items():
        if variant in choices:
            chosen[variant] = choices[variant].chosen_lr
        elif len(by_lr) == 1:
            chosen[variant] = next(iter(by_lr))
        else:
            best, means = _lowest_mean(variant, by_lr, metric)
            chosen[variant] = best
            seeds = sorted({r["seed"] for rows in by_lr.values() for r in rows})
            choices[variant] = LrChoice(variant, best, means, {lr: len(rows) for lr, rows in by_lr.items()}, seeds,
                                        held_out=False)
    kept = [row for row in compared if row.get("lr") == chosen[row["variant"]]]
    return kept, choices


# -------------------------------------------------------------------------------- per-variant stats


@dataclass(frozen=True)
class VariantStats:
    variant: str
    is_baseline: bool
    n_seeds: int
    seeds: list[int]
    lr: float | None
    run_ids: list[str]
    val_loss: MeanCI
    val_bpb: MeanCI
    costs: dict[str, float | None]
    """Means over seeds of :data:`COST_FIELDS` (``None`` where no run recorded the figure)."""


def _mean_or_none(values: Iterable[Any]) -> float | None:
    x = [float(v) for v in values if v is not None]
    return float(np.mean(x)) if x else None


def _check_one_run_per_seed(variant: str, rows: Sequence[Row]) -> None:
    seeds = Counter(r["seed"] for r in rows)
    repeated = sorted(s for s, k in seeds.items() if k > 1)
    if repeated:
        lrs = sorted({r.get("lr") for r in rows}, key=lambda v: (v is None, v))
        raise ValueError(
            f"variant {variant!r} has several runs for seed(s) {repeated} (lr values {lrs}); "
            "choose one lr per variant first, e.g. with best_lr_runs(finals)"
        )


def group_by_variant(finals: Sequence[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = defaultdict(list)
    for row in finals:
        groups[row["variant"]].append(row)
    return dict(groups)


def variant_stats(finals: Sequence[Row], confidence: float = CONFIDENCE) -> dict[str, VariantStats]:
    """Per variant: n seeds, mean and interval of the final val loss and bits per byte, mean costs.

    ``finals`` must hold at most one run per (variant, seed), i.e. one lr per variant (see
    :func:`best_lr_runs`). The result keeps the variants' first-appearance order.
    """
    out = {}
    for variant, rows in group_by_variant(finals).items():
        _check_one_run_per_seed(variant, rows)
        lrs = {r.get("lr") for r in rows}
        out[variant] = VariantStats(
            variant=variant,
            is_baseline=any(bool(r.get("is_baseline")) for r in rows),
            n_seeds=len(rows),
            seeds=sorted(r["seed"] for r in rows),
            lr=lrs.pop() if len(lrs) == 1 else None,
            run_ids=[r["run_id"] for r in rows],
            val_loss=mean_ci((r.get("val_loss") for r in rows), confidence),
            val_bpb=mean_ci((r.get("val_bpb") for r in rows), confidence),
            costs={f: _mean_or_none(r.get(f) for r in rows) for f in COST_FIELDS},
        )
    return out


# ----------------------------------------------------------------------------- baseline comparison


def baseline_variant(rows: Sequence[Row]) -> str | None:
    """The variant whose runs have ``is_baseline=1`` (``None`` if no run is flagged)."""
    flagged = sorted({r["variant"] for r in rows if r.get("is_baseline")})
    if len(flagged) > 1:
        raise ValueError(f"several variants are flagged as the baseline: {flagged}; a sweep has exactly one")
    return flagged[0] if flagged else None


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order.

    With the ``m`` p-values sorted ascending, ``p̃_(i) = min(1, max_{j <= i} (m - j + 1) · p_(j))``
    (i = 1..m); rejecting where ``p̃ < alpha`` controls the family-wise error rate at ``alpha`` under any
    dependence between the tests (Holm 1979). Agrees with statsmodels'
    ``multipletests(method="holm")``.
    """
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    if m == 0:
        return []
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"p-values must lie in [0, 1]: {p.tolist()}")
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted.tolist()


@dataclass(frozen=True)
class PairedDifference:
    """``variant − baseline`` of a final metric, paired by seed (negative: the variant's loss is lower)."""

    variant: str
    baseline: str
    metric: str
    seeds: list[int]
    """The seeds present in both (the pairs)."""
    n_pairs: int
    mean_diff: float | None
    ci_low: float | None
    ci_high: float | None
    t_statistic: float | None
    p_value: float | None
    significant: bool | None
    """``p_adjusted < alpha``: by the multiplicity-corrected p-value; ``None`` when there is no test."""
    alpha: float = ALPHA
    note: str = ""
    """Why there is no test (``"n<2"`` ...), empty when there is one."""
    p_adjusted: float | None = None
    """Holm-adjusted p-value over the ``n_compared`` variants tested against the same baseline (equal to
    ``p_value`` for a single comparison); ``None`` when there is no test."""
    n_compared: int = 1
    """How many tested comparisons the correction spans."""

    @property
    def tested(self) -> bool:
        return self.p_value is not None

    @property
    def short_note(self) -> str:
        """Why there is no test, in a table cell's words: ``n<2`` or ``zero variance``."""
        return self.note.split(" (")[0]


def paired_difference(variant_rows: Sequence[Row], baseline_rows: Sequence[Row], metric: str = "val_loss",
                      alpha: float = ALPHA, confidence: float = CONFIDENCE) -> PairedDifference:
    """Paired t-test of ``variant − baseline`` on ``metric`` over the seeds both have.

    ``t = d̄ / (s_d / √n)`` with ``n − 1`` degrees of freedom, two-sided (``scipy.stats.ttest_rel``);
    the interval is ``d̄ ± t_{(1+c)/2, n-1} · s_d / √n``. With fewer than two pairs there is no test
    (``note="n<2"``); with differences that are all equal (``s_d = 0``, up to float rounding: ``s_d`` at
    most 1e-12 of the values' magnitude) the statistic is undefined and there is no test either
    (``note="zero variance"``).
    """
    if not variant_rows or not baseline_rows:
        raise ValueError("paired_difference needs rows of both the variant and the baseline")
    variant, baseline = variant_rows[0]["variant"], baseline_rows[0]["variant"]
    _check_one_run_per_seed(variant, variant_rows)
    _check_one_run_per_seed(baseline, baseline_rows)
    a = {r["seed"]: r.get(metric) for r in variant_rows if r.get(metric) is not None}
    b = {r["seed"]: r.get(metric) for r in baseline_rows if r.get(metric) is not None}
    seeds = sorted(set(a) & set(b))
    diffs = np.asarray([a[s] - b[s] for s in seeds], dtype=np.float64)
    common = {"variant": variant, "baseline": baseline, "metric": metric, "seeds": seeds, "n_pairs": len(seeds),
              "alpha": alpha}
    if len(seeds) == 0:
        return PairedDifference(**common, mean_diff=None, ci_low=None, ci_high=None, t_statistic=None, p_value=None,
                                significant=None, note="n<2 (no seed in common with the baseline)")
    mean_diff = float(diffs.mean())
    if len(seeds) < 2:
        return PairedDifference(**common, mean_diff=mean_diff, ci_low=None, ci_high=None, t_statistic=None,
                                p_value=None, significant=None, note="n<2 (one paired seed: no test)")
    scale = max(abs(v) for v in [*a.values(), *b.values()])
    if float(diffs.std(ddof=1)) <= 1e-12 * max(scale, 1e-300):  # equal up to float rounding: t = ±inf
        return PairedDifference(**common, mean_diff=mean_diff, ci_low=mean_diff, ci_high=mean_diff, t_statistic=None,
                                p_value=None, significant=None,
                                note="zero variance (every seed's difference is the same: no test)")
    test = sps.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
    ci = mean_ci(diffs, confidence)
    p = float(test.pvalue)
    return PairedDifference(**common, mean_diff=mean_diff, ci_low=ci.low, ci_high=ci.high,
                            t_statistic=float(test.statistic), p_value=p, significant=bool(p < alpha), p_adjusted=p)


def compare_to_baseline(finals: Sequence[Row], metric: str = "val_loss", alpha: float = ALPHA,
                        confidence: float = CONFIDENCE, baseline: str | None = None) -> dict[str, PairedDifference]:
    """:func:`paired_difference` of every non-baseline variant in ``finals`` against the baseline
    (the variant flagged ``is_baseline``, or ``baseline`` when given), with the p-values of the tested
    comparisons Holm-adjusted together (:func:`holm_adjust`) and significance decided by the adjusted
    value. Empty if the baseline has no finished run."""
    baseline = baseline or baseline_variant(finals)
    groups = group_by_variant(finals)
    if baseline is None or baseline not in groups:
        return {}
    diffs = {
        variant: paired_difference(rows, groups[baseline], metric, alpha, confidence)
        for variant, rows in groups.items()
        if variant != baseline
    }
    tested = [v for v, d in diffs.items() if d.tested]
    for variant, p in zip(tested, holm_adjust([diffs[v].p_value for v in tested])):
        diffs[variant] = dataclasses.replace(diffs[variant], p_adjusted=p, n_compared=len(tested),
                                             significant=bool(p < alpha))
    return diffs


# ------------------------------------------------------------------------------------------ fairness


@dataclass(frozen=True)
class FairnessCheck:
    stream_hash_identical: bool
    """Every finished run recorded the same, non-empty ``stream_hash``."""
    reference_hash: str | None
    """The baseline's most common hash (or the most common of all runs when there is no baseline run)."""
    differing: list[dict[str, Any]]
    """``{run_id, variant, seed, stream_hash}`` of each run whose hash is not the reference (or missing)."""
    tokens_by_run: dict[str, int | None]
    tokens_identical: bool
    budgets_by_run: dict[str, dict[str, Any]]
    """``train.max_steps / max_tokens / max_time_s`` of each run's resolved config."""
    budgets_identical: bool
    spec_budget: Any
    """The ``budget`` entry of the sweep spec (``None`` if the spec has none)."""
    identical_fields: dict[str, bool] = field(default_factory=dict)
    """Other stream facts from the runs' summaries (corpus fingerprint, tokenizer hash): identical or not."""


def _find_key(data: Any, key: str) -> Any:
    """The first value stored under ``key`` in a nested mapping (breadth first), else ``None``."""
    queue = [data]
    while queue:
        node = queue.pop(0)
        if isinstance(node, Mapping):
            if key in node:
                return node[key]
            queue.extend(node.values())
        elif isinstance(node, list):
            queue.extend(node)
    return None


def spec_budget(spec_yaml: str | None) -> Any:
    """The ``budget`` entry of a sweep spec's YAML, wherever it is nested (``None`` if absent)."""
    import yaml

    if not spec_yaml:
        return None
    try:
        spec = yaml.safe_load(spec_yaml)
    except yaml.YAMLError:
        return None
    return _find_key(spec, "budget")


def fairness(runs: Sequence[RunRecord], finals: Sequence[FinalRecord], spec_yaml: str | None = None) -> FairnessCheck:
    """Did every finished run read the identical token stream, and under which budget? (``runs`` and
    ``finals`` as the store's :meth:`~archifactory.sweep.store.Store.runs` / ``finals`` return them.)"""
    baseline = baseline_variant(finals) if finals else None
    reference_rows = [r for r in finals if r["variant"] == baseline] or list(finals)
    hashes = [r.get("stream_hash") for r in reference_rows]
    counted = Counter(h for h in hashes if h)
    reference = counted.most_common(1)[0][0] if counted else None
    differing = [
        {"run_id": r["run_id"], "variant": r["variant"], "seed": r["seed"], "stream_hash": r.get("stream_hash")}
        for r in finals
        if not r.get("stream_hash") or r.get("stream_hash") != reference
    ]
    tokens = {r["run_id"]: r.get("tokens") for r in finals}
    finished = {r["run_id"] for r in finals}
    budgets = {}
    for run in runs:
        if run["run_id"] in finished:
            train = run.config.get("train") or {}
            budgets[run["run_id"]] = {k: train.get(k) for k in BUDGET_KEYS}
    identical_fields = {}
    for key in ("corpus_fingerprint", "tokenizer_hash"):
        values = [r.summary.get(key) for r in finals]
        recorded = [v for v in values if v is not None]
        if recorded:
            identical_fields[key] = len(set(map(str, recorded))) == 1 and len(recorded) == len(values)
    return FairnessCheck(
        stream_hash_identical=bool(finals) and not differing,
        reference_hash=reference,
        differing=differing,
        tokens_by_run=tokens,
        tokens_identical=len(set(tokens.values())) <= 1,
        budgets_by_run=budgets,
        budgets_identical=len({json.dumps(b, sort_keys=True) for b in budgets.values()}) <= 1,
        spec_budget=spec_budget(spec_yaml),
        identical_fields=identical_fields,
    )


# ------------------------------------------------------------------------------------- config diffs


IGNORED_CONFIG_KEYS = ("name", "out_dir")
"""Top-level run-config keys that differ between runs by construction; leaves named ``seed`` are
ignored as well (the seed is what pairs runs, not what a variant changes)."""


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1, {"c": 2}]}}`` -> ``{"a.b[0]": 1, "a.b[1].c": 2}``; empty containers stay leaves."""
    if isinstance(data, Mapping) and data:
        out = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, list) and data:
        out = {}
        for i, value in enumerate(data):
            out.update(flatten(value, f"{prefix}[{i}]"))
        return out
    return {prefix: data}


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"

    __str__ = __repr__


MISSING = _Missing()
"""Marks a key that one of two configs does not have."""


def config_diff(config: Mapping[str, Any], base: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, base value, variant value)`` for every leaf that differs between two resolved run
    configs, sorted by key; a key absent on one side has ``MISSING`` there. Ignores
    :data:`IGNORED_CONFIG_KEYS` and ``seed`` leaves."""
    a = flatten({k: v for k, v in config.items() if k not in IGNORED_CONFIG_KEYS})
    b = flatten({k: v for k, v in base.items() if k not in IGNORED_CONFIG_KEYS})
    rows = []
    for key in sorted(set(a) | set(b)):
        if key.rsplit(".", 1)[-1] == "seed":
            continue
        va, vb = a.get(key, MISSING), b.get(key, MISSING)
        if va != vb:
            rows.append((key, vb, va))
    return rows
