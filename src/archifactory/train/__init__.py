"""Training: run configs, optimizers, schedules, the trainer, checkpoints, metrics, distributed."""

from archifactory.train.config import RunConfig, load_run_config
from archifactory.train.trainer import NonFiniteLossError, PastBudgetError, Trainer, train

__all__ = ["NonFiniteLossError", "PastBudgetError", "RunConfig", "Trainer", "load_run_config", "train"]
