"""GRPO on verifiable tasks, from an SFT run: a run config with ``stage: grpo``.

Each optimizer step draws ``batch_size / num_generations`` prompts from the task (a pure function of the
step, so resume is exact), renders each with the SFT run's chat template, samples ``num_generations``
completions per prompt with the model's cached ``generate`` (stopping at ``<|im_end|>``), rewards them
(1 for a correct final answer, plus ``format_reward`` when one can be read at all), normalises the rewards
within each group and takes the clipped GRPO loss (:mod:`archifactory.posttrain.grpo_loss`). The
completion mask covers the completion up to and including its ``<|im_end|>``, as TRL's.

**Several updates per rollout** (``grpo.num_iterations``, TRL's name; mu in the GRPO paper): a step whose
index is a multiple of mu samples a new generation batch and records its log-probabilities under the
sampling weights (``old_logprobs``); the next mu - 1 steps take the loss on the same completions, so the
ratio ``exp(logp - old_logp)`` moves away from 1 and the clip binds. With mu = 1 (TRL's default) the old
log-probabilities are the current ones, detached, and the ratio is 1. Checkpoints fall on generation
boundaries (``train.checkpoint_every`` a multiple of mu), so a resumed run samples what the uninterrupted
one would have.

Differences from TRL's ``GRPOTrainer``: the validation metric is greedy exact-match accuracy on held-out
problems (``eval_accuracy``), and with ``grpo.eval_samples`` also their sampled pass@1 (``eval_pass_at_1``),
not a loss; TRL's ``steps_per_generation`` (one generation batch split over
several steps) is not offered: a generation batch is one step's ``train.batch_size`` completions.

```
grpo_run_dir/  config.yaml, tokenizer.json, chat_template.jinja (copied from the SFT run), metrics.jsonl
               (kind "grpo": reward, reward_std, frac_reward_zero_std, pass_rate, completion_length, kl,
               clip_fraction per step;
               kind "eval": eval_accuracy, and eval_pass_at_1 with grpo.eval_samples > 0),
               checkpoints/, model/, summary.json
```
"""

from __future__ import annotations

import copy
import hashlib
import types
from pathlib import Path
from typing import Iterable, Literal

import torch
from pydantic import Field, model_validator

from archifactory.config import (
    MAX_AUX_LOSS_WEIGHT,
    MAX_COUNT,
    MAX_SEQ_LEN,
    MAX_TEMPERATURE,
    ConfigError,
    Strict,
    component_field,
    load_yaml,
    validate,
)
from archifactory.data.tokenizer import Tokenizer
from archifactory.errors import InputError
from archifactory.integrity import CorruptFileError
from archifactory.model.lm import IGNORE_INDEX, CausalLM
from archifactory.posttrain.chat import IM_END, TEMPLATE_FILE, ChatTemplate
from archifactory.posttrain.sft import base_tokenizer, stage_data
from archifactory.posttrain.grpo_loss import LossType, RewardScale, group_advantages, grpo_loss, token_logprobs
from archifactory.posttrain.tasks import Problem, Task, TaskConfig
from archifactory.registry import OPTIMIZERS, SCHEDULES
from archifactory.results import RunSummary
from archifactory.train.config import RunConfig, TrainConfig, expand_run_data
from archifactory.train.optim import AdamWConfig
from archifactory.train.schedule import ConstantSchedule, LinearSchedule
from archifactory.train.distributed import all_reduce_mean
from archifactory.train.trainer import Trainer


GRPOTaskConfig = TaskConfig


class GRPOOptions(Strict):
    num_generations: int = Field(8, ge=2, le=MAX_COUNT)
    """Completions per prompt (the group)."""
    max_completion_length: int = Field(16, ge=1, le=MAX_SEQ_LEN)
    temperature: float = Field(1.0, ge=0.01, le=MAX_TEMPERATURE)
    """Sampling temperature, also dividing the logits of the loss (TRL); in [0.01, 1e6] (TRL's default 1;
    1e-300 divided the logits by 0)."""
    top_k: int | None = Field(None, ge=1)
    epsilon: float = Field(0.2, gt=0, lt=1)
    epsilon_high: float | None = Field(None, gt=0)
    """Upper clip (DAPO's clip-higher); ``None``: ``epsilon``."""
    beta: float = Field(0.0, ge=0, le=MAX_AUX_LOSS_WEIGHT)
    """KL weight to the frozen starting model; 0 (TRL's default) keeps no reference model; at most 1
    (DeepSeekMath uses 0.04)."""
    loss_type: LossType = "dapo"
    scale_rewards: RewardScale = "group"
    format_reward: float = Field(0.0, ge=0, le=1)
    """Added to the reward when a final answer can be read (0: correctness only); at most the reward of a
    correct answer (1), so that form never outweighs correctness."""
    eval_problems: int = Field(64, ge=1, le=10**6)
    """Held-out problems answered greedily for ``eval_accuracy``."""
    eval_samples: int = Field(0, ge=0, le=MAX_COUNT)
    """Completions sampled per held-out problem, at ``temperature`` and ``top_k`` as in the rollouts, for
    ``eval_pass_at_1``: the share of correct samples averaged over problems, i.e. pass@1 estimated from
    n samples (DeepSeek-R1's pass@1; HumanEval's unbiased estimator at k=1). It measures the policy GRPO
    optimises, which greedy exact match need not follow. 0 (default): greedy exact match only."""
    num_iterations: int = Field(1, ge=1, le=MAX_COUNT)
    """Optimizer steps per generation batch (TRL's ``num_iterations``, the paper's mu); > 1 makes the
    clipped ratio bind."""


def _grpo_train_default() -> TrainConfig:
    return TrainConfig(seq_len=256, batch_size=64, max_steps=50, eval_every=25, checkpoint_every=25, grad_clip=1.0)


class GRPORunConfig(RunConfig):
    """A run config with ``stage: grpo``: the SFT run to start from, the task, GRPO options, and the
    usual optimizer / schedule / train sections (``train.batch_size``: completions per step)."""

    stage: Literal["grpo"] = "grpo"
    base: str
    """The SFT run directory (model/, tokenizer.json, chat_template.jinja)."""
    task: GRPOTaskConfig = Field(default_factory=GRPOTaskConfig)
    data: None = None
    """Unused: the task generates the prompts."""
    grpo: GRPOOptions = Field(default_factory=GRPOOptions)
    optimizer: component_field(OPTIMIZERS) = Field(default_factory=lambda: AdamWConfig(lr=1e-4, weight_decay=0.0))
    schedule: component_field(SCHEDULES) = Field(default_factory=lambda: ConstantSchedule(warmup_steps=0))
    train: TrainConfig = Field(default_factory=_grpo_train_default)

    @model_validator(mode="after")
    def _groups_fit(self):
        micro = self.train.micro_batch_size or self.train.batch_size
        if micro % self.grpo.num_generations:
            raise ValueError(
                f"train.micro_batch_size: {micro} completions per micro-batch (micro_batch_size, else batch_size) "
                f"must hold whole groups of grpo.num_generations={self.grpo.num_generations}; use a multiple of it"
            )
        mu = self.grpo.num_iterations
        if self.train.checkpoint_every % mu:
            raise ValueError(
                f"train.checkpoint_every={self.train.checkpoint_every} must be a multiple of grpo.num_iterations={mu}, "
                "so a checkpoint falls where a new generation batch starts (exact resume)"
            )
        return self


def load_grpo_config(source: str | Path | dict, overrides: Iterable[str] = ()) -> GRPORunConfig:
    overrides = list(overrides)
    data, base = stage_data(GRPORunConfig, source, overrides, "grpo", "a GRPO",
                            ("tokenizer.json", TEMPLATE_FILE, "model/config.yaml", "model/model.safetensors"),
                            "SFT run directory (base: runs/NAME/sft)",
                            "GRPO starts from a finished SFT run (archifactory sft)")
    data.setdefault("model", load_yaml(base / "model" / "config.yaml"))
    data = expand_run_data(data)
    data["data"] = None
    return validate(GRPORunConfig, data, source=None if isinstance(source, dict) else source, overrides=overrides)


class GRPOTrainer(Trainer):
    """The pretraining trainer with prompts from a task, rollouts and the GRPO loss as its micro-batch loss."""

    cfg: GRPORunConfig
    SETUP_FILES = {"tokenizer.json": None, TEMPLATE_FILE: ChatTemplate.readable}  # no data.json

    def setup_data(self, global_micro_batch: int) -> None:
        cfg = self.cfg
        base = Path(cfg.base)
        self.tokenizer = base_tokenizer(base)  # refused when it has more ids than the SFT run's model
        try:
            self.template = ChatTemplate.load(base)
        except CorruptFileError as err:
            from archifactory.train.locate import train_command

            raise CorruptFileError(f"{err}; `{train_command(base)}` writes it again (the SFT run is finished: "
                                   "nothing is trained)") from None
        self.end_id = self.tokenizer.backend.token_to_id(IM_END)
        self.task = cfg.task.build()
        G, world = cfg.grpo.num_generations, self.dist.world_size
        if global_micro_batch % (G * world):
            raise ConfigError(
                f"each process's micro-batch ({global_micro_batch // world} completions) must hold whole groups of "
                f"grpo.num_generations={G}"
            )
        self.prompts_per_micro = global_micro_batch // G  # global, all processes
        self.loader = types.SimpleNamespace(batch_size=global_micro_batch, stream_hash=self._stream_hash)
        self.shards = types.SimpleNamespace(manifest={
            "corpus_fingerprint": f"task:{cfg.task.model_dump_json()}", "tokenizer_hash": self.tokenizer.fingerprint(),
        })
        if self.dist.is_main:
            self.tokenizer.save(self.run_dir / "tokenizer.json")
            self.template.save(self.run_dir)
        self._rollouts: list[dict] = []
        self._generation: int | None = None  # the generation batch held in _rollouts

    def build_model(self) -> CausalLM:
        model = CausalLM.from_pretrained(Path(self.cfg.base) / "model")
        if model.config != self.cfg.model:
            raise ConfigError(f"model: differs from the SFT run's ({self.cfg.base}/model/config.yaml); leave it out")
        self._check_lengths(model)
        self.ref_model = None
        if self.cfg.grpo.beta:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        return model

    LENGTH_CHECK_PROMPTS = 512
    """Training prompts whose length is checked at setup (all of them for a task with fewer)."""

    def _check_lengths(self, model: CausalLM) -> None:
        """Refuse at setup, not at the step that meets it, a prompt + ``max_completion_length`` that the
        model cannot generate (past ``max_seq_len`` with positions that do not extrapolate): the longest
        prompt of a record task, or of a generated task's first :attr:`LENGTH_CHECK_PROMPTS` training
        problems and its held-out evaluation problems."""
        opts = self.cfg.grpo
        splits = getattr(self.task, "splits", None)  # a record task: every record of both splits
        problems = ([(f"{split} record {i}", p) for split, rows in splits.items() for i, p in enumerate(rows)]
                    if splits else
                    [(f"{split} problem {i}", self.task.problem(i, split))
                     for split, n in (("train", self.LENGTH_CHECK_PROMPTS), ("test", opts.eval_problems))
                     for i in range(n)])
        longest, where = 0, ""
        for name, problem in problems:
            n_tokens = len(prompt_ids(self.template, self.tokenizer, problem))
            if n_tokens > longest:
                longest, where = n_tokens, name
        try:
            model.check_generation_length(longest, opts.max_completion_length)
        except InputError as err:
            raise ConfigError(f"grpo.max_completion_length={opts.max_completion_length}: the longest prompt "
                              f"({where}, chat template included) does not fit: {err}") from None

    # ------------------------------------------------------------------------------------------ rollouts

    def prompt_index(self, micro_index: int, k: int) -> int:
        """Global index of this process's ``k``-th prompt in global micro-batch ``micro_index``."""
        per_rank = self.prompts_per_micro // self.dist.world_size
        return micro_index * self.prompts_per_micro + self.dist.rank * per_rank + k

    def _stream_hash(self, n_batches: int) -> str:
        """Hash of every prompt sampled in the first ``n_batches`` micro-batch steps (with mu updates per
        generation batch, the micro-batches of ceil(steps / mu) generation batches)."""
        mu = self.cfg.grpo.num_iterations
        n_batches = -(-n_batches // (self.accum * mu)) * self.accum
        h = hashlib.sha256(f"grpo:{self.cfg.task.model_dump_json()}:{self.prompts_per_micro}".encode())
        for i in range(n_batches * self.prompts_per_micro):
            h.update(self.task.problem(i).prompt.encode())
        return h.hexdigest()[:16]

    def reward(self, completion: str, problem: Problem) -> tuple[float, bool]:
        correct = self.task.correct(completion, problem)
        fmt = self.cfg.grpo.format_reward * float(self.task.well_formed(completion, problem))
        return float(correct) + fmt, correct

    @torch.no_grad()
    def rollout(self, micro_index: int) -> dict:
        """Sample, decode and reward this process's groups of global micro-batch ``micro_index``; returns
        right-padded rows (prompt + completion), the completion targets and the advantages."""
        opts, G = self.cfg.grpo, self.cfg.grpo.num_generations
        rows, targets, rewards, correct, lengths = [], [], [], [], []
        for k in range(self.prompts_per_micro // self.dist.world_size):
            index = self.prompt_index(micro_index, k)
            problem = self.task.problem(index)
            prompt = prompt_ids(self.template, self.tokenizer, problem)
            seed = int.from_bytes(hashlib.sha256(f"{self.cfg.task.seed}:{index}".encode()).digest()[:4], "little")
            out = self.model.generate(torch.tensor([prompt] * G), opts.max_completion_length,
                                      temperature=opts.temperature, top_k=opts.top_k, seed=seed,
                                      eos_token_id=self.end_id)
            for row in out.tolist():
                completion = row[len(prompt):]
                if self.end_id in completion:  # keep the first end-of-turn, drop the padding after it
                    completion = completion[: completion.index(self.end_id) + 1]
                reward, ok = self.reward(self.tokenizer.decode([t for t in completion if t != self.end_id]), problem)
                rows.append(prompt + completion)
                targets.append([IGNORE_INDEX] * (len(prompt) - 1) + completion)
                rewards.append(reward)
                correct.append(ok)
                lengths.append(len(completion))
        T = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), self.end_id, dtype=torch.long)
        target_ids = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for i, (row, target) in enumerate(zip(rows, targets)):
            input_ids[i, : len(row)] = torch.tensor(row)
            target_ids[i, : len(target)] = torch.tensor(target)
        rewards_t = torch.tensor(rewards)
        return {
            "input_ids": input_ids, "targets": target_ids, "rewards": rewards_t,
            "advantages": group_advantages(rewards_t, G, opts.scale_rewards),
            "correct": torch.tensor(correct, dtype=torch.float), "lengths": torch.tensor(lengths, dtype=torch.float),
        }

    @torch.no_grad()
    def sample_generation(self, generation: int) -> None:
        """Roll out generation batch ``generation`` (one step's micro-batches) and, with several updates
        per batch, the log-probabilities of its completions under the sampling weights."""
        was_training = self.model.training
        first = generation * self.accum
        self._rollouts = [self.rollout(i) for i in range(first, first + self.accum)]
        self.model.train(was_training)
        if self.cfg.grpo.num_iterations > 1:
            for r in self._rollouts:
                with self.autocast():
                    logits = self.model(r["input_ids"].to(self.device)).logits
                r["old_logprobs"] = token_logprobs(logits, r["targets"].to(self.device), self.cfg.grpo.temperature)
        local = torch.tensor(float(sum(int((r["targets"] != IGNORE_INDEX).sum()) for r in self._rollouts)))
        self._step_tokens = float(all_reduce_mean(local.to(self.device), self.dist)) * self.dist.world_size
        self._generation = generation

    def micro_loss(self, index: int) -> torch.Tensor:
        opts = self.cfg.grpo
        if index % self.accum == 0:  # sample the whole step first: DAPO normalises by all its tokens
            generation = index // self.accum // opts.num_iterations
            if self._generation != generation:
                self.sample_generation(generation)
            self._step_stats = []
        r = self._rollouts[index % self.accum]
        x, y = r["input_ids"].to(self.device), r["targets"].to(self.device)
        mask = y != IGNORE_INDEX
        with self.autocast():
            logits = self.train_model(x).logits
        logprobs = token_logprobs(logits, y, opts.temperature)
        old = r["old_logprobs"] if "old_logprobs" in r else logprobs.detach()
        ref = None
        if self.ref_model is not None:
            with torch.no_grad(), self.autocast():
                ref = token_logprobs(self.ref_model(x).logits, y, opts.temperature)
        out = grpo_loss(
            logprobs, old, r["advantages"].to(self.device), mask, ref_logprobs=ref, beta=opts.beta,
            epsilon_low=opts.epsilon, epsilon_high=opts.epsilon_high, loss_type=opts.loss_type,
            n_tokens=self._step_tokens / self.dist.world_size, max_completion_length=opts.max_completion_length,
        )
        loss = out.loss if opts.loss_type == "dapo" else out.loss / self.accum
        self._step_stats.append((r, out))
        if index % self.accum == self.accum - 1:
            self._write_step_metrics()
        return loss

    def _write_step_metrics(self) -> None:
        stats = self._step_stats
        G = self.cfg.grpo.num_generations
        group_std = torch.cat([r["rewards"].view(-1, G).std(dim=1) for r, _ in stats])
        values = {
            "reward": torch.cat([r["rewards"] for r, _ in stats]).mean(),
            "reward_std": group_std.mean(),  # TRL's reward_std: the mean within-group std
            "frac_reward_zero_std": (group_std == 0).float().mean(),  # groups that give no signal (TRL's name)
            "pass_rate": torch.cat([r["correct"] for r, _ in stats]).mean(),
            "completion_length": torch.cat([r["lengths"] for r, _ in stats]).mean(),
            "kl": torch.stack([o.kl.float().cpu() for _, o in stats]).mean(),
            "clip_fraction": torch.stack([o.clip_fraction.float().cpu() for _, o in stats]).mean(),
        }
        record = {k: float(all_reduce_mean(v.to(self.device), self.dist)) for k, v in values.items()}
        self.metrics.write({"kind": "grpo", "step": self.step + 1, **record})

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy exact-match accuracy on ``eval_problems`` held-out problems and, with ``eval_samples``,
        their sampled pass@1."""
        opts = self.cfg.grpo
        args = (self.model, self.tokenizer, self.template, self.task, opts.eval_problems, opts.max_completion_length)
        figures = {"eval_accuracy": exact_match(*args)}
        if opts.eval_samples:
            figures["eval_pass_at_1"] = exact_match(*args, samples=opts.eval_samples, temperature=opts.temperature,
                                                    top_k=opts.top_k)
        return figures

    def _summary(self, elapsed: float, last_eval: dict) -> dict:
        return {**super()._summary(elapsed, last_eval), "stage": "grpo", "base": self.cfg.base,
                "task": self.cfg.task.name}


def prompt_ids(template: ChatTemplate, tokenizer: Tokenizer, problem: Problem) -> list[int]:
    """A problem as the model is asked it, in rollouts and in exact-match evaluation: one user turn in the
    chat template, ending where the assistant's answer begins."""
    return template.generation_prompt([{"role": "user", "content": problem.prompt}], tokenizer)


@torch.no_grad()
def exact_match(model: CausalLM, tokenizer: Tokenizer, template: ChatTemplate, task: Task, n: int,
                max_new_tokens: int, split: str = "test", samples: int = 0, temperature: float = 1.0,
                top_k: int | None = None, start: int = 0) -> float:
    """Exact match on problems ``start .. start + n - 1`` of ``split``, in [0, 1].

    ``samples`` 0: the share answered correctly by greedy decoding. ``samples`` n > 0: pass@1 estimated
    from n completions per problem sampled at ``temperature`` / ``top_k`` (the mean over problems of
    correct / n: DeepSeek-R1's pass@1, HumanEval's unbiased pass@k estimator at k = 1). Problem ``i`` is
    sampled with seed ``i``, so two models are compared on the same random numbers."""
    end = tokenizer.backend.token_to_id(IM_END)
    was_training = model.training
    right = 0.0
    for i in range(start, start + n):
        problem = task.problem(i, split)
        prompt = prompt_ids(template, tokenizer, problem)
        if samples:
            rows = model.generate(torch.tensor([prompt] * samples), max_new_tokens, temperature=temperature,
                                  top_k=top_k, seed=i, eos_token_id=end)[:, len(prompt):].tolist()
        else:
            rows = [model.generate(prompt, max_new_tokens, temperature=0, eos_token_id=end)[len(prompt):].tolist()]
        correct = [task.correct(tokenizer.decode(row[: row.index(end)] if end in row else row), problem) for row in rows]
        right += sum(correct) / len(correct)
    model.train(was_training)
    return right / n


def grpo(cfg: GRPORunConfig | str | Path | dict, overrides: Iterable[str] = (), resume: bool = True,
         console=None, allow_config_change: bool = False) -> RunSummary:
    """Reinforce ``cfg.base`` (an SFT run) on ``cfg.task``; resumes from the latest checkpoint."""
    if not isinstance(cfg, GRPORunConfig):
        cfg = load_grpo_config(cfg, overrides)
    return GRPOTrainer(cfg, resume=resume, console=console, allow_config_change=allow_config_change).run()
