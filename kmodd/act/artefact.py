"""A build as the module cache holds it: its modules as OCI layers, and a config saying
what they were built from (the build's key and its inputs) and what they hold; and
the checks a found artefact must pass before anything of it is installed.

An artefact is accepted only when: every blob's sha256 is the digest its manifest
names; it says it was built from this very key; its modules are the ones this source
builds; each is a module for this kernel's arch whose vermagic and modversions the
kernel accepts (the reuse verdict, against this kernel's exports); and, when kmodd signs
modules, each carries a valid signature by kmodd's certificate.

A symbol that neither the kernel nor the source's own modules export is no reason to
refuse a source without BUILD_DEPENDS: the key holds the kernel's exports, so this
machine's own build would import it unresolved just the same (Debian's dahdi does, for
the staging `echo` module's oslec_create). A source with BUILD_DEPENDS may take such a
symbol from another source's build, which its key does not hold: a miss.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmodd.act.builder import BuildResult
from kmodd.base import fsutil
from kmodd.base.errors import BadInputError, KmoddError
from kmodd.base.log import get_logger
from kmodd.base.paths import Root
from kmodd.decide import verdict
from kmodd.world import modfile, modsig
from kmodd.world.buildkey import BuildKey
from kmodd.world.compression import decompress
from kmodd.world.config import Config
from kmodd.world.dkmsconf import SourceConfig
from kmodd.world.kernel import Kernel

CONFIG_TYPE = "application/vnd.kmodd.build.config.v1+json"
MODULE_TYPE = "application/vnd.kmodd.module.v1"
TITLE = "org.opencontainers.image.title"
MAX_CONFIG = 1 << 20
_MAX_MODULE = 512 << 20
KEY_FILE = "key.json"
"""Beside a build's modules in the build store: the key it was built (or pulled) for."""

log = get_logger(__name__)

BlobReader = Callable[[dict[str, Any], Path, int], None]
"""Copies the blob a descriptor names into a path, checked against its digest."""


class Miss(KmoddError):
    """What was found is not what this build would make: build it here."""


@dataclass(frozen=True)
class Artefact:
    """A build's modules as the cache holds them."""

    config: dict[str, Any]
    modules: list[tuple[Path, str]]
    """Each module file and its media type, in the order of the source's modules."""


def describe(key: BuildKey, result: BuildResult, conf: SourceConfig) -> Artefact:
    """The artefact for a build just made: its modules and what they were made from."""
    log_digest = hashlib.sha256(result.log.read_bytes()).hexdigest()
    config = {
        "kmodd": key.inputs["format"],
        "key": key.digest,
        "inputs": key.inputs,
        "source": conf.name,
        "version": conf.version,
        "kernel": conf.kernel,
        "log_sha256": log_digest,
        "modules": [
            {
                "file": m.path.name,
                "name": m.info.name,
                "dest": m.spec.dest_name,
                "sha256": hashlib.sha256(m.path.read_bytes()).hexdigest(),
                "vermagic": m.info.vermagic,
                "modversions": m.info.versions,
            }
            for m in result.modules
        ],
    }
    return Artefact(config, [(m.path, MODULE_TYPE) for m in result.modules])


def accept(
    manifest: dict[str, Any],
    read: BlobReader,
    key: BuildKey,
    conf: SourceConfig,
    k: Kernel,
    target: verdict.Target,
    config: Config,
    into: Path,
) -> list[tuple[modfile.ModuleInfo, Path, str]]:
    """Check an artefact against everything the build would be (Miss when it is not);
    its modules, downloaded into `into`: (what each holds, its file, its dest name)."""
    layers = manifest.get("layers")
    described = manifest.get("config")
    if not isinstance(layers, list) or not isinstance(described, dict):
        raise Miss("the manifest has no layers or config")
    if described.get("mediaType") != CONFIG_TYPE:
        raise Miss(f"not a kmodd build (config {described.get('mediaType')!r})")
    read(described, into / "config.json", MAX_CONFIG)
    try:
        doc = json.loads((into / "config.json").read_text())
    except ValueError as err:
        raise Miss("its config is not JSON") from err
    if doc.get("key") != key.digest or doc.get("inputs") != key.inputs:
        raise Miss("it was built from other inputs than this build's key")
    recorded = doc.get("modules")
    wanted = [m.dest_name for m in conf.modules]
    if not isinstance(recorded, list) or [m.get("dest") for m in recorded] != wanted:
        raise Miss(f"its modules are not {', '.join(wanted)}")
    files = [layer for layer in layers if isinstance(layer, dict)]
    if len(files) != len(wanted) or any(f.get("mediaType") != MODULE_TYPE for f in files):
        raise Miss("its layers are not this source's modules")
    found = []
    for layer, record, dest in zip(files, recorded, wanted, strict=True):
        title = (layer.get("annotations") or {}).get(TITLE, "")
        if title != record.get("file") or not modfile.is_module_file(Path(title)):
            raise Miss(f"layer {title!r} is not the module file it says")
        path = into / Path(title).name
        read(layer, path, _MAX_MODULE)
        raw = path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != record.get("sha256"):
            raise Miss(f"{title}: not the file its config recorded")
        try:
            data = decompress(path, raw)
            info = modfile.parse(path, data)
        except BadInputError as err:
            raise Miss(f"{title}: {err.problem}") from None
        signs = config.sign_cert is not None and k.config.get("CONFIG_MODULE_SIG") == "y"
        if signs and config.sign_cert and not modsig.signed_by(data, config.sign_cert):
            raise Miss(f"{title}: not signed with this machine's key")
        found.append((info, path, dest))
    for v in verdict.judge([info for info, _, _ in found], target):
        if v.reusable:
            continue
        if v.changed or v.problems or conf.build_depends:
            raise Miss(f"{v.module.path.name}: {v.reasons[0]}")
        if v.missing:
            log.info("accepted with symbols no one here exports, as a build here would be",
                     module=v.module.path.name, symbols=" ".join(v.missing))  # fmt: skip
    return found


def remember_key(root: Root, out: Path, key: BuildKey) -> None:
    """Beside a build's modules: the key they are for (what `kmodctl export` sends)."""
    doc = {"key": key.digest, "inputs": key.inputs}
    fsutil.atomic_write(root, out / KEY_FILE, json.dumps(doc, sort_keys=True).encode())
