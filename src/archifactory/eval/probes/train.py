"""Training one probe run: a model built from the project's :class:`~archifactory.model.config.ModelConfig`
trained from scratch on a task's generated examples with the project's optimizer and schedule components,
evaluated on held-out examples as it trains, stopped early once it reaches the target accuracy, and then
scored on the test examples.

Splits: ``train``, ``valid`` and ``test`` are drawn from three independent streams of one data seed
(:func:`split_rng`), the same for every variant, width, seed and grid point. Only ``valid`` steers
anything (early stopping, the grid's choice); ``test`` is scored once, at the end, and only reported.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from archifactory.eval.probes.tasks import IGNORE_INDEX, ProbeData, ProbeTask
from archifactory.model.config import ModelConfig
from archifactory.model.lm import CausalLM
from archifactory.train.metrics import device_name
from archifactory.train.optim import OptimizerConfig, build_optimizer, set_lr
from archifactory.train.precision import resolve_precision
from archifactory.train.schedule import ScheduleConfig

SPLITS = {"train": 0, "valid": 1, "test": 2}


def split_rng(data_seed: int, task_index: int, split: str) -> np.random.Generator:
    """The generator of one split of one task: independent streams per (seed, task, split)."""
    return np.random.default_rng(np.random.SeedSequence([data_seed, task_index, SPLITS[split]]))


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """(length, dim) sin/cos position codes (Vaswani et al. 2017); MAD's autoencoder decoder uses them."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


class ProbeModel(nn.Module):
    """A :class:`CausalLM` whose loss and accuracy are taken on the given target positions only; for
    compression (``autoencoder``) the trunk's last position feeds MAD's MLP decoder, which predicts every
    token of the row from it and a position code."""

    def __init__(self, config: ModelConfig, autoencoder: bool = False) -> None:
        super().__init__()
        self.lm = CausalLM(config)
        self.autoencoder = autoencoder
        if autoencoder:
            D = config.d_model
            self.decoder = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D), nn.GELU(),
                                         nn.LayerNorm(D), nn.Linear(D, D), nn.GELU())
            self.register_buffer("dec_positions", sinusoidal_positions(config.max_seq_len, D), persistent=False)

    def answer_logits(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``inputs``, ``targets`` (B, T). Returns (logits (K, V), labels (K,), summed auxiliary losses) at
        the K positions where ``targets`` is not -100; the vocabulary projection runs there only."""
        hidden, aux = self.lm.hidden_states(inputs)
        if self.autoencoder:
            T = inputs.shape[1]
            code = hidden[:, -1:, :] + self.dec_positions[:T].to(hidden.dtype)  # (B, T, D)
            hidden = self.decoder(code)
        keep = targets != IGNORE_INDEX
        logits = self.lm.logits(hidden[keep])
        total_aux = sum(aux.values()) if aux else torch.zeros((), device=inputs.device)
        return logits, targets[keep], total_aux


@dataclasses.dataclass
class ProbeSettings:
    """How one probe run trains (the spec's ``train`` section, resolved)."""

    batch_size: int
    max_steps: int
    eval_every: int
    early_stop: float | None
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    grad_clip: float | None
    precision: str
    device: str = "cpu"


@dataclasses.dataclass
class ProbeResult:
    valid_acc: float
    """Accuracy on the validation split (at the end of training)."""
    test_acc: float
    test_loss: float
    steps: int
    examples: int
    stopped_early: bool
    elapsed_s: float
    params: int
    history: list[dict]
    """``{"step", "loss", "valid_acc"}`` at each evaluation."""
    kernel_paths: dict[str, str] = dataclasses.field(default_factory=dict)
    """Layer index -> the kernel path its mixer ran (``torch.sdpa``, ``fla`` ...), as pretraining runs record."""
    device: str = ""
    """The device that trained it (``cpu``, the GPU's name)."""
    precision: str = ""
    """The precision ``settings.precision`` resolved to (``auto`` -> bf16 or fp32)."""


@torch.no_grad()
def accuracy(model: ProbeModel, data: ProbeData, batch_size: int, device: torch.device,
             autocast: Callable) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over every answer position of ``data`` (pooled over examples, as
    Zoology and MAD compute it). Raises ValueError if ``data`` holds no answer position."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for start in range(0, len(data), batch_size):
        x = torch.from_numpy(data.inputs[start:start + batch_size]).to(device)
        y = torch.from_numpy(data.targets[start:start + batch_size]).to(device)
        with autocast():
            logits, labels, _ = model.answer_logits(x, y)
        correct += int((logits.argmax(-1) == labels).sum())
        total += labels.numel()
        loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
    model.train()
    if total == 0:
        raise ValueError("the evaluation examples hold no answer position")
    return correct / total, loss_sum / total


def train_probe(model_config: ModelConfig, task: ProbeTask, data: dict[str, ProbeData], settings: ProbeSettings,
                seed: int, on_eval: Callable[[dict], None] | None = None) -> ProbeResult:
    """Train a fresh model (init seed ``seed``) on ``data["train"]`` for ``settings.max_steps`` optimizer
    steps (batches drawn in a seeded order, epoch after epoch), evaluating on ``data["valid"]`` every
    ``eval_every`` steps and stopping once validation accuracy reaches ``early_stop``; then scores
    ``data["test"]``. ``on_eval`` receives each evaluation record (progress)."""
    device = torch.device(settings.device)
    torch.manual_seed(seed)
    model = ProbeModel(model_config, task.autoencoder).to(device)
    optimizer = build_optimizer(model, settings.optimizer)
    precision = resolve_precision(settings.precision, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)

    train = data["train"]
    order_rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    order = order_rng.permutation(len(train))
    cursor = 0
    history: list[dict] = []
    start = time.perf_counter()
    stopped = False
    step = 0
    running = []
    valid_acc = float("nan")
    while step < settings.max_steps:
        if cursor + settings.batch_size > len(order):  # a new epoch: a fresh order (the last partial batch dropped)
            order, cursor = order_rng.permutation(len(train)), 0
        idx = np.sort(order[cursor:cursor + min(settings.batch_size, len(order))])
        cursor += settings.batch_size
        x = torch.from_numpy(train.inputs[idx]).to(device)
        y = torch.from_numpy(train.train_targets[idx]).to(device)
        set_lr(optimizer, settings.schedule.multiplier(step, settings.max_steps))
        with autocast():
            logits, labels, aux = model.answer_logits(x, y)
            loss = F.cross_entropy(logits.float(), labels) + aux
        loss.backward()
        if settings.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        model.lm.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        running.append(float(loss.detach()))
        step += 1
        if step % settings.eval_every == 0 or step == settings.max_steps:
            valid_acc, _ = accuracy(model, data["valid"], settings.batch_size, device, autocast)
            record = {"step": step, "loss": sum(running) / len(running), "valid_acc": valid_acc,
                      "examples": step * settings.batch_size, "elapsed_s": time.perf_counter() - start}
            running = []
            history.append(record)
            if on_eval is not None:
                on_eval(record)
            if not math.isfinite(record["loss"]):
                break
            if settings.early_stop is not None and valid_acc >= settings.early_stop:
                stopped = step < settings.max_steps
                break
    test_acc, test_loss = accuracy(model, data["test"], settings.batch_size, device, autocast)
    return ProbeResult(valid_acc=valid_acc, test_acc=test_acc, test_loss=test_loss, steps=step,
                       examples=step * settings.batch_size, stopped_early=stopped,
                       elapsed_s=time.perf_counter() - start, params=model.lm.num_params(), history=history,
                       kernel_paths={str(k): v for k, v in model.lm.kernel_paths().items()},
                       device=device_name(device), precision=precision)
