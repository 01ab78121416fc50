"""``evaluate(run_or_model, tasks)``: score a trained run or a saved model on tasks, store the results and
skip evaluations already stored.

What can be evaluated:

- a run directory (``model/`` + ``tokenizer.json``, as the trainer writes it): results go to
  ``RUN_DIR/eval.sqlite`` under the run's name; the null model is the unigram distribution of the run's
  training tokens when its shards are still in the cache;
- a saved model directory (``config.yaml`` + ``model.safetensors``) with a ``tokenizer.json`` in it or
  in its parent directory (or one passed as ``tokenizer=``);
- a :class:`~archifactory.model.lm.CausalLM` plus a tokenizer, in Python (results are stored only when
  ``store=`` is given).

Every task is also scored with a null model (unigram counts of the training tokens, or uniform over the
tokenizer's vocabulary) by the same code, and printed beside the model's value and the chance level.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from archifactory.data.tokenizer import Tokenizer
from archifactory.eval import metrics as M
from archifactory.eval.scoring import ModelScorer, Request, TokenScorer, UnigramScorer, encode_pair, score_requests
from archifactory.eval.store import EvalStore, EvaluationRecord, MetricResult
from archifactory.eval.tasks import Item, Task, get_task
from archifactory.model.lm import CausalLM


@dataclasses.dataclass
class EvalTarget:
    """A model ready to evaluate, with what identifies it in the store."""

    model: CausalLM
    tokenizer: Tokenizer
    run_id: str
    model_hash: str
    store_path: Path | None = None
    null: UnigramScorer | None = None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def state_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _unigram_from_run(run_dir: Path, vocab_size: int) -> UnigramScorer | None:
    """Unigram null model from the run's training shards, if the cache still has them."""
    try:
        shards = Path(json.loads((run_dir / "data.json").read_text())["shards"])
        manifest = json.loads((shards / "manifest.json").read_text())
        tokens = np.memmap(shards / "train.bin", dtype=manifest["dtype"], mode="r")
    except (OSError, KeyError, ValueError):
        return None
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    return UnigramScorer.from_counts(torch.from_numpy(counts), "unigram(train tokens)")


def load_target(path: str | Path, tokenizer: str | Path | Tokenizer | None = None,
                device: str | torch.device = "cpu") -> EvalTarget:
    """A run directory or a saved model directory as an :class:`EvalTarget` (see the module docstring)."""
    from archifactory.errors import InputError
    from archifactory.train.locate import check_tokenizer_fits, locate_model

    path = Path(path)
    try:  # the resolver the CLI uses: a run's model/ folder is that run, not a separate saved model
        located = locate_model(path, checkpoints=False)
    except InputError as err:
        raise FileNotFoundError(str(err)) from None
    if located.checkpoint is not None:
        raise ValueError(f"{path} is a checkpoint; evaluation scores a finished run or a saved model: give "
                         f"{located.run_dir} once it has finished")
    model_dir, run_dir = located.model_dir, located.run_dir  # run_dir: the run whose model/ this is, or None
    if tokenizer is None:  # where every command looks (train.locate.ModelSource.tokenizer_path)
        tokenizer = located.tokenizer_path
        if tokenizer is None:
            raise FileNotFoundError(f"no tokenizer.json in {' or '.join(map(str, located.tokenizer_places))}: "
                                    "pass --tokenizer FILE")
    where = tokenizer if not isinstance(tokenizer, Tokenizer) else "the given tokenizer"
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.load(tokenizer)
    model = CausalLM.from_pretrained(model_dir, device=device)
    check_tokenizer_fits(tokenizer, model.config.vocab_size, where)  # as generate checks the tokenizer it finds
    null = _unigram_from_run(run_dir, tokenizer.vocab_size) if run_dir is not None else None
    run_id = (run_dir or model_dir).resolve().name
    return EvalTarget(model, tokenizer, run_id, file_sha256(model_dir / "model.safetensors"),
                      (run_dir or model_dir) / "eval.sqlite", null or UnigramScorer.uniform(tokenizer.vocab_size))


def build_requests(items: Sequence[Item], tokenizer: Tokenizer) -> list[list[Request]]:
    """Each item's choices as token requests; every context starts with the end-of-document id."""
    pairs = [(c, k) for item in items for c, k in zip(item.contexts, item.continuations)]
    memo: dict[tuple[str, str], Request] = {}
    for context, continuation in pairs:
        if (context, continuation) in memo:
            continue
        if context == "":
            context_ids, continuation_ids = [], tokenizer.encode(continuation)
        else:
            context_ids, continuation_ids = encode_pair(tokenizer.encode, context, continuation)
        memo[(context, continuation)] = Request((tokenizer.eos_id, *context_ids), tuple(continuation_ids))
    return [[memo[(c, k)] for c, k in zip(item.contexts, item.continuations)] for item in items]


def score_task(scorer: TokenScorer, task: Task, items: Sequence[Item], requests: list[list[Request]],
               batch_size: int = 16, on_scored=None, share_prefix: bool = False
               ) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Task metrics and per-item values of ``scorer`` on ``items`` (``share_prefix``: see
    :func:`~archifactory.eval.scoring.score_requests`)."""
    flat = [r for rs in requests for r in rs]
    unique = list(dict.fromkeys(flat))  # winogrande-like items share continuations; score each pair once
    scores = dict(zip(unique, score_requests(scorer, unique, batch_size, on_scored, share_prefix)))
    loglikelihood = task.kind == "loglikelihood"
    per_item = [M.item_metrics(item, [scores[r] for r in rs], loglikelihood) for item, rs in zip(items, requests)]
    metrics = {k: v for k, v in M.aggregate(per_item, loglikelihood).items() if k not in task.omit}
    return metrics, per_item


def _progress(console, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:,.1f} items/s"),
        TimeRemainingColumn(),
        disable=not enabled,
        console=console,
    )


def _task_names(tasks: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(n for n in names if n))  # a task named twice is evaluated once
    if not names:
        raise ValueError("no tasks given: name at least one (tasks='piqa,arc_easy', or --tasks piqa,arc_easy)")
    for name in names:
        if not name.startswith("lm_eval:"):
            get_task(name)  # an unknown name fails before any model is loaded
    return names


def evaluate(
    run_or_model: str | Path | CausalLM | EvalTarget,
    tasks: str | Sequence[str],
    limit: int | None = None,
    *,
    tokenizer: str | Path | Tokenizer | None = None,
    store: str | Path | EvalStore | None = None,
    run_id: str | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    force: bool = False,
    include_path: str | Path | None = None,
    lm_eval_defaults: bool = True,
    samples: int = 1,
    temperature: float = 0.8,
    share_prefix: bool = False,
    console=None,
    progress: bool = True,
) -> list[EvaluationRecord]:
    """Evaluate a run directory, a saved model directory or a model on ``tasks`` (names, or a
    comma-separated string), the first ``limit`` items of each (per subject for MMLU).

    Returns one :class:`EvaluationRecord` per task (from the store when already evaluated, unless
    ``force``). Names ``lm_eval:NAME`` run lm-evaluation-harness task NAME through the adapter
    (:mod:`archifactory.eval.lm_eval_adapter`), with task YAMLs from ``include_path`` (and lm-eval's
    built-in tasks unless ``lm_eval_defaults`` is false). ``humaneval`` (pass@k) samples ``samples``
    completions per problem at ``temperature`` (greedy when ``samples`` is 1). ``share_prefix`` scores the
    choices of a multiple-choice item from one cached pass over their shared context (same scores to
    rounding; see :func:`~archifactory.eval.scoring.score_requests` and ``benchmarks/eval_prefix.py`` for
    when it is faster). Raises ``KeyError`` for an
    unknown task, ``FileNotFoundError`` for a directory that
    holds no model or tokenizer, ``ValueError`` for a bad limit.
    """
    names = _task_names(tasks)
    if limit is not None and limit < 1:
        raise ValueError(f"limit (--limit) must be >= 1, got {limit}")
    if samples < 1:
        raise ValueError(f"samples (--samples) must be >= 1, got {samples}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(run_or_model, EvalTarget):
        target = run_or_model
    elif isinstance(run_or_model, CausalLM):
        if tokenizer is None:
            raise ValueError("evaluating a model object needs its tokenizer: evaluate(model, tasks, tokenizer=...)")
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
        target = EvalTarget(run_or_model.to(device), tok, run_id or "model", state_sha256(run_or_model),
                            None, UnigramScorer.uniform(tok.vocab_size))
    else:
        target = load_target(run_or_model, tokenizer, device)
    if run_id is not None:
        target.run_id = run_id
    if isinstance(store, (str, Path)):
        store = EvalStore(store)
    elif store is None and target.store_path is not None:
        store = EvalStore(target.store_path)

    env = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
           "kernel_paths": {str(k): v for k, v in target.model.kernel_paths().items()},
           "batch_size": batch_size, "share_prefix": share_prefix}
    scorer = ModelScorer(target.model, device)
    null = target.null or UnigramScorer.uniform(target.tokenizer.vocab_size)
    records: list[EvaluationRecord] = []
    todo: list[tuple[Task, str, list[Item]]] = []
    for name in names:
        if name.startswith("lm_eval:"):
            continue
        task = get_task(name)
        # pass@k depends on how many samples and at what temperature: part of the evaluation's identity
        version = task.version + (f"+n{samples}+t{temperature if samples > 1 else 0.0}" if task.kind == "code" else "")
        stored = None if force else stored_record(store, target, name, version, limit)
        if stored is not None:
            records.append(stored)
            if console is not None:
                console.print(f"{name}: already evaluated (limit {limit}), skipped", highlight=False)
            continue
        todo.append((task, version, task.items(limit)))

    with _progress(console, progress and bool(todo)) as bar:
        for task, version, items in todo:
            handle = bar.add_task(task.name, total=len(items), rate=0.0)
            start = time.time()

            def advance(n_items: float, handle=handle, start=start) -> None:
                bar.advance(handle, n_items)
                done = bar.tasks[handle].completed
                bar.update(handle, rate=done / max(time.time() - start, 1e-9))

            chance, null_values = {}, {}
            if task.kind == "code":
                from archifactory.eval.humaneval import evaluate_pass_at_k

                values, _ = evaluate_pass_at_k(target.model, target.tokenizer, limit, samples,
                                               temperature=temperature, on_problem=lambda: advance(1))
            else:
                requests = build_requests(items, target.tokenizer)
                per_item = max(1.0, sum(len(r) for r in requests) / max(len(items), 1))
                values, _ = score_task(scorer, task, items, requests, batch_size, lambda n: advance(n / per_item),
                                       share_prefix)
                null_values, _ = score_task(null, task, items, requests, batch_size=256)
                chance = M.chance(items, task.kind == "loglikelihood")
            elapsed = time.time() - start
            bar.update(handle, completed=len(items))
            record = EvaluationRecord(
                run_id=target.run_id, model_hash=target.model_hash, task=task.name, task_version=version,
                limit=limit, n_items=len(items), elapsed_s=elapsed, items_per_s=len(items) / max(elapsed, 1e-9),
                null_model=None if task.kind == "code" else null.name, env=env,
                metrics=[
                    MetricResult(run_id=target.run_id, model_hash=target.model_hash, task=task.name,
                                 task_version=version, limit=limit, metric=metric, value=value,
                                 chance=chance.get(metric), null_value=null_values.get(metric),
                                 higher_is_better=M.HIGHER_IS_BETTER.get(metric, True if metric.startswith("pass@")
                                                                         else None), n_items=len(items))
                    for metric, value in sorted(values.items())  # the order the store returns them in
                ],
            )
            if store is not None:
                store.put(record)
            records.append(record)
    foreign = [n for n in names if n.startswith("lm_eval:")]
    if foreign:
        records += _evaluate_lm_eval(target, foreign, limit, store, force, include_path, lm_eval_defaults, device,
                                     batch_size, null, env, console)
    if console is not None:
        console.print(results_table(records, target.run_id, null.name))
    return records


def stored_record(store, target, task: str, version: str, limit) -> EvaluationRecord | None:
    """The stored evaluation of ``target``'s weights on ``task`` at ``version`` and ``limit``, or None: an
    evaluation already in the store is not run again."""
    if store is None or not store.has(target.run_id, target.model_hash, task, version, limit):
        return None
    done = [m for m in store.metrics(target.run_id, task)
            if m.model_hash == target.model_hash and m.task_version == version and m.limit == limit]
    return EvaluationRecord(run_id=target.run_id, model_hash=target.model_hash, task=task, task_version=version,
                            limit=limit, n_items=done[0].n_items if done else 0, metrics=done)


def _evaluate_lm_eval(target, names, limit, store, force, include_path, include_defaults, device, batch_size, null,
                      env, console) -> list[EvaluationRecord]:
    """lm-eval tasks through :class:`~archifactory.eval.lm_eval_adapter.ArchifactoryLM`, stored like ours."""
    import lm_eval

    from archifactory.eval.lm_eval_adapter import PREFIX, ArchifactoryLM, run_lm_eval, task_manager

    manager = task_manager(include_path, include_defaults)
    unknown = [n for n in names if n[len(PREFIX):] not in manager.all_tasks]
    if unknown:
        raise KeyError(f"lm-eval knows no task {', '.join(unknown)}: put its YAML in a folder and pass "
                       f"--include-path FOLDER")
    records, todo = [], []
    for name in names:
        entry = manager.task_index[name[len(PREFIX):]]
        source = Path(entry.yaml_path).read_bytes() if entry.yaml_path else name.encode()
        version = f"lm_eval-{lm_eval.__version__}+{hashlib.sha256(source).hexdigest()[:12]}"
        stored = None if force else stored_record(store, target, name, version, limit)
        if stored is not None:
            records.append(stored)
            continue
        todo.append((name, version))
    if not todo:
        return records
    bare = [n[len(PREFIX):] for n, _ in todo]
    start = time.time()
    results = run_lm_eval(ArchifactoryLM(model=target.model, tokenizer=target.tokenizer, batch_size=batch_size,
                                         device=device), bare, limit, manager)
    elapsed = time.time() - start
    try:
        null_results = run_lm_eval(ArchifactoryLM(model=null, tokenizer=target.tokenizer, batch_size=256), bare,
                                   limit, manager)
    except NotImplementedError:  # generation tasks: a unigram model has no sensible generation
        null_results = {}
    for name, version in todo:
        result = results[name[len(PREFIX):]]
        null_values = null_results[result.task].metrics if result.task in null_results else {}
        record = EvaluationRecord(
            run_id=target.run_id, model_hash=target.model_hash, task=name, task_version=version, limit=limit,
            n_items=result.n_items, elapsed_s=elapsed, items_per_s=sum(r.n_items for r in results.values()) / elapsed,
            null_model=null.name, env=env,
            metrics=[MetricResult(run_id=target.run_id, model_hash=target.model_hash, task=name, task_version=version,
                                  limit=limit, metric=metric, value=value, null_value=null_values.get(metric),
                                  higher_is_better=M.HIGHER_IS_BETTER.get(metric), n_items=result.n_items)
                     for metric, value in result.metrics.items()],
        )
        if store is not None:
            store.put(record)
        records.append(record)
    return records


def results_table(records: Sequence[EvaluationRecord], run_id: str, null_name: str):
    """A rich table: task, metric, value, chance, null model, items."""
    from rich.table import Table

    table = Table(title=f"{run_id}: evaluation (null model: {null_name})")
    for column in ("task", "metric", "value", "chance", "null", "items"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")

    def fmt(x):
        if x is None or math.isnan(x):
            return ""
        return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.3e}"

    for record in records:
        for m in record.metrics:
            table.add_row(record.task, m.metric, fmt(m.value), fmt(m.chance), fmt(m.null_value), str(m.n_items))
    return table
