"""The results store: one SQLite database per sweep directory (``results.sqlite``).

Tables:
- ``sweep``: one row: name, the spec as YAML, creation time, environment (git SHA, torch, device).
- ``runs``: one row per (variant, seed[, lr]): status (pending | running | done | failed), error text,
  the resolved run config (JSON), the variant's changes against the base (JSON), run directory,
  environment (JSON, with kernel paths), start/finish times, and its purpose: ``compare`` (a result the
  report compares) or ``lr_selection`` (a run of an lr grid that only chooses the variant's lr).
- ``metrics``: per-step training and evaluation records of every run.
- ``final``: one row per finished run: final validation loss / bits per byte / perplexity, parameters,
  FLOPs per token, tokens/s, peak memory, cache bytes, tokens, wall time, the token-stream hash.

Every write is a transaction; ``archifactory report`` reads this file alone.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

from archifactory.errors import UserError

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
    purpose TEXT NOT NULL DEFAULT 'compare'
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
    PRIMARY KEY (run_id, kind, step)
);
CREATE TABLE IF NOT EXISTS final (
    run_id TEXT PRIMARY KEY REFERENCES runs(run_id),
    val_loss REAL,
    val_bpb REAL,
    val_ppl REAL,
    params INTEGER,
    active_params INTEGER,
    flops_per_token REAL,
    tokens_per_s REAL,
    peak_mem_bytes INTEGER,
    state_bytes INTEGER,
    tokens INTEGER,
    elapsed_s REAL,
    stream_hash TEXT,
    summary_json TEXT
);
"""


class StoreDamagedError(UserError, RuntimeError):
    """The results database is not a readable SQLite database, or fails SQLite's integrity check."""


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
            if not self._has_purpose(db):  # a store written before lr-selection runs existed
                db.execute("ALTER TABLE runs ADD COLUMN purpose TEXT NOT NULL DEFAULT 'compare'")

    @staticmethod
    def _has_purpose(db: sqlite3.Connection) -> bool:
        return any(row[1] == "purpose" for row in db.execute("PRAGMA table_info(runs)"))

    def _damaged(self, reason: str) -> StoreDamagedError:
        return StoreDamagedError(
            f"results database {self.path} is damaged ({reason}); move it aside and re-run the sweep "
            "(`archifactory sweep SPEC --dir DIR`): finished runs are recovered from their run directories"
        )

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
                changes: dict, run_dir: str, purpose: str = "compare") -> None:
        """Register a run; an existing run keeps its status and results."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO runs (run_id, variant, seed, lr, is_baseline, config_json, changes_json, run_dir, purpose) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(run_id) DO UPDATE SET config_json=excluded.config_json, "
                "changes_json=excluded.changes_json, run_dir=excluded.run_dir, is_baseline=excluded.is_baseline, "
                "purpose=excluded.purpose",
                (run_id, variant, seed, lr, int(is_baseline), json.dumps(config), json.dumps(changes), run_dir,
                 purpose),
            )

    def mark(self, run_id: str, status: str, error: str | None = None) -> None:
        now = time.time()
        with self.transaction() as db:
            if status == "running":
                db.execute("UPDATE runs SET status=?, error=NULL, started_at=? WHERE run_id=?", (status, now, run_id))
            else:
                db.execute("UPDATE runs SET status=?, error=?, finished_at=? WHERE run_id=?", (status, error, now, run_id))

    def record_results(self, run_id: str, metrics: list[dict], summary: dict) -> None:
        """Store a finished run's per-step metrics and final figures, and mark it done, atomically."""
        with self.transaction() as db:
            db.execute("DELETE FROM metrics WHERE run_id=?", (run_id,))
            rows = {}
            for r in metrics:  # a resumed run repeats steps after its checkpoint: keep the last record
                rows[(r.get("kind", "train"), int(r["step"]))] = r
            db.executemany(
                "INSERT INTO metrics (run_id, kind, step, tokens, elapsed_s, loss, lr, tokens_per_s, val_loss, val_bpb) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (run_id, kind, step, r.get("tokens"), r.get("elapsed_s"), r.get("loss"), r.get("lr"),
                     r.get("tokens_per_s"), r.get("val_loss"), r.get("val_bpb"))
                    for (kind, step), r in sorted(rows.items())
                ],
            )
            db.execute(
                "INSERT OR REPLACE INTO final (run_id, val_loss, val_bpb, val_ppl, params, active_params, flops_per_token, "
                "tokens_per_s, peak_mem_bytes, state_bytes, tokens, elapsed_s, stream_hash, summary_json) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, summary.get("val_loss"), summary.get("val_bpb"), summary.get("val_ppl"), summary.get("params"),
                 summary.get("active_params"), summary.get("flops_per_token_train"), summary.get("tokens_per_s"),
                 summary.get("peak_mem_bytes"), summary.get("state_bytes"), summary.get("tokens"),
                 summary.get("elapsed_s"), summary.get("stream_hash"), json.dumps(summary)),
            )
            env = {k: summary.get(k) for k in ("device", "precision", "torch", "python", "kernel_paths", "world_size")}
            db.execute("UPDATE runs SET status='done', error=NULL, finished_at=?, env_json=? WHERE run_id=?",
                       (time.time(), json.dumps(env), run_id))

    # ------------------------------------------------------------------------------------------- reads

    def sweep(self) -> dict[str, Any] | None:
        with self.connect() as db:
            row = db.execute("SELECT * FROM sweep WHERE id=1").fetchone()
        return dict(row) if row else None

    def runs(self) -> list[dict[str, Any]]:
        with self.connect() as db:
            rows = [dict(r) for r in db.execute("SELECT * FROM runs ORDER BY variant, seed, lr")]
        for row in rows:
            row.setdefault("purpose", "compare")
        return rows

    def finals(self) -> list[dict[str, Any]]:
        """Finished runs' final figures with ``variant``, ``seed``, ``lr``, ``is_baseline`` and ``purpose``
        (``compare`` in a store written before lr-selection runs existed)."""
        with self.connect() as db:
            purpose = "purpose" if self._has_purpose(db) else "'compare' AS purpose"
            return [dict(r) for r in db.execute(
                f"SELECT runs.run_id, variant, seed, lr, is_baseline, {purpose}, final.* FROM final "
                "JOIN runs USING (run_id) WHERE runs.status='done' ORDER BY variant, seed"
            )]

    def metrics(self, run_id: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        query, args = "SELECT * FROM metrics WHERE 1=1", []
        if run_id is not None:
            query, args = query + " AND run_id=?", [*args, run_id]
        if kind is not None:
            query, args = query + " AND kind=?", [*args, kind]
        with self.connect() as db:
            return [dict(r) for r in db.execute(query + " ORDER BY run_id, kind, step", args)]
