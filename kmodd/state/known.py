"""What kmodd has read before, kept so that it need not read it again.

- A module file's facts (modversions, imports, exports, vermagic, namespaces...), in
  state.db, recorded when kmodd builds it or first reads it, and kept while the file is
  the same (its device, inode, size and mtime; its sha256 is kept beside them). Judging
  installed builds for a new kernel then opens no module.
- A kernel's exports, as an index file in the state dir (`exports/KVER`) made from its
  Module.symvers or symvers.gz/.xz and rebuilt when that file changes: loading it takes
  a few milliseconds, where parsing the text takes tens.

Readers (status, plan, any user) use what is recorded and never write; writers (a run
under the writers' lock) record what they read.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kmodd.base import fsutil
from kmodd.base.errors import BadInputError, KmoddError
from kmodd.base.log import get_logger
from kmodd.base.paths import Root
from kmodd.world import modfile, symvers
from kmodd.world.compression import read_bytes
from kmodd.world.kernel import Kernel
from kmodd.world.modfile import ModuleInfo

if TYPE_CHECKING:  # `kmodctl check` reads exports only: it never loads the store
    from kmodd.state.store import Store

log = get_logger(__name__)

_INDEX_FORMAT = 1


def identity(path: Path) -> str:
    """What says a file is the same file with the same content, short of reading it."""
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


# module files --------------------------------------------------------------------------


def module(db: Store, path: Path) -> ModuleInfo:
    """The facts of the module file at `path` (resolved, inside the root), from the
    state while the file is unchanged; else read (and, for a writer, recorded)."""
    try:
        now = identity(path)
    except FileNotFoundError:
        return modfile.read(path)  # raises NotFoundError, named
    except OSError as err:
        raise BadInputError(path, f"cannot read: {err.strerror}") from err
    row = db.module_row(os.fspath(path))
    if row is not None and row[0] == now:
        try:
            return _from_json(path, json.loads(row[2]))
        except (ValueError, KeyError, TypeError):
            pass  # a record of another kmodd's shape: read the file again
    data = read_bytes(path)
    info = modfile.parse(path, data)
    if not db.readonly:
        db.put_module_row(os.fspath(path), now, hashlib.sha256(data).hexdigest(), _to_json(info))
    return info


def modules(db: Store, paths: list[Path]) -> list[ModuleInfo]:
    return [module(db, path) for path in paths]


def remember(db: Store, path: Path, info: ModuleInfo) -> None:
    """Record what a build's module holds, now installed at `path`."""
    data = path.read_bytes()
    db.put_module_row(
        os.fspath(path), identity(path), hashlib.sha256(data).hexdigest(), _to_json(info)
    )


def _to_json(info: ModuleInfo) -> str:
    return json.dumps(
        {
            "name": info.name,
            "arch": info.arch,
            "vermagic": info.vermagic,
            "versions": info.versions,
            "imports": sorted(info.imports),
            "exports": sorted(info.exports),
            "depends": list(info.depends),
            "aliases": list(info.aliases),
            "srcversion": info.srcversion,
            "version": info.version,
            "signed": info.signed,
            "import_ns": sorted(info.import_ns),
        },
        separators=(",", ":"),
    )


def _from_json(path: Path, doc: dict[str, object]) -> ModuleInfo:
    def strings(key: str) -> list[str]:
        value = doc[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError(key)
        return value

    versions = doc["versions"]
    if not isinstance(versions, dict):
        raise TypeError("versions")
    return ModuleInfo(
        path=path,
        name=str(doc["name"]),
        arch=str(doc["arch"]),
        vermagic=str(doc["vermagic"]),
        versions={str(k): int(v) for k, v in versions.items()},
        imports=frozenset(strings("imports")),
        exports=frozenset(strings("exports")),
        depends=tuple(strings("depends")),
        aliases=tuple(strings("aliases")),
        srcversion=str(doc["srcversion"]),
        version=str(doc["version"]),
        signed=bool(doc["signed"]),
        import_ns=frozenset(strings("import_ns")),
    )


# kernels' exports -------------------------------------------------------------------------


def exports(root: Root, k: Kernel, *, write: bool) -> symvers.Exports:
    """`k`'s exports, from its index in the state dir while its exports file is the
    same; else parsed from that file (and, with `write`, indexed for the next time)."""
    source = k.exports_path
    if source is None:
        return k.exports()  # raises NotFoundError, naming where it looked
    try:
        key = {"format": _INDEX_FORMAT, "source": os.fspath(source), "identity": identity(source)}
    except OSError:
        return k.exports()
    index = root.entry(root.state_dir / "exports" / k.release)
    found = _load_index(index, key, source)
    if found is not None:
        return found
    parsed = k.exports()
    if write:
        try:
            fsutil.atomic_write(root, index, _index_bytes(key, parsed))
        except (OSError, KmoddError) as err:  # a cache: a full disk costs only time
            log.warning("exports index not written", kver=k.release, problem=str(err))
    return parsed


def _index_bytes(key: dict[str, object], e: symvers.Exports) -> bytes:
    names = list(e.crcs)
    crcs = array.array("I", (e.crcs[n] for n in names))
    if sys.byteorder != "little":
        crcs.byteswap()
    header = json.dumps({**key, "count": len(names), "namespaces": e.namespaces})
    return header.encode() + b"\n" + "\0".join(names).encode() + b"\n" + crcs.tobytes()


def _load_index(index: Path, key: dict[str, object], source: Path) -> symvers.Exports | None:
    """The index at `index` if it was made from `source` as it is now; else None."""
    try:
        data = read_bytes(index)
        head, _, rest = data.partition(b"\n")
        doc = json.loads(head)
        if {k: doc.get(k) for k in key} != key:
            return None
        count = int(doc["count"])
        names_raw, _, crcs_raw = rest.partition(b"\n")
        names = names_raw.decode("ascii").split("\0") if count else []
        crcs = array.array("I")
        crcs.frombytes(crcs_raw)
        if sys.byteorder != "little":
            crcs.byteswap()
        namespaces = doc["namespaces"]
        if len(names) != count or len(crcs) != count or not isinstance(namespaces, dict):
            return None
    except (KmoddError, ValueError, KeyError, TypeError):
        return None
    return symvers.Exports(source, dict(zip(names, crcs, strict=True)), {}, namespaces)
