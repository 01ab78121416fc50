"""One post-training recipe for many runs: the SFT or GRPO run config a sweep gives every variant.

A recipe is a post-training run config (``stage: sft`` or ``stage: grpo``) without the fields that belong
to one run: ``base`` (the run it starts from), ``model`` (read from the base), ``name`` and ``out_dir``.
:func:`recipe_run` fills them in for one run and validates the result against the variant's model, so a
sweep's plan (``--dry-run``) rejects a bad recipe before anything trains.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from archifactory.config import ConfigError, validate
from archifactory.posttrain.grpo import GRPORunConfig
from archifactory.posttrain.sft import SFTRunConfig, _stage_defaults
from archifactory.train.config import RunConfig, expand_run_data

STAGE_CONFIGS: dict[str, type[RunConfig]] = {"sft": SFTRunConfig, "grpo": GRPORunConfig}
PER_RUN_FIELDS = ("stage", "base", "model", "name", "out_dir")
"""Fields a recipe may not set: the sweep sets them for each run."""


def check_recipe(stage: str, recipe: dict[str, Any]) -> None:
    """Raises ``ValueError`` naming a field the sweep sets per run, or an unknown stage."""
    if stage not in STAGE_CONFIGS:
        raise ValueError(f"no post-training stage {stage!r}; use one of {', '.join(STAGE_CONFIGS)}")
    given = [k for k in PER_RUN_FIELDS if k in recipe]
    if given:
        raise ValueError(f"{stage}.{given[0]}: set by the sweep for each run (the variant's {stage} run starts from "
                         "its previous stage's run); leave it out of the recipe")


def recipe_run(stage: str, recipe: dict[str, Any], *, base: str | Path, name: str, out_dir: str | Path, seed: int,
               model: dict[str, Any], lr: float | None = None) -> tuple[dict[str, Any], RunConfig]:
    """One run of ``recipe``: the raw run config to write (``archifactory train`` reads it once ``base`` has
    finished; the SFT model's vocabulary then grows by the chat tokens) and the same config validated
    against ``model`` (the variant's pretraining model) now.

    ``seed`` becomes ``train.seed``; ``lr`` (when given) ``optimizer.lr``. The stage's own train defaults
    hold when the recipe has no ``train`` section. Raises :class:`ConfigError` for a bad recipe.
    """
    check_recipe(stage, recipe)
    cls = STAGE_CONFIGS[stage]
    data = _stage_defaults(cls, copy.deepcopy(recipe))
    if "train" not in data:
        data["train"] = cls.model_fields["train"].default_factory().model_dump(mode="json")
    data["train"] = {**data["train"], "seed": seed}
    if lr is not None:
        data["optimizer"] = {**data["optimizer"], "lr": lr}
    data.update(stage=stage, base=str(base), name=name, out_dir=str(out_dir))
    chat_data = data.pop("data", None)
    checked = expand_run_data({**data, "model": copy.deepcopy(model)})
    checked["data"] = chat_data
    try:
        config = validate(cls, checked)
    except ConfigError as err:
        raise ConfigError(f"{stage}: {err}") from None
    if chat_data is not None:
        data["data"] = chat_data
    return data, config
