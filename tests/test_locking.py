"""One writer per directory: a second sweep (or trainer) on a directory in use refuses with a clear
message, and a lock left by a killed process does not block the next one."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from archifactory.locking import DirectoryBusyError
from archifactory.sweep.runner import SweepRunner
from archifactory.sweep.store import Store
from archifactory.train import Trainer, load_run_config
from test_sweep import spec
from test_train import run_config


def _holder(tmp_path, code: str) -> subprocess.Popen:
    """A subprocess that takes a directory's lock the way the real command does and then waits."""
    script = tmp_path / "holder.py"
    script.write_text(textwrap.dedent(code))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    line = proc.stdout.readline()
    assert line.strip() == "holding", proc.stderr.read()[-2000:]
    return proc


def test_second_sweep_on_a_directory_refuses_and_a_killed_holder_releases_it(tmp_path):
    sweep_dir = tmp_path / "sweep"
    holder = _holder(tmp_path, f"""
        import sys, time
        from archifactory.sweep.runner import SweepRunner
        from archifactory.sweep.spec import SweepSpec
        from archifactory.config import validate
        from test_sweep import spec
        from pathlib import Path
        def busy(self):
            print("holding", flush=True)
            time.sleep(600)
        SweepRunner._run = busy
        SweepRunner(spec(Path({str(tmp_path)!r}), seeds=[0], variants={{}}), Path({str(tmp_path)!r}),
                    Path({str(sweep_dir)!r})).run()
    """)
    try:
        s = spec(tmp_path, seeds=[0], variants={})
        with pytest.raises(DirectoryBusyError, match=rf"sweep directory .*sweep is in use by process {holder.pid} "
                                                     r"on .*choose another --dir"):
            SweepRunner(s, tmp_path, sweep_dir).run()
        assert not (sweep_dir / "runs").exists()  # nothing was trained by the refused sweep
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel released the killed process's lock: the next sweep runs
    counts = SweepRunner(s, tmp_path, sweep_dir).run()
    assert counts["done"] == 1
    assert [r["status"] for r in Store(sweep_dir / "results.sqlite").runs()] == ["done"]


def test_second_trainer_on_a_run_directory_refuses(tmp_path):
    cfg = load_run_config(run_config(tmp_path, max_steps=2))
    holder = _holder(tmp_path, f"""
        import time
        from archifactory.train import Trainer, load_run_config
        from test_train import run_config
        from pathlib import Path
        def busy(self):
            print("holding", flush=True)
            time.sleep(600)
        Trainer.setup = busy
        Trainer(load_run_config(run_config(Path({str(tmp_path)!r}), max_steps=2))).run()
    """)
    try:
        with pytest.raises(DirectoryBusyError, match=rf"run directory .*run is in use by process {holder.pid}"):
            Trainer(cfg).run()
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert Trainer(cfg).run()["steps"] == 2
