"""Supervised fine-tuning (SFT) of a pretrained run on chat data: a run config with ``stage: sft``.

```
sft_run_dir/
  config.yaml          resolved SFT run config (model = the base run's, vocabulary grown by the chat tokens)
  tokenizer.json       the base run's tokenizer plus the chat tokens
  chat_template.jinja  the template used to render training data, read back by `generate --chat`
  data.json            source, formats, conversation counts (train / held out / truncated / dropped), packing
  metrics.jsonl, checkpoints/, model/, summary.json   as in pretraining
```

It reuses the pretraining :class:`~archifactory.train.trainer.Trainer` (loop, optimizer, schedule,
accumulation, checkpoints, exact resume, DDP/FSDP) and changes four hooks: the data, the starting model,
the micro-batch loss and the validation loss.

**Loss.** Cross-entropy on assistant tokens only by default (``assistant_only_loss``, TRL's name; off: every
token but padding). A step's loss is the sum over its trained tokens divided by their number over all
micro-batches and processes, so gradient accumulation gives the gradient of one full batch (token
weighting, as TRL since transformers 4.46; litgpt averages per micro-batch instead).

**Packing** (``packing: auto | on | off``): several conversations per row with attention masked between
them and absolute positions restarted (``CausalLM.forward(document_ids=...)``). Mixers whose state would
carry across a boundary (every recurrent and SSM mixer, KV-shift attention, MLA, Hymba, RWKV's token-shift
FFN) cannot take packed rows; ``auto`` then pads one conversation per row and says so in ``data.json``
and the summary, ``on`` is an error.
"""

from __future__ import annotations

import hashlib
import json
import math
import types
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from archifactory.config import ConfigError, Seed, Strict, apply_overrides, component_field, load_yaml, validate
from archifactory.data.tokenizer import Tokenizer
from archifactory.model.lm import CausalLM
from archifactory.posttrain.chat import IM_END, TEMPLATE_FILE, ChatTemplate, add_chat_tokens, resize_vocab
from archifactory.posttrain.formats import Format, conversations, load_records
from archifactory.posttrain.sft_data import SFTLoader, eval_batches, tokenize_conversations
from archifactory.posttrain.tasks import TaskConfig
from archifactory.registry import OPTIMIZERS, SCHEDULES
from archifactory.results import RunSummary
from archifactory.train.config import RunConfig, TrainConfig, expand_run_data
from archifactory.train.optim import AdamWConfig
from archifactory.train.schedule import ConstantSchedule, LinearSchedule
from archifactory.train.trainer import Trainer


MAX_EPOCHS = 1000.0
"""Most passes over the SFT data (TRL's default is 3): each epoch's order is drawn when the run's length is
counted, so 1e9 epochs hung the setup."""


MAX_TASK_EXAMPLES = 100_000


class SFTDataConfig(Strict):
    source: str
    """A local ``.json`` / ``.jsonl`` / ``.parquet`` file or a Hugging Face hub dataset name."""
    format: Format = "auto"
    """``auto`` | ``messages`` | ``dolphin_r1`` | ``prompt_completion`` | ``alpaca`` | ``limo`` (see formats.py)."""
    keep_reasoning: bool = True
    """dolphin-r1: keep the thinking trace (``<think>...</think>`` before the answer) or drop it."""
    subset: str | None = None
    """Hub dataset configuration name (e.g. dolphin-r1's ``reasoning-deepseek``)."""
    split: str = "train"
    max_examples: int | None = Field(None, ge=1)
    """Use the first N records only."""
    val_fraction: float = Field(0.05, ge=0, lt=1)
    """Conversations held out for the validation loss (a seeded draw), at least one when > 0."""
    seed: Seed = 0
    """Held-out draw and data order; the same for every variant of a sweep."""
    task: TaskConfig | None = None
    """Add worked examples of a verifiable task (as GRPO's ``task`` names it) to the records: the first
    ``task_examples`` problems of its training split, the user turn its prompt and the assistant turn its
    reference answer (addition, multiplication and gsm8k; countdown has no reference solution). The
    held-out problems are never among them."""
    task_examples: int = Field(0, ge=0, le=MAX_TASK_EXAMPLES)
    """How many task problems ``task`` adds (0: none)."""

    @model_validator(mode="after")
    def _task_examples(self):
        if (self.task is None) != (self.task_examples == 0):
            raise ValueError("data.task and data.task_examples go together: name the task and how many of its "
                             "problems to add (task_examples >= 1), or leave both out")
        if self.task is not None and self.task.name == "countdown":
            raise ValueError("data.task: countdown problems have no reference solution to train on; use addition, "
                             "multiplication or gsm8k")
        return self


def task_records(task: TaskConfig, n: int) -> list[dict]:
    """The first ``n`` training problems of ``task`` as Alpaca records (prompt -> reference answer)."""
    built = task.build()
    return [{"instruction": p.prompt, "input": "", "output": p.answer}
            for p in (built.problem(i, "train") for i in range(n))]


class SFTOptions(Strict):
    assistant_only_loss: bool = True
    """Loss on assistant tokens only (-100 elsewhere); ``false``: on every token but padding."""
    packing: Literal["auto", "on", "off"] = "auto"
    """Several conversations per row where the model can keep them apart (attention-only models)."""
    num_train_epochs: float | None = Field(None, gt=0, le=MAX_EPOCHS)
    """Passes over the training conversations (TRL's name; fractions allowed): the run's length is then
    ceil(rows of those epochs / rows per step) optimizer steps, and ``train.max_steps`` is not used (TRL
    lets a positive ``max_steps`` win instead; here ``train`` always has a budget, so the explicit epochs
    win). ``None``: the ``train`` budget decides."""


def _sft_train_default() -> TrainConfig:
    return TrainConfig(seq_len=256, batch_size=16, max_steps=100, eval_every=50, checkpoint_every=50)


class SFTRunConfig(RunConfig):
    """A run config with ``stage: sft``: the base (pretrained) run, chat data and SFT options, plus the
    usual optimizer / schedule / train sections. ``model`` is filled in from the base run."""

    stage: Literal["sft"] = "sft"
    base: str
    """The pretrained run directory (with ``model/`` and ``tokenizer.json``)."""
    data: SFTDataConfig
    sft: SFTOptions = Field(default_factory=SFTOptions)
    # Fine-tuning defaults: a tenth of the pretraining learning rate, no weight decay (TRL's default), a
    # linear decay to 0 after a short warmup (TRL: linear, no warmup).
    optimizer: component_field(OPTIMIZERS) = Field(default_factory=lambda: AdamWConfig(lr=3e-4, weight_decay=0.0))
    schedule: component_field(SCHEDULES) = Field(
        default_factory=lambda: LinearSchedule(warmup_fraction=0.03, min_lr_ratio=0.0)
    )
    train: TrainConfig = Field(default_factory=_sft_train_default)


def base_tokenizer(base: Path) -> Tokenizer:
    """The base run's ``tokenizer.json``; refused (:class:`InputError`) when it has more ids than the base
    run's model (``model/config.yaml``): it is then another model's tokenizer, as generate and eval refuse."""
    from archifactory.train.locate import check_tokenizer_fits

    base = Path(base)
    tokenizer = Tokenizer.load(base / "tokenizer.json")
    vocab_size = int(load_yaml(base / "model" / "config.yaml")["vocab_size"])
    check_tokenizer_fits(tokenizer, vocab_size, base / "tokenizer.json")
    return tokenizer


def _stage_defaults(cls, data: dict) -> dict:
    """The stage's own optimizer and schedule where the config names none (``expand_run_data`` would
    otherwise fill in the pretraining defaults)."""
    data = dict(data)
    for key in ("optimizer", "schedule"):
        if key not in data:
            data[key] = cls.model_fields[key].default_factory().model_dump(mode="json")
    return data


def stage_data(cls, source: str | Path | dict, overrides: Iterable[str], stage: str, label: str,
               base_files: Iterable[str], base_hint: str, missing_advice: str) -> tuple[dict, Path]:
    """A post-training stage's raw config (its defaults, then ``overrides``) and its ``base`` run
    directory, checked: ``stage`` matches and every file in ``base_files`` exists under ``base``.

    Raises:
        ConfigError: another stage, no ``base``, or a missing base file (``missing_advice`` says what to do).
    """
    data = dict(source) if isinstance(source, dict) else load_yaml(source)
    data = apply_overrides(_stage_defaults(cls, data), overrides)
    if data.get("stage", stage) != stage:
        raise ConfigError(f"stage: {data.get('stage')!r} is not {label} config (expected stage: {stage})")
    data.setdefault("stage", stage)
    if "base" not in data:
        raise ConfigError(f"base: missing; give the {base_hint}")
    base = Path(data["base"])
    for name in base_files:
        if not (base / name).is_file():
            raise ConfigError(f"base: {base / name} is missing; {missing_advice}")
    return data, base


def load_sft_config(source: str | Path | dict, overrides: Iterable[str] = ()) -> SFTRunConfig:
    """An SFT run config from YAML or a mapping: ``base`` is read for the model (its vocabulary grown by
    the chat tokens the base tokenizer lacks) unless ``model`` is given."""
    overrides = list(overrides)
    data, base = stage_data(SFTRunConfig, source, overrides, "sft", "an SFT",
                            ("tokenizer.json", "model/config.yaml", "model/model.safetensors"),
                            "pretrained run directory (base: runs/NAME)", "pretrain the base run to the end first")
    if "model" not in data:
        model = load_yaml(base / "model" / "config.yaml")
        tokenizer = base_tokenizer(base)
        _, _, added = add_chat_tokens(tokenizer)
        tokenizer_size = tokenizer.vocab_size + len(added)
        model["vocab_size"] = max(int(model["vocab_size"]), tokenizer_size)
        data["model"] = model
    chat_data = data.get("data")
    data = expand_run_data({k: v for k, v in data.items() if k != "data"})
    data["data"] = chat_data
    return validate(SFTRunConfig, data, source=None if isinstance(source, dict) else source, overrides=overrides)


class SFTTrainer(Trainer):
    """The pretraining trainer with SFT data, a pretrained starting model and the token-weighted loss."""

    cfg: SFTRunConfig
    SETUP_FILES = {**Trainer.SETUP_FILES, TEMPLATE_FILE: ChatTemplate.readable}

    def setup_data(self, global_micro_batch: int) -> None:
        cfg, tc = self.cfg, self.cfg.train
        base = Path(cfg.base)
        self.tokenizer, self.chat_ids, self.new_ids = add_chat_tokens(base_tokenizer(base))
        self.template = ChatTemplate()
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the chat tokenizer's "
                f"{self.tokenizer.vocab_size} ids; leave model out of the SFT config to take it from the base run"
            )
        records = load_records(cfg.data.source, cfg.data.split, cfg.data.subset)
        if cfg.data.max_examples is not None:
            records = records[: cfg.data.max_examples]
        if not records:
            raise ConfigError(f"data.source={cfg.data.source!r} holds no records")
        n_source = len(records)
        if cfg.data.task is not None:
            records = records + task_records(cfg.data.task, cfg.data.task_examples)
        convs = conversations(records, cfg.data.format, cfg.data.keep_reasoning)
        order = np.random.default_rng([cfg.data.seed, 1]).permutation(len(convs))
        n_val = max(1, round(cfg.data.val_fraction * len(convs))) if cfg.data.val_fraction > 0 and len(convs) > 1 else 0
        val_convs = [convs[i] for i in sorted(order[:n_val])]
        train_convs = [convs[i] for i in sorted(order[n_val:])]
        assistant_only = cfg.sft.assistant_only_loss
        train_examples, train_stats = tokenize_conversations(train_convs, self.template, self.tokenizer, tc.seq_len, assistant_only)
        self.val_examples, val_stats = tokenize_conversations(val_convs, self.template, self.tokenizer, tc.seq_len, assistant_only)
        with torch.device("meta"):
            blockers = cfg.model.build().document_blockers()
        if cfg.sft.packing == "on" and blockers:
            raise ConfigError(
                f"sft.packing=on, but packed conversations cannot be kept apart by {', '.join(blockers[:3])}"
                f"{' ...' if len(blockers) > 3 else ''}; use sft.packing=auto or off (one conversation per row)"
            )
        self.packing = cfg.sft.packing != "off" and not blockers
        pad_id = self.chat_ids[IM_END]
        self.loader = SFTLoader(train_examples, tc.seq_len, global_micro_batch, cfg.data.seed, pad_id,
                                self.packing, self.dist.rank, self.dist.world_size)
        self.pad_id = pad_id
        data_hash = hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()[:16]
        # the trainer's summary reads the data identity from ``shards.manifest`` (pretraining's shard manifest)
        self.shards = types.SimpleNamespace(
            manifest={"corpus_fingerprint": data_hash, "tokenizer_hash": self.tokenizer.fingerprint()}
        )
        self.data_info = {
            "source": cfg.data.source,
            "records": len(records),
            "task_records": len(records) - n_source,
            "data_hash": data_hash,
            "train_conversations": len(train_examples),
            "val_conversations": len(self.val_examples),
            "truncated": train_stats.truncated + val_stats.truncated,
            "dropped": train_stats.dropped + val_stats.dropped,
            "packing": self.packing,
            "packing_blockers": blockers,
            "chat_token_ids": self.chat_ids,
            "new_token_ids": self.new_ids,
        }
        if self.dist.is_main:
            self.tokenizer.save(self.run_dir / "tokenizer.json")
            self.template.save(self.run_dir)
            (self.run_dir / "data.json").write_text(json.dumps(self.data_info, indent=2))
        self.log(
            f"sft data: {len(records)} records{f' ({len(records) - n_source} of task {cfg.data.task.name})' if cfg.data.task else ''} -> {len(train_examples)} train / {len(self.val_examples)} held-out "
            f"conversations ({self.data_info['truncated']} cut at {tc.seq_len} tokens, {self.data_info['dropped']} "
            f"dropped), {'packed' if self.packing else 'one per row'}"
            + (f" (cannot pack: {blockers[0]}{' ...' if len(blockers) > 1 else ''})" if blockers and cfg.sft.packing != "off" else "")
        )

    def build_model(self) -> CausalLM:
        base = CausalLM.from_pretrained(Path(self.cfg.base) / "model")
        expected = self.cfg.model.model_copy(update={"vocab_size": base.config.vocab_size})
        if expected != base.config:
            raise ConfigError(
                f"model: differs from the base run's model ({self.cfg.base}/model/config.yaml) beyond vocab_size; "
                "leave model out of the SFT config to take it from the base run"
            )
        return resize_vocab(base, self.cfg.model.vocab_size, self.new_ids)

    def micro_loss(self, index: int) -> torch.Tensor:
        """Summed cross-entropy of this micro-batch's trained tokens over the step's trained tokens (all
        micro-batches, all processes), times the number of processes (DDP averages their gradients)."""
        if index % self.accum == 0:
            self._step_targets = self.loader.n_targets(range(index, index + self.accum))
        batch = self.loader.batch(index)
        x, y = batch.input_ids.to(self.device), batch.targets.to(self.device)
        documents = batch.document_ids.to(self.device) if batch.document_ids is not None else None
        with self.autocast():
            out = self.train_model(x, y, document_ids=documents)
        n = batch.n_targets
        ce_sum = out.ce_loss * n if n else out.logits.sum() * 0.0  # keeps every rank in the backward
        aux = sum(out.aux_losses.values()) / self.accum if out.aux_losses else 0.0
        return ce_sum * self.dist.world_size / max(self._step_targets, 1) + aux

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean cross-entropy (nats per trained token) over the held-out conversations."""
        if not self.val_examples:
            return {}
        self.model.eval()
        if hasattr(self.optimizer, "eval"):
            self.optimizer.eval()
        nats, tokens = 0.0, 0
        for batch in eval_batches(self.val_examples, max(1, self.loader.batch_size // self.dist.world_size), self.pad_id):
            with self.autocast():
                logits = self.model(batch.input_ids.to(self.device)).logits
            nats += float(torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), batch.targets.to(self.device).flatten(), reduction="sum"
            ))
            tokens += batch.n_targets
        if hasattr(self.optimizer, "train"):
            self.optimizer.train()
        loss = nats / tokens
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_tokens": tokens}

    def setup(self) -> None:
        super().setup()
        epochs = self.cfg.sft.num_train_epochs
        if epochs is not None:
            self.total_steps = self.steps_for_epochs(epochs)
            self.log(f"sft.num_train_epochs={epochs:g}: {self.total_steps} optimizer steps")

    def steps_for_epochs(self, epochs: float) -> int:
        """Optimizer steps that read ``epochs`` passes over the training rows (the last step may run into
        the next epoch)."""
        rows, whole = 0.0, int(epochs)
        for epoch in range(whole):
            rows += len(self.loader.epoch_rows(epoch))
        if epochs > whole:
            rows += (epochs - whole) * len(self.loader.epoch_rows(whole))
        return max(1, math.ceil(rows / (self.loader.batch_size * self.accum)))

    def _summary(self, elapsed: float, last_eval: dict) -> dict:
        return {
            **super()._summary(elapsed, last_eval),
            "stage": "sft",
            "base": self.cfg.base,
            "trained_tokens": self.loader.n_targets(range(self.step * self.accum)),
            "epochs": self.loader.epoch_of(self.step * self.accum),
            **{k: self.data_info[k] for k in ("train_conversations", "val_conversations", "truncated", "dropped",
                                               "packing", "data_hash")},
        }


def sft(cfg: SFTRunConfig | str | Path | dict, overrides: Iterable[str] = (), resume: bool = True,
        console=None, allow_config_change: bool = False) -> RunSummary:
    """Fine-tune ``cfg.base`` on ``cfg.data``; resumes from the run directory's latest checkpoint."""
    if not isinstance(cfg, SFTRunConfig):
        cfg = load_sft_config(cfg, overrides)
    return SFTTrainer(cfg, resume=resume, console=console, allow_config_change=allow_config_change).run()
