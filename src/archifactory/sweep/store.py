"""The results store: one SQLite database per sweep directory (``results.sqlite``).

Tables:
- ``sweep``: one row: name, the spec as YAML, creation time, environment (git SHA, torch, device).
- ``runs``: one row per (variant, seed[, lr]): status (pending | running | done | failed), error text,
  the resolved run config (JSON), the variant's changes against the base (JSON), run directory,
  environment (JSON, with kernel paths), start/finish times, and its purpose: ``compare`` (a result the
  report compares) or ``lr_selection`` (a run of an lr grid that only chooses the variant's lr); its
  ``stage`` (``pretrain`` | ``sft`` | ``grpo``) and, for a post-training stage, ``parent_run_id``: the run
  it starts from (an SFT run's pretraining run, a GRPO run's SFT run), with the same variant and seed.
- ``metrics``: per-step training and evaluation records of every run (kinds ``train``, ``eval`` and, for
  GRPO, ``grpo``: mean reward, pass rate, completion length, KL, clip fraction; GRPO's ``eval`` records
  hold ``eval_accuracy``, the held-out greedy exact match, and ``eval_pass_at_1``, the held-out sampled
  pass@1, when the run sampled any).
- ``final``: one row per finished run: the figures of its :class:`~archifactory.results.RunSummary` under
  the summary's own names (:data:`~archifactory.results.FINAL_FIGURES`: final validation loss / bits per
  byte / perplexity, parameters, ``flops_per_token_train``, tokens/s, peak memory, cache bytes, tokens, wall
  time, the token-stream hash, and ``eval_accuracy``: held-out greedy exact match on the GRPO task, a GRPO
  run's final evaluation; an SFT run's is its GRPO run's step-0 evaluation, the same problems decoded the
  same way before any update; ``eval_pass_at_1`` likewise) and the whole summary (``summary_json``).
- ``evaluations`` / ``eval_metrics``: the sweep's ``eval:`` tasks per run (:class:`archifactory.eval.store.EvalStore`).

Reads return the typed records of :mod:`archifactory.results`, which the report reads as they are.

Stores written before a column existed are migrated when opened for writing (``ALTER TABLE ... ADD
COLUMN`` with the column's default: ``stage`` = ``pretrain``, ``purpose`` = ``compare``); a column since
renamed to its summary key (:data:`RENAMED`: ``final.flops_per_token``, ``final.exact_match``) is renamed
in place, and read under its new name from a store opened read-only.

Every write is a transaction; ``archifactory report`` reads this file alone.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from archifactory.errors import UserError
from archifactory.results import (FINAL_FIGURES, FinalRecord, MetricRecord, RunRecord, RunSummary,
                                   SweepRecord)

SCHEMA = """
CREATE TABLE IF NOT EXISTS sweep (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL,
    spec_yaml TEXT NOT NULL,
    created_at REAL NOT NULL,
    env_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    variant TEXT NOT NULL,
    seed INTEGER NOT NULL,
    lr REAL,
    is_baseline INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'pending',
    error TEXT,
    config_json TEXT NOT NULL,
    changes_json TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    env_json TEXT,
    started_at REAL,
    finished_at REAL,
    purpose TEXT NOT NULL DEFAULT 'compare',
    stage TEXT NOT NULL DEFAULT 'pretrain',
    parent_run_id TEXT
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    kind TEXT NOT NULL,
    step INTEGER NOT NULL,
    tokens INTEGER,
    elapsed_s REAL,
    loss REAL,
    lr REAL,
    tokens_per_s REAL,
    val_loss REAL,
    val_bpb REAL,
    reward REAL,
    pass_rate REAL,
    completion_length REAL,
    kl REAL,
    clip_fraction REAL,
    eval_accuracy REAL,
    eval_pass_at_1 REAL,
    PRIMARY KEY (run_id, kind, step)
);
CREATE TABLE IF NOT EXISTS final (
    run_id TEXT PRIMARY KEY REFERENCES runs(run_id),
    val_loss REAL,
    val_bpb REAL,
    val_ppl REAL,
    params INTEGER,
    active_params INTEGER,
    flops_per_token_train REAL,
    tokens_per_s REAL,
    peak_mem_bytes INTEGER,
    state_bytes INTEGER,
    tokens INTEGER,
    elapsed_s REAL,
    stream_hash TEXT,
    summary_json TEXT,
    eval_accuracy REAL,
    eval_pass_at_1 REAL
);
"""

MIGRATIONS = {  # table -> columns added since the first release, with their definitions
    "runs": {"purpose": "TEXT NOT NULL DEFAULT 'compare'", "stage": "TEXT NOT NULL DEFAULT 'pretrain'",
             "parent_run_id": "TEXT"},
    "metrics": {k: "REAL" for k in ("reward", "pass_rate", "completion_length", "kl", "clip_fraction",
                                    "eval_accuracy", "eval_pass_at_1")},
    "final": {"eval_accuracy": "REAL", "eval_pass_at_1": "REAL"},
}
RENAMED = {"final": {"flops_per_token": "flops_per_token_train", "exact_match": "eval_accuracy"}}
"""table -> old column name -> its name now (the key the trainer's summary and the records use)."""
METRIC_COLUMNS = tuple(f for f in MetricRecord.model_fields if f not in ("run_id", "kind", "step"))
"""The ``metrics`` columns after the key (``run_id``, ``kind``, ``step``): :class:`MetricRecord`'s fields."""
STAGES = ("pretrain", "sft", "grpo")


class StoreDamagedError(UserError, RuntimeError):
    """The results database is not a readable SQLite database, or fails SQLite's integrity check.
    ``path`` and ``reason`` let a caller say what it does about it (:data:`RECOVERY`)."""

    def __init__(self, path: Path, reason: str, advice: str) -> None:
        super().__init__(f"results database {path} is damaged ({reason}); {advice}")
        self.path, self.reason = path, reason


RECOVERY = ("re-running the sweep (`archifactory sweep SPEC --dir {dir}`) moves it aside to {name}.damaged-<time> "
            "and records each finished run again from its run directory (nothing is retrained)")
"""What ``archifactory sweep`` does with a damaged results database, in the words every message uses."""
PROBE_RECOVERY = ("a probe sweep keeps its results only there: move it aside (to keep what can be read) and re-run "
                  "the sweep, which runs every probe again")
"""The same for a probe sweep (``kind: probe``), whose runs have no run directories to record again from."""


class Store:
    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        """``read_only``: open an existing database without writing (reports on read-only media).
        Raises :class:`StoreDamagedError` if the file is damaged (SQLite's ``quick_check``)."""
        self.path = Path(path)
        self.read_only = read_only
        if read_only:
            if not self.path.is_file():
                raise FileNotFoundError(f"results database not found: {self.path}")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as db:
            check = [row[0] for row in db.execute("PRAGMA quick_check")]
        if check != ["ok"]:
            raise self._damaged("; ".join(check[:3]))
        if read_only:
            return
        with self.transaction() as db:
            db.executescript(SCHEMA)
            for table, renamed in RENAMED.items():  # before adding columns: an old store keeps its values
                have = self._columns(db, table)
                for old, new in renamed.items():
                    if old in have and new not in have:
                        db.execute(f"ALTER TABLE {table} RENAME COLUMN {old} TO {new}")
            for table, columns in MIGRATIONS.items():  # a store written before these columns existed
                have = self._columns(db, table)
                for name, definition in columns.items():
                    if name not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")

    @staticmethod
    def _columns(db: sqlite3.Connection, table: str) -> set[str]:
        return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}

    def _damaged(self, reason: str) -> StoreDamagedError:
        return StoreDamagedError(self.path, reason, RECOVERY.format(dir=self.path.parent, name=self.path.name))

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        if self.read_only:
            db = sqlite3.connect(f"file:{self.path.resolve()}?mode=ro", uri=True, timeout=60)
        else:
            db = sqlite3.connect(self.path, timeout=60)
        db.row_factory = sqlite3.Row
        try:
            yield db
        except sqlite3.DatabaseError as err:
            if type(err) is sqlite3.DatabaseError:  # "file is not a database", "disk image is malformed"
                raise self._damaged(str(err)) from None
            raise
        finally:
            db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.connect() as db:
            with db:  # commits on success, rolls back on an exception
                yield db

    # ------------------------------------------------------------------------------------------ writes

    def set_sweep(self, name: str, spec_yaml: str, env: dict) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO sweep (id, name, spec_yaml, created_at, env_json) VALUES (1, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET name=excluded.name, spec_yaml=excluded.spec_yaml, env_json=excluded.env_json",
                (name, spec_yaml, time.time(), json.dumps(env)),
            )

    def add_run(self, run_id: str, variant: str, seed: int, lr: float | None, is_baseline: bool, config: dict,
                changes: dict, run_dir: str, purpose: str = "compare", stage: str = "pretrain",
                parent_run_id: str | None = None) -> None:
        """Register a run; an existing run keeps its status and results. ``stage``: ``pretrain`` | ``sft`` |
        ``grpo``; a post-training stage names the run it starts from in ``parent_run_id``."""
        if stage not in STAGES:
            raise ValueError(f"stage={stage!r}; use one of {', '.join(STAGES)}")
        if (stage == "pretrain") != (parent_run_id is None):
            raise ValueError(f"run {run_id}: a {stage} run {'has no' if stage == 'pretrain' else 'needs a'} parent run")
        with self.transaction() as db:
            db.execute(
                "INSERT INTO runs (run_id, variant, seed, lr, is_baseline, config_json, changes_json, run_dir, purpose, "
                "stage, parent_run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(run_id) DO UPDATE SET "
                "config_json=excluded.config_json, changes_json=excluded.changes_json, run_dir=excluded.run_dir, "
                "is_baseline=excluded.is_baseline, purpose=excluded.purpose, stage=excluded.stage, "
                "parent_run_id=excluded.parent_run_id",
                (run_id, variant, seed, lr, int(is_baseline), json.dumps(config), json.dumps(changes), run_dir,
                 purpose, stage, parent_run_id),
            )

    def mark(self, run_id: str, status: str, error: str | None = None) -> None:
        now = time.time()
        with self.transaction() as db:
            if status == "running":
                db.execute("UPDATE runs SET status=?, error=NULL, started_at=? WHERE run_id=?", (status, now, run_id))
            else:
                db.execute("UPDATE runs SET status=?, error=?, finished_at=? WHERE run_id=?", (status, error, now, run_id))

    def record_results(self, run_id: str, metrics: list[dict], summary: RunSummary | Mapping[str, Any]) -> None:
        """Store a finished run's per-step metrics (``metrics.jsonl`` records: :data:`METRIC_COLUMNS` are
        kept) and its summary (a :class:`RunSummary`; a mapping is validated into one), and mark it done,
        atomically. ``final`` gets the summary's figures under their own names."""
        if not isinstance(summary, RunSummary):
            summary = RunSummary.model_validate(summary)
        with self.transaction() as db:
            db.execute("DELETE FROM metrics WHERE run_id=?", (run_id,))
            rows = {}
            for r in metrics:  # one record per (kind, step); should a file hold two (older runs did), the last
                rows[(r.get("kind", "train"), int(r["step"]))] = r
            db.executemany(
                f"INSERT INTO metrics (run_id, kind, step, {', '.join(METRIC_COLUMNS)}) "
                f"VALUES (?, ?, ?{', ?' * len(METRIC_COLUMNS)})",
                [(run_id, kind, step, *(r.get(c) for c in METRIC_COLUMNS)) for (kind, step), r in sorted(rows.items())],
            )
            db.execute(
                f"INSERT OR REPLACE INTO final (run_id, {', '.join(FINAL_FIGURES)}, summary_json) "
                f"VALUES (?{', ?' * len(FINAL_FIGURES)}, ?)",
                (run_id, *(getattr(summary, f) for f in FINAL_FIGURES), summary.to_json()),
            )
            parent = db.execute("SELECT stage, parent_run_id FROM runs WHERE run_id=?", (run_id,)).fetchone()
            start = [r for (kind, step), r in rows.items() if kind == "eval" and step == 0 and "eval_accuracy" in r]
            if parent is not None and parent["stage"] == "grpo" and start:
                # the SFT model's held-out exact match: this GRPO run's evaluation before its first update
                db.execute("UPDATE final SET eval_accuracy=?, eval_pass_at_1=? WHERE run_id=?",
                           (start[0]["eval_accuracy"], start[0].get("eval_pass_at_1"), parent["parent_run_id"]))
            db.execute("UPDATE runs SET status='done', error=NULL, finished_at=?, env_json=? WHERE run_id=?",
                       (time.time(), summary.env().model_dump_json(), run_id))

    # ------------------------------------------------------------------------------------------- reads

    def sweep(self) -> SweepRecord | None:
        with self.connect() as db:
            row = db.execute("SELECT * FROM sweep WHERE id=1").fetchone()
        return SweepRecord.model_validate(dict(row)) if row else None

    def _stage_filter(self, db: sqlite3.Connection, stage: str | None) -> tuple[str, list]:
        if stage is None:
            return "", []
        if stage not in STAGES:
            raise ValueError(f"stage={stage!r}; use one of {', '.join(STAGES)} or None for every stage")
        if "stage" not in self._columns(db, "runs"):  # read-only store written before stages existed
            return ("", []) if stage == "pretrain" else (" AND 0", [])
        return " AND runs.stage=?", [stage]

    def runs(self, stage: str | None = "pretrain") -> list[RunRecord]:
        """Registered runs of ``stage`` (default: pretraining runs, the ones variants are compared on; ``None``:
        every stage); ``purpose``, ``stage`` and ``parent_run_id`` take their defaults in older stores."""
        with self.connect() as db:
            where, args = self._stage_filter(db, stage)
            rows = [dict(r) for r in db.execute(f"SELECT * FROM runs WHERE 1=1{where} ORDER BY variant, seed, lr", args)]
        return [RunRecord.model_validate(r) for r in rows]

    def finals(self, stage: str | None = "pretrain") -> list[FinalRecord]:
        """Finished runs' final figures with ``variant``, ``seed``, ``lr``, ``is_baseline``, ``purpose``
        (``compare`` in a store written before lr-selection runs existed), ``stage`` and ``parent_run_id``;
        only ``stage``'s runs (default ``pretrain``; ``None``: every stage)."""
        with self.connect() as db:
            have = self._columns(db, "runs")
            purpose = "purpose" if "purpose" in have else "'compare' AS purpose"
            stage_cols = "stage, parent_run_id" if "stage" in have else "'pretrain' AS stage, NULL AS parent_run_id"
            renamed = RENAMED["final"]  # a read-only store written before the renames: its columns, renamed
            final = ", ".join(f"final.{c} AS {renamed[c]}" if c in renamed else f"final.{c}"
                              for c in sorted(self._columns(db, "final") - {"run_id"}))
            where, args = self._stage_filter(db, stage)
            rows = [dict(r) for r in db.execute(
                f"SELECT runs.run_id, variant, seed, lr, is_baseline, {purpose}, {stage_cols}, {final} FROM final "
                f"JOIN runs USING (run_id) WHERE runs.status='done'{where} ORDER BY variant, seed", args
            )]
        return [FinalRecord.model_validate(r) for r in rows]

    def metrics(self, run_id: str | None = None, kind: str | None = None) -> list[MetricRecord]:
        query, args = "SELECT * FROM metrics WHERE 1=1", []
        if run_id is not None:
            query, args = query + " AND run_id=?", [*args, run_id]
        if kind is not None:
            query, args = query + " AND kind=?", [*args, kind]
        with self.connect() as db:
            rows = [dict(r) for r in db.execute(query + " ORDER BY run_id, kind, step", args)]
        return [MetricRecord.model_validate(r) for r in rows]
