"""kmodctl as an admin runs it, in a subprocess, on a temporary root, with no system
bus to find (a service the machine runs serves `/`, never a test's root)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent


def kmodctl(root: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent"}
    return subprocess.run(
        [sys.executable, "-m", "kmodd.edges.cli", "--root", os.fspath(root), *args],
        env=env, cwd=TOP, capture_output=True, text=True, check=False, timeout=timeout,
    )  # fmt: skip
