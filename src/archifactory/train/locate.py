"""One resolver for every command that takes a trained model: a run directory, its ``model/`` folder, one
of its checkpoints, or a saved model directory all name the same kind of thing.

========================================  =====================================================
given                                     model weights and config read from
========================================  =====================================================
``RUN``  (has ``model/``)                 ``RUN/model`` (the final weights)
``RUN/model``                             itself
``RUN/checkpoints/step_N``                its ``model.safetensors``; the config from ``RUN/config.yaml``
any saved model (config.yaml + weights)   itself (``save_pretrained`` / ``hf import`` output)
========================================  =====================================================

The tokenizer is the ``tokenizer.json`` in the model folder, else in its run directory (for a saved model
outside a run: in the folder holding it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from archifactory.errors import InputError
from archifactory.train.checkpoint import STEP_DIR, checkpoint_dirs

MODEL_FILES = ("config.yaml", "model.safetensors")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a trained model is. ``run_dir`` is ``None`` for a saved model outside any run; exactly one of
    ``model_dir`` (a saved model: config.yaml + model.safetensors) and ``checkpoint`` is set."""

    run_dir: Path | None
    model_dir: Path | None = None
    checkpoint: Path | None = None

    @property
    def tokenizer_path(self) -> Path | None:
        """The model's ``tokenizer.json``, if any: beside the weights, else in the run directory (for a saved
        model outside a run: in the folder holding it)."""
        return next((p / "tokenizer.json" for p in self.tokenizer_places if (p / "tokenizer.json").is_file()), None)

    @property
    def tokenizer_places(self) -> list[Path]:
        """Where :attr:`tokenizer_path` looks, in order."""
        places = [p for p in (self.model_dir, self.run_dir) if p is not None]
        return places if self.run_dir is not None else places + [self.model_dir.parent]

    def require_tokenizer(self) -> Path:
        found = self.tokenizer_path
        if found is None:
            where = " or ".join(map(str, self.tokenizer_places))
            advice = ("point at the run directory that trained the model" if self.run_dir is not None else
                      "copy the model's tokenizer.json beside its weights (or into the folder holding them), or "
                      "point at the run directory that trained it")
            raise InputError(f"no tokenizer.json in {where}; {advice}")
        return found

    def repair_advice(self) -> str:
        """What writes a damaged file of this model again (for the message of a damaged-file error)."""
        if self.checkpoint is not None:
            return f"give another checkpoint of {self.run_dir}, or its final model once the run has finished"
        if self.run_dir is not None:
            return f"`{train_command(self.run_dir)}` writes the run's final files again from its last checkpoint"
        return f"save or import the model in {self.model_dir} again"

    def load(self, device: str = "cpu"):
        """The :class:`~archifactory.model.lm.CausalLM` (checksums verified; a damaged or non-finite
        checkpoint raises :class:`~archifactory.train.checkpoint.CheckpointError`)."""
        import torch

        from archifactory.model.lm import CausalLM

        if self.model_dir is not None:
            return CausalLM.from_pretrained(self.model_dir, device=device)
        from archifactory.config import load_yaml
        from archifactory.model.config import load_model_config
        from archifactory.train.checkpoint import load_checkpoint

        model = CausalLM(load_model_config(load_yaml(self.run_dir / "config.yaml").get("model", {})))
        load_checkpoint(self.checkpoint, model, torch.device(device))
        return model.to(device)


def check_tokenizer_fits(tokenizer, vocab_size: int, where: Path | str) -> None:
    """Refuse a tokenizer (read from ``where``) with more ids than the model's ``vocab_size``: its ids past the
    vocabulary index outside the embedding (IndexError), and it is not the tokenizer the model was trained with.
    A smaller tokenizer is fine (a vocabulary padded for speed). Raises :class:`InputError`."""
    if tokenizer.vocab_size > vocab_size:
        raise InputError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{vocab_size}: pass the tokenizer the model was trained with")


def train_command(run_dir: Path) -> str:
    """The command that trains, finishes or rewrites the final files of the run in ``run_dir``: ``archifactory
    train RUN/config.yaml``, plus ``--set out_dir=RUN`` when that config names another directory (a copied or
    moved run directory still names the one it was trained in, and ``train`` writes where the config says)."""
    import shlex

    from archifactory.config import ConfigError, load_yaml

    command = f"archifactory train {shlex.quote(str(run_dir / 'config.yaml'))}"
    try:
        data = load_yaml(run_dir / "config.yaml")
        named = Path(data.get("out_dir") or Path("runs") / str(data.get("name")))
        same = named.resolve() == run_dir.resolve()
    except (ConfigError, OSError, TypeError, ValueError):
        same = False
    return command if same else f"{command} --set out_dir={shlex.quote(str(run_dir))}"


def _is_saved_model(path: Path) -> bool:
    return all((path / name).is_file() for name in MODEL_FILES)


def locate_model(path: str | Path, checkpoints: bool = True) -> ModelSource:
    """Resolve ``path`` (see the module docstring) or raise :class:`InputError` saying what it is not;
    ``checkpoints=False``: for a command that takes no checkpoint, whose messages then offer none."""
    path = Path(path)
    if path.name in ("", ".."):  # "." or "..": name and parent are read from the folder it stands for
        path = path.resolve()
    give = ("give a run directory (runs/NAME), its model/ folder or one of its checkpoints/step_N folders"
            if checkpoints else "give a finished run directory (runs/NAME), its model/ folder or a saved model directory")
    if not path.exists():
        raise InputError(f"{path} does not exist; {give}")
    if not path.is_dir():
        raise InputError(f"{path} is a file; {give}")
    if _is_saved_model(path / "model"):
        return ModelSource(run_dir=path, model_dir=path / "model")
    if _is_saved_model(path):
        in_run = path.name == "model" and any((path.parent / f).is_file() for f in ("config.yaml", "tokenizer.json"))
        parent = path.parent if in_run else None
        return ModelSource(run_dir=parent, model_dir=path)
    if STEP_DIR.match(path.name) and path.parent.name == "checkpoints":
        run_dir = path.parent.parent
        if not (path / "model.safetensors").is_file():
            raise InputError(f"checkpoint {path} has no model.safetensors; give another checkpoint")
        if not (run_dir / "config.yaml").is_file():
            raise InputError(f"checkpoint {path}: its run's config {run_dir / 'config.yaml'} is missing")
        return ModelSource(run_dir=run_dir, checkpoint=path)
    saved = checkpoint_dirs(path)
    if saved:
        raise InputError(f"run {path} has not finished (no model/ yet); finish it with `{train_command(path)}`"
                         + (f", or give a checkpoint such as {saved[-1]}" if checkpoints else ""))
    kinds = ("a run directory (with model/), a saved model (config.yaml + model.safetensors) nor a checkpoint"
             if checkpoints else "a run directory (with model/) nor a saved model (config.yaml + model.safetensors)")
    raise InputError(f"{path} is neither {kinds}; train the run first (archifactory train CONFIG)")
