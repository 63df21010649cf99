"""Real Debian *-dkms packages, downloaded by .ci/fetch-debs into .cache/debs."""

from __future__ import annotations

import subprocess
from pathlib import Path, PurePosixPath

from tests.conftest import require, require_tool

DEBS = Path(__file__).resolve().parent.parent / ".cache" / "debs"


def unpack_dkms_package(package: str, dest_root: Path) -> Path:
    """Unpack `package`'s .deb into `dest_root`; return its `usr/src/<name>-<version>` dir.

    Fails under CI=true, skips elsewhere, when .ci/fetch-debs has not downloaded it."""
    debs = sorted(DEBS.glob(f"{package}_*.deb"))
    require(f"{DEBS}/{package}_*.deb (run .ci/fetch-debs)", bool(debs))
    dpkg_deb = require_tool("dpkg-deb")
    listing = subprocess.run(
        [dpkg_deb, "--contents", debs[-1]], check=True, capture_output=True, text=True
    ).stdout
    confs = [
        PurePosixPath(line.split()[-1])
        for line in listing.splitlines()
        if line.split()[-1].startswith("./usr/src/") and line.endswith("/dkms.conf")
    ]
    assert len(confs) == 1, f"{debs[-1].name} holds {len(confs)} dkms.conf files"
    subprocess.run([dpkg_deb, "--extract", debs[-1], dest_root], check=True)
    return dest_root / confs[0].parent
