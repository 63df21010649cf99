"""Changes on disk that can't be half-done: temp file in the same directory, fsync, rename.

Every path written is inside a root and its directories are resolved inside it first
(`Root.entry`): a directory linked to a host dir is followed as a chroot would follow
it, never on this machine.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kmodd.base.paths import Root


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(root: Root, path: Path, data: bytes, mode: int = 0o644) -> Path:
    """Replace `path` (inside `root`) with `data`: a reader (or a crash) sees the old or
    the new file. Returns where it was written."""
    path = root.entry(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_symlink(root: Root, target: str, link: Path) -> Path:
    """Point `link` (inside `root`) at `target` (relative or absolute), replacing whatever
    was there. Returns where the link was made."""
    link = root.entry(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)
    _fsync_dir(link.parent)
    return link


def remove(root: Root, path: Path) -> bool:
    """Remove a file or link if it is there; prune the directories it leaves empty up to
    (not including) the kernel's own dir, `…/modules/KVER` (never into `kernel/`): a
    kernel package's removal then leaves no `updates/` behind that would keep the kernel
    looking installed. True when something was removed."""
    path = root.entry(path)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    parent = path.parent
    while (
        parent.parent.name != "modules"
        and parent.name != "kernel"
        and parent != parent.parent
        and _rmdir(parent)
    ):
        parent = parent.parent
    return True


def _rmdir(directory: Path) -> bool:
    try:
        directory.rmdir()
    except OSError:
        return False
    return True
