"""Shared fixtures: real Debian kernel headers, real test modules, temporary roots.

Under CI=true a missing real component (headers, a tool, a kernel image) fails the
test; elsewhere it skips, naming what is missing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.oracles.kbuild import build_modules

K111 = "6.12.111+deb12-amd64"
K113 = "6.12.113+deb12-amd64"
K47 = "6.1.0-47-amd64"
K56 = "6.1.0-56-amd64"
KERNELS = (K111, K113, K47, K56)
MODSRC = Path(__file__).parent / "modsrc"
HOST_SRC = Path("/usr/src")


def require(what: str, ok: bool) -> None:
    """Fail under CI, skip elsewhere, when a real component is missing."""
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"real component missing: {what}")
    pytest.skip(f"real component missing: {what}")


def require_tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    require(f"the {name} command", path is not None)
    assert path is not None
    return path


def host_headers(kver: str) -> Path:
    path = HOST_SRC / f"linux-headers-{kver}"
    require(f"kernel headers {path} (package linux-headers-{kver})", (path / "Makefile").is_file())
    return path


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link copy of `src` at `dst` (a real copy where links cannot cross devices)."""

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, symlinks=True, copy_function=link, dirs_exist_ok=True)


def install_headers(root: Path, kver: str, *, full: bool = False) -> Path:
    """Put kernel `kver`'s real headers into `root` as Debian lays them out, with the
    absolute `/lib/modules/KVER/build` link Debian ships. `full` links the whole tree
    (needed to build); otherwise only the files kmodd reads (Makefile, .config,
    Module.symvers)."""
    src = host_headers(kver)
    dst = root / "usr/src" / src.name
    dst.mkdir(parents=True, exist_ok=True)
    if full:
        _link_tree(src, dst)
        common = src.resolve() / "Makefile"
        common_dir = Path(common.read_text().split()[-1]).parent
        _link_tree(common_dir, root / common_dir.relative_to("/"))
        kbuild = (src / "scripts").resolve().parent
        _link_tree(kbuild, root / kbuild.relative_to("/"))
    else:
        for name in ("Makefile", ".config", "Module.symvers"):
            os.link(src / name, dst / name)
    moddir = root / "lib/modules" / kver
    moddir.mkdir(parents=True, exist_ok=True)
    (moddir / "build").symlink_to(f"/usr/src/{src.name}")
    return moddir


@pytest.fixture(autouse=True)
def _tmp_path_readable_by_the_build_user(request: pytest.FixtureRequest) -> None:
    """pytest makes each tmp_path 0700; kmodd's sandbox runs package code as the
    unprivileged build user, which must read a root as it reads a real system's
    /usr/src and /lib/modules (0755)."""
    if "tmp_path" in request.fixturenames:
        request.getfixturevalue("tmp_path").chmod(0o755)


@pytest.fixture
def make_root(tmp_path: Path) -> Callable[..., Path]:
    """`make_root(K111, K113, full=False)` → a temporary root with those kernels."""

    def make(*kvers: str, full: bool = False) -> Path:
        root = tmp_path / "root"
        root.mkdir(exist_ok=True)
        for kver in kvers:
            install_headers(root, kver, full=full)
        return root

    return make


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], dict[str, Path]]]:
    """`built(KVER)` → module name → .ko built from tests/modsrc against KVER's real
    headers, once per session per kernel."""
    require_tool("make")
    cache: dict[str, dict[str, Path]] = {}
    base = tmp_path_factory.mktemp("kbuild")

    def get(kver: str) -> dict[str, Path]:
        if kver not in cache:
            cache[kver] = build_modules(MODSRC, host_headers(kver), base / kver, kver)
        return cache[kver]

    yield get
