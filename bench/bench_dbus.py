"""Prints what the service costs over D-Bus, on this machine.

    python bench/bench_dbus.py [--calls N] [--idle SECONDS] [--harness]

A real dbus-daemon (tests/dbus_harness.py) and the service (`python -m kmodd.edges.daemon`, or
with --harness the watcher-less Service + serve()) for a temporary root holding
6.12.113's headers, 200 tracked builds in the store and a source whose PRE_BUILD hook
sleeps, so a build is running while `Status` is timed (N calls from one client
connection). Then, once the queue has drained: the service's RSS (VmRSS) and the CPU
time it uses over --idle seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from kmodd.act.request import Request, Verb
from kmodd.base.paths import Root
from kmodd.edges.dbus import Client
from kmodd.state.states import State
from kmodd.state.store import Record, Store
from tests.conftest import K113
from tests.dbus_harness import FakeLogind, running_service, system_bus
from tests.sources import write_source
from tests.test_autoinstall import make_system

TRACKED = 200
HOOK_SLEEP = 40


def fill_store(root: Path) -> None:
    """200 installed builds, each with its (empty) module file present."""
    updates = root / "lib/modules" / K113 / "updates/dkms"
    updates.mkdir(parents=True, exist_ok=True)
    db = Store.open(Root.at(root))
    try:
        for i in range(TRACKED):
            (updates / f"bench_{i}.ko.xz").write_bytes(b"")
            db.put(
                Record(
                    f"bench-{i}",
                    "1.0",
                    K113,
                    "x86_64",
                    State.INSTALLED,
                    files=(f"/lib/modules/{K113}/updates/dkms/bench_{i}.ko.xz",),
                )
            )
    finally:
        db.close()


def slow_source(root: Path) -> None:
    src = write_source(
        root,
        "kmt-slow",
        modules=("kmt_simple",),
        extra='AUTOINSTALL="yes"\nPRE_BUILD="hooks/slow"\n',
    )
    hook = src / "hooks/slow"
    # a build that keeps every CPU busy, as a compile does (its loops end with its
    # sandbox)
    hook.write_text(
        "#!/bin/sh\nfor i in $(seq $(nproc)); do (while :; do :; done) & done\n"
        f"sleep {HOOK_SLEEP}\n"
    )
    hook.chmod(0o755)


def proc_status(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return "?"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--harness", action="store_true", help="Service + serve(), no watcher")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kmodd-bench-") as tmp_name:
        tmp = Path(tmp_name)
        root = make_system(tmp / "root", (K113,))
        write_source(root, "kmt-base")
        slow_source(root)
        fill_store(root)
        with (
            system_bus(tmp / "bus") as bus,
            FakeLogind(bus.address) as logind,
            running_service(bus, root, tmp / "kmodd.log", daemon=not args.harness) as server,
        ):
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
            client = Client.connect()
            assert client is not None
            print(f"service pid {server.pid}: {' '.join(server.argv[1:4])}")
            print(f"  RSS at start                  {proc_status(server.pid, 'VmRSS')}")

            job = client.submit(Request(Verb.AUTOINSTALL, K113))
            deadline = time.monotonic() + 30
            while not any(j["id"] == str(job) and j["state"] == "running" for j in client.jobs()):
                assert time.monotonic() < deadline, "the job did not start"
                time.sleep(0.05)
            lines = len(client.status())
            samples = []
            for _ in range(args.calls):
                start = time.perf_counter()
                client.status()
                samples.append(time.perf_counter() - start)
            running = any(j["id"] == str(job) and j["state"] == "running" for j in client.jobs())
            print(
                f"  Status ({lines} lines, {args.calls} calls, "
                f"build {'running' if running else 'FINISHED DURING THE RUN'}):"
            )
            print(
                f"    p50 {statistics.median(samples) * 1000:6.2f} ms   "
                f"p99 {percentile(samples, 99) * 1000:6.2f} ms   "
                f"max {max(samples) * 1000:6.2f} ms"
            )
            print(f"  RSS while building            {proc_status(server.pid, 'VmRSS')}")

            start = time.monotonic()
            done, jobs = client.wait(K113, 600)
            assert done, server.output()
            print(f"  Wait returned after           {time.monotonic() - start:6.1f} s ({jobs[0]})")
            released = logind.wait_for(lambda calls: all(c.released for c in calls), 10)
            print(f"  logind lock taken {len(logind.calls)}x, released: {released}")
            client.close()

            time.sleep(1)
            before = cpu_seconds(server.pid)
            time.sleep(args.idle)
            used = cpu_seconds(server.pid) - before
            print(f"  RSS idle                      {proc_status(server.pid, 'VmRSS')}")
            print(f"  CPU idle over {args.idle:.0f} s            {used * 1000:6.0f} ms")


if __name__ == "__main__":
    main()
