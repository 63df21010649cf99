"""A running build can be stopped: Ctrl-C or SIGTERM to kmodctl, the service's Cancel
and the service's own stop each end a ten-minute build within seconds, leave no
process of it behind and never leave its source `building`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kmodd.act.request import Request, Verb
from kmodd.base.paths import Root
from kmodd.edges.dbus import Client
from kmodd.service.jobs import JobQueue, JobState
from tests.conftest import K113
from tests.dbus_harness import running_service, system_bus
from tests.procs import all_gone, running
from tests.sources import write_source
from tests.test_autoinstall import make_system

TOP = Path(__file__).resolve().parent.parent


SLOW = "sleep 600"
"""What the slow source's make runs (a child of it): found on this machine by its
command line, since the build's own pids are its sandbox's."""


def slow_source(root: Path) -> None:
    """A source whose make runs for ten minutes, with a child."""
    src = write_source(root, "kmt-slow", modules=("kmt_simple",),
                       extra='AUTOINSTALL="yes"\nMAKE[0]="bash ./slow.sh"\n')  # fmt: skip
    (src / "slow.sh").write_text(f"{SLOW} &\nwait\n")


def started(timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while not running(SLOW):
        assert time.monotonic() < deadline, "the build never started"
        time.sleep(0.1)
    return running(SLOW)


def gone(timeout: float = 5) -> bool:
    return all_gone(SLOW, timeout)


def source_state(root: Path) -> str:
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent"}
    proc = subprocess.run(
        [sys.executable, "-m", "kmodd.edges.cli", "--root", os.fspath(root), "status", "--json"],
        env=env, capture_output=True, text=True, check=True, cwd=TOP,
    )  # fmt: skip
    (line,) = json.loads(proc.stdout)
    return str(line["state"])


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_kmodctl_stops_its_build_on_ctrl_c_and_sigterm(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    root = make_system(tmp_path / "root", (K113,))
    slow_source(root)
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmodd.edges.cli", "--root", os.fspath(root),
         "autoinstall", "-k", K113, "--no-initrd"],
        env=env, cwd=TOP, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    started()
    proc.send_signal(sig)
    start = time.monotonic()
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - start < 10
    assert proc.returncode == code, out + err
    assert err.splitlines()[-1].startswith("kmodctl: cancelled"), err
    assert "Traceback" not in err
    assert gone(), "the build's processes outlived kmodctl"
    assert source_state(root) == "added", "never left building"


def test_the_services_cancel_and_stop_end_a_running_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_system(tmp_path / "root", (K113,))
    slow_source(root)
    with (
        system_bus(tmp_path / "bus") as bus,
        running_service(bus, root, tmp_path / "kmodd.log") as server,
    ):
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
        client = Client.connect()
        assert client is not None
        with client:
            # Cancel: the running job ends cancelled within seconds
            job = submit(client)
            started()
            assert client.cancel(job) is True
            assert gone(10), server.output()
            states = {j["id"]: j["state"] for j in client.jobs()}
            deadline = time.monotonic() + 10
            while states[str(job)] != "cancelled":
                assert time.monotonic() < deadline, states
                time.sleep(0.1)
                states = {j["id"]: j["state"] for j in client.jobs()}
            assert source_state_via(client) == "added"

            # stop: the service ends within seconds, the job stays to run again
            again = submit(client)
            started()
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(30)
        assert time.monotonic() - start < 20, server.output()
        assert gone(5)
        assert "Traceback" not in server.output()
    queue = JobQueue(Root.at(root))
    try:
        assert queue.get(again).state is JobState.RUNNING, "left to run at the next start"
    finally:
        queue.close()
    assert source_state(root) == "added"


def submit(client: Client) -> int:
    return client.submit(Request(Verb.AUTOINSTALL, K113, initrd=False))


def source_state_via(client: Client) -> str:
    (line,) = client.status()
    return str(line["state"])


def test_the_run_after_a_kill_9_removes_what_the_killed_one_left(tmp_path: Path) -> None:
    """kill -9 mid-build leaves the build's private copy and, mid-install, `.*.tmp`
    files; the next run removes them, and only them."""
    root = make_system(tmp_path / "root", (K113,))
    slow_source(root)
    updates = root / "lib/modules" / K113 / "updates/dkms"
    updates.mkdir(parents=True)
    half = updates / ".kmt_simple.ko.xz.a1b2c3.tmp"  # what an atomic write leaves
    half.write_bytes(b"half a module")
    theirs = updates / "notes.tmp"  # not kmodd's pattern: stays
    theirs.write_text("an admin's file")
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent"}
    argv = [sys.executable, "-m", "kmodd.edges.cli", "--root", os.fspath(root)]
    proc = subprocess.Popen(
        [*argv, "autoinstall", "-k", K113, "--no-initrd"], env=env, cwd=TOP,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    started()
    proc.kill()
    proc.wait()
    assert gone(10), "the sandbox ends a build whose kmodctl was killed"
    work = root / "var/lib/kmodd/work"
    assert [p.name for p in work.iterdir()], "the killed build's copy is there"
    (root / "usr/src/kmt-slow-1.0/slow.sh").write_text("exit 1\n")  # the next build fails fast
    after = subprocess.run(
        [*argv, "autoinstall", "-k", K113, "--no-initrd"], env=env, cwd=TOP,
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert "Traceback" not in after.stderr, after.stderr
    assert list(work.iterdir()) == []
    assert not half.exists()
    assert theirs.read_text() == "an admin's file"
