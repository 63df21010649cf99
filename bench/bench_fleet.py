"""The module cache for a fleet: a new kernel on a second machine, from the registry,
against building it on the first, for the real Debian `*-dkms` sources that
bench/bench_sources.py measures.

    python bench/bench_fleet.py

Two trees stand for two machines with 6.1.0-56-amd64 and the same sources and signing
key, with Debian's docker-registry on 127.0.0.1 as their module cache (started as the
tests start it). The first runs `kmodctl autoinstall` (it builds, and pushes); then the
second (it pulls, and checks what it pulls). For each: the wall time, and how many
times a compiler's make ran (each build log says each make it ran).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.fspath(Path(__file__).resolve().parent.parent))

from bench import bench_sources as sources
from tests.test_cache import registry


@dataclass(frozen=True)
class FleetResult:
    build_seconds: float
    pull_seconds: float
    first_makes: int
    second_makes: int
    installed_first: int
    installed_second: int
    pulled: int
    """Sources the second machine installed from the cache."""

    def row(self) -> tuple[str, str, str, str]:
        what = (
            f"a new kernel ({sources.KERNEL}) on a second machine of a fleet, from the module "
            f"cache's registry: {self.installed_second} sources ready, {self.pulled} of them "
            f"pulled, {self.second_makes} compiles (the first machine built {self.installed_first}"
            f" with {self.first_makes} makes, and pushed them)"
        )
        ours = f"{self.pull_seconds:.2f} s"
        theirs = f"building on the first machine {self.build_seconds:.2f} s"
        return what, ours, theirs, f"{self.pull_seconds / self.build_seconds:.2f}"


def makes(root: Path) -> int:
    logs = (root / "var/lib/kmodd/builds").glob(f"*/*/{sources.KERNEL}/*/make.log")
    return sum(log.read_text(errors="replace").count("\n+ bash -c ") for log in logs)


def machine(root: Path, packages: Sequence[str], key: Path, cert: Path, host: str) -> None:
    sources.make_tree(root, packages)
    sources.sign_like_dkms(root, key, cert, f"registry = {host}/fleet\nregistry_insecure = yes\n")
    sources.warm(root)


def measure(packages: Sequence[str] = sources.SOURCES) -> FleetResult:
    sources.fetch_debs(packages)
    sources.become_subreaper()
    with tempfile.TemporaryDirectory(prefix="kmodd-bench-fleet-") as tmp_name:
        tmp = Path(tmp_name)
        key, cert = sources.make_key(tmp)
        with registry(tmp / "registry") as reg:
            first, second = tmp / "first", tmp / "second"
            machine(first, packages, key, cert, reg.host)
            machine(second, packages, key, cert, reg.host)
            argv = ["autoinstall", "-k", sources.KERNEL, "--no-initrd"]
            built = sources.timed("kmodd, first machine", sources.kmodctl(first, *argv))
            pulled = sources.timed("kmodd, second machine", sources.kmodctl(second, *argv))
            said = pulled.output.splitlines()
            return FleetResult(
                built.wall,
                pulled.wall,
                makes(first),
                makes(second),
                sum(": built" in line for line in built.output.splitlines()),
                sum(": built" in line or ": pulled " in line for line in said),
                sum(": pulled (from cache " in line for line in said),
            )


def main() -> None:
    result = measure()
    what, ours, theirs, ratio = result.row()
    print(f"{what}\n  second machine {ours}; {theirs}; ratio {ratio}")


if __name__ == "__main__":
    main()
