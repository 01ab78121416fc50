"""The run config: model + data + optimizer + schedule + training loop settings, one YAML file."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal

from pydantic import Field, field_validator, model_validator

import archifactory.data.corpora  # noqa: F401  (registers corpora)
import archifactory.data.tokenizer  # noqa: F401  (registers tokenizers)
from archifactory.config import (
    MAX_COUNT,
    MAX_SECONDS,
    MAX_SEQ_LEN,
    MAX_STEPS,
    MAX_TOKENS,
    FolderName,
    Seed,
    Strict,
    apply_overrides,
    component_field,
    load_yaml,
    validate,
    with_default_kinds,
)
from archifactory.data.corpora import ShakespeareCorpus
from archifactory.data.tokenizer import BPETokenizerConfig
from archifactory.model.config import ModelConfig, ModelField, model_config_class  # noqa: F401
from archifactory.registry import CORPORA, OPTIMIZERS, SCHEDULES, TOKENIZERS
from archifactory.train.optim import AdamWConfig, OptimizerConfig  # noqa: F401  (re-exported)
from archifactory.train.schedule import CosineSchedule, ScheduleConfig  # noqa: F401  (re-exported)

class DataConfig(Strict):
    corpus: component_field(CORPORA) = Field(default_factory=ShakespeareCorpus)
    tokenizer: component_field(TOKENIZERS) = Field(default_factory=BPETokenizerConfig)
    cache_dir: str | None = None
    """Where tokenizers and shards are cached; default ``$ARCHIFACTORY_CACHE`` or ``~/.cache/archifactory``."""
    seed: Seed = 0
    """Data order seed: the same for every variant of a sweep, so all read the identical stream."""


class TrainConfig(Strict):
    seq_len: int = Field(256, ge=1, le=MAX_SEQ_LEN)
    batch_size: int = Field(16, ge=1, le=MAX_SEQ_LEN)
    """Sequences per optimizer step (global, across processes)."""
    micro_batch_size: int | None = Field(None, ge=1, le=MAX_SEQ_LEN)
    """Sequences per forward on each process; ``batch_size`` must be a multiple of it times the number of
    processes (the gradient accumulation steps follow). ``None``: no accumulation."""
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    """Step budget, at most :data:`~archifactory.config.MAX_STEPS` (10**9)."""
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    """Token budget, at most :data:`~archifactory.config.MAX_TOKENS` (10**15)."""
    max_time_s: float | None = Field(None, gt=0, le=MAX_SECONDS)
    """Wall-time budget (at most a year); the schedule then follows the elapsed fraction of it."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision. ``auto``: bf16 where the device computes bf16 natively (CUDA compute capability
    8.0+, a CPU with AVX512-BF16/AMX or ARM BF16), else fp32; the run summary records what it resolved to
    (``archifactory.train.precision``)."""
    compile: bool = False
    grad_clip: float | None = Field(1.0, gt=0)
    nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose loss or gradient norm is NaN or infinite is never applied. ``stop``: the run stops
    (its checkpoints, all finite, are kept); ``skip``: the update is dropped (weights and optimizer state
    untouched, the batch consumed, a ``kind: nonfinite`` line in metrics.jsonl) and the run stops after
    ``max_consecutive_skips`` such steps in a row. Under fp16 the gradient scaler's own skips (an overflow
    while it lowers its scale, with a finite loss) are always skipped, and counted the same way."""
    max_consecutive_skips: int = Field(10, ge=1, le=MAX_STEPS)
    eval_every: int = Field(100, ge=1, le=MAX_STEPS)
    eval_tokens: int = Field(65536, ge=1, le=MAX_TOKENS)
    """Validation targets scored per evaluation: the split's first ``eval_tokens`` rounded down to whole
    ``seq_len`` windows, or the whole split when it is shorter (its final window then is shorter)."""
    log_every: int = Field(10, ge=1, le=MAX_STEPS)
    checkpoint_every: int = Field(200, ge=1, le=MAX_STEPS)
    keep_checkpoints: int = Field(2, ge=1, le=MAX_STEPS)
    seed: Seed = 0
    """Model init seed."""
    threads: int | None = Field(None, ge=1, le=MAX_COUNT)
    """torch CPU threads (fixed threads make CPU runs bitwise reproducible)."""
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """With several processes (torchrun): DDP replicates the model; FSDP2 (``fully_shard`` per block)
    shards parameters, gradients and optimizer state."""
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    progress: bool = True

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        import re

        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d{1,3})?", value):
            raise ValueError(f"{value!r} is not a device; give auto, cpu, cuda, cuda:N or mps")
        return value

    @model_validator(mode="after")
    def _check(self):
        if self.max_steps is None and self.max_tokens is None and self.max_time_s is None:
            raise ValueError("give a budget: max_steps, max_tokens or max_time_s")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of micro_batch_size={self.micro_batch_size}"
            )
        return self

    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


class RunConfig(Strict):
    name: FolderName = "run"
    """The run's name; the default run directory is ``runs/<name>``, so it is one plain folder name."""
    model: ModelField
    """A model of any registered kind (``transformer`` unless ``kind`` says otherwise)."""
    data: DataConfig = Field(default_factory=DataConfig)
    optimizer: component_field(OPTIMIZERS) = Field(default_factory=AdamWConfig)
    """An optimizer registered under ``name`` (``adamw``, ``muon``, ...), with that optimizer's fields."""
    schedule: component_field(SCHEDULES) = Field(default_factory=CosineSchedule)
    """A learning-rate schedule registered under ``kind`` (``cosine``, ``wsd``, ...)."""
    train: TrainConfig
    out_dir: str | None = None
    """Run directory, anywhere; ``None``: ``runs/<name>``."""

    @model_validator(mode="after")
    def _check_lengths(self):
        model, seq_len = self.model, self.train.seq_len
        if model.position.limits_length and seq_len > model.max_seq_len:
            raise ValueError(
                f"train.seq_len={seq_len} exceeds model.max_seq_len={model.max_seq_len}, the length of the "
                f"{model.position.kind} position table; raise model.max_seq_len or lower train.seq_len"
            )
        uses_positions = getattr(model, "mixers_use_positions", lambda: False)  # byte-level kinds: no such check
        if seq_len > model.max_seq_len and not model.position.extrapolates() and uses_positions():
            # generation and evaluation refuse positions past max_seq_len for these encodings
            # (CausalLM.check_generation_length): a model trained on them could not be used at its length
            raise ValueError(
                f"train.seq_len={seq_len} exceeds model.max_seq_len={model.max_seq_len}: the model's "
                f"{model.position.kind} positions past max_seq_len do not extrapolate, so generation and evaluation "
                "refuse them; raise model.max_seq_len to at least train.seq_len or lower train.seq_len"
            )
        if model.pretrained is not None:
            source = Path(model.pretrained.path).expanduser().resolve()
            tokenizer = self.data.tokenizer
            given = Path(getattr(tokenizer, "name_or_path", "")).expanduser().resolve()
            if tokenizer.kind != "hf" or given not in (source, source / "tokenizer.json"):
                raise ValueError(
                    f"model.pretrained.path={model.pretrained.path}: the pretrained embedding's rows are its "
                    f"tokenizer's ids; set data.tokenizer to {{kind: hf, name_or_path: {model.pretrained.path}}}"
                )
        if model.mtp_heads >= seq_len:
            raise ValueError(
                f"model.mtp_heads={model.mtp_heads} must be < train.seq_len={seq_len}: the last multi-token "
                "head would have no target; lower model.mtp_heads or raise train.seq_len"
            )
        return self

    def run_dir(self) -> Path:
        return Path(self.out_dir or Path("runs") / self.name)


def expand_run_data(data: dict) -> dict:
    """``model: tiny`` (a preset name or a YAML path) becomes that config's mapping, and default
    component kinds are filled in, so overrides like ``model.mixer.n_kv_heads=2`` refine them."""
    from archifactory.model.presets import resolve_model_source

    data = dict(data)
    model = data.get("model")
    if isinstance(model, (str, Path)):
        model = load_yaml(resolve_model_source(model))
    if isinstance(model, dict):
        data["model"] = with_default_kinds(model_config_class(model, "model.kind"), model)
    data = with_default_kinds(RunConfig, data)  # `optimizer.lr=...` refines the default optimizer
    if isinstance(data.get("data"), dict) or "data" not in data:
        data["data"] = with_default_kinds(DataConfig, data.get("data", {}))
    return data


def apply_run_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """``overrides`` applied in order to expanded run data; ``model=NAME`` (a preset name or a YAML path,
    as ``model:`` takes in a file) is expanded where it is set, so later ``model.*`` overrides refine it."""
    for override in overrides:
        data = apply_overrides(data, [override])
        if isinstance(data.get("model"), (str, Path)):
            data = expand_run_data(data)
    return data


def load_run_config(source: str | Path | dict, overrides: Iterable[str] = ()) -> RunConfig:
    overrides = list(overrides)
    data = source if isinstance(source, dict) else load_yaml(source)
    return validate(RunConfig, apply_run_overrides(expand_run_data(data), overrides),
                    source=None if isinstance(source, dict) else source, overrides=overrides)
