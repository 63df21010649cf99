"""Living beside DKMS: what DKMS installed is reported, never overwritten silently.

DKMS 3 keeps its tree in `/var/lib/dkms/NAME/VERSION/KVER/ARCH/` and marks an install
for a kernel with the link `/var/lib/dkms/NAME/kernel-KVER-ARCH`.
"""

from __future__ import annotations

from kmodd.paths import Root


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
