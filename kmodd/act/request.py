"""A request to change what is installed: one type for every path it can take.

kmodctl builds a Request from its arguments; it is then either sent to the service
(`Submit(a{sv})` on the bus, `to_wire`/`from_wire`), kept in the job queue
(`options_json`/`from_row`), or performed in-process. Whichever way it goes, its options
go with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kmodd.base.errors import UsageError
from kmodd.world.dkmsconf import NAME_RE, VERSION_RE

MAX_RELEASE = 200
"""Longer than any kernel release (`uname -r` is at most 64 bytes)."""
MAX_SOURCE = 300
MAX_AVOID = 64
_RELEASE = re.compile(r"[A-Za-z0-9._+~-]+")
_SOURCE = re.compile(f"{NAME_RE.pattern}(/{VERSION_RE.pattern})?")


class Verb(StrEnum):
    AUTOINSTALL = "kernel"
    """Bring a kernel up to date: every AUTOINSTALL source."""
    INSTALL = "source"
    """Weak-link or build, and install, one source for one kernel."""
    REMOVE_KERNEL = "remove-kernel"
    UNINSTALL = "uninstall"
    """Remove one source from one kernel."""
    FORGET_SOURCE = "remove-source"
    """A source left /usr/src: remove what was installed of it, everywhere."""


ANY_KERNEL = "*"
"""The kernel of a request that concerns every kernel (FORGET_SOURCE)."""


@dataclass(frozen=True)
class Request:
    verb: Verb
    kernel: str
    source: str = ""
    """NAME or NAME/VERSION; "" for the kernel-wide verbs."""
    initrd: bool = True
    """May remake the initrd (the hooks say no: the package manager makes it next)."""
    avoid: frozenset[str] = field(default_factory=frozenset)
    """Kernels whose builds must not be weak-linked (they are about to go)."""

    def __post_init__(self) -> None:
        if self.verb is Verb.FORGET_SOURCE:
            if self.kernel != ANY_KERNEL:
                raise UsageError(f"{self.verb} concerns every kernel, not {self.kernel!r}")
        else:
            check_release(self.kernel)
        needs_source = self.verb in (Verb.INSTALL, Verb.UNINSTALL, Verb.FORGET_SOURCE)
        if needs_source:
            check_source(self.source)
        elif self.source:
            raise UsageError(f"{self.verb} takes no module source (got {self.source[:80]!r})")
        if len(self.avoid) > MAX_AVOID:
            raise UsageError(f"at most {MAX_AVOID} kernels to avoid, not {len(self.avoid)}")
        for release in self.avoid:
            check_release(release)

    def merged(self, other: Request) -> Request:
        """One request doing what both ask (the same verb on the same target): the
        initrd is remade if either may, and neither's avoided kernels are linked."""
        return Request(
            self.verb,
            self.kernel,
            self.source,
            self.initrd or other.initrd,
            self.avoid | other.avoid,
        )

    # the job queue -----------------------------------------------------------------------

    def options_json(self) -> str:
        return json.dumps({"initrd": self.initrd, "avoid": sorted(self.avoid)})

    @classmethod
    def from_row(cls, verb: str, kernel: str, source: str, options: str) -> Request:
        doc = json.loads(options or "{}")
        return cls(
            Verb(verb),
            kernel,
            source,
            bool(doc.get("initrd", True)),
            frozenset(doc.get("avoid", ())),
        )

    # the bus ------------------------------------------------------------------------------

    def to_wire(self) -> dict[str, tuple[str, Any]]:
        """a{sv}: each key with its D-Bus type."""
        return {
            "verb": ("s", self.verb.value),
            "kernel": ("s", self.kernel),
            "source": ("s", self.source),
            "initrd": ("b", self.initrd),
            "avoid": ("as", sorted(self.avoid)),
        }

    @classmethod
    def from_wire(cls, doc: Mapping[str, tuple[str, Any]]) -> Request:
        """From the a{sv} a caller sent ((signature, value) per key): every key known
        and of its type, `verb` and `kernel` given; anything else is a UsageError."""
        types = {"verb": "s", "kernel": "s", "source": "s", "initrd": "b", "avoid": "as"}
        for key, (signature, _) in doc.items():
            if key not in types:
                raise UsageError(f"unknown request option {key[:40]!r}; known: {', '.join(types)}")
            if signature != types[key]:
                raise UsageError(f"request option {key} must be of type {types[key]}")
        for key in ("verb", "kernel"):
            if key not in doc:
                raise UsageError(f"a request needs {key!r}")
        name = doc["verb"][1]
        try:
            verb = Verb(name)
        except ValueError:
            raise UsageError(
                f"unknown verb {name[:40]!r}; known: {', '.join(v.value for v in Verb)}"
            ) from None
        avoid = doc.get("avoid", ("as", []))[1]
        if len(avoid) > MAX_AVOID:
            raise UsageError(f"at most {MAX_AVOID} kernels to avoid, not {len(avoid)}")
        return cls(
            verb,
            doc["kernel"][1],
            doc.get("source", ("s", ""))[1],
            doc.get("initrd", ("b", True))[1],
            frozenset(avoid),
        )

    def describe(self) -> str:
        what = f"{self.verb.value} {self.source}".rstrip()
        return f"{what} for {self.kernel}" if self.kernel != ANY_KERNEL else what


def check_release(release: str) -> str:
    """A kernel release as a name in /lib/modules: bounded, no path, no control bytes."""
    if (
        not release
        or len(release) > MAX_RELEASE
        or release in (".", "..")
        or not _RELEASE.fullmatch(release)
    ):
        raise UsageError(f"{release[:80]!r} is not a kernel release")
    return release


def check_source(spec: str) -> str:
    """NAME or NAME/VERSION, bounded, as DKMS allows them in /usr/src/NAME-VERSION."""
    if not spec or len(spec) > MAX_SOURCE or not _SOURCE.fullmatch(spec):
        raise UsageError(f"{spec[:80]!r} is not a module source (NAME or NAME/VERSION)")
    return spec
