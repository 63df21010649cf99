"""Test oracles: build real kernel modules and load them into real kernels under QEMU.

These are the ground truth the test suite uses to prove kmodd's reuse decisions.
"""

from .kbuild import KbuildError, build_modules
from .qemu import LoadResult, QemuOracleError, boot_and_insmod

__all__ = [
    "KbuildError",
    "LoadResult",
    "QemuOracleError",
    "boot_and_insmod",
    "build_modules",
]
