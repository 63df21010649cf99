"""Putting modules in a kernel's tree, and taking them out, without half-done states.

Built modules go where DKMS puts them on the distribution (`world.distro`: Debian's
`updates/dkms/`, Fedora's `extra/`, SUSE's `updates/`), else DEST_MODULE_LOCATION; each is
written to a temporary file and renamed. Weak modules are relative symlinks in
`weak-updates/NAME/` to the build installed for another kernel. depmod runs once per
kernel per batch, by the caller.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from kmodd.act.builder import BuildResult
from kmodd.base import fsutil
from kmodd.base.log import get_logger
from kmodd.base.paths import Root
from kmodd.base.run import run
from kmodd.world import distro, modfile
from kmodd.world.dkmsconf import ModuleSpec
from kmodd.world.kernel import Kernel

log = get_logger(__name__)


def dest_dir(root: Root, k: Kernel, spec: ModuleSpec) -> Path:
    """Where `spec` is installed for kernel `k`, by the distribution's DKMS convention
    (`distro`);
    elsewhere DEST_MODULE_LOCATION, but never in the kernel's own `kernel/` tree:
    `/kernel/drivers/misc` goes to `updates/drivers/misc` (depmod prefers updates/), so
    the kernel's module is neither overwritten nor, at uninstall, deleted."""
    convention = distro.detect(root).module_dir
    if convention is not None:
        return k.tree(convention)
    top, *rest = PurePosixPath(spec.dest_location).relative_to("/").parts
    return k.tree(PurePosixPath(top if top in ("updates", "extra") else "updates", *rest))


def build_targets(root: Root, k: Kernel, result: BuildResult) -> list[Path]:
    """Where `install_build` puts each module of `result`, in order."""
    return [dest_dir(root, k, m.spec) / m.path.name for m in result.modules]


def install_build(root: Root, k: Kernel, result: BuildResult) -> list[Path]:
    """Install every module of a build for `k`, replacing older files and weak links."""
    installed = []
    for module, target in zip(result.modules, build_targets(root, k, result), strict=True):
        written = fsutil.atomic_write(root, target, module.path.read_bytes())
        _remove_other_forms(written)
        fsutil.remove(root, weak_link_path(k, result.conf.name, module.path.name))
        installed.append(written)
    log.info(
        "installed",
        module=result.conf.name,
        kver=k.release,
        files=[os.fspath(p) for p in installed],
    )
    return installed


def weak_link_path(k: Kernel, source_name: str, file_name: str) -> Path:
    return k.tree(PurePosixPath("weak-updates", source_name)) / file_name


def link_weak(root: Root, k: Kernel, source_name: str, files: list[Path]) -> list[Path]:
    """Relative symlinks in `k`'s weak-updates to modules installed for another kernel
    (`files`, resolved inside the root)."""
    links = []
    for target in files:
        link = root.entry(weak_link_path(k, source_name, target.name))
        made = fsutil.atomic_symlink(root, os.path.relpath(target, link.parent), link)
        _remove_other_forms(made)
        links.append(made)
    log.info("weak-linked", module=source_name, kver=k.release, links=[os.fspath(p) for p in links])
    return links


def _remove_other_forms(path: Path) -> None:
    """A module installed as .ko.xz replaces the same module as .ko, .ko.gz, .ko.zst."""
    stem = modfile.module_name(path)
    for sibling in path.parent.iterdir():
        same_module = modfile.is_module_file(sibling) and modfile.module_name(sibling) == stem
        if sibling != path and same_module:
            sibling.unlink()


def remove_files(root: Root, files: list[str]) -> None:
    """Remove installed files and links recorded as paths inside the root (and the
    directories that leaves empty, up to the kernel's own)."""
    for inside in files:
        fsutil.remove(root, root.path(inside))


def depmod(root: Root, release: str) -> None:
    base = [] if root.prefix == Path("/") else ["-b", os.fspath(root.prefix)]
    run(["depmod", "-a", *base, release], timeout=600)
