"""Kernel module files (.ko, .ko.gz, .ko.xz, .ko.zst): modversions, imports, exports, .modinfo."""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kmodd.base.errors import BadInputError, NotFoundError
from kmodd.base.paths import Root
from kmodd.world import elf
from kmodd.world.compression import read_bytes

MODULE_SUFFIXES = (".ko", ".ko.gz", ".ko.xz", ".ko.zst")
_SIGNATURE_MARKER = b"~Module signature appended~\n"
_KSYMTAB = b"__ksymtab_"


@dataclass(frozen=True)
class ModuleInfo:
    path: Path
    name: str
    arch: str
    vermagic: str
    versions: dict[str, int]
    """Modversions: symbol → CRC the module was built against (incl. `module_layout`)."""
    imports: frozenset[str]
    """Every undefined symbol: what the kernel or another module must export."""
    exports: frozenset[str]
    depends: tuple[str, ...]
    aliases: tuple[str, ...]
    srcversion: str
    version: str
    signed: bool
    import_ns: frozenset[str] = frozenset()
    """The symbol namespaces it imports (`.modinfo` `import_ns=` entries)."""

    @property
    def vermagic_flags(self) -> str:
        """The vermagic after the release (what the kernel compares under MODVERSIONS)."""
        return vermagic_flags(self.vermagic)


def vermagic_flags(vermagic: str) -> str:
    space = vermagic.find(" ")
    return "" if space < 0 else vermagic[space:]


def is_module_file(path: Path) -> bool:
    return path.name.endswith(MODULE_SUFFIXES)


def module_name(path: Path) -> str:
    """The name the kernel uses for a module file: no suffix, dashes as underscores."""
    name = path.name
    for suffix in MODULE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def read_many(paths: Sequence[Path]) -> list[ModuleInfo]:
    """`read` for many files at once: decompression releases the GIL, so use every core."""
    if len(paths) < 4:
        return [read(p) for p in paths]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(read, paths))


def read(path: Path) -> ModuleInfo:
    if not path.exists():
        raise NotFoundError("no such module file", path)
    data = read_bytes(path)
    return parse(path, data)


def parse(path: Path, data: bytes) -> ModuleInfo:
    image = elf.parse(path, data)
    modinfo_sec = image.section(".modinfo")
    if modinfo_sec is None or image.section(".gnu.linkonce.this_module") is None:
        raise BadInputError(path, "not a kernel module (no .modinfo or module struct section)")
    info = _modinfo(image.content(modinfo_sec))
    imports, exports = image.imports_and_exports(_KSYMTAB)
    return ModuleInfo(
        path=path,
        name=info.get("name", [module_name(path)])[0],
        arch=image.arch,
        vermagic=info.get("vermagic", [""])[0],
        versions=_modversions(image),
        imports=frozenset(imports),
        exports=frozenset(exports),
        depends=tuple(d for d in info.get("depends", [""])[0].split(",") if d),
        aliases=tuple(info.get("alias", [])),
        srcversion=info.get("srcversion", [""])[0],
        version=info.get("version", [""])[0],
        signed=data.endswith(_SIGNATURE_MARKER),
        import_ns=frozenset(info.get("import_ns", [])),
    )


def _modinfo(raw: bytes) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for entry in raw.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep:
            fields.setdefault(key.decode("ascii", "replace"), []).append(
                value.decode("utf-8", "replace")
            )
    return fields


def _modversions(image: elf.Elf) -> dict[str, int]:
    """`__versions` records (ulong CRC + NUL-padded name, 64 bytes) and the ≥ 6.15
    `__version_ext_crcs` (u32 each) / `__version_ext_names` (NUL-separated) pair."""
    versions: dict[str, int] = {}
    sec = image.section("__versions")
    if sec is not None:
        raw = image.content(sec)
        word = image.word_size
        if len(raw) % 64:
            raise BadInputError(
                image.path, "corrupt __versions section (size not a multiple of 64)"
            )
        fmt = f"{image.endian}{'Q' if word == 8 else 'I'}{64 - word}s"
        for crc, name in struct.iter_unpack(fmt, raw):
            symbol = name.split(b"\0", 1)[0].decode("ascii", "replace")
            if symbol:
                versions[symbol] = crc & 0xFFFFFFFF
    crcs_sec = image.section("__version_ext_crcs")
    names_sec = image.section("__version_ext_names")
    if crcs_sec is not None and names_sec is not None:
        crcs_raw = image.content(crcs_sec)
        names = image.content(names_sec).rstrip(b"\0").split(b"\0")
        if len(crcs_raw) != 4 * len(names):
            raise BadInputError(
                image.path, "corrupt extended modversions (CRC and name counts differ)"
            )
        for (crc,), name in zip(
            struct.iter_unpack(image.endian + "I", crcs_raw), names, strict=True
        ):
            versions[name.decode("ascii", "replace")] = crc
    return versions


def is_loaded(root: Root, name: str) -> bool:
    """Module `name` is loaded in the running kernel (as `root`'s /sys shows it)."""
    return root.path(f"/sys/module/{name.replace('-', '_')}").is_dir()
