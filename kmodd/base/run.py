"""The one place kmodd starts other programs.

`check=True` semantics, stdin from /dev/null, a minimal explicit environment, the
command logged at debug as `+ cmd`, and failures raised as `CommandError` carrying
the command, its exit status and the tail of its stderr.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import structlog

from kmodd.base.errors import CommandError

log = structlog.get_logger(__name__)

BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
_TAIL_CHARS = 4000
_running: set[int] = set()
"""Process groups started and not yet reaped: what `terminate_all` kills."""


def terminate_all() -> None:
    """Kill every process group `run` has started (the service's shutdown)."""
    for pgid in list(_running):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
    check: bool = True,
    input: bytes | None = None,
    log_file: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` and return its result with stdout and stderr captured as bytes, or,
    with `log_file`, both appended to that file (the error then carries its tail)."""
    args = [os.fspath(a) for a in argv]
    full_env = {**BASE_ENV, **(env or {})}
    log.debug("+ " + shlex.join(args))
    if log_file is not None:
        with log_file.open("ab") as out:
            out.write(f"+ {shlex.join(args)}\n".encode())
            out.flush()
            proc = _run(args, full_env, cwd, timeout, input, out, out)
        if check and proc.returncode != 0:
            raise CommandError(args, proc.returncode, _file_tail(log_file))
        return proc
    proc = _run(args, full_env, cwd, timeout, input, subprocess.PIPE, subprocess.PIPE)
    if check and proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace")[-_TAIL_CHARS:]
        raise CommandError(args, proc.returncode, tail)
    return proc


def _run(
    args: list[str],
    env: dict[str, str],
    cwd: Path | None,
    timeout: float | None,
    input: bytes | None,
    stdout: int | IO[bytes],
    stderr: int | IO[bytes],
) -> subprocess.CompletedProcess[bytes]:
    try:
        # start_new_session: on timeout the whole process group is killed, not just argv[0]
        with subprocess.Popen(  # noqa: S603 - the one chokepoint
            args,
            env=env,
            cwd=cwd,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        ) as proc:
            _running.add(proc.pid)
            try:
                out, err = proc.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise CommandError(args, -9, f"timed out after {timeout} s") from None
            except BaseException:
                os.killpg(proc.pid, signal.SIGKILL)
                raise
            finally:
                _running.discard(proc.pid)
    except FileNotFoundError as err:
        raise CommandError(args, 127, f"{args[0]}: command not found") from err
    return subprocess.CompletedProcess(args, proc.returncode, out or b"", err or b"")


def _file_tail(path: Path) -> str:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - _TAIL_CHARS))
        return f.read().decode(errors="replace")
