"""kmodd's state in SQLite (WAL): sources, and per (source, kernel) what was done.

The files on disk are the truth; this is the memory of how they got there (which build,
which log, why it failed). `kmodd.reconcile` repairs rows that disagree with the disk.
Writers hold `lock()`: the service and an in-process kmodctl never write at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kmodd.base.errors import BadInputError, KmoddError
from kmodd.base.paths import Root
from kmodd.state.states import State

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sources (
    name TEXT NOT NULL, version TEXT NOT NULL, path TEXT NOT NULL,
    adopted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS records (
    name TEXT NOT NULL, version TEXT NOT NULL, kernel TEXT NOT NULL, arch TEXT NOT NULL,
    state TEXT NOT NULL, weak_from TEXT, log TEXT, detail TEXT, files TEXT NOT NULL DEFAULT '[]',
    remake_initrd INTEGER NOT NULL DEFAULT 0, updated REAL NOT NULL,
    PRIMARY KEY (name, version, kernel, arch));
-- what kmodd read of a module file (its modversions, imports, exports, .modinfo), while
-- the file is the same: verdicts for a new kernel read no module again
CREATE TABLE IF NOT EXISTS modules (
    path TEXT PRIMARY KEY, identity TEXT NOT NULL, digest TEXT NOT NULL, info TEXT NOT NULL);
-- how long the last build of each source took: the longest expected builds start first
CREATE TABLE IF NOT EXISTS durations (
    name TEXT PRIMARY KEY, version TEXT NOT NULL, kernel TEXT NOT NULL,
    seconds REAL NOT NULL, finished REAL NOT NULL);
-- the last listing of a kernel's initrd (added in place: older readers ignore it)
CREATE TABLE IF NOT EXISTS initrds (
    kernel TEXT PRIMARY KEY, image TEXT NOT NULL, mtime_ns INTEGER NOT NULL,
    expected TEXT NOT NULL, missing TEXT NOT NULL, checked REAL NOT NULL);
"""


def files_present(root: Root, record: Record) -> bool:
    """Every file and link of `record` is there (a link must reach its target, followed
    inside the root)."""
    return bool(record.files) and all(_exists(root, f) for f in record.files)


def _exists(root: Root, inside: str) -> bool:
    try:
        return root.real(inside).exists()
    except BadInputError:  # a loop, a path that is not inside the root
        return False


def current_check(root: Root, check: InitrdCheck | None) -> InitrdCheck | None:
    """`check` if its image is still the one it listed (same mtime), else None."""
    if check is None:
        return None
    try:
        mtime = root.real(check.image).stat().st_mtime_ns
    except (OSError, BadInputError):
        return None
    return check if mtime == check.mtime_ns else None


def describe(err: sqlite3.Error, path: Path) -> str:
    """What went wrong with the state file `path`, in the words a full or read-only disk
    gets everywhere else (SQLite says "disk I/O error" when a write finds no space)."""
    name = getattr(err, "sqlite_errorname", "") or ""
    if name == "SQLITE_READONLY":
        return "Read-only file system (or no permission to write it)"
    if name == "SQLITE_FULL" or name.startswith("SQLITE_IOERR"):
        try:
            fs = os.statvfs(path.parent)
        except OSError:
            return str(err)
        free = fs.f_bavail * fs.f_frsize
        if name == "SQLITE_FULL" or free < _NEARLY_FULL:
            return f"No space left on device ({free >> 10} kB free)"
    return str(err)


_NEARLY_FULL = 1 << 20


class StoreError(KmoddError):
    dbus_name = "io.kmodd1.Error.State"
    exit_code = 5


class LockedError(StoreError):
    """The writers' lock is held by another process (the service, or another kmodctl)."""


@dataclass(frozen=True)
class Record:
    """What kmodd did, or could not do, for one module source and one kernel."""

    name: str
    version: str
    kernel: str
    arch: str
    state: State
    weak_from: str | None = None
    log: str | None = None
    detail: str | None = None
    files: tuple[str, ...] = ()
    """Installed files and weak links, as paths inside the root (`/lib/modules/...`)."""
    remake_initrd: bool = False
    updated: float = 0.0


@dataclass(frozen=True)
class InitrdCheck:
    """What the last listing of a kernel's initrd found of the modules kmodd owes it."""

    kernel: str
    image: str
    """The image, as a path inside the root (`/boot/initrd.img-KVER`)."""
    mtime_ns: int
    """The image's mtime when listed: a newer image has not been checked."""
    expected: tuple[str, ...]
    missing: tuple[str, ...]
    checked: float = 0.0


class Store:
    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        """The state at `path`; `readonly` never writes, nor creates, anything (status,
        any user, any root: a mistyped --root stays untouched)."""
        self.path = path
        self.readonly = readonly
        try:
            if readonly:
                self._db = _connect_readonly(path)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{path}: state schema {version} is newer than this kmodd")
            if not readonly:
                self._db.executescript(_SCHEMA)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._tables = _tables(self._db)
            self._has_initrds = "initrds" in self._tables
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{path}: cannot open kmodd's state: {describe(err, path)}") from err

    @classmethod
    def open(cls, root: Root, *, readonly: bool = False) -> Store:
        return cls(root.entry(root.state_dir / "state.db"), readonly=readonly)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # sources ------------------------------------------------------------------------

    def add_source(self, name: str, version: str, path: str) -> bool:
        """Register a source; True when kmodd had not known it (POST_ADD runs then): one
        statement decides, so two jobs at once cannot both see it new."""
        inserted = self._db.execute(
            "INSERT OR IGNORE INTO sources (name, version, path) VALUES (?, ?, ?)",
            (name, version, path),
        ).rowcount
        if not inserted:
            self._db.execute(
                "UPDATE sources SET path = ? WHERE name = ? AND version = ?", (path, name, version)
            )
        return inserted == 1

    def remove_source(self, name: str, version: str) -> None:
        self._db.execute("DELETE FROM sources WHERE name = ? AND version = ?", (name, version))

    def set_adopted(self, name: str) -> int:
        return self._db.execute("UPDATE sources SET adopted = 1 WHERE name = ?", (name,)).rowcount

    def adopted(self, name: str) -> bool:
        row = self._db.execute("SELECT MAX(adopted) FROM sources WHERE name = ?", (name,))
        return bool(row.fetchone()[0])

    # records ------------------------------------------------------------------------

    def put(self, record: Record) -> Record:
        stamped = Record(**{**record.__dict__, "updated": time.time()})
        self._db.execute(
            "INSERT OR REPLACE INTO records (name, version, kernel, arch, state, weak_from, "
            "log, detail, files, remake_initrd, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                stamped.name,
                stamped.version,
                stamped.kernel,
                stamped.arch,
                stamped.state.value,
                stamped.weak_from,
                stamped.log,
                stamped.detail,
                json.dumps(list(stamped.files)),
                int(stamped.remake_initrd),
                stamped.updated,
            ),
        )
        return stamped

    def delete(self, name: str, version: str, kernel: str) -> None:
        self._db.execute(
            "DELETE FROM records WHERE name = ? AND version = ? AND kernel = ?",
            (name, version, kernel),
        )

    def delete_kernel(self, kernel: str) -> None:
        self._db.execute("DELETE FROM records WHERE kernel = ?", (kernel,))
        self.forget_initrd(kernel)
        self.forget_kernel_modules(kernel)

    def records(self, *, name: str | None = None, kernel: str | None = None) -> list[Record]:
        query = "SELECT * FROM records WHERE (? IS NULL OR name = ?) AND (? IS NULL OR kernel = ?)"
        rows = self._db.execute(
            query + " ORDER BY name, version, kernel", (name, name, kernel, kernel)
        )
        return [_record(row) for row in rows]

    def record(self, name: str, version: str, kernel: str) -> Record | None:
        rows = self._db.execute(
            "SELECT * FROM records WHERE name = ? AND version = ? AND kernel = ?",
            (name, version, kernel),
        ).fetchall()
        return _record(rows[0]) if rows else None

    # what module files hold (state/known.py) ---------------------------------------------

    def module_row(self, path: str) -> tuple[str, str, str] | None:
        """(identity, digest, info) recorded for the module file at `path`."""
        if "modules" not in self._tables:
            return None
        row = self._db.execute(
            "SELECT identity, digest, info FROM modules WHERE path = ?", (path,)
        ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]), str(row[2]))

    def put_module_row(self, path: str, identity: str, digest: str, info: str) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO modules (path, identity, digest, info) VALUES (?, ?, ?, ?)",
            (path, identity, digest, info),
        )

    def forget_kernel_modules(self, kernel: str) -> None:
        """Forget what files in `kernel`'s modules dir held (the kernel is gone)."""
        if "modules" in self._tables:
            literal = kernel.replace("!", "!!").replace("%", "!%").replace("_", "!_")
            self._db.execute(
                "DELETE FROM modules WHERE path LIKE ? ESCAPE '!'", (f"%/modules/{literal}/%",)
            )

    # build durations --------------------------------------------------------------------

    def put_duration(self, name: str, version: str, kernel: str, seconds: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO durations (name, version, kernel, seconds, finished) "
            "VALUES (?, ?, ?, ?, ?)",
            (name, version, kernel, seconds, time.time()),
        )

    def duration(self, name: str) -> float | None:
        """How long the last build of source `name` took (any version, any kernel)."""
        row = self._db.execute("SELECT seconds FROM durations WHERE name = ?", (name,))
        found = row.fetchone()
        return None if found is None else float(found[0])

    # initrd checks ----------------------------------------------------------------------

    def put_initrd(self, check: InitrdCheck) -> InitrdCheck:
        stamped = InitrdCheck(**{**check.__dict__, "checked": time.time()})
        self._db.execute(
            "INSERT OR REPLACE INTO initrds (kernel, image, mtime_ns, expected, missing, "
            "checked) VALUES (?,?,?,?,?,?)",
            (
                stamped.kernel,
                stamped.image,
                stamped.mtime_ns,
                json.dumps(list(stamped.expected)),
                json.dumps(list(stamped.missing)),
                stamped.checked,
            ),
        )
        return stamped

    def initrd(self, kernel: str) -> InitrdCheck | None:
        if not self._has_initrds:  # a state a kmodd before initrd checks wrote
            return None
        row = self._db.execute("SELECT * FROM initrds WHERE kernel = ?", (kernel,)).fetchone()
        if row is None:
            return None
        kver, image, mtime_ns, expected, missing, checked = row
        return InitrdCheck(
            str(kver),
            str(image),
            int(mtime_ns),
            tuple(json.loads(str(expected))),
            tuple(json.loads(str(missing))),
            float(checked),
        )

    def forget_initrd(self, kernel: str) -> None:
        self._db.execute("DELETE FROM initrds WHERE kernel = ?", (kernel,))


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """`path` opened read-only. No state yet (no file, or only the job queue's table)
    reads as empty: an in-memory store. A reader that may not create the WAL's -shm file
    (a user, after the service stopped and SQLite removed it) reads the file as
    immutable: with no writer running, what is in the file is the whole state."""
    if path.exists():
        uri = f"{path.as_uri()}?mode=ro"
        db = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)
        try:
            tables = _tables(db)
        except sqlite3.OperationalError:
            db.close()
            db = sqlite3.connect(f"{uri}&immutable=1", uri=True, isolation_level=None)
            tables = _tables(db)
        newer = db.execute("PRAGMA user_version").fetchone()[0] > SCHEMA_VERSION
        if "records" in tables or newer:
            return db
        db.close()
    empty = sqlite3.connect(":memory:", isolation_level=None)
    empty.executescript(_SCHEMA)
    return empty


def _tables(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _record(row: tuple[object, ...]) -> Record:
    name, version, kernel, arch, state, weak_from, log, detail, files, remake, updated = row
    return Record(
        str(name),
        str(version),
        str(kernel),
        str(arch),
        State(str(state)),
        None if weak_from is None else str(weak_from),
        None if log is None else str(log),
        None if detail is None else str(detail),
        tuple(json.loads(str(files))),
        bool(remake),
        float(str(updated)),
    )


_held: dict[Path, int] = {}
_held_guard = threading.Lock()


@contextmanager
def lock(root: Root, *, wait: bool = True) -> Iterator[None]:
    """The writers' lock (`/var/lib/kmodd/lock`): one writing process at a time.

    Re-entrant within a process: the service takes it once for its lifetime, and the
    jobs it runs in threads pass through."""
    path = root.entry(root.state_dir / "lock")
    with _held_guard:
        if _held.get(path):
            _held[path] += 1
            fd = None
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    os.close(fd)
                    raise LockedError(f"{path}: another kmodd is writing") from None
                fcntl.flock(fd, fcntl.LOCK_EX)
            _held[path] = 1
    try:
        yield
    finally:
        with _held_guard:
            _held[path] -= 1
            if fd is not None:
                del _held[path]
                os.close(fd)
