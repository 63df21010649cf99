"""`kmodctl check`: verdicts for module files against installed kernels."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmodd.base.paths import Root
from kmodd.decide import verdict
from kmodd.state import known
from kmodd.world import kernel, modfile

# Where out-of-tree modules live inside a kernel's modules dir (weak-updates holds links)
OUT_OF_TREE_DIRS = ("updates", "extra")


@dataclass(frozen=True)
class Report:
    kernel: str
    verdicts: tuple[verdict.Verdict, ...]

    @property
    def reusable(self) -> bool:
        return all(v.reusable for v in self.verdicts)


def target_of(root: Root, k: kernel.Kernel, *, write: bool = False) -> verdict.Target:
    """What `k` offers, its exports from kmodd's index of them when there is one (with
    `write`, made when there is none: the caller holds the writers' lock)."""
    exports = known.exports(root, k, write=write)
    return verdict.Target(k.release, exports, k.vermagic_flags, k.arch)


def check_files(root: Root, release: str, paths: Sequence[Path]) -> Report:
    """Judge `paths`, one package, against kernel `release`."""
    target = target_of(root, kernel.find(root, release))
    package = modfile.read_many(paths)
    return Report(release, tuple(verdict.judge(package, target)))


def installed_out_of_tree(k: kernel.Kernel) -> list[Path]:
    found: list[Path] = []
    for sub in OUT_OF_TREE_DIRS:
        if (k.modules_dir / sub).is_symlink():  # never read where it leads
            continue
        for dirpath, _dirs, files in os.walk(k.modules_dir / sub):
            found.extend(
                Path(dirpath, f) for f in sorted(files) if f.endswith(modfile.MODULE_SUFFIXES)
            )
    return found


def check_installed(root: Root, releases: Sequence[str] | None = None) -> list[Report]:
    """Every kernel in `releases` (default: all) against the out-of-tree modules
    installed for each *other* kernel; the modules of one kernel form one package."""
    all_releases = kernel.installed_releases(root)
    kernels = {r: kernel.find(root, r) for r in all_releases}
    packages = {r: installed_out_of_tree(k) for r, k in kernels.items()}
    reports = []
    for release in releases or all_releases:
        target = target_of(root, kernels.get(release) or kernel.find(root, release))
        verdicts: list[verdict.Verdict] = []
        for source, paths in packages.items():
            if source != release and paths:
                verdicts.extend(verdict.judge(modfile.read_many(paths), target))
        reports.append(Report(release, tuple(verdicts)))
    return reports


def to_json(report: Report) -> dict[str, Any]:
    return {
        "kernel": report.kernel,
        "modules": [
            {
                "path": os.fspath(v.module.path),
                "name": v.module.name,
                "reusable": v.reusable,
                "changed": [
                    {
                        "symbol": c.symbol,
                        "module_crc": verdict.crc_hex(c.module_crc),
                        "kernel_crc": verdict.crc_hex(c.kernel_crc),
                    }
                    for c in v.changed
                ],
                "missing": list(v.missing),
                "reasons": list(v.reasons),
            }
            for v in report.verdicts
        ],
    }


def to_text(report: Report, *, most: int = 5) -> list[str]:
    """One line per module: `KVER: NAME (PATH): reusable` or why it needs a rebuild."""
    lines = []
    for v in report.verdicts:
        head = f"{report.kernel}: {v.module.name} ({os.fspath(v.module.path)})"
        if v.reusable:
            lines.append(f"{head}: reusable")
            continue
        parts = list(v.problems)
        if v.changed:
            parts.append("changed " + _names([c.symbol for c in v.changed], most))
        if v.missing:
            parts.append("not exported " + _names(list(v.missing), most))
        if v.blocked_by:
            parts.append("needs sibling " + _names(list(v.blocked_by), most) + " (not reusable)")
        lines.append(f"{head}: rebuild: " + "; ".join(parts))
    return lines


def _names(names: list[str], most: int) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")
