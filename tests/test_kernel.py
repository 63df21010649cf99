from __future__ import annotations

import gzip
import lzma
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from kmodd.base.errors import NotFoundError
from kmodd.base.paths import Root
from kmodd.world import kernel
from kmodd.world.compression import Compression
from tests.conftest import K47, K56, K111, K113, host_headers, require, require_tool


def test_facts_of_real_debian_kernels(make_root: Callable[..., Path]) -> None:
    path = make_root(K113, K56)
    root = Root.at(path)
    k = kernel.find(root, K113)
    assert k.build_dir == path / f"usr/src/linux-headers-{K113}"
    assert k.exports_path == k.build_dir / "Module.symvers"
    assert k.arch == "x86_64"
    assert k.compression is Compression.XZ
    assert k.has_modversions
    assert kernel.find(root, K56).compression is Compression.NONE


@pytest.mark.parametrize("kver", [K111, K113, K47, K56])
def test_vermagic_equals_what_kbuild_writes(
    make_root: Callable[..., Path], built: Callable[[str], dict[str, Path]], kver: str
) -> None:
    modinfo = require_tool("modinfo")
    ko = built(kver)["kmt_simple"]
    real = subprocess.run(
        [modinfo, "-F", "vermagic", ko], check=True, capture_output=True, text=True
    ).stdout.rstrip("\n")
    k = kernel.find(Root.at(make_root(kver)), kver)
    assert k.vermagic == real
    assert real.startswith(kver + " ")


def test_vermagic_without_config_comes_from_an_installed_module(tmp_path: Path) -> None:
    """No headers, no /boot/config: the kernel's own modules still tell its vermagic."""
    shipped = sorted(Path(f"/lib/modules/{K113}/kernel/fs").rglob("*.ko.xz"))[:1]
    require(
        f"a .ko.xz under /lib/modules/{K113}/kernel/fs (package linux-image-{K113})", bool(shipped)
    )
    dst = tmp_path / "lib/modules" / K113 / "kernel/fs" / shipped[0].name
    dst.parent.mkdir(parents=True)
    shutil.copy(shipped[0], dst)
    k = kernel.find(Root.at(tmp_path), K113)
    assert k.build_dir is None and k.config == {}
    assert k.vermagic == f"{K113} SMP preempt mod_unload modversions "
    assert k.arch == "x86_64" and k.compression is Compression.XZ


def test_exports_fall_back_to_modules_dir_then_boot(tmp_path: Path) -> None:
    root = Root.at(tmp_path)
    symvers = (host_headers(K113) / "Module.symvers").read_bytes()
    moddir = tmp_path / "lib/modules" / K113
    moddir.mkdir(parents=True)
    (tmp_path / "boot").mkdir()
    rhel = tmp_path / f"boot/symvers-{K113}.xz"
    rhel.write_bytes(lzma.compress(symvers))
    assert kernel.find(root, K113).exports_path == rhel
    (moddir / "symvers.gz").write_bytes(gzip.compress(symvers))
    k = kernel.find(root, K113)
    assert k.exports_path == moddir / "symvers.gz"
    assert k.exports().crcs["module_layout"] == 0x7FE2A4C3


def test_missing_exports_and_missing_kernel_are_named(tmp_path: Path) -> None:
    root = Root.at(tmp_path)
    (tmp_path / "lib/modules" / K113).mkdir(parents=True)
    (tmp_path / "lib/modules" / K113 / "build").symlink_to("/usr/src/nowhere")
    k = kernel.find(root, K113)
    assert k.build_dir is None
    with pytest.raises(NotFoundError) as err:
        k.exports()
    assert f"kernel {K113} has no exports file" in str(err.value)
    assert f"/boot/symvers-{K113}.xz" in str(err.value)
    with pytest.raises(NotFoundError, match=r"kernel 9\.9 is not installed"):
        kernel.find(root, "9.9")
    with pytest.raises(NotFoundError, match="is not a kernel release"):
        kernel.find(root, "../etc")


def test_installed_releases_in_both_module_dirs(tmp_path: Path) -> None:
    for base, kver in (("lib", "6.1.0-9-amd64"), ("usr/lib", "6.12.1-1-amd64"), ("lib", "6.10.0")):
        (tmp_path / base / "modules" / kver).mkdir(parents=True)
    (tmp_path / "usr/lib/modules/6.10.0").mkdir()
    assert kernel.installed_releases(Root.at(tmp_path)) == [
        "6.1.0-9-amd64",
        "6.10.0",
        "6.12.1-1-amd64",
    ]
