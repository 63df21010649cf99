"""The module cache: a build's modules kept in an OCI registry (and in OCI image
layouts, to carry between machines by hand), addressed by the build's key.

Before a build, kmodd looks its key up: in the layouts imported on this machine, then
in the registry. What it finds is installed only when everything checks out: every
blob's sha256 is the digest its manifest names; the artefact says it was built from
this very key; its modules are the ones this source builds; each is a module for this
kernel's arch whose vermagic and modversions the kernel accepts (the reuse verdict,
against this kernel's exports); and, when kmodd signs modules, each carries a valid
signature by kmodd's certificate. Anything else is a miss, said in the log, and the
module is built here. After a build, the service pushes it (`registry_push`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from kmodd.act.artefact import CONFIG_TYPE, BlobReader, Miss, accept, describe, remember_key
from kmodd.act.builder import BuildResult, BuiltModule, store_dir
from kmodd.act.layout import read_layout, work_dir
from kmodd.base import fsutil
from kmodd.base.log import get_logger
from kmodd.base.paths import Root
from kmodd.decide import verdict
from kmodd.world import modfile
from kmodd.world.buildkey import BuildKey
from kmodd.world.config import Config
from kmodd.world.dkmsconf import SourceConfig
from kmodd.world.kernel import Kernel
from kmodd.world.registry import Blob, RegistryError, Resting, client

log = get_logger(__name__)


class Cache:
    """The module cache as one run uses it: the imported layouts, then the registry."""

    def __init__(self, root: Root, config: Config) -> None:
        self.root = root
        self.config = config
        self.client = client(config.registry) if config.registry else None

    @property
    def layouts(self) -> Path:
        return self.root.state_dir / "cache"

    def fetch(
        self, key: BuildKey, conf: SourceConfig, k: Kernel, target: verdict.Target
    ) -> BuildResult | None:
        """The build of `key`, checked and put in the build store; None: build it."""
        for where, manifest, read in self._candidates(key, conf):
            with tempfile.TemporaryDirectory(dir=self._tmp()) as tmp:
                try:
                    found = accept(manifest, read, key, conf, k, target, self.config, Path(tmp))
                except (Miss, RegistryError) as err:
                    log.warning("cache miss: building", module=conf.name, kver=k.release,
                                ref=where, problem=str(err))  # fmt: skip
                    continue
                return self._keep(where, key, conf, k, found)
        return None

    def push(self, key: BuildKey, result: BuildResult, conf: SourceConfig) -> str | None:
        """Push a build just made (when kmodd.conf says so); its reference, or None."""
        settings = self.config.registry
        if settings is None or not settings.push or self.client is None:
            return None
        ref = settings.reference(conf.name, key.digest)
        artefact = describe(key, result, conf)
        with tempfile.TemporaryDirectory(dir=self._tmp()) as tmp:
            config_file = Path(tmp, "config.json")
            config_file.write_text(json.dumps(artefact.config, sort_keys=True))
            layers = [Blob(path, media) for path, media in artefact.modules]
            try:
                self.client.push(ref, Blob(config_file, CONFIG_TYPE), layers)
            except Resting:
                return None
            except RegistryError as err:
                log.warning("not pushed", module=conf.name, ref=ref, problem=str(err))
                return None
        log.info("pushed", module=conf.name, kver=conf.kernel, ref=ref)
        return ref

    def _candidates(
        self, key: BuildKey, conf: SourceConfig
    ) -> list[tuple[str, dict[str, Any], BlobReader]]:
        found = []
        layout = self.layouts / key.digest
        if (layout / "index.json").is_file():
            try:
                manifest, read = read_layout(layout)
                found.append((f"imported {key.digest[:12]}", manifest, read))
            except Miss as err:
                log.warning("imported artefact unusable", key=key.digest, problem=str(err))
        settings = self.config.registry
        if settings is not None and self.client is not None:
            ref = settings.reference(conf.name, key.digest)
            remote: dict[str, Any] | None = None
            try:
                remote = self.client.manifest(ref)
            except Resting:
                pass
            except RegistryError as err:
                log.warning("cache not asked: building", module=conf.name, problem=str(err))
            if remote is not None:
                client = self.client
                found.append((ref, remote, lambda d, p, n: client.blob(ref, d, p, n)))
        return found

    def _keep(
        self,
        where: str,
        key: BuildKey,
        conf: SourceConfig,
        k: Kernel,
        found: list[tuple[modfile.ModuleInfo, Path, str]],
    ) -> BuildResult:
        """The checked modules, into the build store as a build's would be."""
        out = store_dir(self.root, conf.name, conf.version, k.release, conf.arch)
        out.mkdir(parents=True, exist_ok=True)
        specs = {m.dest_name: m for m in conf.modules}
        modules = []
        for info, path, dest in found:
            artefact = fsutil.atomic_write(self.root, out / path.name, path.read_bytes())
            modules.append(BuiltModule(specs[dest], artefact, info))
        logfile = out / "make.log"
        logfile.write_text(f"# kmodd: {conf.name}/{conf.version} for {k.release}: not built "
                           f"here, taken from the module cache: {where}\n")  # fmt: skip
        remember_key(self.root, out, key)
        log.info("from the module cache", module=conf.name, kver=k.release, ref=where)
        return BuildResult(conf, tuple(modules), logfile, 0.0, origin=where)

    def _tmp(self) -> Path:
        return work_dir(self.root)
