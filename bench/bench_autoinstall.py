"""`kmodctl autoinstall` against Debian's `dkms autoinstall`, on the same sources and
kernels, side by side in one run on this machine.

    python bench/bench_autoinstall.py

Both run on temporary trees (`--root` for kmodd; `--sourcetree/--dkmstree/--installtree`
for DKMS) with the real headers of 6.12.111 and 6.12.113 linked in. Two cases:
  build:    a kernel none of the sources was built for: everything is compiled;
  reusable: a second kernel whose kABI keeps every module loadable: DKMS compiles
            everything again, kmodd weak-links.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.fspath(Path(__file__).resolve().parent.parent))

from bench.bench_sources import dkms_env, dkms_trees, make_key, sign_like_dkms
from tests.conftest import K111, K113, install_headers
from tests.debs import unpack_dkms_package
from tests.sources import write_source

BUILD_SOURCES = ("kmt-base", "kmt-pair", "kmt-misc")
REUSABLE_SOURCES = ("kmt-base", "kmt-pair")


def make_tree(base: Path, sources: tuple[str, ...], with_acpi: bool) -> Path:
    root = base / "root"
    (root / "etc").mkdir(parents=True)
    shutil.copy("/etc/os-release", root / "etc/os-release")
    for kver in (K111, K113):
        install_headers(root, kver, full=True)
    for name in sources:
        write_source(root, name)
    if with_acpi:
        unpack_dkms_package("acpi-call-dkms", root)
    return root


def register_with_dkms(root: Path) -> None:
    """`dkms add` every source (untimed: kmodd finds /usr/src by itself)."""
    (root / "var/lib/dkms").mkdir(parents=True)
    for src in sorted((root / "usr/src").glob("*/dkms.conf")):
        name, _, version = src.parent.name.rpartition("-")
        subprocess.run(
            ["dkms", "add", "-m", name, "-v", version, *dkms_trees(root)],
            capture_output=True,
            check=True,
        )


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"  ! {' '.join(argv[:3])}… exited {proc.returncode}: {proc.stderr[-300:]}")
    return took


def kmodd(root: Path, kver: str) -> float:
    return timed(
        [
            sys.executable,
            "-m",
            "kmodd.edges.cli",
            "--root",
            os.fspath(root),
            "autoinstall",
            "-k",
            kver,
            "--no-initrd",
        ]
    )


def dkms(root: Path, kver: str, env: dict[str, str]) -> float:
    """DKMS kept inside its tree: `env` (bench_sources.dkms_env) gives it the signing
    key and a depmod run on the tree, not on this machine's /lib/modules."""
    return timed(["dkms", "autoinstall", "-k", kver, *dkms_trees(root)], env)


def case(name: str, sources: tuple[str, ...], with_acpi: bool) -> None:
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        k_root, d_root = (
            make_tree(Path(a), sources, with_acpi),
            make_tree(Path(b), sources, with_acpi),
        )
        register_with_dkms(d_root)
        key, cert = make_key(Path(a))
        sign_like_dkms(k_root, key, cert)
        env = dkms_env(d_root, key, cert)
        listed = ", ".join(sources + (("acpi-call",) if with_acpi else ()))
        print(f"{name}: sources {listed}")
        if name == "build":
            k, d = kmodd(k_root, K111), dkms(d_root, K111, env)
        else:
            kmodd(k_root, K111)
            dkms(d_root, K111, env)
            k, d = kmodd(k_root, K113), dkms(d_root, K113, env)
        built = sorted(p.name for p in (d_root / "lib/modules").rglob("*.ko*"))
        print(
            f"  kmodctl autoinstall {k:6.2f} s   dkms autoinstall {d:6.2f} s   ratio {k / d:.2f}"
            f"   (dkms installed {len(built)} files)"
        )


def main() -> None:
    print(f"machine: {os.cpu_count()} CPUs; kernels {K111} then {K113}; both sign modules")
    case("build", BUILD_SOURCES, with_acpi=True)
    case("reusable", REUSABLE_SOURCES, with_acpi=False)


if __name__ == "__main__":
    main()
