"""After a driver is installed for the running kernel, devices that are already present
and that it drives get it loaded (udev only asks for drivers when a device appears)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from pathlib import Path

import pyudev
import structlog

from kmodd import modfile
from kmodd.errors import CommandError
from kmodd.paths import Root
from kmodd.run import run

log = structlog.get_logger(__name__)


def present_modaliases() -> list[str]:
    """The MODALIAS of every device udev knows now."""
    context = pyudev.Context()
    return [d.properties["MODALIAS"] for d in context.list_devices() if "MODALIAS" in d.properties]


def wanted(modules: Iterable[modfile.ModuleInfo], modaliases: Iterable[str]) -> list[str]:
    """Names of the modules one of whose `alias=` patterns matches a present device."""
    present = list(modaliases)
    return sorted(
        {
            m.name
            for m in modules
            if any(
                fnmatch.fnmatchcase(alias, pattern) for pattern in m.aliases for alias in present
            )
        }
    )


def is_loaded(root: Root, name: str) -> bool:
    return root.path(f"/sys/module/{name.replace('-', '_')}").is_dir()


def load_for_present_devices(root: Root, files: Iterable[Path]) -> list[str]:
    """modprobe each installed module that a present device wants; the names loaded.
    Only on the running system (root `/`); a failure is logged, never raised."""
    if root.prefix != Path("/"):
        return []
    infos = [modfile.read(f) for f in files if modfile.is_module_file(f)]
    loaded = []
    for name in wanted(infos, present_modaliases()):
        if is_loaded(root, name):
            continue
        try:
            run(["modprobe", name], timeout=60)
        except CommandError as err:
            log.warning("could not load a module for a present device", module=name, error=str(err))
            continue
        loaded.append(name)
    return loaded
