"""Sweeps: baseline + one-change variants x seeds at equal budget, the results store, statistics and
the report."""

from archifactory.sweep.report import write_report
from archifactory.sweep.runner import SweepRunner, run_sweep
from archifactory.sweep.spec import SweepSpec, load_sweep, plan
from archifactory.sweep.store import Store

__all__ = ["Store", "SweepRunner", "SweepSpec", "load_sweep", "plan", "run_sweep", "write_report"]
