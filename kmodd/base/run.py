"""The one place kmodd starts other programs.

`check=True` semantics, stdin from /dev/null (or a file holding `input`), a minimal
explicit environment, the command logged at debug as `+ cmd`, and failures raised as
`CommandError` carrying the command, how it ended and the tail of its stderr.

Every command runs in a process group of its own, killed as a whole when it times out
or is cancelled (its `cancel` event set), and once more after it exits, so no helper
it started lingers in that group; `terminate_all` kills every group still running.
With a `sandbox`, the command runs in it (package code: `base.sandbox`); what is
logged and reported is the command itself.
Its output goes to unnamed temporary files, not pipes: a daemon that inherited them
and lives on cannot keep kmodd waiting for an end of file, and only so much of it is
ever read back (`max_output`).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from kmodd.base.errors import CancelledError, CommandError
from kmodd.base.log import get_logger
from kmodd.base.sandbox import Sandbox

log = get_logger(__name__)

BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
MAX_OUTPUT = 64 * 1024 * 1024
"""What a command may print to stdout for kmodd to read it (dkms.conf's dump, listings)."""
_TAIL_CHARS = 4000
_POLL = 0.1
_running: set[int] = set()
"""Process groups started and not yet reaped: what `terminate_all` kills."""
_lock = threading.Lock()


def terminate_all() -> None:
    """Kill every process group `run` has started and not yet reaped (kmodd stops)."""
    with _lock:
        groups = list(_running)
    for pgid in groups:
        _kill(pgid)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
    check: bool = True,
    input: bytes | None = None,
    log_file: Path | None = None,
    max_output: int = MAX_OUTPUT,
    cancel: threading.Event | None = None,
    sandbox: Sandbox | None = None,
    pass_fds: tuple[int, ...] = (),
) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` and return its result with stdout and stderr as bytes, or, with
    `log_file`, both appended to that file (the error then carries its tail). A
    timeout, `cancel` being set or kmodd stopping kills the whole process group."""
    args = [os.fspath(a) for a in argv]
    full_env = {**BASE_ENV, **(env or {})}
    log.debug("+ " + shlex.join(args))
    started = args if sandbox is None else sandbox.wrap(args, cwd)
    if log_file is not None:
        with log_file.open("ab") as out:
            out.write(f"+ {shlex.join(args)}\n".encode())
            out.flush()
            code = _run(started, full_env, cwd, timeout, input, out, out, cancel, args, pass_fds)
        if check and code != 0:
            raise CommandError(args, code, _tail(log_file))
        return subprocess.CompletedProcess(args, code, b"", b"")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        code = _run(started, full_env, cwd, timeout, input, out, err, cancel, args, pass_fds)
        stderr = _read_tail(err)
        if out.seek(0, os.SEEK_END) > max_output:
            problem = f"printed more than {max_output} bytes"
            raise CommandError(args, code, stderr.decode(errors="replace"), problem=problem)
        out.seek(0)
        stdout = out.read()
    if check and code != 0:
        raise CommandError(args, code, stderr.decode(errors="replace"))
    return subprocess.CompletedProcess(args, code, stdout, stderr)


def _run(
    args: list[str],
    env: dict[str, str],
    cwd: Path | None,
    timeout: float | None,
    input: bytes | None,
    stdout: IO[bytes],
    stderr: IO[bytes],
    cancel: threading.Event | None,
    named: list[str],
    pass_fds: tuple[int, ...] = (),
) -> int:
    """Run `args`, reported in errors as `named` (the command before its sandbox)."""
    if cancel is not None and cancel.is_set():
        raise CancelledError(f"{named[0]} not started: cancelled")
    with contextlib.ExitStack() as stack:
        stdin: int | IO[bytes] = subprocess.DEVNULL
        if input is not None:
            stdin = stack.enter_context(tempfile.TemporaryFile())
            stdin.write(input)
            stdin.seek(0)
        try:
            proc = subprocess.Popen(  # noqa: S603 - the one chokepoint
                args,
                env=env,
                cwd=cwd,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
                pass_fds=pass_fds,
            )
        except FileNotFoundError as err:
            raise CommandError(named, 127, "", problem="not found") from err
        except PermissionError as err:
            raise CommandError(named, 126, "", problem="not executable") from err
        with _lock:
            _running.add(proc.pid)
        try:
            code = _wait(proc, named, timeout, cancel)
            if args is not named and 128 < code < 128 + 65:
                return -(code - 128)  # the sandbox says a signal ended its command so
            return code
        finally:
            _kill(proc.pid)  # whatever it left in its group goes with it
            with _lock:
                _running.discard(proc.pid)
            proc.wait()
    raise AssertionError("unreachable")  # pragma: no cover


def _wait(
    proc: subprocess.Popen[bytes],
    args: list[str],
    timeout: float | None,
    cancel: threading.Event | None,
) -> int:
    """Its exit status; a CommandError after `timeout`, a CancelledError on cancel."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return proc.wait(_POLL)
        except subprocess.TimeoutExpired:
            pass
        if cancel is not None and cancel.is_set():
            _kill(proc.pid)
            raise CancelledError(f"{args[0]} was stopped: cancelled")
        if deadline is not None and time.monotonic() >= deadline:
            _kill(proc.pid)
            raise CommandError(args, -9, "", problem=f"did not finish within {timeout:g} s")


def _kill(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _read_tail(f: IO[bytes]) -> bytes:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - _TAIL_CHARS))
    return f.read()


def _tail(path: Path) -> str:
    with path.open("rb") as f:
        return _read_tail(f).decode(errors="replace")
