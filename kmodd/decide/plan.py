"""For one kernel: what to do with every module source, and why.

weak-link (a build installed for another kernel is reusable), build, excluded
(BUILD_EXCLUSIVE_*), waiting-for-headers, up-to-date, managed-by-dkms, or failed
(the dkms.conf itself is broken).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from kmodd.base.errors import KmoddError
from kmodd.base.paths import Root
from kmodd.decide import verdict
from kmodd.state import known
from kmodd.state.states import State
from kmodd.state.store import Store, files_present
from kmodd.world import buildkey, config, dkms_tree, dkmsconf, kernel, registry
from kmodd.world.dkmsconf import SourceConfig, SourceDir


class Action(StrEnum):
    BUILD = "build"
    WEAK = "weak-link"
    EXCLUDED = "excluded"
    WAIT = "waiting-for-headers"
    UP_TO_DATE = "up-to-date"
    DKMS = "managed-by-dkms"
    FAILED = "failed"


@dataclass(frozen=True)
class Decision:
    source: SourceDir
    kernel: str
    action: Action
    reason: str
    conf: SourceConfig | None = None
    weak_from: str | None = None
    weak_files: tuple[Path, ...] = ()
    verdicts: tuple[verdict.Verdict, ...] = field(default=(), repr=False)

    @property
    def name(self) -> str:
        return self.conf.name if self.conf else self.source.name

    @property
    def version(self) -> str:
        return self.conf.version if self.conf else self.source.version

    def json(self) -> dict[str, str]:
        return {
            "name": self.name,
            "version": self.version,
            "kernel": self.kernel,
            "action": self.action.value,
            "reason": self.reason,
            "weak_from": self.weak_from or "",
        }


def evaluate_for(root: Root, source: SourceDir, k: kernel.Kernel) -> SourceConfig:
    """`source`'s dkms.conf as it reads for kernel `k` (not for building: no work dir)."""
    return dkmsconf.evaluate(
        root,
        source.path / "dkms.conf",
        kernel=k.release,
        arch=k.arch or "unknown",
        kernel_source_dir=k.build_dir or k.modules_dir / "build",
        dkms_tree=root.work_dir / "plan",
        sandbox=config.load(root).sandbox(root, source.name),
    )


def plan_kernel(
    root: Root,
    store: Store,
    k: kernel.Kernel,
    sources: list[SourceDir],
    *,
    autoinstall_only: bool = True,
    avoid_kernels: frozenset[str] = frozenset(),
    ask_cache: bool = True,
) -> list[Decision]:
    """Decide for each of `sources`; `avoid_kernels` are never weak-link sources. With
    `ask_cache`, a build's reason says whether the module cache has it (a registry
    request per build: `plan` shows it; autoinstall asks when it builds)."""
    planner = _Planner(root, store, k, avoid_kernels, ask_cache)
    decisions = []
    for source in sources:
        decision = planner.decide(source)
        if decision is not None and (
            not autoinstall_only or decision.conf is None or decision.conf.autoinstall
        ):
            decisions.append(decision)
    return decisions


class _Planner:
    def __init__(
        self, root: Root, store: Store, k: kernel.Kernel, avoid: frozenset[str], ask_cache: bool
    ):
        self.root, self.store, self.k, self.avoid = root, store, k, avoid
        self.ask_cache = ask_cache
        self._target: verdict.Target | None = None
        self._target_problem: str | None = None

    def target(self) -> verdict.Target | None:
        if self._target is None and self._target_problem is None:
            try:
                exports = known.exports(self.root, self.k, write=not self.store.readonly)
            except KmoddError as err:
                self._target_problem = str(err)
            else:
                self._target = verdict.Target(
                    self.k.release, exports, self.k.vermagic_flags, self.k.arch
                )
        return self._target

    def decide(self, source: SourceDir) -> Decision | None:
        k = self.k
        try:
            conf = evaluate_for(self.root, source, k)
        except KmoddError as err:
            return Decision(source, k.release, Action.FAILED, str(err))

        def decision(action: Action, reason: str) -> Decision:
            return Decision(source, k.release, action, reason, conf)

        excluded = conf.exclusion(k.config)
        if excluded:
            return decision(Action.EXCLUDED, excluded)
        dkms_version = dkms_tree.installed_by_dkms(self.root, conf.name, k.release, conf.arch)
        if dkms_version and not self.store.adopted(conf.name):
            return decision(
                Action.DKMS,
                f"DKMS installed {conf.name}/{dkms_version} for {k.release}; "
                f"`kmodctl adopt -m {conf.name}` takes it over",
            )
        record = self.store.record(conf.name, conf.version, k.release)
        if record and record.state in (State.INSTALLED, State.INSTALLED_WEAK):
            weak_ok = record.weak_from not in self.avoid
            if files_present(self.root, record) and weak_ok:
                return decision(Action.UP_TO_DATE, f"already {record.state}")
        weak = None if conf.no_weak_modules else self._weak_candidate(conf)
        if isinstance(weak, Decision):
            return weak
        if k.build_dir is None:
            return decision(Action.WAIT, f"no headers for {k.release} (no build dir)")
        why = weak or ("NO_WEAK_MODULES=yes" if conf.no_weak_modules else "no build to reuse")
        cached = self._in_cache(conf) if self.ask_cache else None
        if cached:
            why += f"; the module cache has it ({cached}): pulled instead, once it checks out"
        return decision(Action.BUILD, why)

    def _in_cache(self, conf: SourceConfig) -> str | None:
        """Where the module cache holds `conf`'s build for this kernel, if it does: an
        imported artefact, or the registry's (asked once per plan, within its timeout)."""
        settings = config.load(self.root)
        imported = self.root.state_dir / "cache"
        if settings.registry is None and not imported.is_dir():
            return None
        try:
            key = buildkey.compute(self.root, conf, self.k, settings)
        except (KmoddError, OSError):
            return None
        if (imported / key.digest / "index.json").is_file():
            return f"imported {key.digest[:12]}"
        if settings.registry is None:
            return None
        ref = settings.registry.reference(conf.name, key.digest)
        try:
            return ref if registry.client(settings.registry).manifest(ref) is not None else None
        except registry.RegistryError:
            return None

    def _weak_candidate(self, conf: SourceConfig) -> Decision | str | None:
        """A weak-link decision, or the reason none is possible."""
        candidates = [
            r
            for r in self.store.records(name=conf.name)
            if r.version == conf.version
            and r.kernel != self.k.release
            and r.kernel not in self.avoid
            and r.state is State.INSTALLED
            and files_present(self.root, r)
        ]
        if not candidates:
            return None
        target = self.target()
        if target is None:
            return f"cannot judge reuse: {self._target_problem}"
        reasons = []
        for record in sorted(candidates, key=lambda r: kernel.version_key(r.kernel), reverse=True):
            files = [self.root.real(f) for f in record.files]
            try:
                verdicts = verdict.judge(known.modules(self.store, files), target)
            except KmoddError as err:
                reasons.append(f"{record.kernel}: {err}")
                continue
            if all(v.reusable for v in verdicts):
                return Decision(
                    SourceDir(conf.name, conf.version, conf.source_dir),
                    self.k.release,
                    Action.WEAK,
                    f"the build for {record.kernel} is reusable",
                    conf,
                    weak_from=record.kernel,
                    weak_files=tuple(files),
                    verdicts=tuple(verdicts),
                )
            first = next(v for v in verdicts if not v.reusable)
            reasons.append(f"{record.kernel}: {first.module.name}: {first.reasons[0]}")
        return "no reusable build (" + "; ".join(reasons) + ")"


def chosen_sources(root: Root) -> list[dkmsconf.SourceDir]:
    """The version of each source in /usr/src that a kernel gets: the one pinned in
    kmodd.conf (`pin.NAME`), else the newest."""
    return dkmsconf.newest(dkmsconf.find_sources(root), config.load(root).pins)


def plan_for(root: Root, release: str) -> list[Decision]:
    """`plan_kernel` for each source's chosen version, with its own view of the store."""
    k = kernel.find(root, release)
    with Store.open(root, readonly=True) as db:
        return plan_kernel(root, db, k, chosen_sources(root))
