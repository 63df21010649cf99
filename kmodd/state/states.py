"""The states a module source can be in for one kernel, as `kmodctl status` shows them."""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    ADDED = "added"
    QUEUED = "queued"
    BUILDING = "building"
    BUILT = "built"
    INSTALLED = "installed"
    INSTALLED_WEAK = "installed-weak"
    FAILED = "failed"
    EXCLUDED = "excluded"
    WAITING = "waiting-for-headers"
    DKMS = "managed-by-dkms"
