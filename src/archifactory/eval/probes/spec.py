"""Probe sweep specs (``kind: probe``): variants x widths x tasks (and their harder settings) x an
lr x weight-decay grid x seeds, each a model trained from scratch on generated examples.

```yaml
kind: probe
name: mqar
model: {n_layers: 2, ffn: {kind: none}, mixer: {kind: attention, n_heads: 1, n_kv_heads: 1}}
widths: [64, 128]                         # d_model of every variant, in turn
variants:                                 # overrides of the model (paths inside `model`)
  attention: []
  gla: ["mixer={kind: gla}"]
baseline: attention                       # compared with every other variant (default: the first listed)
tasks:
  mqar:
    task: {kind: mqar, vocab_size: 256, seq_len: 64, num_kv_pairs: 8, train_examples: 20000}
    changes: {num_kv_pairs: [16]}         # harder settings, one field at a time (MAD's protocol)
grid: {lr: [1.0e-3, 3.0e-3], weight_decay: [0.0, 0.1]}
seeds: [0, 1]
train: {batch_size: 64, max_steps: 800, eval_every: 100, early_stop: 0.99}
```

``vocab_size`` and ``max_seq_len`` of the model come from each task. For every (variant, width, task
setting) the grid point with the highest mean validation accuracy over the seeds is chosen; the test
accuracy of that grid point is what is reported (:mod:`archifactory.sweep.probe_results`).
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, model_validator

from archifactory.config import (
    MAX_FOLDER_NAME_BYTES,
    ConfigError,
    FolderName,
    Seed,
    Strict,
    apply_overrides,
    check_folder_name,
    load_yaml,
    validate,
    with_default_kinds,
)
from archifactory.eval.probes.tasks import ProbeTask, TaskConfig
from archifactory.model.config import ModelConfig
from archifactory.train.optim import optimizer_config

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class TaskEntry(Strict):
    task: TaskConfig
    changes: dict[str, list[Any]] = Field(default_factory=dict)
    """Harder settings, each field changed alone from the baseline (MAD's ``changes``): ``{vocab_size:
    [32, 64]}`` adds the settings ``vocab_size=32`` and ``vocab_size=64``."""


class ProbeGrid(Strict):
    lr: list[PositiveFloat] = Field(min_length=1)
    weight_decay: list[NonNegativeFloat] = Field(default_factory=lambda: [0.0], min_length=1)

    @model_validator(mode="after")
    def _distinct(self):
        for name in ("lr", "weight_decay"):
            labels = [f"{v:g}" for v in getattr(self, name)]
            if len(set(labels)) != len(labels):
                raise ValueError(f"{name}: {getattr(self, name)} repeats a value (to 6 significant digits)")
        return self


class ProbeTrain(Strict):
    batch_size: int = Field(64, ge=1)
    max_steps: int = Field(ge=1)
    """Optimizer steps per run (the schedule's length); early stopping may end a run sooner."""
    eval_every: int = Field(100, ge=1)
    """Steps between validation evaluations (each can stop the run early)."""
    early_stop: float | None = Field(0.99, gt=0, le=1)
    """Stop once validation accuracy reaches this (Zoology: 0.99); ``null`` trains every step."""
    grad_clip: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    """``fp32`` by default, unlike a run config's ``auto``: a probe's accuracy must not depend on the CPU kind
    (``auto`` is bf16 on a CPU with AVX512-BF16/AMX and fp32 on one without). Shipped probe specs follow one
    rule (tests/test_precision.py): a spec that leaves ``device`` unstated or ``cpu`` (the CPU tier) pins ``fp32``; a
    GPU-tier spec states ``device`` (``auto`` or ``cuda``) and uses ``auto``."""
    device: str = "auto"
    """``auto``: CUDA when available, else CPU."""


class ProbeSweepSpec(Strict):
    kind: Literal["probe"]
    name: FolderName
    description: str = ""
    model: dict[str, Any]
    """The base model's fields (a :class:`ModelConfig` without ``vocab_size``/``max_seq_len``, which each
    task sets; ``d_model`` is set by ``widths`` when given)."""
    widths: list[Annotated[int, Field(ge=1)]] | None = None
    variants: dict[str, list[str]] = Field(min_length=1)
    """Variant name -> overrides of ``model`` (``mixer={kind: gla}``, ``mixer.n_heads=2``)."""
    baseline: str | None = None
    """The variant every other is compared with in the report (paired difference over seeds, Holm-corrected
    p); ``None``: the first listed variant."""
    tasks: dict[str, TaskEntry] = Field(min_length=1)
    grid: ProbeGrid
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    """Model-initialisation (and batch-order) seeds; data are the same for all (``data_seed``)."""
    data_seed: Seed = 0
    optimizer: dict[str, Any] = Field(default_factory=lambda: {"name": "adamw"})
    """An optimizer config (``lr`` and ``weight_decay`` come from the grid)."""
    schedule: dict[str, Any] = Field(default_factory=lambda: {"kind": "cosine"})
    train: ProbeTrain
    parallel: int | None = Field(None, ge=1)
    """Runs at once (processes); ``None``: as many as the CPU cores allow at ``threads_per_run``, or one
    per GPU."""
    threads_per_run: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self):
        for name in self.variants:
            try:
                check_folder_name(name, max_bytes=MAX_FOLDER_NAME_BYTES - 80)
            except ValueError as err:
                raise ValueError(f"variants: variant name {err}") from None
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: {self.seeds} repeats a seed")
        if self.baseline is not None and self.baseline not in self.variants:
            raise ValueError(f"baseline: {self.baseline!r} is not one of the variants ({', '.join(self.variants)})")
        for key in ("vocab_size", "max_seq_len"):
            if key in self.model:
                raise ValueError(f"model.{key}: set by each task; leave it out of the probe spec's model")
        if self.widths is not None and len(set(self.widths)) != len(self.widths):
            raise ValueError(f"widths: {self.widths} repeats a width")
        opt = optimizer_config(self.optimizer)
        if not hasattr(opt, "weight_decay") and self.grid.weight_decay != [0.0]:
            raise ValueError(f"grid.weight_decay: optimizer {opt.name!r} has no weight_decay; use [0.0]")
        for name, entry in self.tasks.items():
            for field, values in entry.changes.items():
                if field not in type(entry.task).model_fields or field == "kind":
                    raise ValueError(f"tasks.{name}.changes.{field}: not a field of task kind {entry.task.kind!r}")
                if not isinstance(values, list) or not values:
                    raise ValueError(f"tasks.{name}.changes.{field}: give a non-empty list of values")
        return self

    @property
    def baseline_variant(self) -> str:
        """The variant the report compares the others with: ``baseline``, else the first listed."""
        return self.baseline or next(iter(self.variants))


@dataclasses.dataclass(frozen=True)
class TaskSetting:
    task_name: str
    """The spec's task name (MAD score groups by it)."""
    setting: str
    """``baseline`` or ``field=value`` (one harder setting)."""
    task: ProbeTask

    @property
    def label(self) -> str:
        return self.task_name if self.setting == "baseline" else f"{self.task_name}.{self.setting}"

    @property
    def data_key(self) -> int:
        """Names this setting's data streams: a hash of its resolved task, so the same task draws the
        same examples in every sweep that holds it, whatever else the sweep holds."""
        return zlib.crc32(self.task.model_dump_json().encode())


@dataclasses.dataclass(frozen=True)
class ProbeJob:
    run_id: str
    variant: str
    width: int
    setting: TaskSetting
    lr: float
    weight_decay: float
    seed: int
    model: ModelConfig


def load_probe_spec(path: str | Path, overrides: list[str] | tuple = ()) -> ProbeSweepSpec:
    data = apply_overrides(load_yaml(path), overrides)
    return validate(ProbeSweepSpec, data, source=path, overrides=overrides)


def is_probe_spec(path: str | Path) -> bool:
    """Whether the sweep file at ``path`` declares ``kind: probe``."""
    data = load_yaml(path)
    return isinstance(data, dict) and data.get("kind") == "probe"


def task_settings(spec: ProbeSweepSpec) -> list[TaskSetting]:
    out = []
    for name, entry in spec.tasks.items():
        out.append(TaskSetting(name, "baseline", entry.task))
        base = entry.task.model_dump()
        for field, values in entry.changes.items():
            for value in values:
                try:
                    task = type(entry.task).model_validate({**base, field: value})
                except ValueError as err:
                    raise ConfigError(f"tasks.{name}.changes.{field}={value!r}: {err}") from None
                out.append(TaskSetting(name, f"{field}={value}", task))
    return out


def model_for(spec: ProbeSweepSpec, variant: str, width: int | None, task: ProbeTask) -> ModelConfig:
    """The resolved model of ``variant`` at ``width`` for ``task``; ConfigError names the variant."""
    data = with_default_kinds(ModelConfig, {**spec.model, "vocab_size": task.vocab_size,
                                            "max_seq_len": task.model_seq_len(),
                                            **({"d_model": width} if width is not None else {})})
    try:
        return validate(ModelConfig, apply_overrides(data, spec.variants[variant]), root="model")
    except ConfigError as err:
        raise ConfigError(f"variant {variant!r} at width {width}: {err}") from None


def plan(spec: ProbeSweepSpec) -> list[ProbeJob]:
    """Every run, ordered so that one (variant, width, task) finishes its grid and seeds together."""
    jobs = []
    widths = spec.widths or [None]
    for setting in task_settings(spec):
        for variant in spec.variants:
            for width in widths:
                model = model_for(spec, variant, width, setting.task)
                for lr in spec.grid.lr:
                    for wd in spec.grid.weight_decay:
                        for seed in spec.seeds:
                            run_id = (f"{variant}-d{model.d_model}-{setting.label}-lr{lr:g}-wd{wd:g}-s{seed}")
                            jobs.append(ProbeJob(run_id, variant, model.d_model, setting, lr, wd, seed, model))
    return jobs


def spec_yaml(spec: ProbeSweepSpec) -> str:
    return yaml.safe_dump(json.loads(spec.model_dump_json()), sort_keys=False)
