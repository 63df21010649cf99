"""A kernel's facts, read from its modules dir, its headers and /boot inside a root."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath

from kmodd.base.errors import BadInputError, NotFoundError
from kmodd.base.paths import Root, SymlinkLoopError
from kmodd.world import modfile, symvers
from kmodd.world.compression import Compression

# CONFIG_X → the architecture name `uname -m` prints (first match wins)
_ARCH_CONFIGS = (
    ("CONFIG_X86_64", "x86_64"),
    ("CONFIG_X86_32", "i686"),
    ("CONFIG_ARM64", "aarch64"),
    ("CONFIG_ARM", "arm"),
    ("CONFIG_PPC64", "ppc64"),
    ("CONFIG_PPC32", "ppc"),
    ("CONFIG_S390", "s390x"),
    ("CONFIG_RISCV", "riscv64"),
    ("CONFIG_LOONGARCH", "loongarch64"),
    ("CONFIG_MIPS", "mips"),
)
_CONFIG_LINE = re.compile(r"^(CONFIG_\w+)=(.*)$", re.MULTILINE)


@dataclass(frozen=True)
class Kernel:
    """One installed kernel, as found in `<root>/lib/modules/KVER`."""

    root: Root
    release: str
    modules_dir: Path

    # Where things are ---------------------------------------------------------------

    def tree(self, sub: str | PurePosixPath) -> Path:
        """`sub` of the modules dir (`updates/dkms`, `weak-updates/NAME`), where kmodd
        writes: no part of it may be a symbolic link, which would take kmodd's writes,
        and depmod's reads, wherever it points."""
        path = self.modules_dir
        for part in PurePosixPath(sub).parts:
            path = path / part
            if path.is_symlink():
                raise BadInputError(
                    path, "is a symbolic link: kmodd writes only into real directories here"
                )
        return path

    @cached_property
    def build_dir(self) -> Path | None:
        """The headers (`build` link, resolved inside the root), if they are there; a
        link that loops is no headers (never the headers it would reach on this host)."""
        try:
            resolved = self.root.resolve(self.modules_dir / "build")
            makefile = self.root.resolve(resolved / "Makefile")
        except SymlinkLoopError:
            return None
        return resolved if makefile.is_file() else None

    def exports_candidates(self) -> list[Path]:
        boot = self.root.boot
        found = [self.build_dir / "Module.symvers"] if self.build_dir else []
        return [
            *found,
            self.modules_dir / "symvers.gz",
            self.modules_dir / "symvers.xz",
            boot / f"symvers-{self.release}.gz",
            boot / f"symvers-{self.release}.xz",
        ]

    @cached_property
    def exports_path(self) -> Path | None:
        """The first exports file there is, resolved inside the root (a Module.symvers
        linked to a host file is read as that path inside the root); one that is there
        but no regular file (a FIFO) is found, and refused when read, named."""
        found = (self._inside(p, any_kind=True) for p in self.exports_candidates())
        return next((p for p in found if p), None)

    def _inside(self, path: Path, *, any_kind: bool = False) -> Path | None:
        try:
            resolved = self.root.resolve(path)
        except SymlinkLoopError:
            return None
        there = resolved.exists() and not resolved.is_dir() if any_kind else resolved.is_file()
        return resolved if there else None

    def exports(self) -> symvers.Exports:
        path = self.exports_path
        if path is None:
            looked = ", ".join(self.root.outside(p) for p in self.exports_candidates())
            raise NotFoundError(f"kernel {self.release} has no exports file (looked in {looked})")
        return symvers.load(path)

    @cached_property
    def config_path(self) -> Path | None:
        candidates = [self.modules_dir / "config", self.root.boot / f"config-{self.release}"]
        if self.build_dir:
            candidates.insert(0, self.build_dir / ".config")
        return next((p for p in map(self._inside, candidates) if p), None)

    @cached_property
    def config(self) -> dict[str, str]:
        """CONFIG_* → value (`y`, `m`, a quoted string, a number); empty if unknown."""
        if self.config_path is None:
            return {}
        try:
            st = self.config_path.stat()
            return dict(_parse_config(self.config_path, st.st_mtime_ns, st.st_size))
        except OSError as err:
            raise BadInputError(self.config_path, f"cannot read: {err.strerror}") from err

    # Facts --------------------------------------------------------------------------

    @cached_property
    def arch(self) -> str | None:
        config = self.config
        for option, name in _ARCH_CONFIGS:
            if config.get(option) == "y":
                if name == "ppc64" and config.get("CONFIG_CPU_LITTLE_ENDIAN") == "y":
                    return "ppc64le"
                return name
        sample = self._sample_module()
        return sample.arch if sample else None

    @cached_property
    def vermagic(self) -> str | None:
        """The kernel's vermagic string, from its config or else one of its own modules."""
        if self.config:
            return self._vermagic_from_config()
        sample = self._sample_module()
        return sample.vermagic if sample else None

    @property
    def vermagic_flags(self) -> str | None:
        magic = self.vermagic
        return None if magic is None else modfile.vermagic_flags(magic)

    @cached_property
    def compression(self) -> Compression:
        """How this kernel's `make modules_install` compresses modules."""
        config = self.config
        for kind, option in (
            (Compression.ZSTD, "CONFIG_MODULE_COMPRESS_ZSTD"),
            (Compression.XZ, "CONFIG_MODULE_COMPRESS_XZ"),
            (Compression.GZIP, "CONFIG_MODULE_COMPRESS_GZIP"),
        ):
            if config.get(option) == "y":
                return kind
        if config:
            return Compression.NONE
        sample = self._first_module_path()
        return Compression.of(sample) if sample else Compression.NONE

    @property
    def has_modversions(self) -> bool:
        return self.config.get("CONFIG_MODVERSIONS") == "y"

    # Helpers ------------------------------------------------------------------------

    def _vermagic_from_config(self) -> str:
        """include/linux/vermagic.h: RELEASE SMP preempt mod_unload modversions ARCH."""
        config = self.config

        def on(option: str) -> bool:
            return config.get(option) == "y"

        parts = [self.release]
        if on("CONFIG_SMP"):
            parts.append("SMP")
        # PREEMPT_BUILD since 5.15 (PREEMPT and PREEMPT_DYNAMIC select it); PREEMPT before
        if on("CONFIG_PREEMPT_BUILD") or on("CONFIG_PREEMPT"):
            parts.append("preempt")
        elif on("CONFIG_PREEMPT_RT"):
            parts.append("preempt_rt")
        if on("CONFIG_MODULE_UNLOAD"):
            parts.append("mod_unload")
        if on("CONFIG_MODVERSIONS"):
            parts.append("modversions")
        parts.extend(self._arch_vermagic())
        return " ".join(parts) + " "

    def _arch_vermagic(self) -> list[str]:
        config = self.config
        if config.get("CONFIG_ARM64") == "y":
            return ["aarch64"]
        families = {
            "CONFIG_MK8": "K8",
            "CONFIG_MPSC": "P4SSE2",
            "CONFIG_MCORE2": "CORE2",
            "CONFIG_MATOM": "ATOM",
        }
        return [name for option, name in families.items() if config.get(option) == "y"]

    def _first_module_path(self) -> Path | None:
        for dirpath, _dirs, files in os.walk(self.modules_dir / "kernel"):
            for name in files:
                if name.endswith(modfile.MODULE_SUFFIXES):
                    return Path(dirpath, name)
        return None

    def _sample_module(self) -> modfile.ModuleInfo | None:
        path = self._first_module_path()
        return modfile.read(path) if path else None


@functools.lru_cache(maxsize=32)
def _parse_config(path: Path, mtime_ns: int, size: int) -> tuple[tuple[str, str], ...]:
    """A kernel config's options; cached while the file is unchanged (status asks often)."""
    text = path.read_text(errors="replace")
    return tuple((key, value.strip('"')) for key, value in _CONFIG_LINE.findall(text))


def installed_releases(root: Root) -> list[str]:
    """Every kernel with a modules dir under `/lib/modules` or `/usr/lib/modules`."""
    seen: set[str] = set()
    for base in root.modules_dirs:
        if not base.is_dir():
            continue
        for entry in sorted(base.iterdir()):
            if entry.name not in seen and _modules_dir(root, entry) is not None:
                seen.add(entry.name)
    return sorted(seen, key=version_key)


def _modules_dir(root: Root, entry: Path) -> Path | None:
    """`entry` resolved inside the root, when it is a directory there."""
    try:
        resolved = root.resolve(entry)
    except SymlinkLoopError:
        return None
    return resolved if resolved.is_dir() else None


def find(root: Root, release: str) -> Kernel:
    if not release or "/" in release or release in (".", ".."):
        raise NotFoundError(f"{release!r} is not a kernel release")
    for base in root.modules_dirs:
        candidate = _modules_dir(root, base / release)
        if candidate is not None:
            return Kernel(root, release, candidate)
    looked = " or ".join(root.outside(base / release) for base in root.modules_dirs)
    raise NotFoundError(f"kernel {release} is not installed (no {looked})")


def version_key(release: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.\-+~_]", release)]
