"""The one place kmodd starts other programs.

`check=True` semantics, stdin from /dev/null, a minimal explicit environment, the
command logged at debug as `+ cmd`, and failures raised as `CommandError` carrying
the command, its exit status and the tail of its stderr.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog

from kmodd.errors import CommandError

log = structlog.get_logger(__name__)

BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
_TAIL_CHARS = 4000


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
    check: bool = True,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` and return its result with stdout and stderr captured as bytes."""
    args = [os.fspath(a) for a in argv]
    full_env = {**BASE_ENV, **(env or {})}
    log.debug("+ " + shlex.join(args))
    try:
        proc = subprocess.run(  # noqa: S603 - the one chokepoint
            args,
            env=full_env,
            cwd=cwd,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
    except FileNotFoundError as err:
        raise CommandError(args, 127, f"{args[0]}: command not found") from err
    except subprocess.TimeoutExpired as err:
        stderr = err.stderr.decode(errors="replace") if err.stderr else ""
        raise CommandError(args, -9, f"{stderr}\ntimed out after {timeout} s") from err
    if check and proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace")[-_TAIL_CHARS:]
        raise CommandError(args, proc.returncode, tail)
    return proc
