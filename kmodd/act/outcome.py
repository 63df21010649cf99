"""What a changing command did for each source on one kernel: the one result type of
autoinstall, install, uninstall and remove-kernel, in-process and (as JSON) on the bus,
and the line an admin reads for it in the package manager's output."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmodd.decide.plan import Action
from kmodd.state.states import State


@dataclass(frozen=True)
class Outcome:
    """What one run did for one source on one kernel: the same object in-process and,
    through `json()`/`from_json()`, over the bus."""

    name: str
    version: str
    kernel: str
    action: Action
    state: State | None
    detail: str
    log: Path | None = None
    weak_from: str | None = None

    @property
    def failed(self) -> bool:
        return self.state is State.FAILED

    def text(self) -> str:
        """The line an admin reads in the package manager's output:
        `kmodd: NAME/VERSION for KVER: weak-linked from KVER0 | built | failed (...)`,
        with ` (up-to-date)` when this run found it already so."""
        fate = self._fate()
        if self.action is Action.UP_TO_DATE and self.state is not None:
            fate += " (up-to-date)"
        return f"kmodd: {self.name}/{self.version} for {self.kernel}: {fate}"

    def _fate(self) -> str:
        if self.state is State.INSTALLED_WEAK:
            return f"weak-linked from {self.weak_from}"
        if self.state is State.INSTALLED:
            return f"pulled ({self.detail})" if self.detail.startswith("from cache ") else "built"
        if self.state is State.BUILT:
            return "built (not installed)"
        if self.state is State.FAILED:
            where = f"; log: {self.log}" if self.log else ""
            return f"failed ({self.detail}{where})"
        if self.state is State.ADDED:
            return f"removed ({self.detail})" if self.detail else "removed"
        if self.state is None:
            return f"{self.action.value} ({self.detail})"
        return f"{self.state.value} ({self.detail})"

    def json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "kernel": self.kernel,
            "action": self.action.value,
            "state": None if self.state is None else self.state.value,
            "detail": self.detail,
            "log": None if self.log is None else os.fspath(self.log),
            "weak_from": self.weak_from,
            "failed": self.failed,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Outcome:
        state = doc.get("state")
        return cls(
            doc["name"],
            doc["version"],
            doc["kernel"],
            Action(doc["action"]),
            None if state is None else State(state),
            doc.get("detail") or "",
            Path(doc["log"]) if doc.get("log") else None,
            doc.get("weak_from") or None,
        )
