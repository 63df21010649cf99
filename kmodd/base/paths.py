"""Every location kmodd reads or writes, derived from one root prefix.

`Root("/")` is the running system; `Root(tmp)` is a chroot-like tree used by tests,
image builds and `--root`. Symlinks inside the root are resolved as a chroot would:
an absolute target is looked up under the prefix, and `..` never climbs above it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kmodd.base.errors import BadInputError

_MAX_SYMLINKS = 40


class SymlinkLoopError(BadInputError):
    """A path inside a root whose symlinks never end (a loop, or more than 40)."""


class OutsideRootError(BadInputError):
    """A path kmodd was to use as inside a root that is not under its prefix."""


@dataclass(frozen=True)
class Root:
    prefix: Path

    @classmethod
    def at(cls, prefix: str | os.PathLike[str]) -> Root:
        return cls(Path(prefix).resolve())

    def path(self, inside: str | PurePosixPath) -> Path:
        """`/lib/modules` inside the root, as a path on this machine (no resolving)."""
        pure = PurePosixPath(inside)
        return self.prefix / (pure.relative_to("/") if pure.is_absolute() else pure)

    def resolve(self, path: Path) -> Path:
        """Resolve every symlink in `path` (a path under the prefix) as a chroot would
        (as openat2's RESOLVE_IN_ROOT does): an absolute target is looked up under the
        prefix and `..` never climbs above it, so the result never leaves the root.

        The result need not exist. A symlink loop is a SymlinkLoopError (following the
        looping link on this machine could reach outside the root); a `path` that is not
        under the prefix at all is an OutsideRootError."""
        try:
            rel = path.relative_to(self.prefix)
        except ValueError:
            raise OutsideRootError(path, f"is not inside the root {self.prefix}") from None
        pending = list(reversed(rel.parts))
        done: list[str] = []
        hops = 0
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if done:
                    done.pop()
                continue
            candidate = self.prefix.joinpath(*done, part)
            if candidate.is_symlink():
                hops += 1
                if hops > _MAX_SYMLINKS:
                    raise SymlinkLoopError(path, "too many levels of symbolic links in the root")
                target = PurePosixPath(candidate.readlink())
                if target.is_absolute():
                    done = []
                    target = target.relative_to("/")
                pending.extend(reversed(target.parts))
                continue
            done.append(part)
        return self.prefix.joinpath(*done)

    def entry(self, path: Path) -> Path:
        """`path` with its directories resolved inside the root but its last component
        kept as it is: the name to create, replace or unlink (a link itself, never what
        it points to)."""
        if path.name in ("", ".", ".."):
            raise OutsideRootError(path, "is not a name of an entry to write")
        return self.resolve(path.parent) / path.name

    def outside(self, path: Path) -> str:
        """How `path` (under the prefix) reads from inside the root: `/lib/modules/...`."""
        try:
            return "/" + os.fspath(path.relative_to(self.prefix))
        except ValueError:
            return os.fspath(path)

    def real(self, inside: str | PurePosixPath) -> Path:
        """`path(inside)` resolved inside the root: where it really is under the prefix."""
        return self.resolve(self.path(inside))

    # Well-known locations, resolved inside the root ---------------------------------------
    # (a `var/lib/kmodd` linked to `/srv/kmodd` is `<prefix>/srv/kmodd`, never the host's)

    @property
    def modules_dirs(self) -> tuple[Path, ...]:
        """Where kernels keep their modules: `/lib/modules` and `/usr/lib/modules`."""
        return (self.real("/lib/modules"), self.real("/usr/lib/modules"))

    @property
    def boot(self) -> Path:
        return self.real("/boot")

    @property
    def usr_src(self) -> Path:
        return self.real("/usr/src")

    @property
    def dkms_overrides(self) -> Path:
        return self.real("/etc/dkms")

    @property
    def dkms_tree(self) -> Path:
        return self.real("/var/lib/dkms")

    @property
    def state_dir(self) -> Path:
        return self.real("/var/lib/kmodd")

    @property
    def work_dir(self) -> Path:
        """Private copies for builds and dkms.conf evaluations (cleared after a crash)."""
        return self.resolve(self.state_dir / "work")

    @property
    def config_file(self) -> Path:
        return self.real("/etc/kmodd/kmodd.conf")
