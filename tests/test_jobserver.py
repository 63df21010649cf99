"""One GNU make jobserver for every build kmodd runs at once: with --jobs N, the jobs of
all builds together never pass N, a long build takes the tokens the others give back,
and among the builds ready the one expected to take longest starts first: as long as
it took last time, or, never built, as long as its source's size says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kmodd.base.errors import CancelledError
from kmodd.base.jobserver import Jobserver
from tests.conftest import K111, K113
from tests.sources import write_source
from tests.test_autoinstall import make_system

TOP = Path(__file__).resolve().parent.parent

JOBS_MK = """\
TARGETS := $(addprefix job-,$(shell seq {count}))
all: $(TARGETS)
\tcp given.ko kmt_simple.ko
job-%:
\t@echo "job {name} $@ start $$(date +%s.%N)"; sleep {seconds}; \\
\techo "job {name} $@ end $$(date +%s.%N)"
.PHONY: all
"""


def test_tokens_are_taken_given_back_and_waited_for() -> None:
    with Jobserver(2) as server:
        assert server.makeflags().startswith("-j2 --jobserver-auth=")
        assert server.try_acquire() and server.try_acquire()
        assert not server.try_acquire() and server.free() == 0
        server.release()
        assert server.free() == 1
        with server.token():
            assert server.free() == 0
        assert server.free() == 1
        assert server.try_acquire()
        cancel = threading.Event()
        threading.Timer(0.3, cancel.set).start()
        with pytest.raises(CancelledError), server.token(cancel):
            pass


def jobs_source(
    root: Path, name: str, count: int, seconds: float, given: bytes, padding: int = 0
) -> None:
    """A source whose make runs `count` jobs of `seconds` each, saying when each ran;
    `padding` bytes of documentation make it look bigger than it builds."""
    dest = name.replace("-", "_")
    extra = f'AUTOINSTALL="yes"\nMAKE[0]="make -f jobs.mk"\nDEST_MODULE_NAME[0]="{dest}"\n'
    extra += 'NO_WEAK_MODULES="yes"\n'
    src = write_source(root, name, modules=("kmt_simple",), extra=extra)
    (src / "jobs.mk").write_text(JOBS_MK.format(count=count, name=name, seconds=seconds))
    (src / "given.ko").write_bytes(given)
    (src / "README").write_bytes(b"x" * padding)


def intervals(root: Path, kernel: str) -> dict[str, list[tuple[float, float]]]:
    """Source → when each of its make jobs ran, from the build logs."""
    found: dict[str, list[tuple[float, float]]] = {}
    for log in (root / "var/lib/kmodd/builds").glob(f"*/*/{kernel}/*/make.log"):
        starts: dict[str, float] = {}
        for name, job, what, when in re.findall(r"^job (\S+) (\S+) (start|end) (\S+)$",
                                                log.read_text(), re.M):  # fmt: skip
            if what == "start":
                starts[job] = float(when)
            else:
                found.setdefault(name, []).append((starts[job], float(when)))
    return found


def most_at_once(runs: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in runs] + [(e, -1) for _, e in runs])
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def autoinstall(root: Path, kernel: str, jobs: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent"}
    return subprocess.run(
        [sys.executable, "-m", "kmodd.edges.cli", "--root", os.fspath(root), "autoinstall",
         "-k", kernel, "--no-initrd", "-j", str(jobs)],
        env=env, cwd=TOP, capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip


def test_every_build_shares_one_jobserver_and_the_longest_starts_first(
    tmp_path: Path, built: object
) -> None:
    assert callable(built)
    given = built(K113)["kmt_simple"].read_bytes()
    root = make_system(tmp_path / "root", (K111, K113))
    jobs_source(root, "kmt-a", 1, 1.0, given, padding=200_000)
    jobs_source(root, "kmt-b", 1, 0.3, given, padding=100_000)
    jobs_source(root, "kmt-z-long", 8, 0.5, given)

    first = autoinstall(root, K111, 2)
    assert first.returncode == 0, first.stdout + first.stderr
    ran = intervals(root, K111)
    everything = [run for runs in ran.values() for run in runs]
    assert len(everything) == 10
    assert most_at_once(everything) <= 2, "more jobs at once than --jobs allows"
    # once the short ones are done, the long build runs two jobs at once
    short_done = max(end for name in ("kmt-a", "kmt-b") for _, end in ran[name])
    after = [(max(s, short_done), e) for s, e in ran["kmt-z-long"] if e > short_done]
    assert most_at_once(after) == 2, ran["kmt-z-long"]
    # never built before: by their sources' sizes, the long one (the smallest) last
    begun = {name: min(s for s, _ in runs) for name, runs in ran.items()}
    assert begun["kmt-a"] < begun["kmt-z-long"] and begun["kmt-b"] < begun["kmt-z-long"], begun

    second = autoinstall(root, K113, 2)
    assert second.returncode == 0, second.stdout + second.stderr
    begun = {name: min(s for s, _ in runs) for name, runs in intervals(root, K113).items()}
    assert begun["kmt-z-long"] < begun["kmt-b"], begun  # it took longest last time
