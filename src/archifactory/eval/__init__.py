"""Evaluation: zero-shot log-likelihood tasks scored on any trained run or saved model, stored per run,
task and metric (see :mod:`archifactory.eval.runner`)."""

from archifactory.eval.runner import EvalTarget, evaluate, load_target
from archifactory.eval.store import EvalStore, EvaluationRecord, MetricResult
from archifactory.eval.tasks import TASKS, get_task

__all__ = ["EvalStore", "EvalTarget", "EvaluationRecord", "MetricResult", "TASKS", "evaluate", "get_task",
           "load_target"]
