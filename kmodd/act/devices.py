"""After a driver is installed for the running kernel, devices that are already present
and that it drives get it loaded (udev only asks for drivers when a device appears)."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from pathlib import Path

import pyudev

from kmodd.base.errors import CommandError
from kmodd.base.log import get_logger
from kmodd.base.paths import Root
from kmodd.base.run import run
from kmodd.world import modfile

log = get_logger(__name__)


def present_modaliases() -> list[str]:
    """The MODALIAS of every device udev knows now."""
    context = pyudev.Context()
    return [d.properties["MODALIAS"] for d in context.list_devices() if "MODALIAS" in d.properties]


def wanted_aliases(modules: Iterable[modfile.ModuleInfo], modaliases: Iterable[str]) -> list[str]:
    """The present devices' modaliases that one of `modules` claims (`alias=`)."""
    patterns = [pattern for m in modules for pattern in m.aliases]
    return sorted({a for a in modaliases if any(fnmatch.fnmatchcase(a, p) for p in patterns)})


def _probe(root: Root, release: str, alias: str, *, dry_run: bool) -> list[str]:
    """`modprobe -b MODALIAS` for `release`: by modalias, as udev loads drivers, so
    the blacklists apply (by name they would not). In a root other than `/`, its own
    modules and configuration; `dry_run` prints the insmods instead."""
    argv = ["modprobe", "-b", "-S", release]
    if root.prefix != Path("/"):
        argv += ["-d", os.fspath(root.prefix), "-C", os.fspath(root.path("/etc/modprobe.d"))]
    return [*argv, *(["-n", "-v"] if dry_run else ["-q"]), "--", alias]


def drivers_for_present_devices(
    root: Root, release: str, files: Iterable[Path]
) -> dict[str, list[str]]:
    """For each present device that one of `files` claims: the modules modprobe would
    load for its modalias (`-b`: blacklists honoured, so a blacklisted driver is not
    among them), by modprobe's own resolution of `release`'s modules.alias."""
    infos = [modfile.read(f) for f in files if modfile.is_module_file(f)]
    answer: dict[str, list[str]] = {}
    for alias in wanted_aliases(infos, present_modaliases()):
        try:
            done = run(_probe(root, release, alias, dry_run=True), timeout=60)
        except CommandError as err:
            log.warning("modprobe cannot resolve a device's alias", alias=alias, error=str(err))
            continue
        answer[alias] = [
            modfile.module_name(Path(line.split(maxsplit=1)[1].strip()))
            for line in done.stdout.decode(errors="replace").splitlines()
            if line.startswith("insmod ")
        ]
    return answer


def load_for_present_devices(root: Root, files: Iterable[Path]) -> list[str]:
    """Load the drivers present devices want among the modules just installed for the
    running kernel: `modprobe -b MODALIAS` per device, as udev would have had the
    module been there when the device appeared (blacklists honoured). Only on the
    running system (root `/`); a failure is logged, never raised. The modaliases."""
    if root.prefix != Path("/"):
        return []
    infos = [modfile.read(f) for f in files if modfile.is_module_file(f)]
    loaded = []
    for alias in wanted_aliases(infos, present_modaliases()):
        try:
            run(_probe(root, os.uname().release, alias, dry_run=False), timeout=60)
        except CommandError as err:
            log.warning("could not load a driver for a present device", alias=alias,
                        error=str(err))  # fmt: skip
            continue
        loaded.append(alias)
    return loaded
