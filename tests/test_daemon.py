"""The real daemon, as a process on a real dbus-daemon, driven by the real kmodctl:
kernels and headers appearing in the root are noticed; restarts and `kill -9` in the
middle of a batch lose nothing and half-write nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd.edges.dbus import Client
from kmodd.world import modfile
from tests.conftest import K111, K113, install_headers, require_tool
from tests.dbus_harness import Bus, running_service, system_bus
from tests.sources import write_source
from tests.test_autoinstall import make_system

TOP = Path(__file__).resolve().parent.parent


def kmodctl(bus: Bus, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """kmodctl as an admin runs it, talking to the service for this root."""
    env = bus.env(PYTHONPATH=os.fspath(TOP))
    return subprocess.run(
        [sys.executable, "-m", "kmodd.edges.cli", "--root", os.fspath(root), *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )


def states(bus: Bus, root: Path) -> dict[tuple[str, str], str]:
    proc = kmodctl(bus, root, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "not running" not in proc.stderr, "status must come from the service"
    return {(s["module"], s["kernel"]): s["state"] for s in json.loads(proc.stdout)}


def until(predicate: object, timeout: float = 120.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[Bus]:
    with system_bus(tmp_path / "bus") as running:
        yield running


def test_a_new_kernel_then_its_headers_are_noticed_and_done(tmp_path: Path, bus: Bus) -> None:
    require_tool("make")
    root = make_system(tmp_path / "root", (K111,))
    for name in ("kmt-base", "kmt-pair", "kmt-misc"):
        write_source(root, name)
    with running_service(bus, root, tmp_path / "kmodd.log", daemon=True) as server:
        done = kmodctl(bus, root, "autoinstall", "-k", K111)
        assert done.returncode == 0, done.stdout + done.stderr + server.output()
        assert f"kmodd: kmt-pair/1.0 for {K111}: built" in done.stdout.splitlines()

        # the image arrives first: its modules wait for headers
        (root / "lib/modules" / K113).mkdir(parents=True)
        until(lambda: states(bus, root).get(("kmt-base", K113)) == "waiting-for-headers")
        # then the headers: what is reusable is weak-linked, the rest is built
        install_headers(root, K113, full=True)
        until(lambda: states(bus, root).get(("kmt-misc", K113)) == "installed", 300)
        waited = kmodctl(bus, root, "wait", "-k", K113, "--timeout", "300")
        assert waited.returncode == 0, waited.stderr
        now = states(bus, root)
        assert now[("kmt-base", K113)] == "installed-weak"
        assert now[("kmt-pair", K113)] == "installed-weak"
        plan = kmodctl(bus, root, "plan", "-k", K113)
        assert f"kmt-pair/1.0, {K113}: up-to-date: already installed-weak" in plan.stdout

        # uninstall goes through the service: K113, which linked to K111's build, gets its own
        gone = kmodctl(bus, root, "uninstall", "-m", "kmt-pair", "-k", K111)
        assert gone.returncode == 0, gone.stdout + gone.stderr + server.output()
        now = states(bus, root)
        assert now[("kmt-pair", K111)] == "added"
        assert now[("kmt-pair", K113)] == "installed"
        assert not (root / "lib/modules" / K111 / "updates/dkms/kmt_pkga.ko.xz").exists()
        weak = root / "lib/modules" / K113 / "weak-updates"
        assert all(link.exists() for link in weak.rglob("*") if link.is_symlink())
        # what the service cannot do for kmodctl is refused, saying why and what to do
        busy = kmodctl(bus, root, "build", "-m", "kmt-base", "-k", K111)
        assert busy.returncode == 5, busy.stderr
        assert "the kmodd service is running" in busy.stderr
        assert "systemctl stop kmodd" in busy.stderr

        # a source removed from /usr/src is removed from every kernel
        subprocess.run(["rm", "-rf", root / "usr/src/kmt-misc-1.0"], check=True)
        until(lambda: ("kmt-misc", K111) not in states(bus, root))
        assert not (root / "lib/modules" / K113 / "updates/dkms/kmt_misc.ko.xz").exists()
        assert "Traceback" not in server.output()


def test_kill_9_mid_batch_then_restart_loses_nothing(tmp_path: Path, bus: Bus) -> None:
    require_tool("make")
    root = make_system(tmp_path / "root", (K113,))
    write_source(root, "kmt-base")
    write_source(
        root, "kmt-slow", modules=("kmt_pkga",), extra='AUTOINSTALL=yes\nPRE_BUILD="slow"\n'
    )
    slow = root / "usr/src/kmt-slow-1.0/slow"
    slow.write_text("#!/bin/sh\nsleep 4\n")
    slow.chmod(0o755)
    with running_service(bus, root, tmp_path / "first.log", daemon=True) as server:
        env = bus.env(PYTHONPATH=os.fspath(TOP))
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kmodd.edges.cli",
                "--root",
                os.fspath(root),
                "autoinstall",
                "-k",
                K113,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        until(lambda: states(bus, root).get(("kmt-slow", K113)) == "building")
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    # restart: the job that was running runs again and finishes
    with running_service(bus, root, tmp_path / "second.log", daemon=True) as server:
        waited = kmodctl(bus, root, "wait", "-k", K113, "--timeout", "300")
        assert waited.returncode == 0, waited.stderr + server.output()
        assert states(bus, root) == {
            ("kmt-base", K113): "installed",
            ("kmt-slow", K113): "installed",
        }
        for path in (root / "lib/modules" / K113 / "updates/dkms").iterdir():
            assert modfile.read(path).vermagic.startswith(K113)
        jobs = json.loads(
            subprocess.run(
                [sys.executable, "-c", _JOBS],
                env=bus.env(PYTHONPATH=os.fspath(TOP)),
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        mine = [j for j in jobs if j["kernel"] == K113]
        assert [j["state"] for j in mine] == ["done"], mine  # one job, run to completion once


_JOBS = """
import json
from kmodd.edges.dbus import Client
client = Client.connect()
print(json.dumps(client.jobs()))
"""


def test_ready_notification_and_a_clean_stop(tmp_path: Path, bus: Bus) -> None:
    root = make_system(tmp_path / "root", ())
    sock_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(os.fspath(sock_path))
        notify.settimeout(30)
        env = bus.env(NOTIFY_SOCKET=os.fspath(sock_path), PYTHONPATH=os.fspath(TOP))
        proc = subprocess.Popen(
            [sys.executable, "-m", "kmodd.edges.daemon", "--root", os.fspath(root)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert notify.recv(4096).decode().startswith("READY=1")
            proc.send_signal(signal.SIGTERM)
            assert notify.recv(4096).decode().startswith("STOPPING=1")
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        output = proc.stdout.read() if proc.stdout else ""
    assert "Traceback" not in output
    assert "level='info' event='ready'" in output


def test_a_source_upgrade_under_the_service_ends_with_the_new_version_everywhere(
    tmp_path: Path, bus: Bus
) -> None:
    """A *-dkms package upgrade as dpkg does it: /usr/src/kmt-base-1.0 goes, 2.0 comes.
    The service forgets 1.0 only, and every kernel ends with 2.0 (built, or weak-linked
    when the other's 2.0 build was there first: the two jobs may run at once), and no
    link is left to a build never judged for it."""
    require_tool("make")
    root = make_system(tmp_path / "root", (K111, K113))
    old = write_source(root, "kmt-base", "1.0")
    with running_service(bus, root, tmp_path / "kmodd.log", daemon=True) as server:
        for kver in (K111, K113):
            done = kmodctl(bus, root, "autoinstall", "-k", kver)
            assert done.returncode == 0, done.stdout + done.stderr + server.output()

        write_source(root, "kmt-base", "2.0")
        shutil.rmtree(old)

        def versions() -> dict[str, tuple[str, str]]:
            proc = kmodctl(bus, root, "status", "--json")
            assert proc.returncode == 0, proc.stderr
            docs = json.loads(proc.stdout)
            return {d["kernel"]: (d["version"], d["state"]) for d in docs}

        def upgraded() -> bool:
            now = versions()
            return now.get(K111) == ("2.0", "installed") and now.get(K113) in (
                ("2.0", "installed"),
                ("2.0", "installed-weak"),
            )

        until(upgraded, 300)
        for kver in (K111, K113):
            waited = kmodctl(bus, root, "wait", "-k", kver, "--timeout", "300")
            assert waited.returncode == 0, waited.stderr + server.output()
        assert upgraded(), versions()
        built = root / "lib/modules" / K111 / "updates/dkms/kmt_simple.ko.xz"
        links = [p for p in (root / "lib/modules").glob("*/weak-updates/**/*") if p.is_symlink()]
        assert [p.resolve() for p in links] == (
            [built] if versions()[K113][1] != "installed" else []
        )
        assert modfile.read(built).vermagic.startswith(K111 + " ")


def test_a_kernel_whose_weak_link_was_taken_away_gets_a_job_of_its_own(
    tmp_path: Path, bus: Bus
) -> None:
    """No watcher here: K111's job installs kmt-base 2.0 where K113's 1.0 link pointed,
    takes that link away, and the service queues K113, which then links to 2.0."""
    require_tool("make")
    root = make_system(tmp_path / "root", (K111, K113))
    write_source(root, "kmt-base", "1.0")
    with running_service(bus, root, tmp_path / "kmodd.log") as server:
        for kver in (K111, K113):
            done = kmodctl(bus, root, "autoinstall", "-k", kver)
            assert done.returncode == 0, done.stdout + done.stderr + server.output()
        write_source(root, "kmt-base", "2.0")
        up = kmodctl(bus, root, "autoinstall", "-k", K111)
        assert up.returncode == 0, up.stdout + up.stderr + server.output()
        assert f"kmodd: kmt-base/1.0 for {K113}: removed (its weak link went to" in up.stdout
        waited = kmodctl(bus, root, "wait", "-k", K113, "--timeout", "300")
        assert waited.returncode == 0, waited.stderr + server.output()
        proc = kmodctl(bus, root, "status", "--json", "-k", K113)
        docs = {d["version"]: d for d in json.loads(proc.stdout)}
        assert docs["2.0"]["state"] == "installed-weak", docs
        assert docs["2.0"]["weak_from"] == K111
        assert docs["1.0"]["state"] == "added", "1.0 is still in /usr/src, not installed"


def test_kmodctl_uses_the_service_only_for_the_root_it_serves(tmp_path: Path, bus: Bus) -> None:
    """No switch needed: the service says which root it serves (its Root property), and
    kmodctl --root OTHER works on OTHER itself, under the writers' lock of OTHER."""
    served = make_system(tmp_path / "served", (K113,))
    other = make_system(tmp_path / "other", (K113,))
    write_source(served, "kmt-base")
    write_source(other, "kmt-misc")
    with running_service(bus, served, tmp_path / "kmodd.log") as server:
        mine = kmodctl(bus, served, "status")
        assert mine.returncode == 0, mine.stderr + server.output()
        assert "not running" not in mine.stderr, "status must come from the service"
        assert mine.stdout == f"kmt-base/1.0, {K113}, x86_64: added\n"
        theirs = kmodctl(bus, other, "status")
        assert theirs.returncode == 0, theirs.stderr
        assert theirs.stderr == (
            f"kmodctl: the kmodd service is not running for {other}; reading its state directly\n"
        )
        assert theirs.stdout == f"kmt-misc/1.0, {K113}, x86_64: added\n"


def jobs_of(bus: Bus) -> list[dict[str, str]]:
    """The service's recent jobs, as its Jobs call gives them."""
    saved = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
    try:
        client = Client.connect()
        assert client is not None, "the service is not on the bus"
        with client:
            return client.jobs()
    finally:
        if saved is None:
            del os.environ["DBUS_SYSTEM_BUS_ADDRESS"]
        else:
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = saved


def test_a_request_keeps_its_options_through_the_service(tmp_path: Path, bus: Bus) -> None:
    """The hooks' --no-initrd reaches the service's job (the package manager makes the
    initrd next; kmodd must not make it too), and a job without it may remake it."""
    require_tool("make")
    root = make_system(tmp_path / "root", (K113,))
    write_source(root, "kmt-base")
    with running_service(bus, root, tmp_path / "kmodd.log") as server:
        hook = kmodctl(bus, root, "autoinstall", "-k", K113, "--no-initrd")
        assert hook.returncode == 0, hook.stderr + server.output()
        assert "not running" not in hook.stderr, "the request must go through the service"
        calls = root / "initrd-calls"  # what the root's update-initramfs was asked
        assert not calls.exists(), calls.read_text()
        admin = kmodctl(bus, root, "uninstall", "-m", "kmt-base", "-k", K113)
        assert admin.returncode == 0, admin.stderr + server.output()
        assert K113 in calls.read_text(), "a REMAKE_INITRD module went: the initrd is remade"
        jobs = {j["kind"]: j for j in jobs_of(bus)}
    assert jobs["kernel"]["initrd"] == "no", jobs
    assert jobs["uninstall"]["initrd"] == "yes", jobs


def test_an_uninstall_leaves_other_kernels_work_to_their_own_jobs(tmp_path: Path, bus: Bus) -> None:
    """K113 weak-links kmt-base from K111. Uninstalling it from K111 through the
    service: K113 gets a job of its own first (never linking back to K111), its build
    is in place before K111's goes, and the uninstall job itself touches K111 only."""
    require_tool("make")
    root = make_system(tmp_path / "root", (K111, K113))
    write_source(root, "kmt-base")
    with running_service(bus, root, tmp_path / "kmodd.log") as server:
        for kver in (K111, K113):
            done = kmodctl(bus, root, "autoinstall", "-k", kver)
            assert done.returncode == 0, done.stdout + done.stderr + server.output()
        assert states(bus, root)[("kmt-base", K113)] == "installed-weak"
        gone = kmodctl(bus, root, "uninstall", "-m", "kmt-base", "-k", K111)
        assert gone.returncode == 0, gone.stdout + gone.stderr + server.output()
        assert f"kmodd: kmt-base/1.0 for {K113}: built" in gone.stdout, gone.stdout
        assert states(bus, root) == {("kmt-base", K111): "added", ("kmt-base", K113): "installed"}
        jobs = jobs_of(bus)
    (uninstall,) = [j for j in jobs if j["kind"] == "uninstall"]
    (relink,) = [j for j in jobs if j["kernel"] == K113 and j["kind"] == "source"]
    assert uninstall["kernel"] == K111 and uninstall["after"] == relink["id"], jobs
    assert relink["avoid"] == K111 and relink["state"] == "done", relink
    assert json.loads(uninstall["outcomes"]) == [], "K113's link was gone before it ran"
    link = root / "lib/modules" / K113 / "weak-updates"
    assert not link.exists() or not any(link.rglob("*.ko*")), "no weak link is left"


def test_a_kernels_removal_relinks_the_others_in_their_own_jobs_first(
    tmp_path: Path, bus: Bus
) -> None:
    """What the prerm hook asks: K111 goes; K113, which weak-links into it, gets a
    build in a K113 job before K111's files are removed, so no link ever dangles."""
    require_tool("make")
    root = make_system(tmp_path / "root", (K111, K113))
    write_source(root, "kmt-base")
    with running_service(bus, root, tmp_path / "kmodd.log") as server:
        for kver in (K111, K113):
            done = kmodctl(bus, root, "autoinstall", "-k", kver)
            assert done.returncode == 0, done.stdout + done.stderr + server.output()
        hook = kmodctl(bus, root, "remove-kernel", K111, "--no-initrd")
        assert hook.returncode == 0, hook.stdout + hook.stderr + server.output()
        assert f"kmodd: kmt-base/1.0 for {K113}: built" in hook.stdout, hook.stdout
        # K111's own files go with its package, after this hook: until then it is listed
        assert states(bus, root) == {("kmt-base", K111): "added", ("kmt-base", K113): "installed"}
        jobs = jobs_of(bus)
    (removal,) = [j for j in jobs if j["kind"] == "remove-kernel"]
    (relink,) = [j for j in jobs if j["kernel"] == K113 and j["kind"] == "source"]
    assert removal["after"] == relink["id"] and relink["avoid"] == K111, jobs
    assert not (root / "lib/modules" / K111 / "updates").exists()
