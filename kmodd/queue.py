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

from kmodd.paths import Root

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL, kernel TEXT NOT NULL, source TEXT NOT NULL DEFAULT '',
    priority INTEGER NOT NULL, state TEXT NOT NULL,
    created REAL NOT NULL, started REAL, finished REAL,
    detail TEXT NOT NULL DEFAULT '', outcomes TEXT NOT NULL DEFAULT '[]');
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, priority, id);
"""


class JobKind(StrEnum):
    KERNEL = "kernel"
    """Bring a kernel up to date: every AUTOINSTALL source."""
    SOURCE = "source"
    """Build or weak-link one source for one kernel."""
    REMOVE_KERNEL = "remove-kernel"
    UNINSTALL = "uninstall"
    """Remove one source from one kernel."""
    REMOVE_SOURCE = "remove-source"


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
    kind: JobKind
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

    @property
    def active(self) -> bool:
        return self.state in (JobState.QUEUED, JobState.RUNNING)


class JobQueue:
    """Jobs in `state.db`; one connection, used from the service's event loop only."""

    def __init__(self, root: Root) -> None:
        path: Path = root.state_dir / "state.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def recover(self) -> list[Job]:
        """After a crash or restart: jobs that were running are queued again."""
        self._db.execute(
            "UPDATE jobs SET state = ?, started = NULL WHERE state = ?",
            (JobState.QUEUED.value, JobState.RUNNING.value),
        )
        return self.active()

    def enqueue(self, kind: JobKind, kernel: str, source: str = "", *, priority: int) -> Job:
        """A new queued job, or the queued one it duplicates (its priority raised)."""
        row = self._db.execute(
            "SELECT id FROM jobs WHERE kind = ? AND kernel = ? AND source = ? AND state = ?",
            (kind.value, kernel, source, JobState.QUEUED.value),
        ).fetchone()
        if row:
            self._db.execute(
                "UPDATE jobs SET priority = MIN(priority, ?) WHERE id = ?", (priority, row[0])
            )
            return self.get(int(row[0]))
        cur = self._db.execute(
            "INSERT INTO jobs (kind, kernel, source, priority, state, created) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (kind.value, kernel, source, priority, JobState.QUEUED.value, time.time()),
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
        """The most urgent queued job whose kernel has no job running."""
        row = self._db.execute(
            "SELECT * FROM jobs j WHERE state = ? AND NOT EXISTS (SELECT 1 FROM jobs r "
            "WHERE r.state = ? AND r.kernel = j.kernel) ORDER BY priority, id LIMIT 1",
            (JobState.QUEUED.value, JobState.RUNNING.value),
        ).fetchone()
        return None if row is None else _job(row)

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


def _job(row: tuple[object, ...]) -> Job:
    (
        job_id,
        kind,
        kernel,
        source,
        priority,
        state,
        created,
        started,
        finished,
        detail,
        outcomes,
    ) = row
    return Job(
        int(str(job_id)),
        JobKind(str(kind)),
        str(kernel),
        str(source),
        int(str(priority)),
        JobState(str(state)),
        float(str(created)),
        None if started is None else float(str(started)),
        None if finished is None else float(str(finished)),
        str(detail),
        str(outcomes),
    )
