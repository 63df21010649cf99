"""OCI image layouts: the module cache on disk, and in a tar to carry by hand
(`kmodctl export`, `kmodctl import`). An imported layout waits in
`/var/lib/kmodd/cache/KEY` until a build of that key looks for it; it is checked then
as a pull from the registry is."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from kmodd.act.artefact import (
    CONFIG_TYPE,
    KEY_FILE,
    MAX_CONFIG,
    MODULE_TYPE,
    TITLE,
    Artefact,
    BlobReader,
    Miss,
)
from kmodd.act.builder import store_dir
from kmodd.base.errors import BadInputError, NotFoundError, UsageError
from kmodd.base.paths import Root
from kmodd.state.states import State
from kmodd.state.store import Store
from kmodd.world import modfile
from kmodd.world.buildkey import BuildKey


def read_layout(layout: Path) -> tuple[dict[str, Any], BlobReader]:
    """The one manifest of an OCI image layout kmodd wrote, and a reader of its blobs."""
    try:
        index = json.loads((layout / "index.json").read_text())
        descriptor = index["manifests"][0]
        digest = descriptor["digest"]
        manifest_file = _blob_path(layout, digest)
        manifest: dict[str, Any] = json.loads(manifest_file.read_text())
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise Miss(f"{layout}: not an OCI image layout kmodd wrote ({err})") from None
    if _sha256(manifest_file) != digest:
        raise Miss(f"{layout}: its manifest does not match its digest")

    def read(descriptor: dict[str, Any], dest: Path, limit: int) -> None:
        digest, size = descriptor.get("digest"), descriptor.get("size")
        if not isinstance(digest, str) or not isinstance(size, int) or not 0 <= size <= limit:
            raise Miss(f"{layout}: a layer without a digest, or too large")
        src = _blob_path(layout, digest)
        if not src.is_file() or src.stat().st_size != size or _sha256(src) != digest:
            raise Miss(f"{layout}: blob {digest} does not match its digest")
        shutil.copyfile(src, dest)

    return manifest, read


def _blob_path(layout: Path, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    if algorithm != "sha256" or len(hexdigest) != 64 or not hexdigest.isalnum():
        raise Miss(f"{layout}: {digest[:80]!r} is not a sha256 digest")
    return layout / "blobs" / "sha256" / hexdigest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def write_layout(layout: Path, artefact: Artefact, ref: str) -> None:
    """`artefact` as an OCI image layout at `layout` (what `kmodctl export` archives)."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes, media: str, title: str | None = None) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        found: dict[str, Any] = {"mediaType": media, "digest": f"sha256:{digest}",
                                 "size": len(data)}  # fmt: skip
        if title is not None:
            found["annotations"] = {TITLE: title}
        return found

    config = put(json.dumps(artefact.config, sort_keys=True).encode(), CONFIG_TYPE)
    layers = [put(path.read_bytes(), media, path.name) for path, media in artefact.modules]
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config, "layers": layers}  # fmt: skip
    entry = put(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    entry["annotations"] = {"org.opencontainers.image.ref.name": ref}
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))


# offline: OCI image layouts in a tar, by hand ------------------------------------------

_MAX_ARCHIVE = 2 << 30
_MAX_MEMBERS = 64


def export(root: Root, spec: str, release: str, out: Path) -> str:
    """Write the build of NAME[/VERSION] installed for `release` (built here or pulled)
    to `out`, an OCI image layout in a tar; its reference name."""
    name, _, version = spec.partition("/")
    with Store.open(root, readonly=True) as db:
        records = [r for r in db.records(name=name, kernel=release)
                   if not version or r.version == version]  # fmt: skip
    installed = [r for r in records if r.state is State.INSTALLED]
    if not installed:
        weak = [r for r in records if r.state is State.INSTALLED_WEAK]
        if weak:
            raise UsageError(f"{name} is weak-linked for {release} from {weak[0].weak_from}: "
                             f"export it for {weak[0].weak_from}")  # fmt: skip
        raise NotFoundError(f"no build of {spec} is installed for {release}")
    record = installed[0]
    out_dir = store_dir(root, record.name, record.version, release, record.arch)
    try:
        key_doc = json.loads((out_dir / KEY_FILE).read_text())
        key = BuildKey(key_doc["inputs"])
    except (OSError, ValueError, KeyError) as err:
        raise NotFoundError(f"{out_dir / KEY_FILE}: the key of this build is not known "
                            f"(built before kmodd kept it: rebuild it)") from err  # fmt: skip
    files = [out_dir / Path(f).name for f in record.files]
    modules = []
    for path in files:
        info = modfile.read(path)
        modules.append({"file": path.name, "name": info.name, "dest": modfile.module_name(path),
                        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                        "vermagic": info.vermagic, "modversions": info.versions})  # fmt: skip
    logfile = out_dir / "make.log"
    config = {"kmodd": key.inputs["format"], "key": key.digest, "inputs": key.inputs,
              "source": record.name, "version": record.version, "kernel": release,
              "log_sha256": _sha256(logfile).removeprefix("sha256:") if logfile.is_file() else "",
              "modules": modules}  # fmt: skip
    ref = f"{record.name}/{record.version}:{key.digest}"
    with tempfile.TemporaryDirectory(dir=work_dir(root)) as tmp:
        layout = Path(tmp, "layout")
        write_layout(layout, Artefact(config, [(p, MODULE_TYPE) for p in files]), ref)
        partial = out.with_name(f".{out.name}.tmp")
        with tarfile.open(partial, "w") as tar:
            for path in sorted(layout.rglob("*")):
                tar.add(path, arcname=os.fspath(path.relative_to(layout)), recursive=False)
        partial.replace(out)
    return ref


def import_archive(root: Root, archive: Path) -> tuple[str, str, str]:
    """Take the OCI image layout in `archive` into this machine's module cache, after
    checking it is one kmodd wrote, whole; the source (`NAME/VERSION`), kernel and key
    it is for. Installing it checks it as a pull is checked."""
    cache_dir = root.state_dir / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".import-") as tmp:
        layout = Path(tmp)
        _extract(archive, layout)
        manifest, read = read_layout(layout)
        described = manifest.get("config")
        if not isinstance(described, dict):
            raise BadInputError(archive, "its manifest has no config")
        try:
            read(described, layout / "config.json", MAX_CONFIG)
            doc = json.loads((layout / "config.json").read_text())
            (layout / "config.json").unlink()
            key = BuildKey(doc["inputs"])
            source, version, kernel = str(doc["source"]), str(doc["version"]), str(doc["kernel"])
        except (Miss, ValueError, KeyError, TypeError) as err:
            raise BadInputError(archive, f"not a kmodd build: {err}") from None
        if key.digest != doc.get("key"):
            raise BadInputError(archive, "its key does not match its inputs")
        final = cache_dir / key.digest
        if final.exists():
            shutil.rmtree(final)
        layout.rename(final)
        layout.mkdir()  # for TemporaryDirectory's clean-up
    return f"{source}/{version}", kernel, key.digest


def _extract(archive: Path, into: Path) -> None:
    """Only what an OCI image layout holds: regular files, bounded, named as its own."""
    try:
        with tarfile.open(archive, "r:") as tar:
            members = tar.getmembers()
            if len(members) > _MAX_MEMBERS:
                raise BadInputError(archive, f"more than {_MAX_MEMBERS} entries")
            total = 0
            for member in members:
                name = member.name.removeprefix("./")
                if member.isdir() and name in ("blobs", "blobs/sha256"):
                    continue
                allowed = name in ("oci-layout", "index.json") or (
                    name.startswith("blobs/sha256/") and len(name) == 13 + 64
                    and all(c in "0123456789abcdef" for c in name[13:])
                )  # fmt: skip
                if not member.isfile() or not allowed:
                    raise BadInputError(archive, f"{name[:80]!r} has no place in a layout")
                total += member.size
                if total > _MAX_ARCHIVE:
                    raise BadInputError(archive, f"larger than {_MAX_ARCHIVE >> 30} GB")
                dest = into / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None
                with source, dest.open("wb") as out:
                    shutil.copyfileobj(source, out)
    except (tarfile.TarError, EOFError) as err:
        raise BadInputError(archive, f"not a tar archive: {err}") from None


def forget(root: Root, digest: str, here: BuildKey) -> list[str]:
    """Take the imported layout of `digest` away again (it is not for this machine);
    the inputs in which it differs from `here`."""
    layout = root.state_dir / "cache" / digest
    differ: list[str] = []
    try:
        manifest, read = read_layout(layout)
        described = manifest.get("config")
        if isinstance(described, dict):
            read(described, layout / "config.json", MAX_CONFIG)
            inputs = json.loads((layout / "config.json").read_text()).get("inputs", {})
            differ = sorted(
                k for k in {*inputs, *here.inputs} if inputs.get(k) != here.inputs.get(k)
            )
    except (Miss, OSError, ValueError, AttributeError):
        pass
    shutil.rmtree(layout, ignore_errors=True)
    return differ


def work_dir(root: Root) -> Path:
    work = root.work_dir
    work.mkdir(parents=True, exist_ok=True)
    return work
