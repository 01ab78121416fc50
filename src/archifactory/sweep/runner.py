"""Running a sweep: every (variant, seed[, lr]) in its own subprocess, several at once.

A variant with an lr grid runs in two waves: its lr-selection runs (the grid on ``lr_selection_seeds``)
go with the first wave, beside every other run; once they have finished, the lr they choose
(:func:`archifactory.sweep.stats.choose_lrs`) is run on the compared ``seeds`` in a second wave.

On CPU the runs share the cores (``threads_per_run`` threads each); with GPUs each run gets one
(``CUDA_VISIBLE_DEVICES``). Re-running skips finished runs and resumes interrupted ones from their
checkpoints (the trainer resumes by itself); a failing run is recorded with its error and the others go
on. Results land in ``SWEEP_DIR/results.sqlite`` as each run finishes.

With post-training ``stages``, a compared run and its stage runs form a chain (``RUN``, ``RUN-sft``,
``RUN-sft-grpo``) that one slot runs in order, each stage skipped when the store has it done and resumed
from its checkpoints otherwise; a failed stage stops its chain (the later stages are recorded as failed
with the reason). The ``eval:`` tasks run on each run of the chain as soon as it is done (in a subprocess,
results into ``results.sqlite``), and evaluations already stored for the run's weights are skipped, so a
killed sweep restarts where it stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from archifactory.config import ConfigError, dump_config, leaf_changes
from archifactory.errors import MissingDependencyError
from archifactory.locking import hold_directory
from archifactory.results import RunSummary
from archifactory.sweep.spec import BASELINE, PlannedRun, SweepSpec, plan, spec_yaml
from archifactory.sweep.stats import COMPARE, LR_SELECTION, choose_lrs, is_selection_run
from archifactory.sweep.store import Store, StoreDamagedError
from archifactory.train.metrics import read_metrics

RERUN_FREE = ("name", "out_dir", "base", "data.cache_dir", "train.threads", "train.progress", "train.log_every")
"""Run-config fields in which a finished run may differ from its plan when a sweep runs again: where it lives
and how it was watched, not what it computed."""


def recipe_changes(old: dict, new: dict) -> list[str]:
    """``field: old -> new`` for each difference between two run-config dumps that changes what a run
    computes: not :data:`RERUN_FREE`, nor one absolute path for another (a moved checkout or sweep), nor a
    field one of them lacks (added to the code since: its default keeps the behaviour it had)."""
    return [f"{field}: {before!r} -> {after!r}" for field, before, after in leaf_changes(old, new, common_only=True)
            if not any(field == f or field.startswith(f + ".") for f in RERUN_FREE)
            and not (isinstance(before, str) and isinstance(after, str) and before.startswith("/")
                     and after.startswith("/"))]


def environment() -> dict:
    """Where the sweep ran: git SHA (when in a repository), versions, device."""
    sha = None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    import platform

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {"git_sha": sha, "torch": torch.__version__, "python": platform.python_version(), "device": device,
            "hostname": platform.node()}


def train_subprocess(cmd: list[str], env: dict[str, str], log: str) -> int:
    """Run one training command with its output appended to ``log``; returns the exit code. Module-level
    so that a scheduler (submitit) can pickle it and run it on another machine."""
    with open(log, "a") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}).returncode


def submitit_executor(spec: SweepSpec, sweep_dir: Path):
    """An existing scheduler, through submitit (``pip install 'archifactory[sweep]'``)."""
    try:
        import submitit
    except ImportError:
        raise MissingDependencyError("executor: submitit needs the submitit package: pip install 'archifactory[sweep]'") from None
    settings = dict(spec.submitit)
    folder = settings.pop("folder", str(sweep_dir / "submitit"))
    cluster = settings.pop("cluster", None)
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    settings.setdefault("cpus_per_task", spec.threads_per_run)
    executor.update_parameters(**settings)
    return executor


def slots(spec: SweepSpec) -> list[dict[str, str]]:
    """One environment per concurrent run."""
    threads = str(spec.threads_per_run)
    base = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if spec.executor == "submitit":  # the scheduler places the jobs: submit them all at once
        return [dict(base) for _ in range(spec.parallel or 64)]
    if torch.cuda.is_available():
        n = spec.parallel or torch.cuda.device_count()
        return [{**base, "CUDA_VISIBLE_DEVICES": str(i % torch.cuda.device_count())} for i in range(n)]
    n = spec.parallel or max(1, (os.cpu_count() or 1) // spec.threads_per_run)
    return [dict(base) for _ in range(n)]


class SweepRunner:
    def __init__(self, spec: SweepSpec, root: Path, sweep_dir: Path, console=None) -> None:
        self.spec, self.root, self.sweep_dir = spec, Path(root), Path(sweep_dir)
        self.console = console
        self.store = self._open_store(self.sweep_dir / "results.sqlite")
        self.executor = submitit_executor(spec, self.sweep_dir) if spec.executor == "submitit" else None
        self._finished_shown: set[str] = set()  # runs whose progress line is final

    def chosen_lrs(self) -> dict[str, float]:
        """The lr each grid variant's finished lr-selection runs choose (variants with none yet: absent)."""
        selection = [r for r in self.store.finals() if is_selection_run(r)]
        return {v: c.chosen_lr for v, c in choose_lrs(selection).items()}

    def _open_store(self, path: Path) -> Store:
        """The sweep's results database; a damaged one is moved aside and a new one started: each
        finished run is then recorded again from its run directory (its trainer resumes at the last
        step from its final checkpoint, so nothing is trained twice)."""
        try:
            return Store(path)
        except StoreDamagedError as err:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for suffix in ("", "-journal", "-wal", "-shm"):
                part = path.with_name(path.name + suffix)
                if part.exists():
                    part.rename(path.with_name(f"{path.name}.damaged-{stamp}{suffix}"))
            self._print(f"warning: results database {path} is damaged ({err.reason}); moved it aside to "
                        f"{path.name}.damaged-{stamp} and started a new one: each finished run is recorded again "
                        "from its run directory (nothing is retrained)")
            return Store(path)

    def plan(self) -> list[PlannedRun]:
        runs = plan(self.spec, self.root, self.sweep_dir, self.chosen_lrs())
        self.refuse_recipe_changes(runs)
        self.store.set_sweep(self.spec.name, spec_yaml(self.spec), environment())
        for run in runs:
            self.store.add_run(run.run_id, run.variant, run.seed, run.lr, run.variant == BASELINE,
                               run.config.model_dump(mode="json"), run.changes, run.config.out_dir, run.purpose,
                               run.stage, run.parent)
        return runs

    def refuse_recipe_changes(self, runs: list[PlannedRun]) -> None:
        """Refuse to run a sweep again when a run it finished would now be planned differently: it is skipped
        as done, so the store and report would describe a recipe it never ran. Where the runs live and how
        fast they ran may differ (:data:`RERUN_FREE`, and absolute paths: a moved checkout or sweep)."""
        stored = {r.run_id: r for r in self.store.runs(stage=None) if r.status == "done"}
        for run in runs:
            if run.run_id not in stored:
                continue
            changes = recipe_changes(stored[run.run_id].config, run.config.model_dump(mode="json"))
            if changes:
                raise ConfigError(
                    f"sweep {self.sweep_dir}: run {run.run_id} finished under another recipe ({'; '.join(changes[:3])}"
                    + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "") + "); it would be skipped "
                    "and reported under the new one. Give the changed sweep a new --dir, or delete "
                    f"{run.config.out_dir} (and the runs that continue it) to run it again"
                )

    def pending(self, runs: list[PlannedRun]) -> list[PlannedRun]:
        """Runs not done, and done runs whose ``eval:`` tasks are not all stored yet."""
        done = {r["run_id"] for r in self.store.runs(stage=None) if r["status"] == "done"}
        return [r for r in runs if r.run_id not in done or self._eval_missing(r)]

    def chains(self, runs: list[PlannedRun]) -> list[list[PlannedRun]]:
        """Each pretraining run followed by its post-training runs, in stage order."""
        chains: dict[str, list[PlannedRun]] = {}
        root_of: dict[str, str] = {}
        for run in runs:
            root = run.run_id if run.parent is None else root_of[run.parent]
            root_of[run.run_id] = root
            chains.setdefault(root, []).append(run)
        return list(chains.values())

    # ------------------------------------------------------------------------------------- evaluation

    def _eval_missing(self, run: PlannedRun) -> bool:
        """Whether the sweep's ``eval:`` tasks still lack a stored result for this done run's weights."""
        if run.purpose != COMPARE or not self.spec.evaluates(run.stage):
            return False
        weights = Path(run.config.out_dir) / "model" / "model.safetensors"
        if not weights.is_file():
            return True
        from archifactory.eval.runner import file_sha256
        from archifactory.eval.store import EvalStore
        from archifactory.eval.tasks import get_task

        store, digest, limit = EvalStore(self.store.path), file_sha256(weights), self.spec.eval.limit
        for name in self.spec.eval.tasks:
            if name.startswith("lm_eval:") or get_task(name).kind == "code":  # versions known only when run
                if not any(e["task"] == name and e["model_hash"] == digest and e["n_limit"] == (limit or -1)
                           for e in store.evaluations(run.run_id)):
                    return True
            elif not store.has(run.run_id, digest, name, get_task(name).version, limit):
                return True
        return False

    def _evaluate(self, run: PlannedRun, env: dict[str, str]) -> None:
        """The ``eval:`` tasks on a done run, in a subprocess (log: ``RUN_DIR/eval.log``); a failure is
        printed and leaves the run done (re-running the sweep tries again)."""
        if not self._eval_missing(run):
            return
        section = self.spec.eval
        log = Path(run.config.out_dir) / "eval.log"
        cmd = [sys.executable, "-m", "archifactory.sweep.evaluation", run.config.out_dir, "--tasks",
               ",".join(section.tasks), "--store", str(self.store.path), "--run-id", run.run_id,
               "--batch-size", str(section.batch_size)]
        if section.limit is not None:
            cmd += ["--limit", str(section.limit)]
        limit = "" if section.limit is None else f" (limit {section.limit})"
        self._print(f"evaluating {run.run_id}: {', '.join(section.tasks)}{limit}; log {log}")
        start, offset = time.time(), log.stat().st_size if log.is_file() else 0
        code = train_subprocess(cmd, env, str(log))
        if code != 0:
            tail = log.read_text(errors="replace")[-1000:] if log.is_file() else ""
            self._print(f"warning: evaluating {run.run_id} failed (exit code {code}; {log}):\n{tail}")
        else:
            with open(log, "rb") as f:  # the subprocess prints one line of scores per task: show them here too
                f.seek(offset)
                scores = [line for line in f.read().decode(errors="replace").splitlines()
                          if line.startswith(f"{run.run_id} ")]
            self._print("\n".join([f"evaluated {run.run_id} in {time.time() - start:.0f} s", *scores]))

    def run(self) -> dict[str, int]:
        """Train every pending run; holds the sweep directory's lock throughout, so a second
        ``archifactory sweep`` on the same directory refuses at once (:class:`DirectoryBusyError`)."""
        with hold_directory(self.sweep_dir, ".sweep.lock", "sweep directory",
                            "wait for that sweep to finish (re-running resumes it) or choose another --dir"):
            return self._run()

    def _run(self) -> dict[str, int]:
        attempted: set[str] = set()
        wave = 0
        while True:  # wave 2: the compared runs at the lr that the finished lr-selection runs chose
            runs = self.plan()
            todo = [r for r in self.pending(runs) if r.run_id not in attempted]
            if wave and not todo:
                break
            self._run_wave(runs, todo, wave)
            attempted |= {r.run_id for r in todo}
            wave += 1
        counts = {"done": 0, "failed": 0}
        for r in self.store.runs(stage=None):
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        self._print(f"sweep finished: {counts.get('done', 0)} done, {counts.get('failed', 0)} failed")
        return counts

    def _run_wave(self, runs: list[PlannedRun], todo: list[PlannedRun], wave: int) -> None:
        environments = slots(self.spec)
        if wave == 0:
            message = (f"sweep {self.spec.name!r}: {len(runs)} runs ({len(runs) - len(todo)} already done), "
                       f"{len(environments)} at a time, budget {self.spec.budget.describe()} -> {self.sweep_dir}")
        else:
            message = f"sweep {self.spec.name!r}: {len(todo)} more runs at the learning rates chosen"
        waiting = sorted(name for name, variant in self.spec.variants.items() if variant.has_lr_grid
                         and not any(r.variant == name and r.purpose != LR_SELECTION for r in runs))
        if waiting:
            message += (f"\n  lr grids of {', '.join(waiting)} run on seeds {self.spec.lr_selection_seeds}; the chosen "
                        f"lr then runs on the compared seeds {self.spec.seeds}")
        self._print(message)
        free = list(range(len(environments)))
        lock = threading.Lock()
        results: dict[str, str] = {}

        pending = {r.run_id for r in todo}
        chains = [c for c in self.chains(runs) if any(r.run_id in pending for r in c)]
        todo = [r for c in chains for r in c]

        def execute(chain: list[PlannedRun]) -> None:
            with lock:
                slot = free.pop()
            try:
                self._execute_chain(chain, environments[slot], results)
            finally:
                with lock:
                    free.append(slot)

        progress = self._progress()
        with progress:
            tasks = {r.run_id: progress.add_task(r.run_id, total=None, loss=float("nan"), tps=0.0, status="queued")
                     for r in todo}
            with ThreadPoolExecutor(max_workers=len(environments)) as pool:
                futures = [pool.submit(execute, c) for c in chains]
                while not all(f.done() for f in futures):
                    self._update(progress, tasks, todo, results)
                    time.sleep(0.5)
                for f in futures:
                    f.result()
            self._update(progress, tasks, todo, results)

    def _execute_chain(self, chain: list[PlannedRun], env: dict[str, str], results: dict[str, str]) -> None:
        """Each run of the chain in stage order: done ones skipped, each done one evaluated; a failure stops it."""
        done = {r["run_id"] for r in self.store.runs(stage=None) if r["status"] == "done"}
        for i, run in enumerate(chain):
            status = "done" if run.run_id in done else self._execute(run, env)
            results[run.run_id] = status
            if status != "done":
                for later in chain[i + 1:]:
                    self.store.mark(later.run_id, "failed", f"not run: its {run.stage} run {run.run_id} failed")
                    results[later.run_id] = "failed"
                return
            self._evaluate(run, env)

    def _execute(self, run: PlannedRun, env: dict[str, str]) -> str:
        run_dir = Path(run.config.out_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path = run_dir / "run.yaml"
        if run.stage_config is not None:  # post-training: the recipe's config; the model comes from the parent
            config_path.write_text(yaml.safe_dump(run.stage_config, sort_keys=False))
        else:
            dump_config(run.config, config_path)
        self.store.mark(run.run_id, "running")
        log = run_dir / "train.log"
        cmd = [sys.executable, "-m", "archifactory.cli", "train", str(config_path), "--set", "train.progress=false"]
        if self.executor is None:
            code = train_subprocess(cmd, env, str(log))
        else:
            job = self.executor.submit(train_subprocess, cmd, env, str(log))
            try:
                code = job.result()
            except Exception as err:  # the scheduler lost the job (timeout, preemption, node failure)
                self.store.mark(run.run_id, "failed", f"scheduler job {job.job_id} failed: {err}")
                return "failed"
        if code != 0:
            tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
            self.store.mark(run.run_id, "failed", f"exit code {code}\n{tail}")
            return "failed"
        try:
            summary = RunSummary.model_validate_json((run_dir / "summary.json").read_text())
        except (OSError, ValidationError) as err:
            self.store.mark(run.run_id, "failed", f"run finished without a readable summary.json: {err}")
            return "failed"
        self.store.record_results(run.run_id, read_metrics(run_dir / "metrics.jsonl"), summary)
        return "done"

    def _update(self, progress, tasks, todo, results) -> None:
        """Refresh each run's line from its metrics file; a finished run is read one last time only."""
        for run in todo:
            if run.run_id in self._finished_shown:
                continue
            if run.run_id in results:
                self._finished_shown.add(run.run_id)
            task = tasks[run.run_id]
            rows = read_metrics(Path(run.config.out_dir) / "metrics.jsonl")
            records = [r for r in rows if r.get("kind") == "train"]
            status = results.get(run.run_id, "running" if records else "queued")
            fields = {"status": status}
            if records:
                last = records[-1]
                fields.update(loss=last["loss"], tps=last["tokens_per_s"] or 0.0)
                tc = run.config.train
                budget = tc.max_tokens or (tc.max_steps * tc.tokens_per_step() if tc.max_steps else None)
                # train rows come every log_every steps; every row (evaluations too) carries the tokens seen
                seen = max(r.get("tokens") or 0 for r in rows)
                if status == "done":  # a finished run fills its bar (its budget may be epochs or time)
                    budget = seen
                progress.update(task, completed=seen, total=budget, **fields)
            else:
                progress.update(task, **fields)

    def _progress(self):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        return Progress(
            TextColumn("{task.description:<24}"),
            BarColumn(),
            TextColumn("{task.fields[status]:<8}"),
            TextColumn("loss {task.fields[loss]:.3f}"),
            TextColumn("{task.fields[tps]:,.0f} tok/s"),
            TimeElapsedColumn(),
            console=self.console,
        )

    def _print(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, highlight=False)
        else:
            print(message, flush=True)


def run_sweep(spec: SweepSpec, root: Path, sweep_dir: Path | None = None, console=None) -> Path:
    sweep_dir = Path(sweep_dir or Path("sweeps") / spec.name)
    SweepRunner(spec, root, sweep_dir, console).run()
    return sweep_dir


def describe_plan(spec: SweepSpec, root: Path, sweep_dir: Path) -> str:
    lines = []
    for run in plan(spec, root, sweep_dir):
        entry = {"variant": run.variant, "seed": run.seed, "lr": run.lr, "purpose": run.purpose}
        if run.stage == "pretrain":
            entry |= {"max_tokens": run.config.train.max_tokens, "changes": run.changes}
        else:
            tc = run.config.train
            entry |= {"stage": run.stage, "from": run.parent, "max_steps": tc.max_steps, "batch_size": tc.batch_size,
                      "seq_len": tc.seq_len, "optimizer_lr": run.config.optimizer.lr}
        if spec.evaluates(run.stage) and run.purpose == COMPARE:
            entry["eval"] = {"tasks": spec.eval.tasks, "limit": spec.eval.limit}
        lines.append(yaml.safe_dump({run.run_id: entry}, sort_keys=False).rstrip())
    for name, variant in spec.variants.items():
        if variant.has_lr_grid:
            lines.append(f"# then {name} on seeds {spec.seeds} at the lr (of {variant.lr}) with the lowest mean "
                         f"final val loss on seeds {spec.lr_selection_seeds}")
    return "\n".join(lines)
