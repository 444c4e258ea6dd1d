"""The server's persistent queue and history: one SQLite table (standard library ``sqlite3``) in
the data folder.

A prompt is a row from the moment ``POST /prompt`` accepts it (the reply is sent after the row
is committed) until the history drops it: ``pending`` → ``running`` → ``completed`` / ``failed``
/ ``cancelled``. Because the queue and the history are one row per prompt, a prompt is in the
history at most once, and because a finished status is final, exactly once. A crash (``kill -9``,
a power cut after the write-ahead log reached the disk) leaves rows as they were committed:
:meth:`Store.recover` turns the ``running`` prompt of a crashed server back into a ``pending``
one, after deleting the files its interrupted attempt had written (recorded as it wrote them),
so it runs again from the start. A prompt that was running during :data:`MAX_ATTEMPTS` crashes
fails instead, so one prompt cannot keep a server from coming up.

The history keeps the ``max_history`` most recently finished prompts.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_ATTEMPTS = 3
FINISHED = ("completed", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id TEXT NOT NULL UNIQUE,
    number REAL NOT NULL,
    status TEXT NOT NULL,
    client_id TEXT,
    prompt TEXT NOT NULL,
    extra_data TEXT NOT NULL,
    workflow TEXT NOT NULL,
    origins TEXT NOT NULL,
    targets TEXT,
    output_nodes TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    files TEXT NOT NULL DEFAULT '[]',
    outputs TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    messages TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, number, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished);
"""


@dataclass
class Job:
    """One accepted prompt, as stored."""

    prompt_id: str
    number: float
    status: str
    client_id: str | None
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    workflow: dict[str, Any]  # the graphsd workflow the prompt translates to
    origins: dict[str, Any]  # graphsd node id -> {"id": prompt node id, "class_type", "inputs"}
    targets: list[str] | None  # graphsd node ids to run (None: every output node)
    output_nodes: list[str]  # prompt node ids of the output nodes that run
    created: float
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    files: list[str] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    messages: list[Any] = field(default_factory=list)


def _job(row: sqlite3.Row) -> Job:
    return Job(
        prompt_id=row["prompt_id"],
        number=row["number"],
        status=row["status"],
        client_id=row["client_id"],
        prompt=json.loads(row["prompt"]),
        extra_data=json.loads(row["extra_data"]),
        workflow=json.loads(row["workflow"]),
        origins=json.loads(row["origins"]),
        targets=json.loads(row["targets"]) if row["targets"] is not None else None,
        output_nodes=json.loads(row["output_nodes"]),
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
        attempts=row["attempts"],
        files=json.loads(row["files"]),
        outputs=json.loads(row["outputs"]),
        error=json.loads(row["error"]) if row["error"] else None,
        messages=json.loads(row["messages"]),
    )


class Store:
    """Thread-safe access to the jobs table (the HTTP handlers and the dispatcher thread share
    one connection under a lock; every method is one transaction)."""

    def __init__(self, path: str | Path, max_history: int = 10_000):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_history = max_history
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        # WAL + NORMAL: a committed transaction survives the process being killed; FULL would
        # also survive a power cut at the price of an fsync per prompt event
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT MAX(ABS(number)) FROM jobs").fetchone()
        self._next_number = int(row[0]) + 1 if row[0] is not None else 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, statements: Iterable[tuple[str, tuple[Any, ...]]]) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for sql, args in statements:
                self._db.execute(sql, args)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    # ---- the queue --------------------------------------------------------------------------
    def add(self, job: Job, front: bool = False, number: float | None = None) -> float:
        """Commit a new pending prompt; returns its queue number (ComfyUI's ``number``: lower
        runs first; ``front`` puts it before everything queued)."""
        with self._lock:
            if number is None:
                number = -self._next_number if front else self._next_number
            number = float(number)
            self._next_number = max(self._next_number, int(abs(number))) + 1
            job.number, job.status = number, "pending"
            self._tx(
                [
                    (
                        "INSERT INTO jobs (prompt_id, number, status, client_id, prompt, extra_data, workflow, origins, targets,"
                        " output_nodes, created) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            job.prompt_id,
                            number,
                            job.client_id,
                            json.dumps(job.prompt),
                            json.dumps(job.extra_data),
                            json.dumps(job.workflow),
                            json.dumps(job.origins),
                            json.dumps(job.targets) if job.targets is not None else None,
                            json.dumps(job.output_nodes),
                            job.created,
                        ),
                    )
                ]
            )
            return number

    def claim_next(self) -> Job | None:
        """The first pending prompt, now marked running (one attempt more), or None."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE status = 'pending' ORDER BY number, seq LIMIT 1").fetchone()
            if row is None:
                return None
            now = time.time()
            self._tx(
                [
                    (
                        "UPDATE jobs SET status = 'running', started = ?, attempts = attempts + 1, files = '[]' WHERE seq = ?",
                        (now, row["seq"]),
                    )
                ]
            )
            job = _job(row)
            job.status, job.started, job.attempts, job.files = "running", now, job.attempts + 1, []
            return job

    def add_files(self, prompt_id: str, files: list[str]) -> None:
        """Record files the running attempt wrote (deleted if the server crashes before it ends)."""
        if not files:
            return
        with self._lock:
            row = self._db.execute("SELECT files FROM jobs WHERE prompt_id = ?", (prompt_id,)).fetchone()
            if row is not None:
                merged = json.loads(row["files"]) + list(files)
                self._tx([("UPDATE jobs SET files = ? WHERE prompt_id = ?", (json.dumps(merged), prompt_id))])

    def finish(self, prompt_id: str, status: str, outputs: dict[str, Any], error: dict[str, Any] | None, messages: list[Any]) -> None:
        """Move a running prompt into the history (``completed``, ``failed`` or ``cancelled``) and
        drop the oldest history entries beyond ``max_history``."""
        assert status in FINISHED
        with self._lock:
            self._tx(
                [
                    (
                        "UPDATE jobs SET status = ?, finished = ?, outputs = ?, error = ?, messages = ?"
                        " WHERE prompt_id = ? AND status = 'running'",
                        (status, time.time(), json.dumps(outputs), json.dumps(error) if error else None, json.dumps(messages), prompt_id),
                    ),
                    (
                        "DELETE FROM jobs WHERE status IN ('completed', 'failed', 'cancelled') AND seq NOT IN (SELECT seq FROM jobs"
                        " WHERE status IN ('completed', 'failed', 'cancelled') ORDER BY finished DESC, seq DESC LIMIT ?)",
                        (self.max_history,),
                    ),
                ]
            )

    def requeue(self, prompt_id: str) -> None:
        """Put a running prompt back at its place in the queue (the server is stopping)."""
        with self._lock:
            self._tx(
                [
                    (
                        "UPDATE jobs SET status = 'pending', files = '[]', attempts = MAX(attempts - 1, 0)"
                        " WHERE prompt_id = ? AND status = 'running'",
                        (prompt_id,),
                    )
                ]
            )

    def cancel_pending(self, prompt_ids: list[str] | None) -> list[str]:
        """Move pending prompts (all of them when ``prompt_ids`` is None) into the history as
        cancelled; returns the ids that were pending."""
        with self._lock:
            if prompt_ids is None:
                rows = self._db.execute("SELECT prompt_id FROM jobs WHERE status = 'pending'").fetchall()
            else:
                marks = ",".join("?" * len(prompt_ids))
                rows = self._db.execute(
                    f"SELECT prompt_id FROM jobs WHERE status = 'pending' AND prompt_id IN ({marks})", tuple(prompt_ids)
                ).fetchall()
            ids = [r["prompt_id"] for r in rows]
            now = time.time()
            messages = json.dumps([["execution_interrupted", {"reason": "removed from the queue before it ran"}]])
            self._tx(
                [
                    (
                        "UPDATE jobs SET status = 'cancelled', finished = ?, messages = ? WHERE prompt_id = ? AND status = 'pending'",
                        (now, messages, i),
                    )
                    for i in ids
                ]
            )
            return ids

    def recover(self) -> list[Job]:
        """After a crash: every prompt left running goes back to pending (or fails after
        MAX_ATTEMPTS attempts). Returns those prompts as they were, with the files their
        interrupted attempt recorded, for the caller to delete."""
        with self._lock:
            jobs = [_job(r) for r in self._db.execute("SELECT * FROM jobs WHERE status = 'running'").fetchall()]
            statements: list[tuple[str, tuple[Any, ...]]] = []
            for job in jobs:
                if job.attempts >= MAX_ATTEMPTS:
                    error = {
                        "exception_type": "ServerCrash",
                        "exception_message": f"the server stopped {job.attempts} times while running this prompt; it is not retried again",
                    }
                    statements.append(
                        (
                            "UPDATE jobs SET status = 'failed', finished = ?, files = '[]', error = ?, messages = ? WHERE prompt_id = ?",
                            (time.time(), json.dumps(error), json.dumps([["execution_error", error]]), job.prompt_id),
                        )
                    )
                else:
                    statements.append(("UPDATE jobs SET status = 'pending', files = '[]' WHERE prompt_id = ?", (job.prompt_id,)))
            self._tx(statements)
            return jobs

    # ---- reading ----------------------------------------------------------------------------
    def get(self, prompt_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE prompt_id = ?", (prompt_id,)).fetchone()
            return _job(row) if row is not None else None

    def queue(self) -> tuple[list[Job], list[Job]]:
        """(running, pending in run order)."""
        with self._lock:
            running = [_job(r) for r in self._db.execute("SELECT * FROM jobs WHERE status = 'running' ORDER BY seq")]
            pending = [_job(r) for r in self._db.execute("SELECT * FROM jobs WHERE status = 'pending' ORDER BY number, seq")]
            return running, pending

    def queue_remaining(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM jobs WHERE status IN ('pending', 'running')").fetchone()[0])

    def jobs(self, statuses: list[str], limit: int | None = None, offset: int = 0) -> tuple[list[Job], int]:
        """Jobs with the given statuses, newest first, and how many there are in all."""
        marks = ",".join("?" * len(statuses))
        with self._lock:
            total = int(self._db.execute(f"SELECT COUNT(*) FROM jobs WHERE status IN ({marks})", tuple(statuses)).fetchone()[0])
            order = "ORDER BY COALESCE(finished, started, created) DESC, seq DESC"
            sql = f"SELECT * FROM jobs WHERE status IN ({marks}) {order} LIMIT ? OFFSET ?"
            rows = self._db.execute(sql, (*statuses, -1 if limit is None else limit, offset)).fetchall()
            return [_job(r) for r in rows], total

    def history(self, max_items: int | None = None, offset: int = 0) -> list[Job]:
        """Finished prompts, oldest first (ComfyUI's ``/history`` order); ``max_items`` takes
        the newest ones."""
        jobs, _ = self.jobs(list(FINISHED), max_items, offset)
        return list(reversed(jobs))

    def delete_history(self, prompt_ids: list[str] | None) -> None:
        """Forget finished prompts (all of them when ``prompt_ids`` is None)."""
        with self._lock:
            if prompt_ids is None:
                self._tx([("DELETE FROM jobs WHERE status IN ('completed', 'failed', 'cancelled')", ())])
            else:
                self._tx(
                    [("DELETE FROM jobs WHERE status IN ('completed', 'failed', 'cancelled') AND prompt_id = ?", (i,)) for i in prompt_ids]
                )
