"""Probe results in the sweep's ``results.sqlite``: table ``probe_runs``, one row per run (variant, width,
task setting, grid point, seed) with its status, validation and test accuracy, steps, examples seen,
whether it stopped early, wall time, parameters, the validation history and where it ran (``env_json``:
device, resolved precision and each layer's kernel path, the :class:`~archifactory.results.RunEnv` that
pretraining runs record). The ``sweep`` row (name, spec, environment) is the sweep store's
(:class:`archifactory.sweep.store.Store`). A table written before ``env_json`` existed gains the column
(empty) when opened for writing."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field

from archifactory.results import RunEnv, parse_run_env


SCHEMA = """
CREATE TABLE IF NOT EXISTS probe_runs (
    run_id TEXT PRIMARY KEY,
    variant TEXT NOT NULL,
    width INTEGER NOT NULL,
    task TEXT NOT NULL,
    setting TEXT NOT NULL,
    task_json TEXT NOT NULL,
    lr REAL NOT NULL,
    weight_decay REAL NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    error TEXT,
    valid_acc REAL,
    test_acc REAL,
    test_loss REAL,
    steps INTEGER,
    examples INTEGER,
    stopped_early INTEGER,
    elapsed_s REAL,
    params INTEGER,
    test_examples INTEGER,
    history_json TEXT,
    model_json TEXT,
    finished_at REAL,
    env_json TEXT
);
"""
MIGRATIONS = {"env_json": "TEXT"}
"""Columns added to ``probe_runs`` since its first release, with their definitions."""


class ProbeRun(BaseModel):
    """One row of ``probe_runs`` as the report reads it."""

    run_id: str
    variant: str
    width: int
    task: str
    setting: str
    lr: float
    weight_decay: float
    seed: int
    status: str
    error: str | None = None
    valid_acc: float | None = None
    test_acc: float | None = None
    test_loss: float | None = None
    steps: int | None = None
    examples: int | None = None
    stopped_early: bool | None = None
    elapsed_s: float | None = None
    params: int | None = None
    test_examples: int | None = None
    env: Annotated[RunEnv | None, BeforeValidator(parse_run_env), Field(default=None, validation_alias="env_json")]
    """Where the run ran: device, resolved precision, kernel path per layer (``None`` before it finished,
    or in a store written before probe runs recorded it)."""


class ProbeStore:
    """The ``probe_runs`` table beside the sweep store's tables in the same file (the sweep store
    checks the file's integrity and keeps the ``sweep`` row)."""

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        from archifactory.sweep.store import Store  # the sweep package imports this module (its report)

        self.sweep_store = Store(path, read_only)
        self.connect, self.transaction = self.sweep_store.connect, self.sweep_store.transaction
        if not read_only:
            with self.transaction() as db:
                db.executescript(SCHEMA)
                have = {row[1] for row in db.execute("PRAGMA table_info(probe_runs)")}
                for name, definition in MIGRATIONS.items():
                    if name not in have:
                        db.execute(f"ALTER TABLE probe_runs ADD COLUMN {name} {definition}")

    def set_sweep(self, name: str, spec_yaml: str, env: dict) -> None:
        self.sweep_store.set_sweep(name, spec_yaml, env)

    def sweep(self) -> dict | None:
        return self.sweep_store.sweep()

    def has_probes(self) -> bool:
        with self.connect() as db:
            return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='probe_runs'").fetchone() is not None

    def add_probe(self, run_id: str, variant: str, width: int, task: str, setting: str, task_json: str, lr: float,
                  weight_decay: float, seed: int, model_json: str) -> None:
        """Register a run; an existing one keeps its status and results."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO probe_runs (run_id, variant, width, task, setting, task_json, lr, weight_decay, seed, "
                "model_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(run_id) DO NOTHING",
                (run_id, variant, width, task, setting, task_json, lr, weight_decay, seed, model_json),
            )

    def probe_failed(self, run_id: str, error: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE probe_runs SET status='failed', error=?, finished_at=? WHERE run_id=?",
                       (error, time.time(), run_id))

    def probe_done(self, run_id: str, result: dict[str, Any]) -> None:
        """Record a finished run: ``result`` as :func:`archifactory.eval.probes.runner.run_job` returns it
        (``env``: a :class:`~archifactory.results.RunEnv`, optional)."""
        env = result.get("env")
        with self.transaction() as db:
            db.execute(
                "UPDATE probe_runs SET status='done', error=NULL, valid_acc=?, test_acc=?, test_loss=?, steps=?, "
                "examples=?, stopped_early=?, elapsed_s=?, params=?, test_examples=?, history_json=?, finished_at=?, "
                "env_json=? WHERE run_id=?",
                (result["valid_acc"], result["test_acc"], result["test_loss"], result["steps"], result["examples"],
                 int(result["stopped_early"]), result["elapsed_s"], result["params"], result["test_examples"],
                 json.dumps(result["history"]), time.time(), env.model_dump_json() if env is not None else None,
                 run_id),
            )

    def probe_runs(self, status: str | None = None) -> list[ProbeRun]:
        if not self.has_probes():
            return []
        with self.connect() as db:  # a read-only store written before env_json existed reads it as empty
            have = {r[1] for r in db.execute("PRAGMA table_info(probe_runs)")}
        env = "env_json" if "env_json" in have else "NULL AS env_json"
        query = ("SELECT run_id, variant, width, task, setting, lr, weight_decay, seed, status, error, valid_acc, "
                 f"test_acc, test_loss, steps, examples, stopped_early, elapsed_s, params, test_examples, {env} "
                 "FROM probe_runs")
        args: tuple = ()
        if status is not None:
            query, args = query + " WHERE status=?", (status,)
        with self.connect() as db:
            rows = db.execute(query + " ORDER BY task, setting, variant, width, lr, weight_decay, seed", args)
            return [ProbeRun.model_validate(dict(r)) for r in rows]

    def history(self, run_id: str) -> list[dict]:
        with self.connect() as db:
            row = db.execute("SELECT history_json FROM probe_runs WHERE run_id=?", (run_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else []
