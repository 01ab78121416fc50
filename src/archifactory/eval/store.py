"""Evaluation results in SQLite (stdlib): one row per (run, model weights, task, item limit) evaluation and
one row per metric of it.

The tables live beside the sweep store's in any database: a run directory keeps its own ``eval.sqlite``;
a sweep can point :class:`EvalStore` at its ``results.sqlite`` (the table names do not collide), so the
report reads evaluations with the rest of a sweep's results.

Tables:
- ``evaluations``: run_id, model_hash (SHA-256 of the weights file, so a retrained run is evaluated
  again), task, task_version, n_limit (-1 = all items), n_items, elapsed_s, items_per_s, null_model,
  created_at, env_json. Primary key (run_id, model_hash, task, task_version, n_limit): an evaluation
  already there is skipped.
- ``eval_metrics``: per evaluation and metric: value, chance level, the null model's value,
  higher_is_better, n_items.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel, ConfigDict

EVAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    run_id TEXT NOT NULL,
    model_hash TEXT NOT NULL,
    task TEXT NOT NULL,
    task_version TEXT NOT NULL,
    n_limit INTEGER NOT NULL,
    n_items INTEGER NOT NULL,
    elapsed_s REAL,
    items_per_s REAL,
    null_model TEXT,
    created_at REAL NOT NULL,
    env_json TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (run_id, model_hash, task, task_version, n_limit)
);
CREATE TABLE IF NOT EXISTS eval_metrics (
    run_id TEXT NOT NULL,
    model_hash TEXT NOT NULL,
    task TEXT NOT NULL,
    task_version TEXT NOT NULL,
    n_limit INTEGER NOT NULL,
    metric TEXT NOT NULL,
    value REAL,
    chance REAL,
    null_value REAL,
    higher_is_better INTEGER,
    n_items INTEGER NOT NULL,
    PRIMARY KEY (run_id, model_hash, task, task_version, n_limit, metric)
);
"""


class MetricResult(BaseModel):
    """One metric of one task on one model: the record the evaluator returns, the store keeps and a
    report reads, unchanged."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    model_hash: str
    task: str
    task_version: str
    limit: int | None
    metric: str
    value: float | None
    chance: float | None = None
    null_value: float | None = None
    higher_is_better: bool | None = None
    n_items: int


class EvaluationRecord(BaseModel):
    """One (run, weights, task, limit) evaluation and its metrics."""

    run_id: str
    model_hash: str
    task: str
    task_version: str
    limit: int | None
    n_items: int
    elapsed_s: float | None = None
    items_per_s: float | None = None
    null_model: str | None = None
    env: dict = {}
    metrics: list[MetricResult] = []


def _limit_key(limit: int | None) -> int:
    return -1 if limit is None else int(limit)


def metric_from_row(row: sqlite3.Row | dict) -> MetricResult:
    """An ``eval_metrics`` row as the record it was stored from (``n_limit`` -1 is no limit)."""
    return MetricResult(
        run_id=row["run_id"], model_hash=row["model_hash"], task=row["task"], task_version=row["task_version"],
        limit=None if row["n_limit"] < 0 else row["n_limit"], metric=row["metric"], value=row["value"],
        chance=row["chance"], null_value=row["null_value"],
        higher_is_better=None if row["higher_is_better"] is None else bool(row["higher_is_better"]),
        n_items=row["n_items"],
    )


class EvalStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.transaction() as db:
            db.executescript(EVAL_SCHEMA)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=60)
        db.row_factory = sqlite3.Row
        try:
            with db:
                yield db
        finally:
            db.close()

    def has(self, run_id: str, model_hash: str, task: str, task_version: str, limit: int | None) -> bool:
        with self.transaction() as db:
            row = db.execute(
                "SELECT 1 FROM evaluations WHERE run_id=? AND model_hash=? AND task=? AND task_version=? AND n_limit=?",
                (run_id, model_hash, task, task_version, _limit_key(limit)),
            ).fetchone()
        return row is not None

    def put(self, record: EvaluationRecord) -> None:
        """Write an evaluation and its metrics in one transaction (replacing an earlier one with the same key)."""
        key = (record.run_id, record.model_hash, record.task, record.task_version, _limit_key(record.limit))
        with self.transaction() as db:
            db.execute("DELETE FROM eval_metrics WHERE run_id=? AND model_hash=? AND task=? AND task_version=? "
                       "AND n_limit=?", key)
            db.execute(
                "INSERT OR REPLACE INTO evaluations (run_id, model_hash, task, task_version, n_limit, n_items, "
                "elapsed_s, items_per_s, null_model, created_at, env_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*key, record.n_items, record.elapsed_s, record.items_per_s, record.null_model, time.time(),
                 json.dumps(record.env)),
            )
            db.executemany(
                "INSERT INTO eval_metrics (run_id, model_hash, task, task_version, n_limit, metric, value, chance, "
                "null_value, higher_is_better, n_items) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(*key, m.metric, m.value, m.chance, m.null_value,
                  None if m.higher_is_better is None else int(m.higher_is_better), m.n_items) for m in record.metrics],
            )

    def metrics(self, run_id: str | None = None, task: str | None = None) -> list[MetricResult]:
        query, args = "SELECT * FROM eval_metrics WHERE 1=1", []
        if run_id is not None:
            query, args = query + " AND run_id=?", [*args, run_id]
        if task is not None:
            query, args = query + " AND task=?", [*args, task]
        with self.transaction() as db:
            rows = db.execute(query + " ORDER BY run_id, task, n_limit, metric", args).fetchall()
        return [metric_from_row(r) for r in rows]

    def evaluations(self, run_id: str | None = None) -> list[dict]:
        query, args = "SELECT * FROM evaluations", []
        if run_id is not None:
            query, args = query + " WHERE run_id=?", [run_id]
        with self.transaction() as db:
            return [dict(r) for r in db.execute(query + " ORDER BY run_id, task, n_limit", args)]
