"""Living beside DKMS: what DKMS installed is reported, never overwritten silently.

DKMS 3 keeps its tree in `/var/lib/dkms/NAME/VERSION/KVER/ARCH/` and marks an install
for a kernel with the link `/var/lib/dkms/NAME/kernel-KVER-ARCH`.
"""

from __future__ import annotations

from kmodd.base.paths import Root


def installed_by_dkms(root: Root, name: str, kernel: str, arch: str) -> str | None:
    """The version DKMS installed of `name` for `kernel`, if it did."""
    marker = root.dkms_tree / name / f"kernel-{kernel}-{arch}"
    if not marker.is_symlink() and not marker.exists():
        return None
    try:
        # kernel-KVER-ARCH -> VERSION/KVER/ARCH
        return marker.readlink().parts[0]
    except (OSError, IndexError):
        return "unknown"


def dkms_modules(root: Root, name: str) -> list[str]:
    """Kernels for which DKMS has `name` installed (any arch)."""
    base = root.dkms_tree / name
    if not base.is_dir():
        return []
    return sorted(p.name[len("kernel-") :].rsplit("-", 1)[0] for p in base.glob("kernel-*"))


def drop_claim(root: Root, name: str, kernel: str, arch: str) -> bool:
    """After kmodd took a module over: remove DKMS's install marker for that kernel, so
    `dkms uninstall`/`remove` no longer deletes what kmodd installed there (DKMS then
    shows the module as built, not installed). DKMS's tree is otherwise left alone."""
    marker = root.entry(root.dkms_tree / name / f"kernel-{kernel}-{arch}")
    if not marker.is_symlink():
        return False
    marker.unlink()
    return True
