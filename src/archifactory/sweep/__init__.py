"""Sweeps: baseline + one-change variants x seeds at equal budget, the results store, statistics and
the report."""

from archifactory.sweep.spec import SweepSpec, load_sweep, plan
from archifactory.sweep.store import Store

__all__ = ["Store", "SweepSpec", "load_sweep", "plan"]
