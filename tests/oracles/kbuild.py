"""Build the test modules in tests/modsrc with a real Kbuild tree (``make M=...``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

_TAIL_LINES = 40
_BUILD_ARTEFACTS = (
    "*.o",
    "*.ko",
    "*.mod",
    "*.mod.c",
    ".*.cmd",
    "Module.symvers",
    "modules.order",
)


class KbuildError(RuntimeError):
    """``make modules`` failed; the message carries the tail of its output."""


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _private_copy(src: Path, out: Path, kver: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    parent = Path(tempfile.mkdtemp(prefix=f"kbuild-{kver}-", dir=out))
    dest = parent / "src"
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(*_BUILD_ARTEFACTS))
    return dest


def _run_make(build_dir: Path, mdir: Path, kver: str) -> None:
    cmd = [
        "make",
        "-C",
        os.fspath(build_dir),
        f"M={os.fspath(mdir)}",
        f"KERNELRELEASE={kver}",
        "modules",
        "-j2",
    ]
    env = {**os.environ, "LC_ALL": "C"}
    try:
        subprocess.run(
            cmd, check=True, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env
        )
    except subprocess.CalledProcessError as exc:
        raise KbuildError(
            f"{' '.join(cmd)} failed with exit status {exc.returncode}\n"
            f"--- stdout tail ---\n{_tail(exc.stdout or '')}\n"
            f"--- stderr tail ---\n{_tail(exc.stderr or '')}"
        ) from exc


def build_modules(src: Path, build_dir: Path, out: Path, kver: str) -> dict[str, Path]:
    """Build every module of ``src`` against ``build_dir`` (e.g. /lib/modules/KVER/build).

    ``src`` is copied to a fresh private directory under ``out`` first, so parallel or
    repeated builds never share object files. Returns module name -> built ``.ko``.
    """
    mdir = _private_copy(src, out, kver)
    _run_make(build_dir, mdir, kver)
    built = {ko.stem: ko for ko in sorted(mdir.glob("*.ko"))}
    if not built:
        raise KbuildError(f"make succeeded but produced no .ko in {os.fspath(mdir)}")
    return built
