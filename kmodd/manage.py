"""Changing what is installed, one source or one kernel at a time: build, install,
uninstall, remove a kernel, adopt from DKMS. All under the writers' lock."""

from __future__ import annotations

import os

import structlog

from kmodd import builder, config, dkms_compat, dkmsconf, install, kernel, plan, store
from kmodd.autoinstall import Options, autoinstall
from kmodd.dkmsconf import SourceDir
from kmodd.errors import BuildError, KmoddError, NotFoundError, UsageError
from kmodd.outcome import Outcome
from kmodd.paths import Root
from kmodd.plan import Action
from kmodd.state import State
from kmodd.store import Record, Store

log = structlog.get_logger(__name__)


def find_source(root: Root, spec: str) -> SourceDir:
    """`NAME` or `NAME/VERSION` → the source in /usr/src (the newest version for NAME)."""
    name, _, version = spec.partition("/")
    matches = [s for s in dkmsconf.find_sources(root) if s.name == name]
    if version:
        matches = [s for s in matches if s.version == version]
    if not matches:
        raise NotFoundError(f"no module source {spec} in {root.outside(root.usr_src)}")
    return max(matches, key=lambda s: kernel.version_key(s.version))


def build_only(root: Root, spec: str, release: str, jobs: int) -> Outcome:
    source = find_source(root, spec)
    k = kernel.find(root, release)
    arch = k.arch or os.uname().machine
    with store.lock(root), Store.open(root) as db:
        try:
            result = builder.build(root, source, k, config=config.load(root), jobs=jobs)
        except BuildError as err:
            logfile = None if err.log is None else os.fspath(err.log)
            db.put(
                Record(
                    source.name,
                    source.version,
                    release,
                    arch,
                    State.FAILED,
                    log=logfile,
                    detail=err.problem,
                )
            )
            raise
        old = db.record(source.name, source.version, release)
        if old is None or old.state not in (State.INSTALLED, State.INSTALLED_WEAK):
            db.put(
                Record(
                    source.name,
                    source.version,
                    release,
                    arch,
                    State.BUILT,
                    log=os.fspath(result.log),
                    detail="built, not installed",
                )
            )
    return Outcome(
        result.conf.name,
        result.conf.version,
        release,
        Action.BUILD,
        State.BUILT,
        "built",
        result.log,
    )


def install_source(root: Root, spec: str, release: str, options: Options) -> list[Outcome]:
    source = find_source(root, spec)
    return autoinstall(root, release, _only(options, source.name))


def _only(options: Options, name: str) -> Options:
    return Options(options.jobs, options.initrd, frozenset({name}), options.avoid_kernels)


def uninstall(root: Root, spec: str, release: str, options: Options) -> list[Outcome]:
    """Remove NAME from KVER; kernels that weak-linked to it get another build."""
    source = find_source(root, spec)
    with store.lock(root), Store.open(root) as db:
        record = db.record(source.name, source.version, release)
        if record is None or not record.files:
            return []  # asking for what is already so is success
        install.remove_files(root, list(record.files))
        db.put(
            Record(
                source.name,
                source.version,
                release,
                record.arch,
                State.ADDED,
                detail="uninstalled",
            )
        )
        dependants = [r.kernel for r in db.records(name=source.name) if r.weak_from == release]
    install.depmod(root, release)
    _post_remove(root, source, release)
    outcomes = []
    for other in dependants:
        outcomes += autoinstall(root, other, _only(options, source.name))
    return outcomes


def _post_remove(root: Root, source: SourceDir, release: str) -> None:
    """The source's POST_REMOVE, as DKMS runs it after a remove; a failure is said."""
    try:
        conf = plan.evaluate_for(root, source, kernel.find(root, release))
        builder.source_hook(
            root, conf, release, "POST_REMOVE", timeout=config.load(root).build_timeout
        )
    except KmoddError as err:
        log.warning("POST_REMOVE not run or failed", module=source.name, kver=release,
                    problem=str(err))  # fmt: skip


def remove_kernel(root: Root, release: str, options: Options) -> list[Outcome]:
    """Forget KVER: first give the kernels that weak-link into it another build, then
    remove what kmodd installed for it, so no link is ever left dangling."""
    with store.lock(root), Store.open(root) as db:
        dependants: dict[str, set[str]] = {}
        for r in db.records():
            if r.weak_from == release and r.kernel != release:
                dependants.setdefault(r.kernel, set()).add(r.name)
    outcomes = []
    for other, names in sorted(dependants.items()):
        avoid = options.avoid_kernels | {release}
        outcomes += autoinstall(
            root, other, Options(options.jobs, options.initrd, frozenset(names), avoid)
        )
    with store.lock(root), Store.open(root) as db:
        for r in db.records(kernel=release):
            install.remove_files(root, list(r.files))
        db.delete_kernel(release)
    log.info("kernel removed", kver=release)
    return outcomes


def adopt(root: Root, name: str, options: Options) -> list[Outcome]:
    """Take over from DKMS: kmodd may now replace what DKMS installed for NAME."""
    source = find_source(root, name)
    kernels = dkms_compat.dkms_modules(root, source.name)
    with store.lock(root), Store.open(root) as db:
        db.add_source(source.name, source.version, root.outside(source.path))
        if db.set_adopted(source.name) == 0:
            raise UsageError(f"{name}: not a known source")
    outcomes = []
    for release in kernels:
        if release in kernel.installed_releases(root):
            done = autoinstall(root, release, _only(options, source.name))
            if any(o.state in (State.INSTALLED, State.INSTALLED_WEAK) for o in done):
                arch = kernel.find(root, release).arch or os.uname().machine
                dkms_compat.drop_claim(root, source.name, release, arch)
            outcomes += done
    return outcomes


def forget_source(root: Root, spec: str) -> list[str]:
    """The source NAME (or only NAME/VERSION) left /usr/src: remove what kmodd installed
    of it, everywhere, but the files another version of it now owns (an upgrade put the
    new build where the old one was). Returns the kernels whose trees changed (depmod
    has run for each)."""
    name, _, version = spec.partition("/")
    with store.lock(root), Store.open(root) as db:
        everything = db.records(name=name)
        gone = [r for r in everything if not version or r.version == version]
        owned = {f for r in everything if r not in gone for f in r.files}
        changed = sorted({r.kernel for r in gone if r.files})
        for r in gone:
            install.remove_files(root, [f for f in r.files if f not in owned])
            db.delete(r.name, r.version, r.kernel)
    installed = set(kernel.installed_releases(root))
    for release in changed:
        if release in installed:
            install.depmod(root, release)
    return changed
