"""Processes on this machine, found by what they run: a sandboxed command's pids are
its own PID namespace's, so tests look for its processes by their command lines."""

from __future__ import annotations

import time
from pathlib import Path


def running(cmdline: str) -> list[int]:
    """Pids of the live (not zombie) processes whose command line is `cmdline`
    (arguments joined by spaces)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if state != "Z" and b" ".join(argv).decode(errors="replace") == cmdline:
            found.append(int(proc.name))
    return found


def all_gone(cmdline: str, timeout: float = 5) -> bool:
    """No process runs `cmdline` within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while running(cmdline):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
