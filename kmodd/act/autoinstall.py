"""Bringing one kernel up to date: plan, weak-link, build in parallel, install, depmod
once, and remake the initrd when a REMAKE_INITRD module changed.

The same code path serves `kmodctl autoinstall`, the kernel hooks and the service.
A failure is recorded with its log and never stops the other modules.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmodd.act import artefact, builder, cache, devices, initrd, install, schedule
from kmodd.act.outcome import Outcome
from kmodd.base import fsutil
from kmodd.base.errors import BuildError, CancelledError, KmoddError
from kmodd.base.jobserver import Jobserver
from kmodd.base.log import bind, get_logger
from kmodd.base.paths import Root
from kmodd.decide import reuse, verdict
from kmodd.decide.plan import Action, Decision, plan_kernel
from kmodd.state import known, store
from kmodd.state.states import State
from kmodd.state.store import Record, Store, files_present
from kmodd.world import buildkey, config, dkmsconf, kernel, modfile

log = get_logger(__name__)

_RECORDED = {
    Action.EXCLUDED: State.EXCLUDED,
    Action.WAIT: State.WAITING,
    Action.DKMS: State.DKMS,
    Action.FAILED: State.FAILED,
}


@dataclass(frozen=True)
class Options:
    jobs: int = os.cpu_count() or 1
    """Jobs the machine runs at once, when no `jobserver` is given."""
    jobserver: Jobserver | None = None
    """The one jobserver every build takes its job slots from (the service's, or
    kmodctl's); None: one of `jobs` tokens for this run."""
    initrd: bool = True
    only: frozenset[str] | None = None
    """Only these source names (default: every source with AUTOINSTALL=yes)."""
    avoid_kernels: frozenset[str] = frozenset()
    pins: Mapping[str, str] = field(default_factory=dict)
    """Versions to install instead of the newest, over kmodd.conf's `pin.NAME`."""
    cancel: threading.Event | None = None
    """Set: running builds are killed, none starts, the run ends with CancelledError."""


def autoinstall(root: Root, release: str, options: Options = Options()) -> list[Outcome]:
    with store.lock(root), Store.open(root) as db:
        return _Run(root, db, kernel.find(root, release), options).run()


class _Run:
    def __init__(self, root: Root, db: Store, k: kernel.Kernel, options: Options) -> None:
        self.root, self.db, self.k, self.options = root, db, k, options
        self.arch = k.arch or os.uname().machine
        self.config = config.load(root)
        self.cache = cache.Cache(root, self.config)
        self.changed = False
        self.remake_initrd = False
        self.installed_now: list[Path] = []
        self.relinked: set[str] = set()
        """Other kernels whose weak links this run took away: depmod runs for them too."""
        self.outcomes: list[Outcome] = []
        self.before: dict[str, Record | None] = {}
        """Each build's record before it started: what a cancel puts back."""
        self.jobserver: Jobserver | None = None
        self._target: verdict.Target | None = None
        self._target_lock = threading.Lock()
        self._urgencies: dict[str, tuple[object, ...]] = {}
        self.contested: list[tuple[Decision, builder.BuildResult | None]] = []
        """Weak links and builds whose module name another source had installed when
        they were ready: settled once every build of the run is done, so a conflict
        names the version installed at the end, whatever order the builds finished in."""

    @property
    def _pending(self) -> Path:
        """Exists while a change for this kernel waits for depmod (and the initrd): a run
        killed in between leaves it, and the next run finishes the job."""
        return self.root.entry(self.root.state_dir / "pending" / self.k.release)

    def run(self) -> list[Outcome]:
        if self._pending.exists():
            self.changed = True
            self.remake_initrd = self._pending.read_text().strip() == "initrd"
        sources = dkmsconf.find_sources(self.root)
        self._forget_gone(sources)
        added = {
            (s.name, s.version)
            for s in sources
            if self.db.add_source(s.name, s.version, self.root.outside(s.path))
        }
        sources = dkmsconf.newest(sources, {**self.config.pins, **self.options.pins})
        if self.options.only is not None:
            sources = [s for s in sources if s.name in self.options.only]
        decisions = plan_kernel(
            self.root,
            self.db,
            self.k,
            sources,
            autoinstall_only=self.options.only is None,
            avoid_kernels=self.options.avoid_kernels,
            ask_cache=False,
        )
        for decision in decisions:  # DKMS runs POST_ADD at `dkms add`: here, when first seen
            if decision.conf and (decision.source.name, decision.source.version) in added:
                self._said_hook(decision.conf, "POST_ADD")
        builds = []
        for decision in decisions:
            if decision.action is Action.BUILD:
                builds.append(decision)
            elif decision.action is Action.WEAK:
                self._link(decision)
            else:
                self._note(decision)
        self._build_all(builds)
        self._settle_contested()
        for other in sorted(self.relinked):
            install.depmod(self.root, other)
        if self.changed:
            install.depmod(self.root, self.k.release)
            if self.remake_initrd and self.options.initrd:
                initrd.remake(self.root, self.db, self.k.release)
            self._pending.unlink(missing_ok=True)
        if self.installed_now and self.k.release == os.uname().release:
            devices.load_for_present_devices(self.root, self.installed_now)
        return self.outcomes

    def _forget_gone(self, sources: Sequence[dkmsconf.SourceDir]) -> None:
        """Records of versions whose dir has left /usr/src and that installed nothing
        (a failure, a wait, an exclusion) describe nothing left on the machine: they go,
        with the version's row once no record needs it. A gone version's installed
        files stay (and its records) until a newer version replaces them or it is
        uninstalled: a module that works is never taken away because a dir went."""
        present = {(s.name, s.version) for s in sources}
        gone: set[tuple[str, str]] = set()
        for r in self.db.records():
            if (r.name, r.version) not in present:
                gone.add((r.name, r.version))
                if not r.files:
                    self.db.delete(r.name, r.version, r.kernel)
        for name, version in sorted(gone):
            if not any(r.version == version for r in self.db.records(name=name)):
                self.db.remove_source(name, version)

    # one decision at a time -------------------------------------------------------------

    def _save(self, d: Decision, state: State, **fields: Any) -> None:
        """Record `state` for `d`'s source on this kernel."""
        self.db.put(Record(d.name, d.version, d.kernel, self.arch, state, **fields))

    def _say(
        self,
        d: Decision,
        state: State | None,
        detail: str,
        log: Path | None = None,
        weak_from: str | None = None,
    ) -> None:
        self.outcomes.append(
            Outcome(d.name, d.version, d.kernel, d.action, state, detail, log, weak_from)
        )

    def _note(self, d: Decision) -> None:
        if d.action is Action.UP_TO_DATE:
            # what is installed, said as its fate: the job that did it may have been
            # another (the watcher's), and the admin reading apt's output wants the fate
            now = self.db.record(d.name, d.version, d.kernel)
            if now is not None:
                logfile = Path(now.log) if now.log else None
                self._say(d, now.state, d.reason, logfile, now.weak_from)
                return
        state = _RECORDED.get(d.action)
        if state is not None:
            old = self.db.record(d.name, d.version, d.kernel)
            if old and old.files and d.action is Action.EXCLUDED:
                self._retire(old)
            self._save(d, state, detail=d.reason)
        self._say(d, state, d.reason)

    def _link(self, d: Decision) -> None:
        assert d.conf is not None
        if self._claimed_by_another(d, d.weak_files):
            self.contested.append((d, None))
            return
        try:
            self._install_hook(d.conf, "PRE_INSTALL")
        except BuildError as err:
            self._failed(d, err.problem, err.log)
            return
        old = self._about_to_write(
            d, [install.weak_link_path(self.k, d.name, f.name) for f in d.weak_files]
        )
        links = install.link_weak(self.root, self.k, d.name, list(d.weak_files))
        self.installed_now += links
        files = tuple(self.root.outside(p) for p in links)
        if old:
            self._retire(old, keep=files)
        self._save(
            d,
            State.INSTALLED_WEAK,
            weak_from=d.weak_from,
            detail=d.reason,
            files=files,
            remake_initrd=d.conf.remake_initrd,
        )
        self._changed(d.conf.remake_initrd)
        self._replace_other_versions(d, files)
        self._said_hook(d.conf, "POST_INSTALL")
        self._say(d, State.INSTALLED_WEAK, d.reason, weak_from=d.weak_from)

    def _install_hook(self, conf: dkmsconf.SourceConfig, which: str) -> None:
        builder.source_hook(
            self.root, conf, self.k.release, which, timeout=self.config.build_timeout
        )

    def _said_hook(self, conf: dkmsconf.SourceConfig, which: str) -> None:
        """POST_INSTALL, POST_ADD: as with DKMS, a failure is said but undoes nothing."""
        try:
            self._install_hook(conf, which)
        except BuildError as err:
            log.warning(f"{which} failed", module=conf.name, kver=self.k.release,
                        problem=err.problem, log=os.fspath(err.log or ""))  # fmt: skip

    def _claimed_by_another(self, d: Decision, modules: Sequence[Path]) -> str | None:
        """Another source's module of the same name already in place for this kernel: a
        conflict to report, never a silent overwrite (nor, later, an uninstall of one
        that deletes the other's file). Asked in this run's one finishing thread."""
        names = {modfile.module_name(m) for m in modules}
        for other in self.db.records(kernel=d.kernel):
            if other.name == d.name or other.state not in (State.INSTALLED, State.INSTALLED_WEAK):
                continue
            clash = sorted(names & {modfile.module_name(Path(f)) for f in other.files})
            if clash and files_present(self.root, other):
                return (
                    f"conflict: module {', '.join(clash)} is already installed by "
                    f"{other.name}/{other.version} for {d.kernel}; uninstall one of the two"
                )
        return None

    def _replace_other_versions(self, d: Decision, files: tuple[str, ...]) -> None:
        """`d`'s version is now the one installed for this kernel: the other versions'
        records and files go in the same step, and a weak link another kernel made to
        the build that was here is taken away (it would now load a build never judged
        for that kernel), recorded as to be judged again."""
        replaced = False
        for other in self.db.records(name=d.name, kernel=d.kernel):
            if other.version != d.version:
                self._retire(other, keep=files)
                self.db.delete(other.name, other.version, other.kernel)
                replaced = True
        if not replaced:
            return
        for stale in self.db.records(name=d.name):
            if stale.weak_from == d.kernel and stale.version != d.version:
                install.remove_files(self.root, list(stale.files))
                why = (
                    f"its weak link went to {d.kernel}'s build, now {d.name}/{d.version}: "
                    f"to be judged again (kmodctl autoinstall -k {stale.kernel})"
                )
                self.db.put(
                    Record(stale.name, stale.version, stale.kernel, stale.arch, State.ADDED,
                           detail=why)
                )  # fmt: skip
                self.relinked.add(stale.kernel)
                outcome = Outcome(stale.name, stale.version, stale.kernel, Action.WEAK,
                                  State.ADDED, why)  # fmt: skip
                self.outcomes.append(outcome)

    def _retire(self, old: Record, keep: tuple[str, ...] = ()) -> None:
        install.remove_files(self.root, [f for f in old.files if f not in keep])
        self._changed(old.remake_initrd)

    def _changed(self, remake_initrd: bool) -> None:
        if not self.changed or (remake_initrd and not self.remake_initrd):
            fsutil.atomic_write(
                self.root, self._pending, b"initrd\n" if remake_initrd else b"depmod\n"
            )
        self.changed = True
        self.remake_initrd = self.remake_initrd or remake_initrd

    # builds ------------------------------------------------------------------------------

    def _build_all(self, builds: list[Decision]) -> None:
        """Build in parallel in BUILD_DEPENDS order, on the jobserver's tokens: the
        REMAKE_INITRD sources first among those ready, then the longest expected."""
        self.jobserver = self.options.jobserver or Jobserver(self.options.jobs)
        try:
            stopped = schedule.run(
                builds, self, self.jobserver, urgency=self._urgency, cancel=self.options.cancel
            )
        finally:
            if self.options.jobserver is None:
                self.jobserver.close()
        if stopped:
            raise CancelledError(f"cancelled: the builds for {self.k.release} were stopped")

    def _urgency(self, d: Decision) -> tuple[object, ...]:
        """Sorts first what should start first: initrd modules, then the longest build
        (as long as it took last time; never built: as long as its source's size says)."""
        if d.name not in self._urgencies:  # once: the ready list is sorted often
            expected = self.db.duration(d.name) or schedule.estimate(d.source.path)
            self._urgencies[d.name] = (not (d.conf and d.conf.remake_initrd), -expected)
        return self._urgencies[d.name]

    def _cache_target(self) -> verdict.Target:
        """This kernel's exports, what the module cache's finds are judged against: read
        once for the run's builds (indexed for the next run)."""
        with self._target_lock:
            if self._target is None:
                self._target = reuse.target_of(self.root, self.k, write=True)
            return self._target

    # schedule.Builds: what the scheduler calls -----------------------------------------

    def started(self, d: Decision) -> None:
        self.before[d.name] = self.db.record(d.name, d.version, d.kernel)
        self._keep_files(d, State.BUILDING, d.reason)

    def build(self, d: Decision) -> builder.BuildResult:
        """The module cache's build of `d` when it has one that checks out, else a
        build here (then pushed, when kmodd.conf says so)."""
        bind(module=d.name, kver=d.kernel)
        assert self.jobserver is not None
        key = self._key(d)
        if key is not None and d.conf is not None:
            cached = self.cache.fetch(key, d.conf, self.k, self._cache_target())
            if cached is not None:
                return cached
        result = builder.build(
            self.root,
            d.source,
            self.k,
            config=self.config,
            jobserver=self.jobserver,
            cancel=self.options.cancel,
        )
        if key is not None:
            artefact.remember_key(self.root, result.log.parent, key)
            self.cache.push(key, result, result.conf)
        return result

    def _key(self, d: Decision) -> buildkey.BuildKey | None:
        """What `d`'s build depends on, as the module cache's key (None: not keyed)."""
        if d.conf is None:
            return None
        try:
            return buildkey.compute(self.root, d.conf, self.k, self.config)
        except (KmoddError, OSError) as err:
            log.warning("build not keyed: the module cache is not asked", module=d.name,
                        problem=str(err))  # fmt: skip
            return None

    def failed(self, d: Decision, problem: str) -> None:
        self._failed(d, problem, None)

    def restore(self, d: Decision) -> None:
        """A cancelled build leaves the record as it was before (never `building`)."""
        old = self.before.get(d.name)
        if old is None:
            self.db.delete(d.name, d.version, d.kernel)
        else:
            self.db.put(old)

    def finish(self, d: Decision, future: Future[builder.BuildResult]) -> bool:
        return self._finish(d, future)

    def _finish(self, d: Decision, future: Future[builder.BuildResult]) -> bool:
        try:
            result = future.result()
        except BuildError as err:
            self._failed(d, err.problem, err.log)
            return False
        except (KmoddError, OSError) as err:
            self._failed(d, str(err), None)
            return False
        if self._claimed_by_another(d, [m.path for m in result.modules]):
            self.contested.append((d, result))
            return False  # what needs it waits for no outcome that may not come
        return self._install(d, result)

    def _install(self, d: Decision, result: builder.BuildResult) -> bool:
        if result.origin is None:  # a pull says nothing of how long a build takes
            self.db.put_duration(d.name, d.version, d.kernel, result.seconds)
        try:
            self._install_hook(result.conf, "PRE_INSTALL")
            old = self._about_to_write(d, install.build_targets(self.root, self.k, result))
            paths = install.install_build(self.root, self.k, result)
            files = tuple(self.root.outside(p) for p in paths)
            for built, path in zip(result.modules, paths, strict=True):
                known.remember(self.db, path, built.info)
        except BuildError as err:
            self._failed(d, err.problem, err.log)
            return False
        except (KmoddError, OSError) as err:
            self._owns_only_what_is_there(d)
            self._failed(d, str(err), None)
            return False
        self.installed_now += paths
        if old:
            self._retire(old, keep=files)
        remake = result.conf.remake_initrd
        self._save(
            d,
            State.INSTALLED,
            log=os.fspath(result.log),
            detail=f"from cache {result.origin}" if result.origin else "built",
            files=files,
            remake_initrd=remake,
        )
        self._changed(remake)
        self._replace_other_versions(d, files)
        self._said_hook(result.conf, "POST_INSTALL")
        said = f"from cache {result.origin}" if result.origin else "built and installed"
        self._say(d, State.INSTALLED, said, result.log)
        return True

    def _settle_contested(self) -> None:
        """Each contested module, now every build is done: still claimed by another
        source, a conflict naming the version that has it; else installed after all."""
        for d, result in self.contested:
            conflict = self._claimed_by_another(d, d.weak_files if result is None else
                                                [m.path for m in result.modules])  # fmt: skip
            if conflict:
                self._failed(d, conflict, None if result is None else result.log)
            elif result is None:
                self._link(d)
            else:
                self._install(d, result)

    def _about_to_write(self, d: Decision, targets: Sequence[Path]) -> Record | None:
        """Before a file or link is written: the record owns it already (with what
        it had), so a run killed in between leaves no file that no record owns; the
        next run finishes or replaces it. Returns the record as it was."""
        old = self.db.record(d.name, d.version, d.kernel)
        had = old.files if old else ()
        self._save(
            d,
            State.BUILDING if old is None else old.state,
            weak_from=old.weak_from if old else None,
            log=old.log if old else None,
            detail="installing",
            files=tuple(dict.fromkeys([*had, *(self.root.outside(t) for t in targets)])),
            remake_initrd=old.remake_initrd if old else False,
        )
        return old

    def _owns_only_what_is_there(self, d: Decision) -> None:
        """An install that failed half-way: the record keeps the files it has."""
        now = self.db.record(d.name, d.version, d.kernel)
        if now is not None:
            there = tuple(
                f for f in now.files if os.path.lexists(self.root.entry(self.root.path(f)))
            )
            self.db.put(dataclasses.replace(now, files=there))

    def _failed(self, d: Decision, problem: str, logfile: Path | None) -> None:
        self._keep_files(d, State.FAILED, problem, logfile)
        self._say(d, State.FAILED, problem, logfile)

    def _keep_files(
        self, d: Decision, state: State, detail: str, logfile: Path | None = None
    ) -> None:
        """A new state for `d`; what it had installed stays installed (and recorded)."""
        old = self.db.record(d.name, d.version, d.kernel)
        self._save(
            d,
            state,
            log=None if logfile is None else os.fspath(logfile),
            detail=detail,
            files=old.files if old else (),
            remake_initrd=old.remake_initrd if old else False,
        )
