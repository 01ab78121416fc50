"""The training loop: one run, from a :class:`RunConfig` to a run directory.

```
run_dir/
  config.yaml        resolved run config
  tokenizer.json     the tokenizer the run used
  data.json          shard manifest reference (corpus fingerprint, tokenizer hash, token counts)
  metrics.jsonl      one line per logged step and per evaluation
  checkpoints/       step_XXXXXXXX/{model.safetensors, state.pt}, the last N
  model/             final weights (config.yaml + model.safetensors), loadable by CausalLM.from_pretrained
  summary.json       final metrics, costs, environment
```
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from archifactory.config import ConfigError, dump_config, leaf_changes
from archifactory.data.loader import PackedLoader, eval_batches
from archifactory.data.shards import build_shards
from archifactory.errors import UserError
from archifactory.locking import hold_directory
from archifactory.model.lm import CausalLM
from archifactory.results import RunSummary
from archifactory.train import checkpoint as ckpt
from archifactory.train.config import RunConfig
from archifactory.train.distributed import all_reduce_mean, barrier, init_distributed, shutdown
from archifactory.train.metrics import MetricsWriter, device_name, device_peak_flops, peak_memory_bytes
from archifactory.train.optim import averages_weights, build_optimizer, evaluation_weights, set_lr
from archifactory.train.precision import AUTOCAST_DTYPES, has_native_bf16, resolve_precision
from archifactory.train.schedule import lr_multiplier


class NonFiniteLossError(UserError, RuntimeError):
    """The loss, the gradients or the weights became NaN or infinite; the run stopped before using
    them, and its checkpoints (all finite) are kept. A user error: the message says which settings to
    change (the command line prints it as one line)."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("ARCHIFACTORY_CACHE", Path.home() / ".cache" / "archifactory"))


def prepare_data(cfg: RunConfig, log=print):
    """Tokenizer and shards for ``cfg`` (trained/built once, then read from the cache)."""
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    start = time.time()
    tokenizer = cfg.data.tokenizer.load_or_train(cfg.data.corpus, cache_dir, cfg.model.vocab_size)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}); set model.vocab_size >= {tokenizer.vocab_size}"
        )
    shards = build_shards(cfg.data.corpus, tokenizer, cache_dir)
    splits = shards.manifest["splits"]
    log(
        f"data: {cfg.data.corpus.kind} -> {splits['train']['tokens']:,} train / {splits['val']['tokens']:,} val tokens, "
        f"tokenizer {tokenizer.name} ({tokenizer.vocab_size}), {time.time() - start:.1f}s"
    )
    return tokenizer, shards


RESUME_FIXED = ("model", "data", "train.seq_len", "train.batch_size", "optimizer.name")
"""Config fields a resumed run may not change: they define the token stream (``data``, ``seq_len``,
``batch_size``), what the weights mean (``model``) and what the optimizer state means (``optimizer.name``).
A checkpoint trained under other values would silently continue as a different experiment."""
RESUME_FREE = ("data.cache_dir",)
"""Fields under :data:`RESUME_FIXED` that do not change the run (where the cache lives)."""


def fixed_changes(old: dict, new: dict) -> list[str]:
    """``field: old -> new`` for each change between two config dumps that a resumed run may not make."""
    changed = _changed_fields(old, new)
    out = []
    for line in changed:
        path = line.split(":", 1)[0]
        fixed = any(path == f or path.startswith(f + ".") for f in RESUME_FIXED)
        free = any(path == f or path.startswith(f + ".") for f in RESUME_FREE)
        if fixed and not free:
            out.append(line)
    return out


class ResumeConfigError(ConfigError):
    """Resuming would change what the run's checkpoints were trained with (see :data:`RESUME_FIXED`)."""


class PastBudgetError(ConfigError):
    """The checkpoint to resume from is past the run's budget: nothing to train, and its weights are not
    those of a run of that budget."""


def _steps(n: int) -> str:
    return f"{n} step{'' if n == 1 else 's'}"


def reads_as_json_object(path: Path) -> bool:
    """Whether ``path`` holds a JSON object (``data.json`` has no checksum: damage shows as unreadable)."""
    try:
        return isinstance(json.loads(path.read_bytes()), dict)
    except (OSError, ValueError):  # missing, bad bytes or not JSON
        return False


class Trainer:
    SETUP_FILES: dict[str, Callable[[Path], bool] | None] = {"tokenizer.json": None, "data.json": reads_as_json_object}
    """The files :meth:`setup` writes in the run directory, each with the check that it reads (``None``: its
    checksum suffices): a finished run with one missing, not matching its checksum or not reading is
    prepared again, which writes them, instead of returning at once."""

    def __init__(self, cfg: RunConfig, resume: bool = True, console=None, allow_config_change: bool = False) -> None:
        self.cfg = cfg
        self.resume = resume
        self.console = console
        self.allow_config_change = allow_config_change

    def log(self, message: str) -> None:
        if self.dist.is_main:
            if self.console is not None:
                self.console.print(message, highlight=False, soft_wrap=True)  # one physical line per message
            else:
                print(message, flush=True)

    # ------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        cfg, tc = self.cfg, self.cfg.train
        self.dist, self.device = init_distributed(tc.device)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.run_dir = cfg.run_dir()
        self.finished: RunSummary | None = None
        if self.resume:
            # a finished run is known as such early only by its readable config.yaml; a missing or damaged
            # one is written again below, and the checkpoint's own record of its config decides in _load
            self.finished = self._already_finished() if self._check_resumable() else None
            if self.finished is not None:
                return  # nothing to prepare, write or train
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.yaml")
        world = self.dist.world_size
        micro = tc.micro_batch_size or tc.batch_size // world
        if tc.batch_size % (micro * world):
            raise ConfigError(
                f"train.batch_size={tc.batch_size} is not a multiple of micro_batch_size ({micro}) x processes ({world})"
            )
        self.accum = tc.batch_size // (micro * world)
        self.setup_data(micro * world)
        torch.manual_seed(tc.seed)
        self.model = self.build_model().to(self.device)
        self.fsdp = self.dist.enabled and tc.parallel == "fsdp"
        self.train_model = self.model
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in self.model.blocks:
                fully_shard(block)
            fully_shard(self.model)
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # No buffer broadcast: buffers are constants (RoPE, ALiBi tables) or kept equal on every rank by
            # `after_optimizer_step` (MoE routing bias); rank 0's would overwrite the others' step loads.
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        if tc.compile:
            self.train_model = torch.compile(self.train_model)
        self.precision = resolve_precision(tc.precision, self.device)
        if self.precision == "bf16" and not has_native_bf16(self.device):
            self.log(f"note: train.precision=bf16 on {device_name(self.device)}, which has no native bf16: "
                     "it is emulated and usually slower than fp32 (precision=auto picks fp32 here)")
        self.autocast_dtype = AUTOCAST_DTYPES[self.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if tc.max_steps is not None:
            self.total_steps = tc.max_steps
        elif tc.max_tokens is not None:
            self.total_steps = math.ceil(tc.max_tokens / tc.tokens_per_step())
        else:
            self.total_steps = None  # wall-time budget
        self.flops_per_token = self.model.flops_per_token(tc.seq_len, training=True)
        self.peak_flops = device_peak_flops(self.device)
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", tc.loggers, self.run_dir,
                                     cfg.model_dump(mode="json"), enabled=self.dist.is_main)
        self.step, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        self.skipped_steps, self.consecutive_skips = 0, 0
        self.resumed_from: tuple[Path, int] | None = None  # (checkpoint, its step) when resumed
        if self.resume:
            self._resume()
        elif self.dist.is_main:
            self._remove_earlier_checkpoints()
        resumed_at = None if self.resumed_from is None else self.resumed_from[1]
        dropped = self.metrics.keep_through(resumed_at)
        if dropped:
            self.log(f"metrics.jsonl: dropped {dropped} line(s) of the steps this run trains again "
                     f"(after step {resumed_at})" if resumed_at is not None else
                     f"metrics.jsonl: dropped {dropped} line(s) of an earlier start of this run (it starts over)")

    def _remove_earlier_checkpoints(self) -> None:
        """A run started over (``--fresh``) removes the checkpoints of its earlier start: left in place, those
        past its new progress would be kept over its own when old checkpoints are pruned, and a later resume
        would continue (or call finished) the earlier run instead of this one. It removes the earlier start's
        ``summary.json`` too: the new start stopped after its last checkpoint (a kill during its final
        evaluation) would otherwise be called finished with the earlier start's summary and ``model/``."""
        import shutil

        earlier = ckpt.checkpoint_dirs(self.run_dir)
        for path in earlier:
            shutil.rmtree(path)
        summary = self.run_dir / "summary.json"
        if summary.is_file():
            summary.unlink()
        if earlier:
            self.log(f"checkpoints: removed {len(earlier)} of an earlier start of this run "
                     f"({', '.join(p.name for p in earlier)}; it starts over)")

    def setup_data(self, global_micro_batch: int) -> None:
        """Tokenizer, training loader and validation data (a hook: post-training stages read other data)."""
        cfg, tc = self.cfg, self.cfg.train
        # rank 0 trains the tokenizer and writes shards; the others then read them from the cache
        if self.dist.is_main:
            self.tokenizer, self.shards = prepare_data(cfg, self.log)
        barrier(self.dist)
        if not self.dist.is_main:
            self.tokenizer, self.shards = prepare_data(cfg, lambda *_: None)
        if self.dist.is_main:
            self.tokenizer.save(self.run_dir / "tokenizer.json")
            (self.run_dir / "data.json").write_text(json.dumps(
                {"shards": str(self.shards.directory), **{k: v for k, v in self.shards.manifest.items() if k != "corpus"}},
                indent=2,
            ))
        self.loader = PackedLoader(self.shards.tokens("train"), tc.seq_len, global_micro_batch, cfg.data.seed,
                                   self.dist.rank, self.dist.world_size)
        self.val_tokens = self.shards.tokens("val")
        self.val_bytes = self.shards.token_bytes("val")
        self._check_validation_split()

    def build_model(self) -> CausalLM:
        """The model to train, on CPU (a hook: post-training stages start from a trained one), with the
        parts ``model.pretrained`` names copied from their Hugging Face model."""
        model = self.cfg.model.build()
        if self.cfg.model.pretrained is not None:
            from archifactory.model.hf import load_pretrained_modules

            load_pretrained_modules(model)
        return model

    def _check_validation_split(self) -> None:
        """Evaluation needs a validation split with text in it; one shorter than a window is evaluated as
        one shorter window (see :func:`eval_batches`)."""
        tc, n = self.cfg.train, len(self.val_tokens)
        n_bytes = self.shards.manifest["splits"]["val"]["bytes"]
        if n < 2 or n_bytes == 0:
            raise ConfigError(
                f"data: the validation split has {n} tokens ({n_bytes} bytes of text); evaluation needs at least 2 "
                f"tokens of text (seq_len={tc.seq_len}). Set data.corpus.val_fraction above "
                f"{self.cfg.data.corpus.val_fraction} or use a corpus with more documents"
            )
        if n - 1 < tc.seq_len:
            self.log(f"note: the validation split has {n:,} tokens, fewer than one window of seq_len={tc.seq_len} + 1: "
                     f"it is evaluated as one window of {n - 1} targets")

    def _refuse_changes(self, old: dict, where: str) -> None:
        changes = fixed_changes(old, self.cfg.model_dump(mode="json"))
        if not changes:
            return
        if self.allow_config_change:
            self.log(f"warning: resuming {where} with a changed setup (--allow-config-change): {'; '.join(changes[:8])}")
            return
        raise ResumeConfigError(
            f"{where} was trained with another setup: {'; '.join(changes[:4])}"
            + (f" (and {len(changes) - 4} more)" if len(changes) > 4 else "")
            + "; these fields may not change when resuming (the token stream, batch or model would differ). "
            "Give the run a new directory (another name or out_dir), start over with --fresh, or pass "
            "--allow-config-change to mix the two setups on purpose"
        )

    def _check_resumable(self) -> bool:
        """Before anything is written: refuse to resume a run whose checkpoints were trained under other
        :data:`RESUME_FIXED` values (from the run's config.yaml; each checkpoint is checked again when
        loaded). Returns whether there are checkpoints and config.yaml was read (and agrees)."""
        from archifactory.config import load_yaml

        checkpoints = ckpt.checkpoint_dirs(self.run_dir)
        budget = self._step_budget()
        if checkpoints and budget is not None and ckpt.checkpoint_step(checkpoints[-1]) > budget:
            self._refuse_past_budget(checkpoints[-1], ckpt.checkpoint_step(checkpoints[-1]), budget)
        path = self.run_dir / "config.yaml"
        if not checkpoints:
            return False
        try:
            old = load_yaml(path) if path.is_file() else None
        except ConfigError:
            old = None
        if old is None:  # missing or unreadable: the newest intact checkpoint's own record of its config
            recorded = self._checkpoint_config(checkpoints)
            if recorded is not None:
                self._refuse_changes(recorded[1], f"checkpoint {recorded[0]}")
            return False
        self._refuse_changes(old, f"run {self.run_dir}")
        return True

    @staticmethod
    def _checkpoint_config(checkpoints: list[Path]) -> tuple[Path, dict] | None:
        """The newest intact checkpoint and the config it records, if any does."""
        for path in reversed(checkpoints):
            if ckpt.verify_checkpoint(path):
                continue
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
            return (path, json.loads(state["config_json"])) if "config_json" in state else None
        return None

    def _step_budget(self) -> int | None:
        """The run's budget in steps (``None`` for a wall-time budget)."""
        tc = self.cfg.train
        if tc.max_steps is not None:
            return tc.max_steps
        return math.ceil(tc.max_tokens / tc.tokens_per_step()) if tc.max_tokens is not None else None

    def _already_finished(self) -> RunSummary | None:
        """The summary of a run that has nothing left to do, found before its data is prepared or any file
        written: its newest checkpoint is at the step budget and its summary and final model are written
        and intact, as is that checkpoint (a damaged one is trained again from the one before it). ``None``
        otherwise (:meth:`_finished` then decides after the checkpoint is loaded)."""
        budget, checkpoints = self._step_budget(), ckpt.checkpoint_dirs(self.run_dir)
        if budget is None or not checkpoints or ckpt.checkpoint_step(checkpoints[-1]) != budget:
            return None
        if not self._setup_files_intact():
            return None  # setup writes them again (the advice for a damaged file names this command)
        if ckpt.verify_checkpoint(checkpoints[-1]):
            return None
        summary = self._final_summary(budget)
        if summary is not None:
            self.log(f"already at step {budget} of {self.budget_text(budget)}: nothing to train ({self.run_dir}; "
                     "raise the budget to train further)")
        return summary

    def _setup_files_intact(self) -> bool:
        """Whether every file in :attr:`SETUP_FILES` is there, matches its checksum (when it has one) and
        passes its reading check."""
        from archifactory.integrity import verify_sidecar

        return all(path.is_file() and not verify_sidecar(path) and (reads is None or reads(path))
                   for name, reads in self.SETUP_FILES.items() for path in [self.run_dir / name])

    def _final_summary(self, step: int) -> RunSummary | None:
        """The run's summary when it is for ``step`` and the final model is intact, else ``None``."""
        from archifactory.integrity import verify_checksums

        try:
            summary = RunSummary.model_validate_json((self.run_dir / "summary.json").read_bytes())
        except (OSError, ValueError):  # missing, damaged or not a summary (pydantic's error is a ValueError)
            return None
        intact = verify_checksums(self.run_dir / "model", required=("config.yaml", "model.safetensors")) == []
        return summary if summary.steps == step and intact else None

    def budget_text(self, total: int | None = None) -> str:
        """The run's step budget as the config states it: ``max_steps 8``, ``max_tokens 4,096 (8 steps)``."""
        tc, total = self.cfg.train, self.total_steps if total is None else total
        if tc.max_steps is not None and tc.max_steps == total:
            return f"max_steps {total}"
        if tc.max_tokens is not None:
            return f"max_tokens {tc.max_tokens:,} ({_steps(total)})"
        return _steps(total)

    def _refuse_past_budget(self, path: Path, step: int, total: int) -> None:
        raise PastBudgetError(
            f"checkpoint {path} is at step {step}, past the run's budget of {self.budget_text(total)}: nothing to "
            f"train, and its weights are not those of a {total}-step run. Raise the budget to at least {step} steps "
            f"to continue it, or train {_steps(total)} in another directory (another name or out_dir) or over this "
            "one with --fresh"
        )

    def _finished(self) -> RunSummary | None:
        """When a resumed run has nothing left to train: its summary if its final evaluation and model are
        written and intact (the caller then stops), else ``None`` (the caller writes them). Raises
        :class:`PastBudgetError` when the checkpoint is past the budget."""
        tc = self.cfg.train
        if self.total_steps is not None:
            if self.step > self.total_steps:
                self._refuse_past_budget(self.resumed_from[0], self.step, self.total_steps)
            if self.step < self.total_steps:
                return None
            where = f"step {self.step} of {self.budget_text()}"
        elif self.elapsed_before >= tc.max_time_s:
            where = f"{self.elapsed_before:.0f}s of max_time_s {tc.max_time_s:g}"
        else:
            return None
        summary = self._final_summary(self.step)
        if summary is not None:
            self.log(f"already at {where}: nothing to train ({self.run_dir}; raise the budget to train further)")
            return summary
        self.log(f"already at {where}: nothing to train; writing the final evaluation and model the run had not "
                 "written (or that were damaged)")
        return None

    def _resume(self) -> None:
        """Resume from the newest intact checkpoint; a damaged one is reported and passed over."""
        damaged = []
        for path in reversed(ckpt.checkpoint_dirs(self.run_dir)):
            try:
                self._load(path)
            except ckpt.CheckpointError as err:
                self.log(f"warning: {err}; trying the checkpoint before it")
                damaged.append(path.name)
                continue
            if damaged:
                self.log(f"warning: passed over damaged checkpoint(s) {', '.join(damaged)}; they are "
                         "replaced as training reaches their steps again")
            return
        if damaged:
            raise ckpt.CheckpointError(
                f"no intact checkpoint in {self.run_dir / 'checkpoints'} (damaged: {', '.join(damaged)}); "
                "delete that folder or pass --fresh to start the run over"
            )

    def _load(self, path: Path) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            whole = self.cfg.model.build()
            state = ckpt.load_checkpoint(path, whole, "cpu")
            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, whole.state_dict(), options=options)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        else:
            state = ckpt.load_checkpoint(path, self.model, self.device)
            ckpt.load_optimizer_state(self.optimizer, state["optimizer"])
        if averages_weights(self.optimizer):
            # The checkpoint holds the evaluated (averaged) weights, saved in the optimizer's eval mode;
            # back to the training weights by the very operation the uninterrupted run did after saving.
            self.optimizer.train()
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens"])
        self.resumed_from = (path, self.step)
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if "config_json" in state:
            old = json.loads(state["config_json"])
            self._refuse_changes(old, f"checkpoint {path}")
            changed = _changed_fields(old, self.cfg.model_dump(mode="json"))
            if changed:
                self.log(f"note: resuming {path} with a changed config: {'; '.join(changed[:8])}")
        self.elapsed_before = float(state["elapsed"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if self.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)
        self.log(f"resumed from {path} at step {self.step}")

    # --------------------------------------------------------------------------------------- the loop

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def progress_fraction(self, elapsed: float) -> tuple[float, float]:
        """(step position, total) for the schedule: steps, or elapsed time for a time budget."""
        tc = self.cfg.train
        if self.total_steps is not None:
            return self.step, self.total_steps
        return elapsed / tc.max_time_s * 1000.0, 1000.0

    def done(self, elapsed: float) -> bool:
        tc = self.cfg.train
        if self.total_steps is not None and self.step >= self.total_steps:
            return True
        return tc.max_time_s is not None and elapsed >= tc.max_time_s

    def train_step(self) -> tuple[float, float, bool]:
        """One optimizer step (with accumulation); returns (mean loss, grad norm, applied). A step whose
        loss or gradient norm is NaN or infinite is not applied: weights and optimizer state stay as
        they were (under fp16 the gradient scaler still lowers its scale)."""
        tc = self.cfg.train
        self.train_model.train()
        total = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            with self._gradient_sync(micro == self.accum - 1):
                loss = self.micro_loss(self.step * self.accum + micro)
                self.scaler.scale(loss).backward()
            total += loss.detach()
        total = all_reduce_mean(total, self.dist)
        self.scaler.unscale_(self.optimizer)
        if tc.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in self.model.parameters() if p.grad is not None])
            )
        # every process holds the same reduced loss and norm, so all take the same decision
        loss, norm = float(total), float(grad_norm)
        applied = math.isfinite(loss) and math.isfinite(norm)
        if applied:
            self.scaler.step(self.optimizer)
        self.scaler.update()  # no-op without fp16; after an overflow it lowers the scale
        # once per step: MoE bias balancing from the whole step's loads (discarded if the step was skipped)
        self.model.after_optimizer_step(applied)
        self.optimizer.zero_grad(set_to_none=True)
        return loss, norm, applied

    def micro_loss(self, index: int) -> torch.Tensor:
        """Loss of global micro-batch ``index``, scaled so that a step's micro-batch losses sum to the step's
        loss (a hook: SFT weighs micro-batches by their trained tokens)."""
        x, y = self.loader.batch(index)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with self.autocast():
            out = self.train_model(x, y)
        return out.loss / self.accum

    def _gradient_sync(self, sync: bool):
        """Skip the gradient all-reduce on accumulation micro-steps before the last."""
        if not self.dist.enabled or sync:
            if self.fsdp:
                self.model.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.fsdp:
            self.model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.train_model.no_sync()

    def _nonfinite_step(self, loss: float, grad_norm: float, lr: float, elapsed: float) -> None:
        """Step ``self.step`` was not applied (non-finite loss or gradient): record it in metrics.jsonl,
        then skip it or stop the run, as ``train.nonfinite`` says."""
        tc = self.cfg.train
        self.skipped_steps += 1
        self.consecutive_skips += 1
        what = f"loss became {loss}" if not math.isfinite(loss) else f"gradient norm became {grad_norm}"
        scaler_overflow = self.scaler.is_enabled() and math.isfinite(loss)  # fp16: the scaler's own signal
        stop = (tc.nonfinite == "stop" and not scaler_overflow) or self.consecutive_skips >= tc.max_consecutive_skips
        if not stop and not math.isfinite(loss):
            bad = ckpt.nonfinite_tensors(dict(self.model.named_parameters()))
            if self._anywhere(bad):  # skipping cannot help once the weights themselves are non-finite
                what += f" and the weights are non-finite ({', '.join(bad[:3]) or 'on another process'})"
                stop = True
        self.metrics.write({"kind": "nonfinite", "step": self.step, "tokens": self.tokens_seen, "loss": loss,
                            "grad_norm": grad_norm, "lr": lr, "elapsed_s": elapsed,
                            "action": "stopped" if stop else "skipped", "skipped_steps": self.skipped_steps},
                           replace=True)  # kept over a resume (why it restarted): met again, one line
        if not stop:
            self.log(f"warning: step {self.step}: {what}; update skipped ({self.consecutive_skips} in a row, "
                     f"{self.skipped_steps} in all; the run stops after {tc.max_consecutive_skips} in a row)")
            return
        what += ", so the update was not applied"
        if self.consecutive_skips > 1:
            what += f" ({self.consecutive_skips} steps in a row)"
        raise NonFiniteLossError(self._nonfinite_message(what, lr))

    def _nonfinite_message(self, what: str, lr: float) -> str:
        """One line: what went wrong at which step (as numbered in metrics.jsonl), which checkpoint is
        good, and advice that fits this run's settings and precision."""
        tc = self.cfg.train
        last = ckpt.latest_checkpoint(self.run_dir)  # written only after a finiteness check
        kept = (f"the last good checkpoint is {last} (step {ckpt.checkpoint_step(last)}), which a rerun resumes from"
                if last else "no checkpoint had been written yet")
        advice = [f"lower optimizer.lr (the rate at this step was {lr:.3g})"]
        advice.append("turn on gradient clipping (train.grad_clip=1.0)" if tc.grad_clip is None
                      else f"lower train.grad_clip (now {tc.grad_clip:g})")
        advice.append("lengthen the warmup (schedule.warmup_steps)")
        if self.scaler.is_enabled():
            advice.append("use precision=bf16 on hardware that has it (fp16 overflows above 65504)")
        if tc.nonfinite == "stop":
            advice.append("set train.nonfinite=skip to drop such steps")
        if self.resumed_from is not None and self.step == self.resumed_from[1] + 1:
            # the very first step from that checkpoint failed: finite weights, but already diverged
            path = self.resumed_from[0]
            earlier = [p for p in ckpt.checkpoint_dirs(self.run_dir) if p.name < path.name]
            back = (f"delete {path} to resume from {earlier[-1].name}" if earlier else "start over with --fresh")
            kept = (f"the checkpoint it resumed from, {path}, holds finite weights that have already diverged "
                    f"(its first step fails again); {back}")
        return (f"step {self.step} of run {self.run_dir} (as numbered in metrics.jsonl): {what}; training stopped "
                f"and {kept}. To continue: {', '.join(advice[:-1])}, or {advice[-1]}.")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (nats/token), perplexity and bits per byte over the validation split's first
        ``eval_tokens`` targets (all of a shorter split, its final partial window included)."""
        tc = self.cfg.train
        self.model.eval()
        if hasattr(self.optimizer, "eval"):
            self.optimizer.eval()  # schedule-free optimizers evaluate at their averaged weights (also saved)
        nats, tokens, nbytes = 0.0, 0, 0
        micro = max(1, self.loader.batch_size // self.dist.world_size)
        for x, y, target_bytes in eval_batches(self.val_tokens, self.val_bytes, tc.seq_len, micro, tc.eval_tokens):
            x, y = x.to(self.device), y.to(self.device)
            with self.autocast():
                logits = self.model(x).logits
            nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            nats += float(nll)
            tokens += y.numel()
            nbytes += int(target_bytes.sum())
        if hasattr(self.optimizer, "train"):
            self.optimizer.train()
        loss = nats / tokens
        # bits per byte: the scored targets' nats over the UTF-8 bytes of the text they cover (their spans)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_bpb": nats / math.log(2) / max(nbytes, 1)}

    def full_model(self) -> CausalLM:
        """The model with whole (unsharded) weights on rank 0: the model itself unless FSDP shards it.
        Every rank must call it (FSDP gathers collectively)."""
        if not self.fsdp:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.dist.is_main:
            return self.model
        whole = self.cfg.model.build()
        whole.load_state_dict(state)
        return whole

    def optimizer_state(self) -> dict:
        if not self.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def _anywhere(self, bad: list[str]) -> bool:
        """Whether any process found something (FSDP ranks check different shards)."""
        return float(all_reduce_mean(torch.tensor(float(len(bad)), device=self.device), self.dist)) > 0

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if any weight or optimizer state is NaN or infinite (on
        any process), so that nothing non-finite is ever saved."""
        bad = ckpt.nonfinite_tensors(dict(self.model.state_dict()))
        bad += ckpt.nonfinite_tensors([s for s in self.optimizer.state.values()], "optimizer state ")
        if self._anywhere(bad):
            where = ", ".join(bad[:3]) or "on another process"
            raise NonFiniteLossError(self._nonfinite_message(
                f"weights or optimizer state became NaN or infinite ({where}); nothing was saved", self.optimizer.param_groups[0]["lr"]))

    def save(self, elapsed: float) -> None:
        """Checkpoint the evaluated weights (a schedule-free optimizer's average, with its state in eval
        mode, from which :meth:`_resume` returns to the training weights exactly)."""
        self.check_finite()
        with evaluation_weights(self.optimizer):
            self._save(elapsed)

    def _save(self, elapsed: float) -> None:
        model, optimizer_state = self.full_model(), self.optimizer_state()
        if not self.dist.is_main:
            barrier(self.dist)
            return
        state: dict[str, Any] = {
            "step": self.step,
            "tokens": self.tokens_seen,
            "elapsed": elapsed,
            "optimizer": optimizer_state,
            "rng_cpu": torch.get_rng_state(),
            "skipped_steps": self.skipped_steps,
            "config_json": json.dumps(self.cfg.model_dump(mode="json"), sort_keys=True),
        }
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        ckpt.save_checkpoint(self.run_dir, self.step, model, state, self.cfg.train.keep_checkpoints)
        barrier(self.dist)

    def run(self) -> RunSummary:
        """Train to the budget; returns the run's summary (also written to ``summary.json``). The main process holds the run directory's lock throughout, so a second
        trainer on the same directory refuses at once (:class:`DirectoryBusyError`)."""
        held = contextlib.ExitStack()
        if int(os.environ.get("RANK", "0")) == 0:
            held.enter_context(hold_directory(self.cfg.run_dir(), ".train.lock", "run directory",
                                              "wait for that run to finish or choose another out_dir"))
        with held:
            self.setup()
            try:
                return self.finished if self.finished is not None else self._loop()
            finally:
                if self.finished is None:
                    self.metrics.close()
                shutdown(self.dist)

    def _loop(self) -> RunSummary:
        tc = self.cfg.train
        n_params = self.model.num_params()
        self.log(
            f"model: {n_params:,} parameters, {self.flops_per_token / 1e6:.1f} MFLOPs/token (train), "
            f"device {device_name(self.device)}, {self.dist.world_size} process(es), accumulation {self.accum}, "
            f"precision {self.precision}" + (" (auto)" if self.cfg.train.precision == "auto" else "")
        )
        if self.resumed_from is not None:
            summary = self._finished()
            if summary is not None:
                return summary
        if self.step == 0 and self.tokens_seen == 0:
            self.metrics.write({"kind": "eval", "step": 0, "tokens": 0, **self.evaluate()})
        start, first_step = time.time(), self.step
        window_start, window_tokens = time.time(), 0
        last_eval: dict[str, float] = {}
        # no bar when nothing is left to train (a resumed run that only writes its final model)
        progress = self._progress(enabled=not self.done(self.elapsed_before))
        with progress:
            resumed_at = self.step if self.total_steps else int(self.elapsed_before)
            task = progress.add_task("train", total=self.total_steps or int(tc.max_time_s), completed=resumed_at,
                                     loss="-", tps="-")  # "-" until the first step is logged
            while not self.done(self.elapsed_before + time.time() - start):
                elapsed = self.elapsed_before + time.time() - start
                position, total = self.progress_fraction(elapsed)
                lr = set_lr(self.optimizer, lr_multiplier(self.cfg.schedule, position, total))
                loss, grad_norm, applied = self.train_step()
                self.step += 1
                self.tokens_seen += tc.tokens_per_step()
                window_tokens += tc.tokens_per_step()
                if applied:
                    self.consecutive_skips = 0
                else:
                    self._nonfinite_step(loss, grad_norm, lr, self.elapsed_before + time.time() - start)
                if applied and (self.step % tc.log_every == 0 or self.step == 1):
                    now = time.time()
                    tps = window_tokens / max(now - window_start, 1e-9)
                    window_start, window_tokens = now, 0
                    record = {
                        "kind": "train", "step": self.step, "tokens": self.tokens_seen, "loss": loss, "lr": lr,
                        "grad_norm": grad_norm, "tokens_per_s": tps,
                        "mfu": tps * self.flops_per_token / self.peak_flops if self.peak_flops else None,
                        "peak_mem_bytes": peak_memory_bytes(self.device),
                        "elapsed_s": self.elapsed_before + now - start,
                    }
                    self.metrics.write(record)
                    progress.update(task, loss=f"{loss:.4f}", tps=f"{tps:,.0f}")
                advance = self.step if self.total_steps else int(self.elapsed_before + time.time() - start)
                progress.update(task, completed=advance)
                elapsed = self.elapsed_before + time.time() - start
                if self.step % tc.eval_every == 0:
                    last_eval = self.evaluate()
                    self.metrics.write({"kind": "eval", "step": self.step, "tokens": self.tokens_seen,
                                        "elapsed_s": elapsed, **last_eval})
                if self.step % tc.checkpoint_every == 0:
                    self.save(elapsed)
        elapsed = self.elapsed_before + time.time() - start
        if self.step % tc.eval_every != 0 or not last_eval:
            last_eval = self.evaluate()
            # a run resumed at its last step evaluates it again: one line per step in metrics.jsonl
            self.metrics.write({"kind": "eval", "step": self.step, "tokens": self.tokens_seen, "elapsed_s": elapsed,
                                **last_eval}, replace=self.step == first_step)
        if self.step % tc.checkpoint_every != 0 and self.step > first_step:  # else it is the one resumed from
            self.save(elapsed)
        summary = RunSummary.model_validate(self._summary(elapsed, last_eval))
        with evaluation_weights(self.optimizer):  # the weights the final evaluation scored
            final = self.full_model()
            if self.dist.is_main:
                final.save_pretrained(self.run_dir / "model")
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(summary.to_json())
            if "val_loss" in last_eval or not last_eval:  # SFT: per trained token, no bits/byte
                figures = f"val loss {last_eval.get('val_loss', float('nan')):.4f}" + (
                    f", {last_eval['val_bpb']:.4f} bits/byte" if "val_bpb" in last_eval else "")
            else:  # GRPO: exact match
                figures = ", ".join(f"{name} {value:.4f}" for name, value in last_eval.items())
            self.log(f"done: step {self.step}, {self.tokens_seen:,} tokens, {figures}, {elapsed:.0f}s -> {self.run_dir}")
        return summary

    def _summary(self, elapsed: float, last_eval: dict) -> dict:
        """The summary's keys (:class:`RunSummary`'s fields; a post-training trainer adds its own)."""
        tc = self.cfg.train
        return {
            "name": self.cfg.name,
            "steps": self.step,
            "skipped_steps": self.skipped_steps,
            "tokens": self.tokens_seen,
            "elapsed_s": elapsed,
            "tokens_per_s": self.tokens_seen / max(elapsed, 1e-9),
            **last_eval,
            "params": self.model.num_params(),
            "active_params": self.model.active_params(),
            "flops_per_token_train": self.flops_per_token,
            "state_bytes": self.model.state_bytes(tc.seq_len),
            "peak_mem_bytes": peak_memory_bytes(self.device),
            "kernel_paths": {str(k): v for k, v in self.model.kernel_paths().items()},
            "stream_hash": self.loader.stream_hash(self.step * self.accum),  # every micro-batch read
            "corpus_fingerprint": self.shards.manifest["corpus_fingerprint"],
            "tokenizer_hash": self.shards.manifest["tokenizer_hash"],
            "device": device_name(self.device),
            "precision": self.precision,  # as resolved (``train.precision: auto`` -> bf16 or fp32)
            "world_size": self.dist.world_size,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
        }

    def _progress(self, enabled: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        enabled = enabled and self.cfg.train.progress and self.dist.is_main
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
            disable=not enabled,
            console=self.console,
        )


def _changed_fields(old: dict, new: dict) -> list[str]:
    """``a.b: old -> new`` for every leaf that differs between two config dumps."""
    return [f"{field}: {before!r} -> {after!r}" for field, before, after in leaf_changes(old, new)]


def train(cfg: RunConfig, resume: bool = True, console=None, allow_config_change: bool = False) -> RunSummary:
    """Train ``cfg`` to its budget; resumes from the run directory's latest checkpoint when present.

    Raises:
        ResumeConfigError: resuming would change a :data:`RESUME_FIXED` field (unless ``allow_config_change``).
        PastBudgetError: the newest checkpoint is past the budget (a finished run at its budget returns its
            summary at once, saying there is nothing to train).
        NonFiniteLossError: the loss, gradients or weights became non-finite (see ``train.nonfinite``).
    """
    return Trainer(cfg, resume=resume, console=console, allow_config_change=allow_config_change).run()
