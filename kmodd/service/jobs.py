"""The persistent job queue: jobs survive restarts and `kill -9` (a job that was
running runs again), duplicates merge, the most urgent runs first, one job per
kernel at a time and several kernels at once.

Priorities (lower runs first): the running kernel, then the default boot kernel,
then the rest. Within a kernel's job, the REMAKE_INITRD sources build first.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from pathlib import Path

from kmodd.act.request import Request, Verb
from kmodd.base.paths import Root

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL, kernel TEXT NOT NULL, source TEXT NOT NULL DEFAULT '',
    priority INTEGER NOT NULL, state TEXT NOT NULL,
    created REAL NOT NULL, started REAL, finished REAL,
    detail TEXT NOT NULL DEFAULT '', outcomes TEXT NOT NULL DEFAULT '[]',
    options TEXT NOT NULL DEFAULT '{}', after_jobs TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, priority, id);
"""
_ADDED_COLUMNS = {
    "options": "TEXT NOT NULL DEFAULT '{}'",
    "after_jobs": "TEXT NOT NULL DEFAULT ''",
}
"""Columns newer than the first schema: added to a state.db made before them."""


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Priority(IntEnum):
    RUNNING_KERNEL = 0
    DEFAULT_KERNEL = 1
    OTHER = 2


@dataclass(frozen=True)
class Job:
    id: int
    kind: Verb
    kernel: str
    source: str
    priority: int
    state: JobState
    created: float
    started: float | None
    finished: float | None
    detail: str
    outcomes: str
    """JSON list of the outcomes, once finished."""
    options: str = "{}"
    """The request's options, as `Request.options_json` writes them."""
    after: tuple[int, ...] = ()
    """Jobs that must have finished before this one starts."""

    @property
    def active(self) -> bool:
        return self.state in (JobState.QUEUED, JobState.RUNNING)

    @property
    def request(self) -> Request:
        return Request.from_row(self.kind.value, self.kernel, self.source, self.options)


class JobQueue:
    """Jobs in `state.db`; one connection, used from the service's event loop only."""

    def __init__(self, root: Root) -> None:
        path: Path = root.entry(root.state_dir / "state.db")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        have = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column, decl in _ADDED_COLUMNS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {decl}")

    def close(self) -> None:
        self._db.close()

    def recover(self) -> list[Job]:
        """After a crash or restart: jobs that were running are queued again."""
        self._db.execute(
            "UPDATE jobs SET state = ?, started = NULL WHERE state = ?",
            (JobState.QUEUED.value, JobState.RUNNING.value),
        )
        return self.active()

    def enqueue(self, request: Request, *, priority: int, after: tuple[int, ...] = ()) -> Job:
        """A new queued job, or the queued one doing the same (same verb, kernel and
        source): merged with it (`Request.merged`), its priority raised."""
        row = self._db.execute(
            "SELECT * FROM jobs WHERE kind = ? AND kernel = ? AND source = ? AND state = ?",
            (request.verb.value, request.kernel, request.source, JobState.QUEUED.value),
        ).fetchone()
        if row:
            held = _job(row)
            merged = held.request.merged(request)
            waits = sorted(set(held.after) | set(after))
            self._db.execute(
                "UPDATE jobs SET priority = MIN(priority, ?), options = ?, after_jobs = ? "
                "WHERE id = ?",
                (priority, merged.options_json(), _ids(waits), held.id),
            )
            return self.get(held.id)
        cur = self._db.execute(
            "INSERT INTO jobs (kind, kernel, source, priority, state, created, options, after_jobs)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                request.verb.value,
                request.kernel,
                request.source,
                priority,
                JobState.QUEUED.value,
                time.time(),
                request.options_json(),
                _ids(after),
            ),
        )
        assert cur.lastrowid is not None
        return self.get(cur.lastrowid)

    def get(self, job_id: int) -> Job:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return _job(row)

    def find(self, job_id: int) -> Job | None:
        try:
            return self.get(job_id)
        except KeyError:
            return None

    def active(self, kernel: str | None = None) -> list[Job]:
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE state IN (?, ?) AND (? IS NULL OR kernel = ?) "
            "ORDER BY priority, id",
            (JobState.QUEUED.value, JobState.RUNNING.value, kernel, kernel),
        )
        return [_job(r) for r in rows]

    def recent(self, limit: int = 200) -> list[Job]:
        rows = self._db.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
        return [_job(r) for r in rows]

    def next_ready(self) -> Job | None:
        """The most urgent queued job whose kernel has no job running and whose `after`
        jobs have all finished."""
        rows = self._db.execute(
            "SELECT * FROM jobs j WHERE state = ? AND NOT EXISTS (SELECT 1 FROM jobs r "
            "WHERE r.state = ? AND r.kernel = j.kernel) ORDER BY priority, id",
            (JobState.QUEUED.value, JobState.RUNNING.value),
        )
        waiting = {j.id for j in self.active()}
        for row in rows:
            job = _job(row)
            if not waiting.intersection(job.after):
                return job
        return None

    def start(self, job: Job) -> Job:
        self._db.execute(
            "UPDATE jobs SET state = ?, started = ? WHERE id = ?",
            (JobState.RUNNING.value, time.time(), job.id),
        )
        return self.get(job.id)

    def finish(self, job: Job, state: JobState, detail: str, outcomes: str = "[]") -> Job:
        self._db.execute(
            "UPDATE jobs SET state = ?, finished = ?, detail = ?, outcomes = ? WHERE id = ?",
            (state.value, time.time(), detail, outcomes, job.id),
        )
        return self.get(job.id)

    def cancel(self, job_id: int) -> Job | None:
        """Cancel a queued job; a running one finishes (a half build helps no one)."""
        cur = self._db.execute(
            "UPDATE jobs SET state = ?, finished = ? WHERE id = ? AND state = ?",
            (JobState.CANCELLED.value, time.time(), job_id, JobState.QUEUED.value),
        )
        return self.get(job_id) if cur.rowcount else None


def _ids(ids: tuple[int, ...] | list[int]) -> str:
    return ",".join(str(i) for i in ids)


def _job(row: sqlite3.Row) -> Job:
    return Job(
        int(row["id"]),
        Verb(row["kind"]),
        str(row["kernel"]),
        str(row["source"]),
        int(row["priority"]),
        JobState(row["state"]),
        float(row["created"]),
        None if row["started"] is None else float(row["started"]),
        None if row["finished"] is None else float(row["finished"]),
        str(row["detail"]),
        str(row["outcomes"]),
        str(row["options"]),
        tuple(int(i) for i in str(row["after_jobs"]).split(",") if i),
    )
