"""Sweep specs: a base run, one-change variants, seeds, and an equal budget.

```yaml
name: positions
base: configs/runs/shakespeare-tiny.yaml   # a run config path, or the run mapping inline
base_overrides: [train.eval_every=50]       # optional: settings for every run of this sweep
seeds: [0, 1, 2]                            # the seeds the report compares
lr_selection_seeds: [100, 101]              # where lr grids are run to choose each variant's lr
budget: {tokens: 2.0e6}                     # or {flops: 1.0e13} or {seconds: 300}
match_params: false                         # resize each variant's FFN to the base's parameter count
variants:
  nope:  {overrides: [model.position.kind=none], description: no positional encoding}
  alibi: [model.position.kind=alibi]        # shorthand: just the overrides
  learned: {overrides: [model.position.kind=learned], lr: [1.0e-3, 3.0e-3]}   # an lr grid
```

The baseline (the base unchanged) is always run, as the variant named ``baseline``; a variant given that
name redefines it (``kv_heads.yaml`` makes MHA the baseline). Every run reads the
same token stream (the base's data config and ``data.seed``); the seed changes model initialisation.

A variant with a learning-rate grid (``lr`` with several values) runs the grid on ``lr_selection_seeds``
first (runs of purpose ``lr_selection``, named ``VARIANT-lrLR-sSEED``); the lr with the lowest mean final
validation loss there is then run on ``seeds``, and only those runs enter the report's comparison. The
two seed lists must not overlap, so the compared results are not the ones that chose the lr.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from archifactory.config import (
    MAX_COUNT,
    MAX_FLOPS,
    MAX_FOLDER_NAME_BYTES,
    MAX_SECONDS,
    MAX_TOKENS,
    ConfigError,
    FolderName,
    Seed,
    Strict,
    apply_overrides,
    check_folder_name,
    load_yaml,
    validate,
)
from archifactory.sweep.stats import COMPARE, LR_SELECTION
from archifactory.train.config import RunConfig, apply_run_overrides, expand_run_data

BASELINE = "baseline"
MAX_LR_GRID = 64
"""Most learning rates in one variant's grid."""
MAX_SEEDS = 1024
"""Most seeds in ``seeds`` or ``lr_selection_seeds`` (each is a run per variant)."""


class Budget(Strict):
    """Equal budget for every run: tokens (default), training FLOPs, or wall seconds; at most
    :data:`~archifactory.config.MAX_TOKENS` (10**15) tokens, 10**30 FLOPs or a year."""

    tokens: float | None = Field(None, ge=1, le=MAX_TOKENS)
    flops: float | None = Field(None, gt=0, le=MAX_FLOPS)
    seconds: float | None = Field(None, gt=0, le=MAX_SECONDS)

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("tokens", "flops", "seconds") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of tokens, flops or seconds (got {given or 'none'})")
        return self

    def describe(self) -> str:
        if self.tokens is not None:
            return f"{self.tokens:,.0f} tokens per run"
        if self.flops is not None:
            return f"{self.flops:.3g} training FLOPs per run"
        return f"{self.seconds:,.0f} s of training per run"


Stage = Literal["pretrain", "sft", "grpo"]
STAGE_ORDER: tuple[str, ...] = ("pretrain", "sft", "grpo")
LR_SCALE = "lr_scale"


class EvalSection(Strict):
    """Evaluation tasks run on every compared run after each of its stages (``archifactory eval``)."""

    tasks: list[str] = Field(min_length=1)
    """Task names as ``archifactory eval --tasks`` takes them (``lambada``, ``piqa``, ``lm_eval:NAME``, ...)."""
    limit: int | None = Field(None, ge=1)
    """Only the first N items of each task (``--limit``)."""
    stages: list[Stage] | None = None
    """The stages whose runs are evaluated; ``None``: every stage of the sweep."""
    batch_size: int = Field(16, ge=1, le=2**20)
    """Sequences per forward pass (``--batch-size``, with the same bound)."""

    @field_validator("tasks")
    @classmethod
    def _known(cls, tasks: list[str]) -> list[str]:
        from archifactory.eval.tasks import get_task

        for name in tasks:
            if not name.startswith("lm_eval:"):
                try:
                    get_task(name)
                except KeyError as err:
                    raise ValueError(str(err).strip("'\"")) from None
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"{tasks} names a task twice")
        return tasks


class Variant(Strict):
    overrides: list[str] = Field(default_factory=list)
    description: str = ""
    lr: list[Annotated[float, Field(gt=0)]] | None = Field(None, min_length=1, max_length=MAX_LR_GRID)
    """Learning rates (each > 0 and finite) to try on the sweep's ``lr_selection_seeds``; the best (lowest
    mean final validation loss there) is run on ``seeds`` and reported. A single value just sets this
    variant's lr."""

    @property
    def has_lr_grid(self) -> bool:
        return self.lr is not None and len(self.lr) > 1


class SweepSpec(Strict):
    name: FolderName
    """The default sweep directory is ``sweeps/<name>`` (``--dir`` chooses another), so one plain folder name."""
    base: str | dict[str, Any]
    base_overrides: list[str] = Field(default_factory=list)
    """Dotted overrides applied to the base before any variant (e.g. a sweep's eval cadence)."""
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1, max_length=MAX_SEEDS)
    """The seeds whose runs the report compares (paired by seed across variants)."""
    lr_selection_seeds: list[Seed] = Field(default_factory=list, max_length=MAX_SEEDS)
    """Seeds on which variants with an lr grid choose their lr; disjoint from ``seeds``. Required when a
    variant has a grid."""
    budget: Budget
    variants: dict[str, Variant] = Field(default_factory=dict, max_length=MAX_COUNT)
    match_params: bool = False
    match_tolerance: float = Field(0.02, gt=0, lt=0.5)
    parallel: int | None = Field(None, ge=1, le=MAX_COUNT)
    """Runs at once; ``None``: one per GPU, or on CPU as many as the cores allow at ``threads_per_run``."""
    threads_per_run: int = Field(1, ge=1, le=MAX_COUNT)
    executor: Literal["local", "submitit"] = "local"
    """``local``: subprocesses on this machine. ``submitit``: each run becomes a job of an existing
    scheduler through submitit (SLURM, or ``cluster: local`` for a dry run), with ``submitit`` settings."""
    submitit: dict[str, Any] = Field(default_factory=dict)
    """``folder`` (job logs), ``cluster`` (slurm | local | debug; default: detected) and any
    ``AutoExecutor.update_parameters`` keys, e.g. ``slurm_partition``, ``timeout_min``, ``gpus_per_node``."""
    stages: list[Stage] = Field(default_factory=lambda: ["pretrain"])
    """``[pretrain]``, ``[pretrain, sft]`` or ``[pretrain, sft, grpo]``: the stages every compared run goes through."""
    sft: dict[str, Any] | None = None
    """The SFT recipe every variant gets: an SFT run config without base / model / name / out_dir, plus
    an optional ``lr_scale`` (see the module docstring)."""
    grpo: dict[str, Any] | None = None
    """The GRPO recipe every variant gets, likewise."""
    eval: EvalSection | None = None

    @field_validator("variants", mode="before")
    @classmethod
    def _shorthand(cls, value):
        if isinstance(value, dict):
            return {k: {"overrides": v} if isinstance(v, list) else (v or {}) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _names(self):
        # names first: the checks below put the name into a field path
        for name in self.variants:
            try:
                # run ids <variant>[-lr<lr>]-s<seed> become folders under <sweep>/runs/: room for the suffix
                check_folder_name(name, max_bytes=MAX_FOLDER_NAME_BYTES - 40)
            except ValueError as err:
                raise ValueError(f"variants: variant name {err}") from None
        for name, variant in self.variants.items():
            # each grid value names its selection runs (VARIANT-lrLR-sSEED): two values must not share a name
            labels = [f"{lr:g}" for lr in variant.lr or []]
            if len(set(labels)) != len(labels):
                raise ValueError(f"variants.{name}.lr: {variant.lr} repeats a learning rate (to 6 significant "
                                 f"digits: {labels}); give each value once")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: {self.seeds} repeats a seed")
        if len(set(self.lr_selection_seeds)) != len(self.lr_selection_seeds):
            raise ValueError(f"lr_selection_seeds: {self.lr_selection_seeds} repeats a seed")
        shared = sorted(set(self.seeds) & set(self.lr_selection_seeds))
        if shared:
            raise ValueError(f"lr_selection_seeds: seed(s) {shared} are also compared (seeds: {self.seeds}); the lr "
                             "must be chosen on other seeds than those whose results the report compares")
        self._check_stages()
        grids = [name for name, v in self.variants.items() if v.has_lr_grid]
        if grids and not self.lr_selection_seeds:
            raise ValueError(f"variants.{grids[0]}.lr: an lr grid needs lr_selection_seeds (seeds not in "
                             f"seeds: {self.seeds}) to choose the lr on, e.g. lr_selection_seeds: "
                             f"{[max(self.seeds) + 100 + i for i in range(2)]}")
        return self


    def _check_task_examples(self) -> None:
        """SFT's worked task examples (``sft.data.task``) must come from GRPO's task with the same split, or
        they could hold the problems GRPO's held-out exact match is measured on."""
        from archifactory.posttrain.tasks import TaskConfig

        sft_task = ((self.sft or {}).get("data") or {}).get("task")
        grpo_task = (self.grpo or {}).get("task")
        if not isinstance(sft_task, dict) or not isinstance(grpo_task, dict):
            return
        ours, theirs = TaskConfig(**sft_task), TaskConfig(**grpo_task)
        if ours.name != theirs.name:
            return  # another task's examples cannot hold this task's problems
        differ = [k for k in ("digits", "n_numbers", "max_number", "data", "seed", "test_fraction")
                  if getattr(ours, k) != getattr(theirs, k)]
        if differ:
            raise ValueError(f"sft.data.task.{differ[0]}={getattr(ours, differ[0])!r} differs from grpo.task's "
                             f"{getattr(theirs, differ[0])!r}: the SFT examples would not come from the same training "
                             "split, and could hold the held-out problems; give both the same task fields")

    def _check_stages(self) -> None:
        from archifactory.posttrain.recipe import check_recipe

        if self.stages != list(STAGE_ORDER[: len(self.stages)]):
            raise ValueError(f"stages: {self.stages}; use [pretrain], [pretrain, sft] or [pretrain, sft, grpo] "
                             "(each stage starts from the one before)")
        for stage in STAGE_ORDER[1:]:
            recipe = getattr(self, stage)
            if stage in self.stages and recipe is None:
                raise ValueError(f"stages: lists {stage} but the spec has no {stage}: section; give the recipe every "
                                 f"variant gets (an {stage} run config without base/model/name/out_dir)")
            if stage not in self.stages and recipe is not None:
                raise ValueError(f"{stage}: a recipe is given but stages: {self.stages} does not run it; add {stage} "
                                 "to stages or remove the section")
            if recipe is not None:
                check_recipe(stage, {k: v for k, v in recipe.items() if k != LR_SCALE})
                scale = recipe.get(LR_SCALE)
                if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                          or not 0 < scale < float("inf")):
                    raise ValueError(f"{stage}.{LR_SCALE}: {scale!r}; give a positive number (the variant's "
                                     f"pretraining lr times it is its {stage} lr) or leave it out")
        self._check_task_examples()
        if self.eval is not None and self.eval.stages is not None:
            extra = [s for s in self.eval.stages if s not in self.stages]
            if extra:
                raise ValueError(f"eval.stages: {extra} not in stages: {self.stages}")

    def evaluates(self, stage: str) -> bool:
        """Whether the ``eval:`` tasks run on ``stage``'s runs."""
        return self.eval is not None and (self.eval.stages is None or stage in self.eval.stages)


@dataclasses.dataclass
class PlannedRun:
    run_id: str
    variant: str
    seed: int
    lr: float | None
    config: RunConfig
    changes: dict
    purpose: str = COMPARE
    """``compare`` (a result the report compares) or ``lr_selection`` (only chooses the variant's lr)."""
    stage: str = "pretrain"
    parent: str | None = None
    """A post-training run's starting run (the previous stage's run of the same variant and seed)."""
    stage_config: dict | None = None
    """A post-training run's raw config, written as its ``run.yaml`` (its model is read from ``parent`` then)."""


def load_sweep(path: str | Path, overrides: list[str] | tuple = ()) -> tuple[SweepSpec, Path]:
    """The spec and the directory its relative paths resolve against."""
    path = Path(path)
    spec = validate(SweepSpec, apply_overrides(load_yaml(path), overrides), source=path, overrides=overrides)
    return spec, path.parent


def base_data(spec: SweepSpec, root: Path) -> dict:
    if isinstance(spec.base, dict):
        return copy.deepcopy(spec.base)
    path = Path(spec.base)
    if not path.is_absolute():
        path = (root / path) if (root / path).is_file() else path
    return load_yaml(path)


def plan(spec: SweepSpec, root: Path, sweep_dir: Path,
         chosen_lrs: dict[str, float] | None = None) -> list[PlannedRun]:
    """Every run with its resolved config: (variant, seed) for each compared seed, and for a variant with
    an lr grid, (variant, lr, seed) for each lr-selection seed, then its compared runs at the lr in
    ``chosen_lrs`` once chosen (absent until then). Raises ConfigError naming the variant."""
    chosen_lrs = chosen_lrs or {}
    base = apply_run_overrides(expand_run_data(base_data(spec, root)), spec.base_overrides)
    base_cfg = _resolve(base, [], f"{spec.name}/baseline")
    base_params = _params(base_cfg) if spec.match_params else None
    runs: list[PlannedRun] = []
    variants = {BASELINE: Variant(), **{k: v for k, v in spec.variants.items() if k != BASELINE}}
    if BASELINE in spec.variants:
        variants[BASELINE] = spec.variants[BASELINE]
    for name, variant in variants.items():
        cfg = _resolve(base, variant.overrides, name)
        changes: dict[str, Any] = {"overrides": variant.overrides, "description": variant.description,
                                   "match_params": None}
        if spec.match_params and name != BASELINE:
            cfg, changes["match_params"] = match_params(cfg, base_params, spec.match_tolerance, name)
        if variant.has_lr_grid:
            grid = [(lr, seed, LR_SELECTION) for lr in variant.lr for seed in spec.lr_selection_seeds]
            if name in chosen_lrs:
                grid += [(chosen_lrs[name], seed, COMPARE) for seed in spec.seeds]
        else:
            grid = [(variant.lr[0] if variant.lr else None, seed, COMPARE) for seed in spec.seeds]
        for lr, seed, purpose in grid:
            run_id = f"{name}-s{seed}" if lr is None else f"{name}-lr{lr:g}-s{seed}"
            run = cfg.model_copy(deep=True)
            run.name = run_id
            run.out_dir = str(sweep_dir / "runs" / run_id)
            run.train.seed = seed
            if lr is not None:
                run.optimizer.lr = lr
            _apply_budget(run, spec.budget)
            runs.append(PlannedRun(run_id, name, seed, lr, run, changes, purpose))
            if purpose == COMPARE:
                runs += _stage_runs(spec, root, sweep_dir, runs[-1])
    return runs


DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".csv")
"""Suffixes that make a recipe's data value a local file (checked at planning) rather than a hub name."""


def resolve_recipe_paths(recipe: dict, root: Path) -> dict:
    """A recipe with its local data files (``data.source``, ``task.data``) resolved against the spec's
    directory when they exist there (as ``base`` is); other values (cwd-relative paths, hub names) kept."""
    recipe = copy.deepcopy(recipe)
    for section, key in (("data", "source"), ("task", "data")):
        value = (recipe.get(section) or {}).get(key)
        if not isinstance(value, str):
            continue
        if not Path(value).is_absolute() and (root / value).exists():
            recipe[section][key] = str((root / value).resolve())
        elif Path(value).suffix.lower() in DATA_FILE_SUFFIXES and not Path(value).exists():
            # a file name (a hub name has no such suffix): refuse at planning, not in every stage run
            raise ConfigError(f"{section}.{key}: {value} is not a file, relative to the spec's directory {root} "
                              "or to the working directory; give the path of an existing file (or a hub name)")
    return recipe


def _stage_runs(spec: SweepSpec, root: Path, sweep_dir: Path, pretrain: PlannedRun) -> list[PlannedRun]:
    """The post-training runs that continue ``pretrain``, one per stage after it, each from the one before."""
    from archifactory.posttrain.recipe import recipe_run

    runs, parent = [], pretrain
    model = pretrain.config.model.model_dump(mode="json")
    if len(spec.stages) > 1 and pretrain.config.data.tokenizer.kind == "bytes":
        raise ConfigError(f"variant {pretrain.variant!r}: data.tokenizer.kind=bytes cannot take the chat template's "
                          "tokens; pretrain with data.tokenizer.kind=bpe (or hf) for the sft stage")
    for stage in spec.stages[1:]:
        try:
            recipe = resolve_recipe_paths(getattr(spec, stage), root)
        except ConfigError as err:
            raise ConfigError(f"{stage}.{err}") from None
        scale = recipe.pop(LR_SCALE, None)
        run_id = f"{parent.run_id}-{stage}"
        out_dir = sweep_dir / "runs" / run_id
        try:
            data, cfg = recipe_run(stage, recipe, base=parent.config.out_dir, name=run_id, out_dir=out_dir,
                                   seed=pretrain.seed, model=model,
                                   lr=None if scale is None else scale * pretrain.config.optimizer.lr)
        except ConfigError as err:
            raise ConfigError(f"variant {pretrain.variant!r}: {err}") from None
        run = PlannedRun(run_id, pretrain.variant, pretrain.seed, pretrain.lr, cfg, pretrain.changes, COMPARE,
                         stage, parent.run_id, data)
        runs.append(run)
        parent = run
    return runs


def _resolve(base: dict, overrides: list[str], variant: str) -> RunConfig:
    try:
        return validate(RunConfig, apply_run_overrides(base, overrides))
    except ConfigError as err:
        raise ConfigError(f"variant {variant!r}: {err}") from None


def _params(cfg: RunConfig) -> int:
    import torch


    with torch.device("meta"):
        return cfg.model.build().num_params()


def _apply_budget(run: RunConfig, budget: Budget) -> None:
    update: dict[str, Any] = {"max_steps": None, "max_tokens": None, "max_time_s": None}
    if budget.tokens is not None:
        update["max_tokens"] = int(budget.tokens)
    elif budget.seconds is not None:
        update["max_time_s"] = budget.seconds
    else:
        import torch


        with torch.device("meta"):  # shapes only
            model = run.model.build()
        per_token = model.flops_per_token(run.train.seq_len, training=True)
        update["max_tokens"] = max(1, int(budget.flops / per_token))
        if update["max_tokens"] > MAX_TOKENS:
            raise ConfigError(f"budget.flops: {budget.flops:.3g} FLOPs are {update['max_tokens']:.3g} tokens of run "
                              f"{run.name!r}, more than {MAX_TOKENS:.0e}; give a smaller budget")
    run.train = run.train.model_copy(update=update)


def match_params(cfg: RunConfig, target: int, tolerance: float, variant: str) -> tuple[RunConfig, dict]:
    """Resize the variant's FFN hidden size (``hidden`` or MoE ``expert_hidden``, on the default block)
    until its parameter count is within ``tolerance`` of ``target``."""
    ffn = cfg.model.ffn
    field = "expert_hidden" if hasattr(ffn, "expert_hidden") else "hidden" if hasattr(ffn, "hidden") else None
    before = _params(cfg)
    if abs(before - target) <= tolerance * target:
        return cfg, {"changed": {}, "params_before": before, "params_after": before, "target": target}
    if field is None:
        raise ConfigError(f"variant {variant!r}: match_params needs an FFN with a hidden size; {ffn.kind!r} has none")

    def with_hidden(h: int) -> RunConfig:
        data = cfg.model_dump(mode="json")
        data["model"]["ffn"][field] = h
        return validate(RunConfig, data)

    counts: dict[int, int] = {}

    def params_at(h: int) -> int:
        if h not in counts:
            counts[h] = _params(with_hidden(h))
        return counts[h]

    old = getattr(ffn, field)
    # parameters are affine in the hidden size for every FFN (count = a + b * hidden): two counts give the
    # line, its solution is checked with its neighbours; bisection where the count is not affine
    slope = (params_at(2 * old) - params_at(old)) / old if old else 0  # hidden None: a default width
    guess = round(old + (target - params_at(old)) / slope) if old and slope > 0 else 0
    if guess > 1 and params_at(guess - 1) <= target <= params_at(guess + 1):
        best = min((guess - 1, guess, guess + 1), key=lambda h: abs(params_at(h) - target))
    else:
        low, high = 1, 64 * cfg.model.d_model
        while low < high:  # parameters grow with the hidden size: bisect for the closest
            mid = (low + high) // 2
            if params_at(mid) < target:
                low = mid + 1
            else:
                high = mid
        best = min((h for h in (low - 1, low) if h >= 1), key=lambda h: abs(params_at(h) - target))
    resized = with_hidden(best)
    after = params_at(best)
    if abs(after - target) > tolerance * target:
        raise ConfigError(
            f"variant {variant!r}: cannot match the base's {target:,} parameters within {tolerance:.0%} by "
            f"resizing ffn.{field} (closest: {after:,} at {best}); change the variant's width instead"
        )
    return resized, {"changed": {f"model.ffn.{field}": [old, best]}, "params_before": before,
                     "params_after": after, "target": target}


def spec_yaml(spec: SweepSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
