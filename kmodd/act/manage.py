"""Changing what is installed, one source or one kernel at a time: build, install,
uninstall, remove a kernel, adopt from DKMS. All under the writers' lock."""

from __future__ import annotations

import dataclasses
import os

from kmodd.act import builder, initrd, install
from kmodd.act.autoinstall import Options, autoinstall
from kmodd.act.outcome import Outcome
from kmodd.base import fsutil
from kmodd.base.errors import BuildError, KmoddError, NotFoundError, UsageError
from kmodd.base.jobserver import Jobserver
from kmodd.base.log import get_logger
from kmodd.base.paths import Root
from kmodd.decide import plan
from kmodd.decide.plan import Action
from kmodd.state import store
from kmodd.state.states import State
from kmodd.state.store import Record, Store
from kmodd.world import config, dkms_tree, dkmsconf, kernel
from kmodd.world.dkmsconf import SourceDir

log = get_logger(__name__)


def find_source(root: Root, spec: str) -> SourceDir:
    """`NAME` or `NAME/VERSION` → the source in /usr/src (the newest version for NAME)."""
    name, _, version = spec.partition("/")
    matches = [s for s in dkmsconf.find_sources(root) if s.name == name]
    if version:
        matches = [s for s in matches if s.version == version]
    if not matches:
        raise NotFoundError(f"no module source {spec} in {root.outside(root.usr_src)}")
    return max(matches, key=lambda s: kernel.version_key(s.version))


def build_only(root: Root, spec: str, release: str, jobserver: Jobserver) -> Outcome:
    source = find_source(root, spec)
    k = kernel.find(root, release)
    arch = k.arch or os.uname().machine
    with store.lock(root), Store.open(root) as db:
        try:
            result = builder.build(root, source, k, config=config.load(root), jobserver=jobserver)
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
    """NAME (its pinned or newest version) or NAME/VERSION (that one, this time)."""
    source = find_source(root, spec)
    options = _only(options, source.name)
    if "/" in spec:
        options = dataclasses.replace(options, pins={source.name: source.version})
    return autoinstall(root, release, options)


def _only(options: Options, name: str) -> Options:
    return dataclasses.replace(options, only=frozenset({name}))


def weak_dependants(root: Root, release: str, name: str | None = None) -> dict[str, list[str]]:
    """Other kernels whose weak links go to `release`'s builds (of source `name`, or
    of any): kernel → source names. They need builds of their own before those go."""
    with Store.open(root, readonly=True) as db:
        found: dict[str, set[str]] = {}
        for r in db.records(name=name):
            if r.weak_from == release and r.kernel != release and r.files:
                found.setdefault(r.kernel, set()).add(r.name)
    return {k: sorted(v) for k, v in sorted(found.items())}


def uninstall(root: Root, spec: str, release: str, *, remake_initrd: bool = True) -> list[Outcome]:
    """Remove NAME from KVER, and from its initrd when it belongs there (unless told
    not to remake it). Weak links other kernels still have to its build are taken away
    with it (never left dangling), each an outcome of its own: those kernels need a
    verdict again (`weak_dependants` named them beforehand, so their own requests
    normally relinked them first)."""
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
        why = f"its weak link went to {source.name}'s build for {release}, now uninstalled"
        outcomes = _take_away(root, db, db.records(name=source.name), release, why)
        install.depmod(root, release)
        if record.remake_initrd and remake_initrd:
            initrd.remake(root, db, release)
    _post_remove(root, source, release)
    return outcomes


def _take_away(
    root: Root, db: Store, records: list[Record], release: str, why: str
) -> list[Outcome]:
    """Remove the weak links of `records` that go to `release`'s builds; each becomes
    an ADDED record and an outcome saying so; depmod runs for each kernel touched."""
    outcomes = []
    for r in records:
        if r.weak_from != release or r.kernel == release or not r.files:
            continue
        install.remove_files(root, list(r.files))
        said = f"{why}: to be judged again (kmodctl autoinstall -k {r.kernel})"
        db.put(Record(r.name, r.version, r.kernel, r.arch, State.ADDED, detail=said))
        outcomes.append(Outcome(r.name, r.version, r.kernel, Action.WEAK, State.ADDED, said))
    for other in sorted({o.kernel for o in outcomes}):
        install.depmod(root, other)
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


def remove_kernel(root: Root, release: str) -> list[Outcome]:
    """Forget KVER: remove what kmodd installed for it and its records. Weak links
    other kernels still have to its builds are taken away with it (never left
    dangling), each an outcome of its own (`weak_dependants` named them beforehand,
    so their own requests normally gave them builds of their own first)."""
    with store.lock(root), Store.open(root) as db:
        why = f"its weak link went to a build for {release}, which was removed"
        outcomes = _take_away(root, db, db.records(), release, why)
        for r in db.records(kernel=release):
            install.remove_files(root, list(r.files))
        db.delete_kernel(release)
        fsutil.remove(root, root.state_dir / "exports" / release)
    log.info("kernel removed", kver=release)
    return outcomes


def adopt(root: Root, name: str, options: Options) -> list[Outcome]:
    """Take over from DKMS: kmodd may now replace what DKMS installed for NAME."""
    source = find_source(root, name)
    kernels = dkms_tree.dkms_modules(root, source.name)
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
                dkms_tree.drop_claim(root, source.name, release, arch)
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
