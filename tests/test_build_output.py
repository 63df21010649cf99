"""What a build leaves is checked before anything touches it: a regular file inside
the build dir, an ELF kernel module for the kernel's architecture. Anything else fails
that source, named, and nothing outside the build dir is read or rewritten."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import K113, require_tool
from tests.sources import write_source
from tests.test_autoinstall import kmodctl, make_system

# name → (the MAKE command, the problem said)
BAD_OUTPUTS = {
    "link-out": ("ln -s {canary} kmt_simple.ko", "kmt_simple.ko is not a regular file"),
    "empty": ("touch kmt_simple.ko", "kmt_simple.ko is not a kernel module"),
    "text": ("echo not an ELF > kmt_simple.ko", "kmt_simple.ko is not a kernel module"),
    "fifo": ("mkfifo kmt_simple.ko", "kmt_simple.ko is not a regular file"),
    "object": (
        "cp {obj} kmt_simple.ko",
        "kmt_simple.ko is not a kernel module",
    ),
    "dir-out": (
        "mkdir -p {outside} && cp {good} {outside}/kmt_simple.ko && ln -s {outside} out",
        "out/kmt_simple.ko lies outside the build dir",
    ),
}


@pytest.fixture
def world(tmp_path: Path, built: object) -> tuple[Path, Path, dict[str, Path]]:
    require_tool("make")
    root = make_system(tmp_path / "root", (K113,))
    canary = tmp_path / "host-file.ko"
    canary.write_bytes(b"a host file kmodd must neither strip nor install\n")
    assert callable(built)
    return root, canary, built(K113)


@pytest.mark.parametrize("case", sorted(BAD_OUTPUTS))
def test_a_build_output_that_is_not_a_module_of_its_own_fails_named(
    world: tuple[Path, Path, dict[str, Path]], tmp_path: Path, case: str
) -> None:
    root, canary, modules = world
    before = hashlib.sha256(canary.read_bytes()).hexdigest()
    make, says = BAD_OUTPUTS[case]
    obj = next(modules["kmt_simple"].parent.rglob("kmt_simple.o"), canary)
    make = make.format(
        canary=canary, obj=obj, good=modules["kmt_simple"], outside=tmp_path / "outside"
    )
    location = 'BUILT_MODULE_LOCATION[0]="out"\n' if case == "dir-out" else ""
    write_source(root, f"kmt-{case}", modules=("kmt_simple",),
                 extra=f'AUTOINSTALL="yes"\nMAKE[0]="{make}"\n{location}')  # fmt: skip
    done = kmodctl(root, "autoinstall", "-k", K113, "--no-initrd")
    assert done.returncode == 7, done.stdout + done.stderr
    assert says in done.stdout, done.stdout
    assert "refused" in done.stdout or "not a kernel module" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert hashlib.sha256(canary.read_bytes()).hexdigest() == before
    assert not list((root / "lib/modules" / K113).rglob("kmt_simple*")), "nothing installed"
    (line,) = json.loads(kmodctl(root, "status", "--json").stdout)
    assert line["state"] == "failed"
    check = kmodctl(root, "check", "-k", K113)
    assert check.returncode in (0, 1), check.stdout + check.stderr  # no broken file to trip on
