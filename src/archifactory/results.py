"""Typed records of a sweep's results, passed from the trainer through the results store
(:mod:`archifactory.sweep.store`) to the report under one set of names.

The trainer builds a :class:`RunSummary` (its ``summary.json``); the sweep runner reads it back as one and
hands it to the store, whose ``final`` columns are :data:`FINAL_FIGURES`, the summary's own field names
(:class:`FinalFigures`), and whose ``runs.env_json`` is the summary's :meth:`RunSummary.env`. The store's
reads return these records (:class:`SweepRecord`, :class:`RunRecord`, :class:`FinalRecord`,
:class:`MetricRecord`) and the report reads them as they are: no key is renamed on the way.

Each record's fields are the store's column names (``SELECT *`` rows validate as they are); a column
that holds JSON text (``config_json``, ``changes_json``, ``env_json``, ``summary_json``) is parsed once,
here, into a typed field without the ``_json`` suffix (``config``, ``changes``, ``env``, ``summary``), so
no reader parses it again. Text that is not JSON (a store damaged by hand) reads as empty, as before.

Records are frozen and also answer ``record["key"]``, ``record.get("key")`` and ``"key" in record``, so the
figure statistics in :mod:`archifactory.sweep.stats`, which take any mapping-like row, work on records and
on plain rows alike.

The evaluation records (one per run, task and metric) are :class:`archifactory.eval.store.MetricResult`,
which the evaluator returns, :class:`~archifactory.eval.store.EvalStore` keeps and the report reads.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError


def _parse_json(value: Any) -> Any:
    """A JSON column's text -> its value; empty or non-JSON text -> ``None`` (already parsed values pass)."""
    if value is None or not isinstance(value, (str, bytes)):
        return value
    if not value:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return None


def _dict_or_empty(value: Any) -> Any:
    value = _parse_json(value)
    return value if isinstance(value, dict) else {}


JsonDict = Annotated[dict[str, Any], BeforeValidator(_dict_or_empty)]
"""A JSON object column: ``{}`` when empty, not JSON, or not an object."""


class Record(BaseModel):
    """Base of the results records: frozen, built from store rows, readable like a mapping."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="allow")
    """A column this module does not name yet is kept as it is (``record.get("column")``)."""

    def __getitem__(self, key: str) -> Any:
        if key in type(self).model_fields:
            return getattr(self, key)
        extra = self.__pydantic_extra__ or {}
        if key in extra:
            return extra[key]
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        """Whether the record holds a value for ``key``: a field that is not ``None``, or a kept extra column."""
        return isinstance(key, str) and self.get(key) is not None


class VariantChanges(BaseModel):
    """``runs.changes_json``: what a variant changes against the sweep's base config."""

    model_config = ConfigDict(frozen=True, extra="allow")

    overrides: list[str] = Field(default_factory=list)
    """Dotted ``key=value`` overrides (a mapping in the store is read as ``key=value`` lines)."""
    description: str = ""
    match_params: Any = None
    """Iso-parameter matching: ``{"changed": {key: [before, after]}, "params_before", "params_after",
    "target"}``, or ``None`` when the variant was not matched."""

    @classmethod
    def parse(cls, value: Any) -> VariantChanges:
        data = _dict_or_empty(value)
        overrides = data.get("overrides") or []
        if isinstance(overrides, dict):
            overrides = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]
        return cls(**{**data, "overrides": [str(o) for o in overrides],
                      "description": str(data.get("description") or "")})


class RunEnv(BaseModel):
    """``runs.env_json``: where and how a finished run ran (from its summary)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    device: str | None = None
    precision: str | None = None
    torch: str | None = None
    python: str | None = None
    kernel_paths: dict[str, str] | None = None
    """Layer index -> the kernel path that ran (``torch``, ``sdpa``, ``fla`` ...)."""
    world_size: int | None = None


def parse_run_env(value: Any) -> RunEnv | None:
    """An ``env_json`` column's text (or a parsed mapping) -> :class:`RunEnv`; empty or not JSON -> ``None``."""
    data = _parse_json(value)
    if isinstance(data, RunEnv) or data is None:
        return data
    return RunEnv.model_validate(data) if isinstance(data, dict) else None


class SweepRecord(Record):
    """The ``sweep`` table's one row."""

    name: str = ""
    spec_yaml: str = ""
    created_at: float | None = None
    env: Annotated[JsonDict, Field(default_factory=dict, validation_alias="env_json")]


class RunColumns(Record):
    """The ``runs`` columns that name a run and its role: every :class:`RunRecord` and :class:`FinalRecord`
    has them."""

    run_id: str
    variant: str
    seed: int
    lr: float | None = None
    is_baseline: bool = False
    purpose: str = "compare"
    """``compare`` (a result the report compares) or ``lr_selection`` (only chooses the variant's lr)."""
    stage: str = "pretrain"
    """The training stage the run belongs to (``pretrain``, ``sft``, ``grpo``); ``pretrain`` in a store
    without the column."""
    parent_run_id: str | None = None
    """The run a post-training stage starts from (``None`` for pretraining)."""


class RunRecord(RunColumns):
    """One row of ``runs``: a registered (variant, seed[, lr]) run and its state."""

    status: str = "pending"
    error: str | None = None
    config: Annotated[JsonDict, Field(default_factory=dict, validation_alias="config_json")]
    """The resolved run config (``RunConfig.model_dump(mode="json")``)."""
    changes: Annotated[VariantChanges, BeforeValidator(VariantChanges.parse),
                       Field(default_factory=VariantChanges, validation_alias="changes_json")]
    run_dir: str = ""
    env: Annotated[RunEnv | None, BeforeValidator(parse_run_env), Field(default=None, validation_alias="env_json")]
    started_at: float | None = None
    finished_at: float | None = None


class FinalFigures(Record):
    """A finished run's final figures: fields of the trainer's :class:`RunSummary` and, under the same
    names, the columns of the store's ``final`` table (:data:`FINAL_FIGURES`) and of :class:`FinalRecord`."""

    val_loss: float | None = None
    """Final validation loss (nats per token)."""
    val_bpb: float | None = None
    """Final validation bits per byte."""
    val_ppl: float | None = None
    params: int | None = None
    active_params: int | None = None
    flops_per_token_train: float | None = None
    """Training FLOPs per token (forward + backward), :meth:`CausalLM.flops_per_token` with ``training``."""
    tokens_per_s: float | None = None
    """Training tokens per second of wall time over the whole run."""
    peak_mem_bytes: int | None = None
    state_bytes: int | None = None
    """KV-cache or recurrent-state bytes per sequence at the run's ``train.seq_len``."""
    tokens: int | None = None
    """Training tokens read."""
    elapsed_s: float | None = None
    stream_hash: str | None = None
    """Hash of every micro-batch the run read, in order (the fairness check compares it across variants)."""
    eval_accuracy: float | None = None
    """Held-out greedy exact match on a GRPO task: a GRPO run's final evaluation; in the store, an SFT
    run's is its GRPO run's step-0 evaluation (the same problems decoded before any update); else ``None``."""
    eval_pass_at_1: float | None = None
    """Held-out sampled pass@1 on a GRPO task (``grpo.eval_samples`` completions per problem at the
    rollout temperature), taken as ``eval_accuracy`` is; ``None`` without ``eval_samples``."""


FINAL_FIGURES: tuple[str, ...] = tuple(FinalFigures.model_fields)
"""The ``final`` table's figure columns, in order: :class:`FinalFigures`' field names."""


class RunSummary(FinalFigures):
    """A finished run's ``summary.json``: what the trainer writes and returns, the sweep runner reads back
    and the store keeps (its figures as ``final`` columns, the whole as ``final.summary_json``). A
    post-training stage adds its own keys (``stage``, ``base``, ``packing`` ...), kept as extra fields."""

    name: str | None = None
    steps: int | None = None
    skipped_steps: int | None = None
    """Optimizer steps skipped for a non-finite loss or gradient."""
    kernel_paths: dict[str, str] | None = None
    """Layer index -> the kernel path its mixer ran (``torch.sdpa``, ``fla.chunk_gla`` ...)."""
    corpus_fingerprint: str | None = None
    tokenizer_hash: str | None = None
    device: str | None = None
    precision: str | None = None
    """The precision ``train.precision`` resolved to (``auto`` -> bf16 or fp32)."""
    world_size: int | None = None
    torch: str | None = None
    python: str | None = None
    numpy: str | None = None

    def env(self) -> RunEnv:
        """Where and how the run ran (the store's ``runs.env_json``)."""
        return RunEnv.model_validate(self.model_dump(include=set(RunEnv.model_fields)))

    def to_json(self) -> str:
        """The ``summary.json`` text: the keys the run set, under their own names."""
        return self.model_dump_json(indent=2, exclude_unset=True)


def _summary_or_empty(value: Any) -> Any:
    """``summary_json`` text -> a :class:`RunSummary`; empty, not JSON or not a valid summary -> an empty one."""
    if isinstance(value, RunSummary):
        return value
    try:
        return RunSummary.model_validate(_dict_or_empty(value))
    except ValidationError:
        return RunSummary()


class FinalRecord(FinalFigures, RunColumns):
    """A finished run's final figures (``final`` joined with its run's :class:`RunColumns`)."""

    summary: Annotated[RunSummary, BeforeValidator(_summary_or_empty),
                       Field(default_factory=RunSummary, validation_alias="summary_json")]
    """The run's whole ``summary.json`` (corpus fingerprint, tokenizer hash, steps ...)."""


class MetricRecord(Record):
    """One per-step record of ``metrics`` (``kind`` ``train``, ``eval`` or ``grpo``)."""

    run_id: str
    kind: str
    step: int
    tokens: int | None = None
    elapsed_s: float | None = None
    loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    val_loss: float | None = None
    val_bpb: float | None = None
    reward: float | None = None
    """GRPO records: mean reward, pass rate, completion length, KL, clip fraction; ``eval_accuracy``: the
    held-out greedy exact match; ``eval_pass_at_1``: the held-out sampled pass@1 (``grpo.eval_samples``)."""
    pass_rate: float | None = None
    completion_length: float | None = None
    kl: float | None = None
    clip_fraction: float | None = None
    eval_accuracy: float | None = None
    eval_pass_at_1: float | None = None
