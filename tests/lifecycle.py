"""The world of tests/test_lifecycle.py: a machine's kernels and module sources, and what
must hold of kmodd's work on it after every step.

kmodd is driven only through its command line (`python -m kmodd.edges.cli --root ROOT ...`),
never through its Python API, and never through a kmodd service on a system bus.

Builds are cheap: every (source version, kernel) is built once per test session with
real make against the kernel's real headers (`BuildCache`); the sources written into a
root say in their dkms.conf `MAKE[0]="cp CACHE/$kernelver/TAG/*.ko ."`, so kmodd runs
its whole pipeline (dkms.conf, private build dir, strip, compression, install, weak
links, depmod) while its `make` costs a copy. Each source version's modules carry
`MODULE_INFO(kmttag, "NAME/VERSION")`, so the file in place says which version it is.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import K56, K111, K113, MODSRC, host_headers, install_headers
from tests.oracles.kbuild import build_modules
from tests.sources import write_source

KERNELS = (K111, K113, K56)
# Debian compresses the modules of its 6.12 kernels with xz and not those of 6.1
MODULE_EXT = {K111: ".ko.xz", K113: ".ko.xz", K56: ".ko"}
SUBTREES = ("updates", "extra", "weak-updates")
INTREE_MODULES = ("kmt_kmalloc", "kmt_pkgc", "kmt_pkgd")  # the kernel's own, in kernel/
INTREE_TAG = "kernel/intree"
FILES_MISSING = "installed files are missing; autoinstall puts them back"
NO_BUS = "unix:path=/nonexistent"
CLI_TIMEOUT = 600.0


@dataclass(frozen=True)
class Source:
    name: str
    modules: tuple[str, ...]
    versions: tuple[str, ...]
    """Every version the test may put in /usr/src, oldest first in DKMS's order."""
    broken: frozenset[str] = frozenset()
    """Versions whose build fails (their make says an error and exits 1)."""

    def newest(self, present: Iterable[str]) -> str:
        return max(present, key=self.versions.index)


CATALOGUE: dict[str, Source] = {
    s.name: s
    for s in (
        # reusable across 6.12.111 <-> 6.12.113; 1.9 < 1.10 < 2.0 (DKMS's order, not text's)
        Source("kmt-base", ("kmt_simple",), ("1.9", "1.10", "2.0")),
        # another source that builds the same module name as kmt-base: a conflict
        Source("kmt-other", ("kmt_simple",), ("1.0",)),
        # two modules, the second uses the first: judged as one package
        Source("kmt-pair", ("kmt_pkga", "kmt_pkgb"), ("1.0",)),
        # not reusable across 6.12.111 <-> 6.12.113: every kernel builds; 2.0 fails
        Source("kmt-misc", ("kmt_misc",), ("1.0", "1.1", "2.0"), frozenset({"2.0"})),
    )
}
# each source -> the sources that build one of its module names (itself included)
SHARERS = {
    name: frozenset(o.name for o in CATALOGUE.values() if set(o.modules) & set(s.modules))
    for name, s in CATALOGUE.items()
}


def tag(name: str, version: str) -> str:
    return f"{name}/{version}"


def slug(tag_: str) -> str:
    return tag_.replace("/", "-")


def _module_tags() -> dict[str, tuple[str, ...]]:
    """Every tag built, with its modules: each working source version, and the kernel's
    own modules."""
    tags: dict[str, tuple[str, ...]] = {INTREE_TAG: INTREE_MODULES}
    for s in CATALOGUE.values():
        for v in s.versions:
            if v not in s.broken:
                tags[tag(s.name, v)] = s.modules
    return tags


ALL_TAGS = tuple(_module_tags())


# Builds -------------------------------------------------------------------------------


class BuildCache:
    """Every tag's modules built once with real make against each kernel's real headers:
    `<base>/ko/KVER/SLUG/MODULE.ko`."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.ko = base / "ko"
        assert re.fullmatch(r"[A-Za-z0-9_./+-]+", os.fspath(self.ko)), (
            f"the cache path {self.ko} goes into a dkms.conf between double quotes"
        )

    def build_all(self, kernels: Iterable[str]) -> int:
        jobs = [(k, t, mods) for k in kernels for t, mods in _module_tags().items()]
        with ThreadPoolExecutor(max_workers=2) as pool:
            for _ in pool.map(lambda job: self._build(*job), jobs):
                pass
        return len(jobs)

    def _build(self, kver: str, tag_: str, modules: tuple[str, ...]) -> None:
        src = self.base / "src" / kver / slug(tag_)
        src.mkdir(parents=True)
        for module in modules:
            for suffix in (".c", ".h"):
                if (MODSRC / f"{module}{suffix}").exists():
                    shutil.copy(MODSRC / f"{module}{suffix}", src)
            with (src / f"{module}.c").open("a") as c:
                c.write(f'MODULE_INFO(kmttag, "{tag_}");\n')
        for header in ("kmt_pkga.h", "kmt_pkgc.h"):
            shutil.copy(MODSRC / header, src)
        (src / "Kbuild").write_text("obj-m := " + " ".join(f"{m}.o" for m in modules) + "\n")
        built = build_modules(src, host_headers(kver), self.base / "out" / kver / slug(tag_), kver)
        dest = self.dir(kver, tag_)
        dest.mkdir(parents=True)
        for module in modules:
            shutil.copy(built[module], dest / f"{module}.ko")

    def dir(self, kver: str, tag_: str) -> Path:
        return self.ko / kver / slug(tag_)


# The world ----------------------------------------------------------------------------


def new_root(base: Path) -> Path:
    """A Debian-like root with no kernel and no source: os-release only."""
    root = base / "root"
    (root / "etc").mkdir(parents=True)
    shutil.copy("/etc/os-release", root / "etc/os-release")
    (root / "usr/src").mkdir(parents=True)
    (root / "lib/modules").mkdir(parents=True)
    return root


def add_kernel(root: Path, cache: BuildCache, kver: str) -> str:
    """Kernel KVER's packages installed: its full headers, the `build` link and a few of
    its own modules (real ones, built for it) in kernel/. Returns the hash of kernel/."""
    moddir = install_headers(root, kver, full=True)
    own = moddir / "kernel/drivers/test"
    own.mkdir(parents=True)
    for module in INTREE_MODULES:
        shutil.copy(cache.dir(kver, INTREE_TAG) / f"{module}.ko", own / f"{module}.ko")
    (moddir / "modules.order").write_text(
        "".join(f"kernel/drivers/test/{m}.ko\n" for m in INTREE_MODULES)
    )
    return tree_hash(moddir / "kernel")


def remove_kernel_files(root: Path, kver: str, *, keep: Iterable[str] = ()) -> None:
    """What removing the kernel's image and headers packages takes away: the kernel's own
    files in lib/modules/KVER (kernel/, modules.*, the build link), its headers and their
    common part. kmodd's updates/, extra/ and weak-updates/ are not the packages'."""
    moddir = root / "lib/modules" / kver
    if moddir.is_dir():
        for entry in moddir.iterdir():
            if entry.name in SUBTREES:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    remove_headers(root, kver, keep=keep)


def remove_headers(root: Path, kver: str, *, keep: Iterable[str] = ()) -> None:
    """The headers packages removed: linux-headers-KVER, its -common part and the
    linux-kbuild tree they use unless a kernel in `keep` uses it too (the build link
    stays)."""
    headers = root / "usr/src" / f"linux-headers-{kver}"
    common = root / "usr/src" / f"linux-headers-{kver.removesuffix('-amd64')}-common"
    trees = [headers, common]
    kbuild = _kbuild(kver)
    if all(_kbuild(other) != kbuild for other in keep if other != kver):
        trees.append(root / kbuild.relative_to("/"))
    for tree in trees:
        if tree.is_dir():
            shutil.rmtree(tree)


def _kbuild(kver: str) -> Path:
    """The host's linux-kbuild tree of kernel `kver` (as install_headers finds it)."""
    return (host_headers(kver) / "scripts").resolve().parent


def remove_empty_dirs(path: Path) -> None:
    """dpkg's last act for a package's dirs: rmdir each one that is empty, deepest first."""
    if not path.is_dir() or path.is_symlink():
        return
    for sub in path.iterdir():
        remove_empty_dirs(sub)
    if not any(path.iterdir()):
        path.rmdir()


def write_test_source(root: Path, cache: BuildCache, name: str, version: str) -> Path:
    source = CATALOGUE[name]
    if version in source.broken:
        make = (
            f"echo '{source.modules[0]}.c:1:1: error: broken on purpose (lifecycle test)' >&2;"
            " exit 1"
        )
    else:
        make = "cp -- prebuilt/$kernelver/*.ko ."
    src = write_source(
        root,
        name,
        version,
        modules=source.modules,
        extra=f'AUTOINSTALL="yes"\nMAKE[0]="{make}"\n',
    )
    # the cache's builds of this version go with the source: its make runs in kmodd's
    # sandbox, which shows it the root, not the cache beside it
    for built in cache.ko.glob(f"*/{slug(tag(name, version))}"):
        shutil.copytree(built, src / "prebuilt" / built.parent.name)
    return src


def tree_hash(path: Path) -> str:
    """Names, kinds, modes, link targets and contents of everything under `path`."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            entry = Path(dirpath) / name
            st = entry.lstat()
            digest.update(f"{entry.relative_to(path)}\0{st.st_mode:o}\0".encode())
            if entry.is_symlink():
                digest.update(os.fspath(entry.readlink()).encode())
            elif entry.is_file():
                digest.update(entry.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()


# The command line ---------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KMODD_ROOT"}
    env["DBUS_SYSTEM_BUS_ADDRESS"] = NO_BUS  # no kmodd service on a system bus, ever
    env["LC_ALL"] = "C"
    return env


def cli_argv(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "kmodd.edges.cli", "--root", os.fspath(root), *args]


def kmodctl(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_argv(root, *args),
        capture_output=True,
        text=True,
        check=False,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        timeout=CLI_TIMEOUT,
    )


def said(proc: subprocess.CompletedProcess[str]) -> str:
    return f"$ {' '.join(map(str, proc.args))}\nexit {proc.returncode}\n{proc.stdout}{proc.stderr}"


_OUTCOME = re.compile(
    r"^kmodd: (?P<name>[^/ ]+)/(?P<version>\S+) for (?P<kernel>\S+): (?P<fate>.*)$"
)


@dataclass(frozen=True)
class OutcomeLine:
    name: str
    version: str
    kernel: str
    fate: str


def outcomes(stdout: str) -> list[OutcomeLine]:
    found = []
    for line in stdout.splitlines():
        m = _OUTCOME.match(line)
        if m:
            found.append(OutcomeLine(m["name"], m["version"], m["kernel"], m["fate"]))
    return found


def check_changing_command(proc: subprocess.CompletedProcess[str]) -> list[OutcomeLine]:
    """autoinstall, install, uninstall, remove-kernel: exit 0, or 7 with a failed line;
    never a traceback. Returns the outcome lines."""
    lines = outcomes(proc.stdout)
    failed = [o for o in lines if o.fate.startswith("failed")]
    assert "Traceback" not in proc.stderr, said(proc)
    assert proc.returncode in (0, 7), said(proc)
    assert (proc.returncode == 7) == bool(failed), "exit 7 exactly when a line says failed\n" + (
        said(proc)
    )
    return lines


def power_off(pid: int) -> None:
    """SIGKILL the process group `pid` leads and every process descended from it (kmodd
    runs its commands in sessions of their own): stop them all first, so that none
    starts another in between, then kill them."""
    stopped: set[int] = set()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGSTOP)
    stopped.add(pid)
    while True:
        new = descendants(pid, stopped) - stopped
        if not new:
            break
        for p in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGSTOP)
        stopped |= new
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for p in stopped - {pid}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def descendants(pid: int, known: set[int]) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found = {pid} | known
    grew = True
    while grew:
        more = {p for p, pp in parents.items() if pp in found and p not in found}
        found |= more
        grew = bool(more)
    return found - {pid}


# Reading what is in place -------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One object of `kmodctl status --json`."""

    module: str
    version: str
    kernel: str
    state: str
    weak_from: str | None
    detail: str | None

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> Record:
        return cls(
            str(doc["module"]),
            str(doc["version"]),
            str(doc["kernel"]),
            str(doc["state"]),
            doc.get("weak_from") or None,
            doc.get("detail") or None,
        )

    @property
    def installed(self) -> bool:
        return self.state in ("installed", "installed-weak")

    def __str__(self) -> str:
        extra = f" from {self.weak_from}" if self.weak_from else ""
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.module}/{self.version} on {self.kernel}: {self.state}{extra}{detail}"


def status(root: Path) -> list[Record]:
    proc = kmodctl(root, "status", "--json")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, said(proc)
    return [Record.of(doc) for doc in json.loads(proc.stdout)]


_MODULE_FILE = re.compile(r"^(?P<stem>[^.][^/]*?)\.ko(?:\.xz|\.gz|\.zst)?$")


def module_stem(path: Path) -> str | None:
    m = _MODULE_FILE.match(path.name)
    return m["stem"] if m else None


def modinfo(path: Path) -> dict[str, str]:
    """`.modinfo` fields (the first of each) of a module file, read without modinfo(8)."""
    data = path.read_bytes()
    try:
        if path.name.endswith(".xz"):
            data = lzma.decompress(data)
        elif path.name.endswith(".gz"):
            data = gzip.decompress(data)
    except (lzma.LZMAError, EOFError, OSError) as err:
        raise AssertionError(f"{path} is not a whole module: {err}") from None
    assert data[:4] == b"\x7fELF", f"{path} is not a whole module (no ELF header)"
    fields: dict[str, str] = {}
    for m in re.finditer(rb"(?<=\0)(vermagic|kmttag|name)=([^\0]*)\0", data):
        fields.setdefault(m[1].decode(), m[2].decode(errors="replace"))
    return fields


def kmodd_entries(moddir: Path) -> Iterator[Path]:
    """Everything below updates/, extra/ and weak-updates/ that is not a directory (a
    link to a directory included)."""
    for sub in SUBTREES:
        top = moddir / sub
        if not top.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            for name in filenames:
                yield Path(dirpath) / name
            for name in dirnames:
                if (Path(dirpath) / name).is_symlink():
                    yield Path(dirpath) / name


def expected_files(root: Path, record: Record) -> dict[Path, str]:
    """The files an installed record stands for: dir/stem → module name (by stem, so the
    compression suffix is kmodd's to choose)."""
    moddir = root / "lib/modules" / record.kernel
    where = (
        moddir / "updates/dkms"
        if record.state == "installed"
        else moddir / "weak-updates" / record.module
    )
    return {where / m: m for m in CATALOGUE[record.module].modules}


def find_module(dir_stem: Path) -> list[Path]:
    if not dir_stem.parent.is_dir():
        return []
    return [
        p
        for p in dir_stem.parent.iterdir()
        if module_stem(p) == dir_stem.name and (p.is_symlink() or p.exists())
    ]


def depmod_problems(root: Path, kver: str) -> list[str]:
    depmod = shutil.which("depmod") or shutil.which("depmod", path="/usr/sbin:/sbin")
    assert depmod is not None
    symvers = root / "usr/src" / f"linux-headers-{kver}" / "Module.symvers"
    proc = subprocess.run(
        [depmod, "-b", os.fspath(root), "-n", "-e", "-E", os.fspath(symvers), kver],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    bad = [
        line
        for line in proc.stderr.splitlines()
        if "needs unknown symbol" in line or "disagrees about version" in line
    ]
    if proc.returncode != 0:
        bad.append(f"depmod exited {proc.returncode}: {proc.stderr.strip()}")
    return bad


def check_reusable(root: Path, kver: str, targets: list[Path]) -> tuple[bool, str]:
    proc = kmodctl(root, "check", "--json", "-k", kver, *map(os.fspath, targets))
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, said(proc)
    doc = json.loads(proc.stdout)
    verdicts = {m["path"]: m for m in doc["modules"]}
    ok = proc.returncode == 0 and all(m["reusable"] for m in verdicts.values())
    return ok, json.dumps(doc["modules"], indent=1)


def wait_or_power_off(proc: subprocess.Popen[bytes], delay: float) -> bool:
    """Let `proc` run `delay` seconds, then cut the power to it. True: it had finished."""
    try:
        proc.wait(timeout=delay)
        return True
    except subprocess.TimeoutExpired:
        pass
    power_off(proc.pid)
    proc.wait()
    return False
