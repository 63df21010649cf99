"""Regenerating a kernel's initrd with the generator the system uses."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from kmodd.paths import Root
from kmodd.run import run

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Generator:
    name: str
    tool: str
    """Path of the tool inside the root."""

    def initrd(self, root: Root, kernel: str) -> Path:
        if self.name == "update-initramfs":
            return root.path(f"/boot/initrd.img-{kernel}")
        if self.name == "dracut":
            return root.path(f"/boot/initramfs-{kernel}.img")
        return root.path("/boot/initramfs-linux.img")

    def argv(self, kernel: str) -> list[str]:
        if self.name == "update-initramfs":
            return [self.tool, "-u", "-k", kernel]
        if self.name == "dracut":
            return [self.tool, "--force", "--kver", kernel]
        return [self.tool, "-P"]


_GENERATORS = (
    ("update-initramfs", ("/usr/sbin/update-initramfs", "/sbin/update-initramfs")),
    ("dracut", ("/usr/bin/dracut", "/usr/sbin/dracut", "/sbin/dracut")),
    ("mkinitcpio", ("/usr/bin/mkinitcpio",)),
)


def detect(root: Root) -> Generator | None:
    for name, tools in _GENERATORS:
        for tool in tools:
            if root.path(tool).exists():
                return Generator(name, tool)
    return None


def regenerate(root: Root, kernel: str) -> Path | None:
    """Remake `kernel`'s initrd if it has one; returns it, or None when there is none
    (the kernel's own hooks make it later) or no generator is installed."""
    gen = detect(root)
    if gen is None:
        log.warning("no initrd generator found", kver=kernel)
        return None
    image = gen.initrd(root, kernel)
    if not image.exists():
        log.info("no initrd to regenerate yet", kver=kernel, initrd=os.fspath(image))
        return None
    argv = gen.argv(kernel)
    if root.prefix != Path("/"):
        argv = ["chroot", os.fspath(root.prefix), *argv]
    log.info("regenerating initrd", kver=kernel, generator=gen.name)
    run(argv, timeout=900)
    return image
