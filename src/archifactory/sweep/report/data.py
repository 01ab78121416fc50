"""What a report shows, read once from ``results.sqlite`` as the typed records the store returns
(:mod:`archifactory.results`) and with the sweep's statistics computed once (:mod:`archifactory.sweep.stats`).

Evaluation results (:mod:`archifactory.eval.store`: tables ``evaluations`` and ``eval_metrics``) are read
from the same file when the sweep stored them there; they join ``runs`` on ``run_id``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from archifactory.eval.store import MetricResult, metric_from_row
from archifactory.results import FinalRecord, MetricRecord, RunRecord, SweepRecord
from archifactory.sweep import stats as st
from archifactory.sweep.stages import PosttrainData, read_posttrain
from archifactory.sweep.store import Store

if TYPE_CHECKING:  # eval.probes imports the sweep store: read at call time
    from archifactory.eval.probes.spec import ProbeSweepSpec
    from archifactory.eval.probes.store import ProbeRun

RESULTS_FILE = "results.sqlite"

BASELINE_COLOR = "#1a1a1a"
VARIANT_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
                  "#7f7f7f"]


@dataclass
class SweepData:
    """Everything the report shows, read from the store and computed once."""

    sweep: SweepRecord
    runs: list[RunRecord]
    """The runs variants are compared on (pretraining)."""
    order: list[str]
    """Variants, the baseline first, then in the order the runner registered them."""
    baseline: str | None
    finals: list[FinalRecord]
    """Finished runs, one lr per variant (the best, where a variant ran a grid)."""
    all_finals: list[FinalRecord]
    lr_choices: dict[str, st.LrChoice]
    stats: dict[str, st.VariantStats]
    diff_loss: dict[str, st.PairedDifference]
    diff_bpb: dict[str, st.PairedDifference]
    fairness: st.FairnessCheck
    eval_curves: dict[str, list[MetricRecord]] = field(default_factory=dict)
    train_curves: dict[str, list[MetricRecord]] = field(default_factory=dict)
    stage_runs: list[RunRecord] = field(default_factory=list)
    """Every registered run of every stage (pretraining and post-training: ``RunRecord.stage``)."""
    posttrain: PosttrainData | None = None
    """The post-training stages' runs, curves and fairness checks (:mod:`archifactory.sweep.stages`)."""
    evals: list[MetricResult] = field(default_factory=list)
    """Evaluation results of the sweep's runs (one per run, task, item limit and metric: the newest
    evaluation where a run's weights were evaluated more than once)."""
    probe_runs: list[ProbeRun] = field(default_factory=list)
    """A probe sweep's runs (``kind: probe``: table ``probe_runs``), empty otherwise."""
    probe_spec: ProbeSweepSpec | None = None
    """A probe sweep's spec (its grid and seeds decide which grid points are complete)."""

    @property
    def is_probe_sweep(self) -> bool:
        """A sweep of synthetic probes only (no language-model runs to compare on loss)."""
        return bool(self.probe_runs) and not self.runs

    @property
    def name(self) -> str:
        return self.sweep.name

    def runs_of(self, variant: str, lr_selection: bool = False) -> list[RunRecord]:
        """The variant's compared runs (with ``lr_selection``: its lr-selection runs as well)."""
        return [r for r in self.runs if r.variant == variant and (lr_selection or not st.is_selection_run(r))]

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
    def failed(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status == "failed"]

    @property
    def unfinished(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status not in ("done", "failed")]

    def seq_len(self) -> int | None:
        for run in self.runs:
            value = (run.config.get("train") or {}).get("seq_len")
            if value:
                return int(value)
        return None


def _registration_order(store: Store) -> list[str]:
    with store.connect() as db:
        return [r[0] for r in db.execute("SELECT variant FROM runs GROUP BY variant ORDER BY MIN(rowid)")]


def read_evaluations(store: Store, run_ids: set[str]) -> list[MetricResult]:
    """The ``eval_metrics`` rows of ``run_ids`` in the store's file (none when the sweep stored no
    evaluation there); of several evaluations of one run, task and limit (a retrained run's new
    weights), the newest."""
    with store.connect() as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"evaluations", "eval_metrics"} <= tables:
            return []
        rows = db.execute(
            "SELECT m.* FROM eval_metrics m JOIN evaluations e USING (run_id, model_hash, task, task_version, "
            "n_limit) ORDER BY e.created_at, m.run_id, m.task, m.metric").fetchall()
    newest: dict[tuple, MetricResult] = {}
    for row in rows:  # oldest first, so a newer evaluation replaces an older one
        if row["run_id"] in run_ids:
            result = metric_from_row(row)
            newest[(result.run_id, result.task, result.limit, result.metric)] = result
    return list(newest.values())


def read_sweep_results(sweep_dir: str | Path) -> SweepData:
    """Read ``sweep_dir/results.sqlite`` and compute the report's statistics."""
    path = Path(sweep_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no results store at {path}: run the sweep first (archifactory sweep SPEC)")
    store = Store(path, read_only=True)
    sweep = store.sweep() or SweepRecord()
    if not sweep.name:
        sweep = sweep.model_copy(update={"name": Path(sweep_dir).resolve().name})
    runs = store.runs()
    stage_runs = store.runs(stage=None)
    all_finals = store.finals()
    finals, lr_choices = st.best_lr_runs(all_finals)
    baseline = st.baseline_variant(runs)
    order = _registration_order(store)
    if baseline in order:
        order = [baseline] + [v for v in order if v != baseline]
    kept = {r.run_id for r in finals}
    eval_curves: dict[str, list[MetricRecord]] = {}
    train_curves: dict[str, list[MetricRecord]] = {}
    for kind, curves in (("eval", eval_curves), ("train", train_curves)):
        for metric in store.metrics(kind=kind):
            if metric.run_id in kept:
                curves.setdefault(metric.run_id, []).append(metric)
    return SweepData(
        sweep=sweep,
        runs=runs,
        order=order,
        baseline=baseline,
        finals=finals,
        all_finals=all_finals,
        lr_choices=lr_choices,
        stats=st.variant_stats(finals),
        diff_loss=st.compare_to_baseline(finals, "val_loss", baseline=baseline),
        diff_bpb=st.compare_to_baseline(finals, "val_bpb", baseline=baseline),
        fairness=st.fairness(runs, finals, sweep.spec_yaml),
        eval_curves=eval_curves,
        train_curves=train_curves,
        stage_runs=stage_runs,
        evals=read_evaluations(store, {r.run_id for r in stage_runs}),
        posttrain=read_posttrain(store, sweep.spec_yaml),
        probe_runs=_probe_runs(path),
        probe_spec=_probe_spec(sweep.spec_yaml),
    )


def _probe_runs(path: Path) -> list[ProbeRun]:
    from archifactory.eval.probes.store import ProbeStore

    return ProbeStore(path, read_only=True).probe_runs()


def _probe_spec(spec_yaml: str | None) -> ProbeSweepSpec | None:
    """The sweep's spec when it is a probe sweep (else, or when it no longer validates, ``None``)."""
    import yaml

    from archifactory.eval.probes.spec import ProbeSweepSpec

    try:
        data = yaml.safe_load(spec_yaml or "")
        if isinstance(data, dict) and data.get("kind") == "probe":
            return ProbeSweepSpec.model_validate(data)
    except (yaml.YAMLError, ValueError):
        pass
    return None
