"""Post-training stages of a sweep, as the report reads them: per stage, did every variant get the same
recipe (same data, same order, same steps and batch, same GRPO prompts and sampling seeds), and each
run's curves and final figures.

The pretraining checks (:func:`archifactory.sweep.stats.fairness`) compare token streams; a
post-training stage is fair when its runs agree on:

- ``data``: the SFT data's hash, or the GRPO task (name, digits, seed: the prompt stream's identity);
- ``stream``: the ``stream_hash`` of what the run read (SFT: the conversations in training order; GRPO:
  every prompt of every step);
- ``tokenizer``: the tokenizer's fingerprint (the base tokenizer plus the chat tokens);
- ``steps``: the optimizer steps run;
- ``budget``: ``train.max_steps / max_tokens / max_time_s / batch_size / seq_len`` of the run config;
- ``recipe``: the rest of the resolved run config (optimizer, schedule, SFT or GRPO options), except what
  names the run, its starting point, its seed, and the learning rate when the spec's ``lr_scale`` rule
  ties it to the variant's pretraining lr (then ``lr`` lists each run's value).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections import Counter
from typing import Any, Mapping, Sequence

from archifactory.results import FinalRecord, MetricRecord, RunRecord

POSTTRAIN_STAGES = ("sft", "grpo")
BUDGET_FIELDS = ("max_steps", "max_tokens", "max_time_s", "batch_size", "seq_len")
PER_RUN_KEYS = ("name", "out_dir", "base", "model")


@dataclasses.dataclass(frozen=True)
class StageFairness:
    stage: str
    run_ids: list[str]
    values: dict[str, dict[str, Any]]
    """check -> run id -> the run's value (JSON text for mappings)."""
    lr_by_run: dict[str, float | None]

    def identical(self, check: str) -> bool:
        return len(set(self.values[check].values())) <= 1 and None not in self.values[check].values()

    def differing(self, check: str) -> list[str]:
        """Runs whose value is not the most common one (or missing)."""
        counted = Counter(v for v in self.values[check].values() if v is not None)
        reference = counted.most_common(1)[0][0] if counted else None
        return sorted(r for r, v in self.values[check].items() if v is None or v != reference)

    @property
    def ok(self) -> bool:
        return all(self.identical(check) for check in self.values)


def _recipe(config: Mapping[str, Any], lr_follows_variant: bool) -> str:
    data = copy.deepcopy(dict(config))
    for key in PER_RUN_KEYS:
        data.pop(key, None)
    train = data.get("train") or {}
    train.pop("seed", None)
    for key in BUDGET_FIELDS:
        train.pop(key, None)
    if lr_follows_variant:
        (data.get("optimizer") or {}).pop("lr", None)
    return json.dumps(data, sort_keys=True)


def stage_fairness(stage: str, runs: Sequence[RunRecord], finals: Sequence[FinalRecord],
                   lr_follows_variant: bool = False) -> StageFairness:
    """The checks of the module docstring over ``stage``'s finished compared runs (``runs`` and ``finals``
    as :meth:`Store.runs` / :meth:`Store.finals` give them for that stage)."""
    done = {f.run_id: f for f in finals if f.purpose == "compare"}
    configs = {r.run_id: r.config for r in runs if r.run_id in done}
    ids = sorted(done)
    values: dict[str, dict[str, Any]] = {
        "data": {rid: done[rid].summary.corpus_fingerprint for rid in ids},
        "stream": {rid: done[rid].stream_hash for rid in ids},
        "tokenizer": {rid: done[rid].summary.tokenizer_hash for rid in ids},
        "steps": {rid: done[rid].summary.steps for rid in ids},
        "budget": {rid: json.dumps({k: (configs.get(rid, {}).get("train") or {}).get(k) for k in BUDGET_FIELDS})
                   for rid in ids},
        "recipe": {rid: _recipe(configs.get(rid, {}), lr_follows_variant) for rid in ids},
    }
    lrs = {rid: (configs.get(rid, {}).get("optimizer") or {}).get("lr") for rid in ids}
    return StageFairness(stage, ids, values, lrs)


def lr_follows_variant(spec_yaml: str | None, stage: str) -> bool:
    """Whether the sweep's ``stage`` recipe ties the lr to each variant's pretraining lr (``lr_scale``)."""
    import yaml

    try:
        spec = yaml.safe_load(spec_yaml or "") or {}
    except yaml.YAMLError:
        return False
    return isinstance(spec.get(stage), dict) and spec[stage].get("lr_scale") is not None


@dataclasses.dataclass
class PosttrainData:
    """A sweep's post-training stages as the report shows them (empty when the sweep had none)."""

    runs: dict[str, list[RunRecord]]
    """stage -> registered runs of that stage."""
    finals: dict[str, list[FinalRecord]]
    """stage -> finished runs' final figures (``variant``, ``seed``, ``eval_accuracy``, ``val_loss``...)."""
    curves: dict[str, dict[str, list[MetricRecord]]]
    """kind (``sft_eval``, ``grpo``, ``grpo_eval``) -> run id -> metric rows in step order."""
    fairness: dict[str, StageFairness]
    spec: dict[str, Any]
    """The sweep spec's ``stages``, ``sft``, ``grpo`` and ``eval`` entries (as written)."""

    @property
    def stages(self) -> list[str]:
        return [s for s in POSTTRAIN_STAGES if self.runs.get(s)]

    def final(self, stage: str, variant: str) -> list[FinalRecord]:
        return [f for f in self.finals.get(stage, []) if f.variant == variant]


def read_posttrain(store, spec_yaml: str | None) -> PosttrainData:
    """The post-training runs, final figures, curves and fairness checks of a sweep's store."""
    import yaml

    try:
        spec = yaml.safe_load(spec_yaml or "") or {}
    except yaml.YAMLError:
        spec = {}
    runs = {s: store.runs(stage=s) for s in POSTTRAIN_STAGES}
    finals = {s: [f for f in store.finals(stage=s) if f.purpose == "compare"] for s in POSTTRAIN_STAGES}
    curves: dict[str, dict[str, list[MetricRecord]]] = {"sft_eval": {}, "grpo": {}, "grpo_eval": {}}
    wanted = {("sft", "eval"): "sft_eval", ("grpo", "grpo"): "grpo", ("grpo", "eval"): "grpo_eval"}
    for (stage, kind), name in wanted.items():
        ids = {r.run_id for r in runs[stage]}
        if not ids:
            continue
        for row in store.metrics(kind=kind):
            if row.run_id in ids:
                curves[name].setdefault(row.run_id, []).append(row)
    fairness = {s: stage_fairness(s, runs[s], finals[s], lr_follows_variant(spec_yaml, s))
                for s in POSTTRAIN_STAGES if finals[s]}
    return PosttrainData(runs, finals, curves, fairness,
                         {k: spec.get(k) for k in ("stages", "sft", "grpo", "eval") if isinstance(spec, dict)})
