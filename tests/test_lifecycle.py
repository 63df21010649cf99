"""A machine's whole life as a Hypothesis state machine: kernels come and go, module
sources are installed, upgraded, downgraded and removed, autoinstall runs for one kernel
or all, modules are installed and uninstalled, and autoinstall is killed (SIGKILL to it
and everything it started, as when the power goes) at random points. kmodd is driven
only through `python -m kmodd.edges.cli --root ROOT`, never through a service on a bus.

After every step:

0. the kernel dirs in lib/modules are the installed kernels, and every module file kmodd
   put there is a whole module built for that kernel (old or new, even after a kill);
5. each kernel's own kernel/ tree is byte-identical to what its package put there;

and on every kernel but one whose autoinstall was killed and has not completed since
(the next run must repair: until then the records may lag behind the files):

1. every file under updates/, extra/ and weak-updates/ belongs to exactly one record of
   `kmodctl status --json`, and every installed record's files exist and are that
   version's build (status --json does not list a record's files: they are derived
   from the record's state and the modules the test's dkms.conf names, and each module
   file says which source version it was built from in its .modinfo);
2. every weak link resolves, relatively, to the build of the installed record it was
   made from, and `kmodctl check -k KVER` judges each source's targets reusable;
3. at most one version of a source is installed per kernel; once autoinstall (or
   install) has run for the kernel since the source last changed there, the one
   installed is the newest version in /usr/src by DKMS's order, unless that one failed;
4. no two sources install one module name on a kernel; a failure is a broken build, or
   (once settled as in 3) a conflict naming the source that has the module installed;
6. depmod over the whole root finds every symbol, with the right version.

A failing invariant shows the records, the files and the whole example so far (a kill's
timing can make Hypothesis's replay of it differ). KMODD_SOAK=1 selects a longer profile
(bench/soak-lifecycle); KMODD_LIFECYCLE_STATS=FILE writes the run's counts there as JSON.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.conftest import require, require_tool
from tests.lifecycle import (
    CATALOGUE,
    FILES_MISSING,
    KERNELS,
    SHARERS,
    BuildCache,
    OutcomeLine,
    Record,
    add_kernel,
    check_changing_command,
    check_reusable,
    cli_argv,
    cli_env,
    depmod_problems,
    expected_files,
    find_module,
    kmodctl,
    kmodd_entries,
    modinfo,
    module_stem,
    new_root,
    remove_empty_dirs,
    remove_headers,
    remove_kernel_files,
    status,
    tag,
    tree_hash,
    wait_or_power_off,
    write_test_source,
)

_BASE = settings(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile("kmodd-lifecycle", _BASE, max_examples=15, stateful_step_count=12)
settings.register_profile(
    "kmodd-lifecycle-soak",
    _BASE,
    max_examples=int(os.environ.get("KMODD_SOAK_EXAMPLES", "40")),
    stateful_step_count=int(os.environ.get("KMODD_SOAK_STEPS", "30")),
)
PROFILE = settings.get_profile(
    "kmodd-lifecycle-soak" if os.environ.get("KMODD_SOAK") == "1" else "kmodd-lifecycle"
)
KILL_DELAY = st.floats(min_value=0.0, max_value=0.75)  # a run with cached builds takes < 1 s
ALL = "--all-kernels"
P = ParamSpec("P")
T = TypeVar("T")


@dataclass
class Stats:
    examples: int = 0
    steps: int = 0
    rules: Counter[str] = field(default_factory=Counter)
    kills_landed: int = 0
    kills_too_late: int = 0
    seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))

    def json(self) -> dict[str, object]:
        return {
            "examples": self.examples,
            "steps": self.steps,
            "rules": dict(sorted(self.rules.items())),
            "kills_landed": self.kills_landed,
            "kills_too_late": self.kills_too_late,
            "seconds": {k: round(v, 1) for k, v in sorted(self.seconds.items())},
        }


@dataclass
class Context:
    cache: BuildCache
    base: Path
    stats: Stats


def timed(
    fn: Callable[Concatenate[Lifecycle, P], None],
) -> Callable[Concatenate[Lifecycle, P], None]:
    """Count a rule's runs (an invariant's: not as steps) and the time they take."""

    def timed_fn(self: Lifecycle, /, *args: P.args, **kwargs: P.kwargs) -> None:
        stats = self.ctx.stats
        start = time.monotonic()
        if not fn.__name__.startswith("the_"):
            shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k != "data")
            self.step_no += 1
            self._remember(f"## step {self.step_no}: {fn.__name__}({shown})")
        try:
            fn(self, *args, **kwargs)
        finally:
            stats.seconds[fn.__name__] += time.monotonic() - start
            if not fn.__name__.startswith("the_"):
                stats.steps += 1
                stats.rules[fn.__name__] += 1

    functools.update_wrapper(timed_fn, fn)
    return timed_fn


class Lifecycle(RuleBasedStateMachine):
    """The machine's model: which kernels and source versions are installed, which
    (kernel, source) pairs kmodd has brought up to date since they last changed, and
    which kernels a killed run may have left half-done."""

    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self.ctx = ctx
        ctx.stats.examples += 1
        self.scratch = Path(tempfile.mkdtemp(prefix="machine-", dir=ctx.base))
        self.root = new_root(self.scratch)
        self.kernels: dict[str, str] = {}  # release -> hash of its kernel/ tree
        self.sources: dict[str, set[str]] = {name: set() for name in CATALOGUE}
        # (kernel, source) pairs autoinstall or install has brought up to date since the
        # last change to either
        self.settled: set[tuple[str, str]] = set()
        # kernels whose autoinstall was killed and has not completed since
        self.dirty: set[str] = set()
        self.step_no = 0
        self.history: list[str] = []  # the steps, what they drew, what kmodctl said

    def teardown(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    # helpers ----------------------------------------------------------------------

    def _kmodctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = kmodctl(self.root, *args)
        self._remember(f"$ kmodctl {' '.join(args)}  # exit {proc.returncode}\n{proc.stdout}")
        return proc

    def _remember(self, what: str) -> None:
        self.history.append(what.rstrip())

    def _draw(self, data: st.DataObject, strategy: st.SearchStrategy[T]) -> T:
        value = data.draw(strategy)
        self._remember(f"#   drew {value!r}")
        return value

    def _ran(self, proc: subprocess.CompletedProcess[str]) -> list[OutcomeLine]:
        lines = check_changing_command(proc)
        for line in lines:
            # a weak link another kernel had to a build this run replaced is taken
            # away, and that kernel judged again when its turn comes (README)
            if line.fate.startswith("removed"):
                self._unsettle(line.name, line.kernel)
        return lines

    def _autoinstall(self, target: str) -> None:
        args = ("--all-kernels",) if target == ALL else ("-k", target)
        self._ran(self._kmodctl("autoinstall", *args, "--no-initrd"))
        done = list(self.kernels) if target == ALL else [target]
        for kver in done:
            self.dirty.discard(kver)
            self.settled |= {(kver, name) for name in CATALOGUE}

    def _unsettle(self, name: str, kver: str | None = None) -> None:
        """NAME changed on KVER (None: on every kernel): it, and every source that
        builds a module NAME builds too, may need autoinstall there again."""
        touched = SHARERS[name]
        self.settled = {
            (k, n) for k, n in self.settled if n not in touched or kver not in (None, k)
        }

    def _present(self) -> list[tuple[str, str]]:
        return sorted((n, v) for n, vs in self.sources.items() for v in vs)

    def _absent(self) -> list[tuple[str, str]]:
        return [
            (n, v) for n, s in CATALOGUE.items() for v in s.versions if v not in self.sources[n]
        ]

    def _targets(self) -> list[str]:
        return [*sorted(self.kernels), ALL]

    # kernels ----------------------------------------------------------------------

    @precondition(lambda self: len(self.kernels) < len(KERNELS))
    @rule(data=st.data(), postinst=st.booleans())
    @timed
    def add_kernel(self, data: st.DataObject, postinst: bool) -> None:
        """The kernel's image and headers packages; with `postinst`, their hook runs
        `autoinstall -k KVER`."""
        kver = self._draw(data, st.sampled_from([k for k in KERNELS if k not in self.kernels]))
        self.kernels[kver] = add_kernel(self.root, self.ctx.cache, kver)
        self.settled = {(k, n) for k, n in self.settled if k != kver}
        if postinst:
            self._autoinstall(kver)

    @precondition(lambda self: bool(self.kernels))
    @rule(data=st.data(), order=st.sampled_from(["prerm", "headers-first", "files-first"]))
    @timed
    def remove_kernel(self, data: st.DataObject, order: str) -> None:
        """The kernel's packages removed: the image's prerm hook runs `remove-kernel`
        before dpkg takes the files away (`prerm`); the headers package went first
        (`headers-first`); or the files went before anyone told kmodd (`files-first`).
        Then dpkg removes the package dirs left empty: nothing may be left."""
        kver = self._draw(data, st.sampled_from(sorted(self.kernels)))
        if order == "headers-first":
            remove_headers(self.root, kver, keep=self.kernels)
        if order == "files-first":
            remove_kernel_files(self.root, kver, keep=self.kernels)
        self._ran(self._kmodctl("remove-kernel", kver, "--no-initrd"))
        remove_kernel_files(self.root, kver, keep=self.kernels)
        moddir = self.root / "lib/modules" / kver
        remove_empty_dirs(moddir)
        del self.kernels[kver]
        self.dirty.discard(kver)
        self.settled = {(k, n) for k, n in self.settled if k != kver}
        left = sorted(os.fspath(p.relative_to(moddir)) for p in moddir.rglob("*"))
        assert not moddir.exists(), f"remove-kernel {kver} left in {moddir}: {left}"

    # sources ----------------------------------------------------------------------

    @precondition(lambda self: bool(self._absent()))
    @rule(data=st.data(), postinst=st.booleans())
    @timed
    def add_source(self, data: st.DataObject, postinst: bool) -> None:
        """A source package installed (possibly beside another version of it); with
        `postinst`, its hook runs `autoinstall --all-kernels`."""
        name, version = self._draw(data, st.sampled_from(self._absent()))
        write_test_source(self.root, self.ctx.cache, name, version)
        self.sources[name].add(version)
        self._unsettle(name)
        if postinst:
            self._autoinstall(ALL)

    @precondition(lambda self: bool(self._present()))
    @rule(data=st.data())
    @timed
    def remove_source(self, data: st.DataObject) -> None:
        """A source package removed: its prerm uninstalls that version from every
        kernel, then its files go."""
        name, version = self._draw(data, st.sampled_from(self._present()))
        for kver in sorted(self.kernels):
            self._ran(self._kmodctl("uninstall", "-m", f"{name}/{version}", "-k", kver))
        shutil.rmtree(self.root / "usr/src" / f"{name}-{version}")
        self.sources[name].discard(version)
        self._unsettle(name)

    @precondition(
        lambda self: any(
            vs and len(vs) < len(CATALOGUE[n].versions) for n, vs in self.sources.items()
        )
    )
    @rule(data=st.data(), postinst=st.booleans())
    @timed
    def replace_source(self, data: st.DataObject, postinst: bool) -> None:
        """A source package upgraded or downgraded: dpkg replaces /usr/src/NAME-OLD with
        /usr/src/NAME-NEW; with `postinst`, the new package's hook runs
        `autoinstall --all-kernels`."""
        name, old = self._draw(
            data,
            st.sampled_from(
                [
                    (n, v)
                    for n, v in self._present()
                    if len(self.sources[n]) < len(CATALOGUE[n].versions)
                ]
            ),
        )
        new = self._draw(
            data,
            st.sampled_from([v for v in CATALOGUE[name].versions if v not in self.sources[name]]),
        )
        shutil.rmtree(self.root / "usr/src" / f"{name}-{old}")
        write_test_source(self.root, self.ctx.cache, name, new)
        self.sources[name] = (self.sources[name] - {old}) | {new}
        self._unsettle(name)
        if postinst:
            self._autoinstall(ALL)

    # kmodctl ----------------------------------------------------------------------

    @rule(data=st.data())
    @timed
    def autoinstall(self, data: st.DataObject) -> None:
        self._autoinstall(self._draw(data, st.sampled_from(self._targets())))

    @precondition(lambda self: bool(self.kernels) and bool(self._present()))
    @rule(data=st.data())
    @timed
    def install(self, data: st.DataObject) -> None:
        name = self._draw(data, st.sampled_from(sorted({n for n, _ in self._present()})))
        kver = self._draw(data, st.sampled_from(sorted(self.kernels)))
        self._ran(self._kmodctl("install", "-m", name, "-k", kver, "--no-initrd"))
        self._unsettle(name, kver)
        self.settled.add((kver, name))

    @precondition(lambda self: bool(self.kernels) and bool(self._present()))
    @rule(data=st.data())
    @timed
    def uninstall(self, data: st.DataObject) -> None:
        name, version = self._draw(data, st.sampled_from(self._present()))
        kver = self._draw(data, st.sampled_from(sorted(self.kernels)))
        self._ran(self._kmodctl("uninstall", "-m", f"{name}/{version}", "-k", kver))
        self._unsettle(name, kver)

    @rule(data=st.data(), delay=KILL_DELAY)
    @timed
    def kill_autoinstall(self, data: st.DataObject, delay: float) -> None:
        """`kill -9` of an autoinstall (and of everything it started) `delay` seconds in;
        the next run must repair what it left."""
        target = self._draw(data, st.sampled_from(self._targets()))
        args = ("--all-kernels",) if target == ALL else ("-k", target)
        argv = cli_argv(self.root, "autoinstall", *args, "--no-initrd")
        out = self.scratch / "killed.out"
        with out.open("wb") as sink:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=cli_env(),
                start_new_session=True,
            )
            finished = wait_or_power_off(proc, delay)
        text = out.read_text()
        fate = "finished first" if finished else f"killed after {delay:.3f} s"
        self._remember(f"$ kmodctl {' '.join(argv[5:])}  # {fate}\n{text}")
        if finished:
            self.ctx.stats.kills_too_late += 1
            self._ran(subprocess.CompletedProcess(argv, proc.returncode, text, text))
            for kver in list(self.kernels) if target == ALL else [target]:
                self.dirty.discard(kver)
                self.settled |= {(kver, name) for name in CATALOGUE}
            return
        self.ctx.stats.kills_landed += 1
        self.dirty = set(self.kernels)
        self.settled = set()

    # invariants -------------------------------------------------------------------

    @invariant()
    @timed
    def the_world_is_consistent(self) -> None:
        try:
            self._check_the_world()
        except AssertionError as err:
            raise AssertionError(f"{err}\n{self._scene()}") from None

    def _scene(self) -> str:
        """What an invariant's failure is shown with: the records, the files, and the
        whole example (a kill's timing can make Hypothesis's replay differ)."""
        lines = ["--- kmodctl status --json ---"]
        lines += [str(r) for r in status(self.root)]
        lines.append(f"--- files (kernels killed mid-run since: {sorted(self.dirty)}) ---")
        for kver in sorted(self.kernels):
            for entry in sorted(kmodd_entries(self.root / "lib/modules" / kver)):
                where = os.fspath(entry.relative_to(self.root))
                if entry.is_symlink():
                    lines.append(f"{where} -> {entry.readlink()}")
                else:
                    try:
                        lines.append(f"{where} ({modinfo(entry).get('kmttag', '?')})")
                    except (AssertionError, OSError) as err:
                        lines.append(f"{where} (unreadable: {err})")
        lines.append("--- the steps so far ---")
        lines += self.history
        return "\n".join(lines)

    def _check_the_world(self) -> None:
        root = self.root
        on_disk = {p.name for p in (root / "lib/modules").iterdir()}
        assert on_disk == set(self.kernels), f"kernel dirs {sorted(on_disk)}"
        for kver, digest in self.kernels.items():
            moddir = root / "lib/modules" / kver
            # 5: the kernel's own tree is untouched
            assert tree_hash(moddir / "kernel") == digest, f"{kver}: kernel/ was changed"
            # 0: every module file in place is whole and built for this kernel
            for entry in kmodd_entries(moddir):
                if module_stem(entry) is None or entry.is_symlink():
                    continue
                info = modinfo(entry)
                assert info.get("vermagic", "").startswith(f"{kver} "), (entry, info)
        records = status(root)
        clean = set(self.kernels) - self.dirty
        for kver in sorted(clean):
            mine = [r for r in records if r.kernel == kver]
            self._records_and_files(kver, mine)
            self._weak_links(kver, mine, records)
            self._versions(kver, mine)
            self._conflicts(kver, mine)
            problems = depmod_problems(root, kver)  # 6
            assert not problems, f"depmod for {kver}:\n" + "\n".join(problems)

    def _records_and_files(self, kver: str, mine: list[Record]) -> None:
        """1: files <-> records, each file that version's build."""
        moddir = self.root / "lib/modules" / kver
        missing = [str(r) for r in mine if r.detail == FILES_MISSING]
        assert not missing, f"records whose files are gone: {missing}"
        claims: dict[Path, list[Record]] = {}
        for r in mine:
            assert r.module in CATALOGUE, f"a record of an unknown source: {r}"
            if not r.installed:
                continue
            for dir_stem, module in expected_files(self.root, r).items():
                found = find_module(dir_stem)
                assert len(found) == 1, f"{r}: {module} is {[os.fspath(p) for p in found]}"
                assert found[0].exists(), f"{r}: {found[0]} -> {found[0].readlink()} dangles"
                claims.setdefault(found[0], []).append(r)
                info = modinfo(found[0])  # through a weak link: its target
                want = tag(r.module, r.version)
                assert info.get("kmttag") == want, f"{found[0]} is {info} for {r}"
        for entry in kmodd_entries(moddir):
            owners = claims.get(entry, [])
            where = os.fspath(entry.relative_to(self.root))
            assert len(owners) == 1, f"{where} belongs to {[str(o) for o in owners]}"

    def _weak_links(self, kver: str, mine: list[Record], records: list[Record]) -> None:
        """2: weak links resolve, relatively, to the build of the record they came from,
        and `check` judges each source's targets (one package) reusable for KVER."""
        moddir = self.root / "lib/modules" / kver
        weak = moddir / "weak-updates"
        if not weak.exists():
            return
        by_source: dict[str, list[Path]] = {}
        for entry in kmodd_entries(moddir):
            if not entry.is_relative_to(weak):
                continue
            where = os.fspath(entry.relative_to(self.root))
            assert entry.is_symlink(), f"{where} is not a link"
            assert not entry.readlink().is_absolute(), f"{where} is absolute"
            target = Path(os.path.realpath(entry))
            assert target.is_file(), f"{where} -> {entry.readlink()} dangles"
            modules = self.root / "lib/modules"
            assert target.is_relative_to(modules), f"{where} leads out of lib/modules"
            source = entry.relative_to(weak).parts[0]
            record = next(r for r in mine if r.module == source and r.installed)
            origin = target.relative_to(modules).parts[0]
            assert origin == record.weak_from, f"{where} -> {target} but {record}"
            built = [
                r
                for r in records
                if (r.module, r.version, r.kernel) == (source, record.version, origin)
            ]
            assert built and built[0].state == "installed", (
                f"{where}: {record}, but its origin is {[str(b) for b in built]}"
            )
            by_source.setdefault(source, []).append(target)
        for source, targets in sorted(by_source.items()):
            ok, verdict = check_reusable(self.root, kver, sorted(targets))
            assert ok, f"{kver} weak-links {source} to what check rejects: {verdict}"

    def _versions(self, kver: str, mine: list[Record]) -> None:
        """3: one version per source; the newest present once settled, unless it failed."""
        for name, source in CATALOGUE.items():
            installed = [r for r in mine if r.module == name and r.installed]
            assert len(installed) <= 1, f"{kver}: {[str(r) for r in installed]}"
            present = self.sources[name]
            if not present or (kver, name) not in self.settled:
                continue
            newest = source.newest(present)
            record = next((r for r in mine if (r.module, r.version) == (name, newest)), None)
            assert record is not None, f"status shows no {name}/{newest} for {kver}"
            if record.state == "failed":
                continue  # whether the failure is explained: _conflicts
            assert record.installed, (
                f"{kver} was brought up to date, but {record}; installed: "
                f"{[str(r) for r in installed]}"
            )

    def _conflicts(self, kver: str, mine: list[Record]) -> None:
        """4: one source per module name; a failure is a broken build or, once settled,
        a conflict with the source that has the module installed, of a version that is
        in /usr/src (one whose package removal uninstalled it everywhere is no failure)."""
        owner: dict[str, Record] = {}
        for r in mine:
            if not r.installed:
                continue
            for module in CATALOGUE[r.module].modules:
                assert module not in owner, f"{kver}: {module} from {owner[module]} and {r}"
                owner[module] = r
        for r in mine:
            if r.state != "failed":
                continue
            if (kver, r.module) in self.settled:
                assert r.version in self.sources[r.module], (
                    f"status shows a failure of {r}, whose dir is gone from /usr/src"
                )
            if r.version in CATALOGUE[r.module].broken:
                assert r.detail and "broken on purpose" in r.detail, str(r)
                continue
            if (kver, r.module) not in self.settled:
                continue  # said of a conflict that may be gone since
            explained = [
                f"conflict: module {m} is already installed by {o.module}/{o.version} for {kver}"
                for m in CATALOGUE[r.module].modules
                if (o := owner.get(m)) is not None and o.module != r.module
            ]
            assert any(r.detail and r.detail.startswith(e) for e in explained), (
                f"an unexplained failure: {r}"
            )


@pytest.fixture(scope="session")
def lifecycle_cache(tmp_path_factory: pytest.TempPathFactory) -> BuildCache:
    """Every source version of the catalogue really built for every kernel, once."""
    require_tool("make")
    require_tool("depmod")
    require_tool("strip")
    cache = BuildCache(tmp_path_factory.mktemp("lifecycle-kbuild"))
    cache.build_all(KERNELS)
    return cache


def test_a_machines_whole_life(lifecycle_cache: BuildCache, tmp_path: Path) -> None:
    require("/etc/os-release", Path("/etc/os-release").is_file())
    stats = Stats()
    ctx = Context(lifecycle_cache, tmp_path, stats)

    class Machine(Lifecycle):
        def __init__(self) -> None:
            super().__init__(ctx)

    try:
        run_state_machine_as_test(Machine, settings=PROFILE)
    finally:
        summary = json.dumps(stats.json())
        print(f"\nkmodd lifecycle: {summary}")
        out = os.environ.get("KMODD_LIFECYCLE_STATS")
        if out:
            Path(out).write_text(summary + "\n")
