"""One error hierarchy: every class has a D-Bus error name and a CLI exit code.

Only entry points (cli, daemon, hooks) turn these into messages and exit codes.
Exit codes 0 and 1 are results (0: all good, 1: something needs a rebuild / failed
for a module), 2 is a usage error (argparse's own), the rest are the classes below.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


class KmoddError(Exception):
    """Base class. `str(err)` is one line fit for an admin."""

    dbus_name = "io.kmodd1.Error.Failed"
    exit_code = 5


class UsageError(KmoddError):
    """The command line (or a D-Bus call) asks for something that makes no sense."""

    dbus_name = "io.kmodd1.Error.InvalidArgs"
    exit_code = 2


class BadInputError(KmoddError):
    """A file exists but its content is malformed: corrupt ELF, broken symvers line..."""

    dbus_name = "io.kmodd1.Error.BadInput"
    exit_code = 3

    def __init__(self, path: Path, problem: str, *, line: int | None = None) -> None:
        self.path = path
        self.problem = problem
        self.line = line
        where = os.fspath(path) if line is None else f"{os.fspath(path)}:{line}"
        super().__init__(f"{where}: {problem}")


class NotFoundError(KmoddError):
    """A named thing does not exist: a module path, a kernel, a kernel's exports."""

    dbus_name = "io.kmodd1.Error.NotFound"
    exit_code = 4

    def __init__(self, what: str, path: Path | None = None) -> None:
        self.what = what
        self.path = path
        super().__init__(what if path is None else f"{os.fspath(path)}: {what}")


class CommandError(KmoddError):
    """An external command failed; carries the command, its status and stderr's tail."""

    dbus_name = "io.kmodd1.Error.CommandFailed"
    exit_code = 5

    def __init__(
        self, argv: list[str], returncode: int, stderr_tail: str, *, problem: str | None = None
    ) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.problem = problem or ended(returncode)
        tail = stderr_tail.strip().splitlines()[-1:]
        super().__init__(f"{argv[0]} {self.problem}" + (f": {tail[0]}" if tail else ""))

    @property
    def timed_out(self) -> bool:
        return self.problem.startswith("did not finish")


def ended(returncode: int) -> str:
    """How a process ended, as an admin reads it: `exited with status 2`, `was killed
    by SIGSEGV`."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class CancelledError(KmoddError):
    """Work was stopped before it finished: cancelled, or kmodd was told to stop."""

    dbus_name = "io.kmodd1.Error.Cancelled"
    exit_code = 9


class AccessDeniedError(KmoddError):
    """The caller may not change the system."""

    dbus_name = "io.kmodd1.Error.AccessDenied"
    exit_code = 6


class BuildError(KmoddError):
    """Building, or installing, one module source for one kernel failed."""

    dbus_name = "io.kmodd1.Error.BuildFailed"
    exit_code = 7

    def __init__(self, what: str, problem: str, log: Path | None = None) -> None:
        self.what = what
        self.problem = problem
        self.log = log
        suffix = "" if log is None else f" (log: {os.fspath(log)})"
        super().__init__(f"{what}: {problem}{suffix}")


EXIT_CODES: dict[int, str] = {
    0: "success: every module is reusable / every job succeeded",
    1: "check: at least one module needs a rebuild",
    2: "usage error",
    3: "bad input: a file is malformed (corrupt module, broken symvers line, bad dkms.conf)",
    4: "not found: a module path, a kernel or a kernel's exports does not exist",
    5: "an operation or external command failed",
    6: "access denied",
    7: "some modules failed to build or install (each named, with its log); the rest were done",
    8: "timed out waiting for the service",
    9: "cancelled, or interrupted (Ctrl-C, SIGTERM): nothing half-done was left",
}
