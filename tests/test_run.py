"""The one subprocess chokepoint: every command in a process group of its own, killed
as a whole on timeout and cancel; output read from files, so a daemon holding them
cannot keep kmodd waiting, and only so much of it."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd.base.errors import CancelledError, CommandError
from kmodd.base.run import run


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.fixture
def pidfile(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pid"
    yield path
    if path.exists():  # never leave a test's sleeper behind
        for pid in path.read_text().split():
            if alive(int(pid)):
                os.kill(int(pid), signal.SIGKILL)


def test_a_daemon_holding_the_output_does_not_keep_kmodd_waiting(pidfile: Path) -> None:
    """dkms.conf's `setsid -f sleep` escapes the process group and keeps stdout and
    stderr open; the command itself is done, and so is kmodd's wait."""
    start = time.monotonic()
    done = run(
        ["bash", "-c", f"setsid -f bash -c 'echo $$ > {pidfile}; exec sleep 60'; echo done"],
        timeout=30,
    )
    assert time.monotonic() - start < 5
    assert done.stdout == b"done\n"
    time.sleep(0.2)
    assert alive(int(pidfile.read_text())), "it left the group: only a sandbox ends it"


def test_a_timeout_kills_the_whole_group_and_says_so(pidfile: Path) -> None:
    start = time.monotonic()
    with pytest.raises(CommandError) as caught:
        run(["bash", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], timeout=1)
    assert time.monotonic() - start < 5
    assert str(caught.value) == "bash did not finish within 1 s"
    assert caught.value.timed_out
    time.sleep(0.2)
    assert not alive(int(pidfile.read_text())), "its child went with it"


def test_output_beyond_the_bound_is_refused_not_read() -> None:
    with pytest.raises(CommandError, match=r"^head printed more than 1048576 bytes$"):
        run(["head", "-c", "5000000", "/dev/zero"], max_output=1024 * 1024)


def test_cancel_stops_a_running_command_within_a_moment(pidfile: Path) -> None:
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    start = time.monotonic()
    with pytest.raises(CancelledError, match="cancelled"):
        run(["bash", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], cancel=cancel)
    assert time.monotonic() - start < 3
    time.sleep(0.2)
    assert not alive(int(pidfile.read_text()))


def test_how_a_command_ended_is_said_in_words() -> None:
    with pytest.raises(CommandError) as caught:
        run(["bash", "-c", "echo oops >&2; kill -SEGV $$"])
    assert str(caught.value) == "bash was killed by SIGSEGV: oops"
    with pytest.raises(CommandError) as caught:
        run(["bash", "-c", "exit 3"])
    assert str(caught.value) == "bash exited with status 3"
    with pytest.raises(CommandError) as caught:
        run(["kmodd-no-such-command"])
    assert str(caught.value) == "kmodd-no-such-command not found"
    assert caught.value.returncode == 127


def test_input_goes_in_from_a_file_not_a_pipe() -> None:
    big = b"x" * (4 * 1024 * 1024)  # more than a pipe holds: no deadlock either way
    assert run(["wc", "-c"], input=big).stdout.strip() == str(len(big)).encode()
