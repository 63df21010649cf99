"""`kill -9` of autoinstall at many points of a batch: every module file is the old or
the new one, never truncated, and the next run finishes the work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kmodd.world import modfile
from tests.cli import kmodctl
from tests.conftest import K111, require_tool
from tests.sources import write_source
from tests.test_autoinstall import make_system

KILL_AFTER = (0.2, 0.6, 1.2, 2.0, 3.0, 4.5, 6.5, 9.0)


def test_kill_9_at_many_points_leaves_whole_files_and_the_next_run_finishes(
    tmp_path: Path,
) -> None:
    require_tool("make")
    root = make_system(tmp_path / "root", (K111,))
    for name in ("kmt-base", "kmt-pair", "kmt-misc"):
        write_source(root, name)
    updates = root / "lib/modules" / K111 / "updates/dkms"
    argv = [sys.executable, "-m", "kmodd.edges.cli", "--root", os.fspath(root),
            "autoinstall", "-k", K111, "-j", "2"]  # fmt: skip
    seen_files = 0
    for delay in KILL_AFTER:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)  # the power goes: kmodctl, make, everything
        proc.wait()
        if updates.is_dir():
            for path in updates.iterdir():
                if modfile.is_module_file(path):
                    modfile.read(path)  # raises on a truncated or corrupt module
                    seen_files += 1
    assert seen_files > 0, "no kill landed after an install: move KILL_AFTER later"
    final = kmodctl(root, "autoinstall", "-k", K111)
    assert final.returncode == 0, final.stdout + final.stderr
    states = {s["module"]: s["state"] for s in json.loads(kmodctl(root, "status", "--json").stdout)}
    assert states == {"kmt-base": "installed", "kmt-pair": "installed", "kmt-misc": "installed"}
    for path in updates.iterdir():
        assert modfile.read(path).vermagic.startswith(K111)
    again = kmodctl(root, "autoinstall", "-k", K111)
    assert again.returncode == 0 and again.stdout.count("up-to-date") == 3
