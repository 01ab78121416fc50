"""Running a probe sweep: every (variant, width, task setting, lr, weight decay, seed) trained in a pool
of worker processes, each result written to ``SWEEP_DIR/results.sqlite`` as it finishes.

Re-running skips finished runs (a run is short: an interrupted one starts again); a failing run is
recorded with its error and the others go on. The sweep directory is held by one process at a time
(the same lock as ``archifactory sweep``). Examples are generated once per (task setting, split) in
each worker, from the spec's ``data_seed``, so every run of a task reads the identical examples.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import platform
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from archifactory.eval.probes.spec import ProbeJob, ProbeSweepSpec, plan, spec_yaml
from archifactory.eval.probes.store import ProbeStore
from archifactory.sweep.store import PROBE_RECOVERY, StoreDamagedError
from archifactory.locking import hold_directory
from archifactory.results import RunEnv


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=8)
def _data(task_json: str, data_key: int, data_seed: int):
    """The task and its three splits (generated once per worker process)."""
    from pydantic import TypeAdapter

    from archifactory.eval.probes.tasks import TaskConfig
    from archifactory.eval.probes.train import split_rng

    task = TypeAdapter(TaskConfig).validate_json(task_json)
    return task, {
        "train": task.generate(task.train_examples, split_rng(data_seed, data_key, "train"), "train"),
        "valid": task.generate(task.test_examples, split_rng(data_seed, data_key, "valid"), "valid"),
        "test": task.generate(task.test_examples, split_rng(data_seed, data_key, "test"), "test"),
    }


def run_job(job: ProbeJob, spec: ProbeSweepSpec) -> dict:
    """Train one probe run (in a worker process); returns its result as a plain dict."""
    import torch

    from archifactory.eval.probes.train import ProbeSettings, train_probe
    from archifactory.config import validate, with_default_kinds
    from archifactory.train.config import RunConfig
    from archifactory.train.optim import optimizer_config

    task, data = _data(job.setting.task.model_dump_json(), job.setting.data_key, spec.data_seed)
    optimizer = {**spec.optimizer, "lr": job.lr}
    if "weight_decay" in optimizer_config(spec.optimizer).model_fields:
        optimizer["weight_decay"] = job.weight_decay
    # the schedule through the run config's registry field, so any registered schedule is accepted
    schedule = validate(RunConfig, with_default_kinds(RunConfig, {
        "model": job.model.model_dump(), "schedule": spec.schedule,
        "train": {"max_steps": 1, "seq_len": job.model.max_seq_len}})).schedule
    device = spec.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = ProbeSettings(batch_size=spec.train.batch_size, max_steps=spec.train.max_steps,
                             eval_every=spec.train.eval_every, early_stop=spec.train.early_stop,
                             optimizer=optimizer_config(optimizer), schedule=schedule,
                             grad_clip=spec.train.grad_clip, precision=spec.train.precision, device=device)
    result = train_probe(job.model, task, data, settings, job.seed)
    out = {k: getattr(result, k) for k in ("valid_acc", "test_acc", "test_loss", "steps", "examples",
                                           "stopped_early", "elapsed_s", "params", "history")}
    out["test_examples"] = len(data["test"])
    out["env"] = RunEnv(device=result.device, precision=result.precision, torch=torch.__version__,
                        python=platform.python_version(), kernel_paths=result.kernel_paths, world_size=1)
    return out


def _slots(spec: ProbeSweepSpec) -> int:
    import torch

    if spec.parallel is not None:
        return spec.parallel
    if spec.train.device in ("auto", "cuda") and torch.cuda.is_available():
        return 1  # one process drives the GPU (tiny models: a second would only contend)
    return max(1, (os.cpu_count() or 1) // spec.threads_per_run)


class ProbeRunner:
    def __init__(self, spec: ProbeSweepSpec, sweep_dir: Path, console=None) -> None:
        self.spec, self.sweep_dir, self.console = spec, Path(sweep_dir), console
        try:
            self.store = ProbeStore(self.sweep_dir / "results.sqlite")
        except StoreDamagedError as err:
            raise StoreDamagedError(err.path, err.reason, PROBE_RECOVERY) from None

    def plan(self) -> list[ProbeJob]:
        from archifactory.sweep.runner import environment

        jobs = plan(self.spec)
        self.store.set_sweep(self.spec.name, spec_yaml(self.spec), {**environment(), "kind": "probe"})
        for job in jobs:
            self.store.add_probe(job.run_id, job.variant, job.width, job.setting.task_name, job.setting.setting,
                                 job.setting.task.model_dump_json(), job.lr, job.weight_decay, job.seed,
                                 job.model.model_dump_json())
        return jobs

    def run(self) -> dict[str, int]:
        with hold_directory(self.sweep_dir, ".sweep.lock", "sweep directory",
                            "wait for that sweep to finish (re-running resumes it) or choose another --dir"):
            return self._run()

    def _run(self) -> dict[str, int]:
        jobs = self.plan()
        done = {r.run_id for r in self.store.probe_runs("done")}
        todo = [j for j in jobs if j.run_id not in done]
        n = _slots(self.spec)
        self._print(f"probe sweep {self.spec.name!r}: {len(jobs)} runs ({len(jobs) - len(todo)} already done), "
                    f"{n} at a time -> {self.sweep_dir}")
        if todo:
            self._execute(todo, n)
        runs = self.store.probe_runs()
        counts = {"done": sum(r.status == "done" for r in runs), "failed": sum(r.status == "failed" for r in runs)}
        self._print(f"probe sweep finished: {counts['done']} done, {counts['failed']} failed")
        return counts

    def _execute(self, todo: list[ProbeJob], n: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]:,.0f} examples/s"), TextColumn("{task.fields[last]}"),
                            TimeElapsedColumn(), console=self.console)
        examples = 0
        start = time.perf_counter()
        context = multiprocessing.get_context("spawn")  # no forked torch threads or CUDA state
        with progress, ProcessPoolExecutor(max_workers=n, mp_context=context, initializer=_init_worker,
                                           initargs=(self.spec.threads_per_run,)) as pool:
            bar = progress.add_task("runs", total=len(todo), rate=0.0, last="")
            futures = {pool.submit(run_job, job, self.spec): job for job in todo}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = futures[future]
                    try:
                        result = future.result()
                    except Exception as err:  # one failing run is recorded; the others go on
                        detail = "".join(traceback.format_exception(type(err), err, err.__traceback__))[-3000:]
                        self.store.probe_failed(job.run_id, detail)
                        last = f"{job.run_id}: failed ({type(err).__name__}: {str(err)[:80]})"
                    else:
                        self.store.probe_done(job.run_id, result)
                        examples += result["examples"]
                        last = f"{job.run_id}: test acc {result['test_acc']:.3f}"
                    progress.update(bar, advance=1, rate=examples / max(1e-9, time.perf_counter() - start),
                                    last=last)

    def _print(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, highlight=False)
        else:
            print(message, flush=True)


def run_probe_sweep(spec: ProbeSweepSpec, sweep_dir: Path | None = None, console=None) -> Path:
    sweep_dir = Path(sweep_dir or Path("sweeps") / spec.name)
    ProbeRunner(spec, sweep_dir, console).run()
    return sweep_dir


def describe_probe_plan(spec: ProbeSweepSpec) -> str:
    jobs = plan(spec)
    lines = [f"{j.run_id}: variant {j.variant}, d_model {j.width}, task {j.setting.label}, lr {j.lr:g}, "
             f"weight_decay {j.weight_decay:g}, seed {j.seed}" for j in jobs]
    lines.append(f"# {len(jobs)} runs of up to {spec.train.max_steps} steps x {spec.train.batch_size} examples; "
                 f"per (variant, width, task setting) the grid point with the best mean validation accuracy is "
                 f"reported at its test accuracy")
    return "\n".join(lines)
