"""What is where: every module source against every installed kernel, from the disk.

The store remembers how things got there; the disk is the truth. A record claiming
files that are gone is shown as `added`, saying so in `detail`. Status only reads: it
opens the store read-only, and the next autoinstall, under the writers' lock, mends it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmodd.base.paths import Root
from kmodd.state.states import State
from kmodd.state.store import Record, Store, current_check, files_present
from kmodd.world import config, dkms_tree, dkmsconf, kernel, modfile


@dataclass(frozen=True)
class Line:
    module: str
    version: str
    kernel: str
    arch: str
    state: State
    weak_from: str | None = None
    log: str | None = None
    detail: str | None = None
    loaded: bool | None = None
    """For the running kernel: whether its modules are loaded now."""
    in_initrd: bool | None = None
    """For a REMAKE_INITRD source: whether the kernel's initrd, as last listed, holds
    its modules (None: not listed since the image last changed, or not applicable)."""
    initrd: str | None = None
    """The image that `in_initrd` speaks of."""
    sandbox: str | None = None
    """What kmodd.conf allows the source's package code beyond the sandbox (`network`,
    `off`); None: nothing, it builds in the sandbox."""

    def text(self) -> str:
        """DKMS's shape: `acpi-call/1.2.2, 6.12.113+deb12-amd64, x86_64: installed`."""
        state: str = self.state.value
        if self.state is State.INSTALLED_WEAK:
            state = f"installed-weak (from {self.weak_from})"
        elif self.state is State.INSTALLED and (self.detail or "").startswith("from cache "):
            state = f"installed ({self.detail})"
        elif self.state is State.FAILED:
            why = "; ".join(x for x in (self.detail, self.log and f"log: {self.log}") if x)
            state = f"failed ({why})"
        elif self.state in (State.EXCLUDED, State.DKMS) and self.detail:
            state = f"{state} ({self.detail})"
        if self.loaded:
            state += ", loaded"
        if self.in_initrd is not None:
            state += ", in initrd" if self.in_initrd else f", NOT in its initrd {self.initrd}"
        if self.sandbox == "network":
            state += ", builds with network access (kmodd.conf)"
        elif self.sandbox == "off":
            state += ", builds as root without a sandbox (kmodd.conf)"
        if not self.kernel:
            return f"{self.module}/{self.version}: {state} ({self.detail})"
        return f"{self.module}/{self.version}, {self.kernel}, {self.arch}: {state}"

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Line:
        return cls(
            doc["module"],
            doc["version"],
            doc["kernel"],
            doc["arch"],
            State(doc["state"]),
            doc.get("weak_from") or None,
            doc.get("log") or None,
            doc.get("detail") or None,
            in_initrd=_tristate(doc.get("in_initrd")),
            initrd=doc.get("initrd") or None,
            sandbox=doc.get("sandbox") or None,
        )

    def json(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "version": self.version,
            "kernel": self.kernel,
            "arch": self.arch,
            "state": self.state.value,
            "weak_from": self.weak_from,
            "log": self.log,
            "detail": self.detail,
            "in_initrd": self.in_initrd,
            "initrd": self.initrd,
            "sandbox": self.sandbox,
        }


def _tristate(value: object) -> bool | None:
    """True, False or None, also from the bus's strings ("true", "false", "")."""
    if isinstance(value, bool) or value is None:
        return value
    return {"true": True, "false": False}.get(str(value).lower())


def status(
    root: Root, db: Store, *, name: str | None = None, release: str | None = None
) -> list[Line]:
    kernels = [release] if release else kernel.installed_releases(root)
    arches = {r: kernel.find(root, r).arch or os.uname().machine for r in kernels}
    sources = {(s.name, s.version) for s in dkmsconf.find_sources(root)}
    if not kernels and not release:
        # sources, but no kernel yet (a fresh image, a container): say so per source
        return [
            Line(n, v, "", "", State.ADDED, detail="no kernel installed")
            for n, v in sorted(sources)
            if not name or n == name
        ]
    records = {(r.name, r.version, r.kernel): r for r in db.records(name=name, kernel=release)}
    allowed = config.load(root)
    lines = []
    for record in records.values():
        if record.kernel in arches:
            lines.append(_line(root, db, record))
    # every source in /usr/src against every kernel; a version known only from records
    # (its dir is gone) shows just those
    for src_name, version in sorted(sources):
        if name and src_name != name:
            continue
        for kver in kernels:
            if (src_name, version, kver) in records:
                continue
            arch = arches[kver]
            dkms = dkms_tree.installed_by_dkms(root, src_name, kver, arch)
            state = State.DKMS if dkms == version else State.ADDED
            lines.append(Line(src_name, version, kver, arch, state))
    lines = [_allowance(line, allowed.allowance(line.module)) for line in lines]
    return sorted(lines, key=lambda ln: (ln.module, ln.version, kernel.version_key(ln.kernel)))


def _allowance(line: Line, allowed: config.Allowance) -> Line:
    """`line`, saying what kmodd.conf lets its source's build do beyond the sandbox."""
    if allowed is config.Allowance.NONE:
        return line
    return dataclasses.replace(line, sandbox=allowed.value)


def _line(root: Root, db: Store, record: Record) -> Line:
    state, detail = record.state, record.detail
    installed = state in (State.INSTALLED, State.INSTALLED_WEAK)
    if installed and not files_present(root, record):
        # the disk is the truth; the record is mended by the next autoinstall, under the
        # writers' lock (status only reads)
        state, detail = State.ADDED, "installed files are missing; autoinstall puts them back"
        record = Record(record.name, record.version, record.kernel, record.arch, state)
    loaded = None
    if state in (State.INSTALLED, State.INSTALLED_WEAK) and record.kernel == os.uname().release:
        loaded = all(modfile.is_loaded(root, modfile.module_name(Path(f))) for f in record.files)
    weak_from = record.weak_from if state is State.INSTALLED_WEAK else None
    in_initrd, image = None, None
    if state in (State.INSTALLED, State.INSTALLED_WEAK) and record.remake_initrd:
        check = current_check(root, db.initrd(record.kernel))
        mine = {modfile.module_name(Path(f)) for f in record.files}
        if check is not None and mine <= set(check.expected):  # else: not listed for these
            in_initrd, image = not mine & set(check.missing), check.image
    return Line(
        record.name,
        record.version,
        record.kernel,
        record.arch,
        state,
        weak_from,
        record.log,
        detail,
        loaded,
        in_initrd,
        image,
    )
