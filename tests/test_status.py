"""`kmodctl status` with the service down: it only reads, for root and for any user,
and tells sources without kernels from no sources."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli import kmodctl
from tests.conftest import K113, require_tool
from tests.dbus_harness import as_other_user
from tests.sources import write_source
from tests.test_autoinstall import make_system


def listing(directory: Path) -> dict[str, bytes | None]:
    """Every file's content under `directory`, but SQLite's own -wal/-shm sidecars, which
    a reader of a WAL database may create (empty of any change)."""
    return {
        os.fspath(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
        for p in sorted(directory.rglob("*"))
        if not p.name.endswith(("-wal", "-shm"))
    }


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user may enter (pytest's own are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="kmodd-status-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_a_user_reads_status_with_the_service_down_and_nothing_is_written(
    open_dir: Path,
) -> None:
    require_tool("make")
    root = make_system(open_dir / "root", (K113,))
    write_source(root, "kmt-base")
    done = kmodctl(root, "autoinstall", "-k", K113)
    assert done.returncode == 0, done.stdout + done.stderr
    state = root / "var/lib/kmodd"
    before = listing(state)
    expected = f"kmt-base/1.0, {K113}, x86_64: installed"

    # first a user, meeting the state as the last writer left it (SQLite removed the
    # WAL's -shm file, which the user may not create), then root
    assert not (state / "state.db-shm").exists()
    with as_other_user() as user:
        env = {**user.env, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={open_dir}/no-bus"}
        argv = [*user.argv, "-m", "kmodd.edges.cli", "--root", os.fspath(root), "status"]
        proc = subprocess.run(argv, env=env, cwd="/", capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr  # once: "attempt to write a readonly database"
    assert expected in proc.stdout.splitlines()
    assert "reading its state directly" in proc.stderr
    as_root = kmodctl(root, "status")
    assert as_root.returncode == 0, as_root.stderr
    assert as_root.stdout == proc.stdout
    assert listing(state) == before, "status wrote to kmodd's state"
    wal = state / "state.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0, "status wrote to the WAL"


def test_status_on_a_mistyped_root_creates_nothing(tmp_path: Path) -> None:
    typo = tmp_path / "srv/imgae"
    typo.mkdir(parents=True)
    proc = kmodctl(typo, "status")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.endswith("kmodctl: no module sources in /usr/src\n"), proc.stderr
    assert list(typo.iterdir()) == [], "a read created files"


def test_sources_without_kernels_are_not_no_sources(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for name in ("kmt-base", "kmt-misc"):
        write_source(root, name)
    proc = kmodctl(root, "status")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "kmt-base/1.0: added (no kernel installed)",
        "kmt-misc/1.0: added (no kernel installed)",
    ]
    assert "no module sources" not in proc.stderr
