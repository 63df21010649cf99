"""After a crash (kill -9, power loss): what the interrupted run left on disk goes
before the next run starts, while it holds the writers' lock, so nothing of another
run is touched. Only files: a process kmodd did not start itself is never killed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kmodd.base.errors import KmoddError
from kmodd.base.log import get_logger
from kmodd.base.paths import Root

log = get_logger(__name__)

_TREES = ("updates", "extra", "weak-updates")
"""Where kmodd writes in a kernel's module dir (atomic writes leave `.NAME.*.tmp`)."""


def clean_litter(root: Root) -> list[Path]:
    """Remove the work dirs and half-written temporaries of runs that did not finish;
    the paths removed (logged)."""
    removed: list[Path] = []
    work = root.work_dir
    if work.is_dir():
        for leftover in sorted(work.iterdir()):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(leftover)
    dirs = [root.state_dir]
    for modules in root.modules_dirs:
        if modules.is_dir():
            dirs += [kdir / tree for kdir in _resolved(root, modules) for tree in _TREES]
    for directory in dirs:
        if not directory.is_dir() or directory.is_symlink():
            continue
        for parent, _, files in os.walk(directory):
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    path = Path(parent, name)
                    path.unlink(missing_ok=True)
                    removed.append(path)
    if removed:
        log.info("removed what an interrupted run left", paths=[os.fspath(p) for p in removed])
    return removed


def _resolved(root: Root, modules: Path) -> list[Path]:
    """The kernel dirs in `modules`, each resolved inside the root."""
    found = []
    for entry in modules.iterdir():
        try:
            found.append(root.resolve(entry))
        except KmoddError:
            continue
    return found
