"""Real Debian `*-dkms` sources built for one kernel: `kmodctl autoinstall` against
Debian's `dkms autoinstall`, side by side in one run on this machine.

    python bench/bench_sources.py [--evidence DIR] [--keep DIR] [--packages PKG...]

SOURCES (below) are Debian 12 `*-dkms` packages, downloaded into .cache/debs when
missing (`apt-get download`, as .ci/fetch-debs does) and unpacked into two temporary
trees holding the real headers of 6.1.0-56-amd64 (`tests.conftest.install_headers`):

  kmodd: `kmodctl --root TREE_A autoinstall -k KVER --no-initrd`, with kmodd's sandbox
         (bubblewrap, user kmodd-build, no network) as it ships;
  DKMS:  `dkms autoinstall -k KVER --sourcetree/--dkmstree/--installtree` into TREE_B,
         every source `dkms add`ed first (untimed).

Both sign with the same throw-away key (DKMS gets it through `mok_signing_key` and
`mok_certificate` in its environment, so it never makes /var/lib/dkms/mok.key), and
DKMS's `depmod -a KVER` runs as `depmod -b TREE_B -a KVER` (a `depmod` first in its
PATH), as kmodd's runs in its root: neither tool writes outside its tree.

For each tool: the wall time; the CPU time of everything it ran (user+sys,
`getrusage(RUSAGE_CHILDREN)` before and after, this process a child subreaper so that
what bwrap leaves to be reaped counts too); Σ CPU ÷ CPUs, "the machine's limit", the
wall time no scheduling could beat on this machine; how many sources ended installed
and which failed, with the first error of each log (kmodd: `kmodctl status --json`;
DKMS: `dkms status` and its make.log); when each of the longest builds started and
how long it took (kmodd's own record of build times; DKMS's make.log times).
`measure()` returns all of it (bench/run prints `Result.row()` as one table row).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.fspath(Path(__file__).resolve().parent.parent))

from tests.conftest import K56, install_headers
from tests.debs import DEBS, unpack_dkms_package

KERNEL = K56

SOURCES: tuple[str, ...] = (
    "acpi-call-dkms",  # acpi_call: call ACPI methods from userspace (laptop GPU/battery)
    "adv-17v35x-dkms",  # Advantech XR17V35x multiport PCIe serial cards, one module
    "apfs-dkms",  # linux-apfs-rw: Apple's APFS file system, read/write, one module
    "bbswitch-dkms",  # bbswitch: power off the discrete GPU of Optimus laptops
    "dahdi-dkms",  # DAHDI telephony cards (Asterisk): 32 modules, its own Makefile
    "ddcci-dkms",  # ddcci + ddcci-backlight: monitor brightness over DDC/CI (2 modules)
    "digimend-dkms",  # DIGImend graphics-tablet HID drivers (4 modules)
    "dm-writeboost-dkms",  # dm-writeboost: a log-structured device-mapper write cache
    "dpdk-kmods-dkms",  # DPDK's igb_uio: userspace I/O for NICs
    "evdi-dkms",  # evdi: DisplayLink's virtual DRM display, one module
    "falcosecurity-scap-dkms",  # Falco's scap: syscall capture for security monitoring
    "gost-crypto-dkms",  # Russian GOST ciphers and hashes for the crypto API (6 modules)
    "jool-dkms",  # Jool: SIIT and NAT64 translators, three Makefiles in sequence
    "langford-dkms",  # Langford DDS PCI board driver (2013 code), one module
    "nat-rtsp-dkms",  # RTSP conntrack and NAT helpers for netfilter (2 modules)
    "openvpn-dco-dkms",  # ovpn-dco: OpenVPN's data channel offload
    "rapiddisk-dkms",  # RapidDisk RAM disks and their block cache (2 modules)
    "rtpengine-kernel-dkms",  # xt_RTPENGINE: Sipwise rtpengine's in-kernel RTP forwarding
    "tp-smapi-dkms",  # ThinkPad SMAPI battery control and HDAPS (3 modules)
    "v4l2loopback-dkms",  # v4l2loopback: virtual video devices
    "vpoll-dkms",  # vpoll: a tiny char device that signals poll events on demand
    "xtables-addons-dkms",  # xtables-addons: 23 netfilter extensions from one Makefile
    "xtrx-dkms",  # Fairwaves XTRX software-defined radio, PCIe driver
    "openafs-modules-dkms",  # THE LONG ONE: OpenAFS client; ./configure probes the
    # kernel with ~100 test compiles, one after another, then builds openafs.ko
)
"""What is measured: every candidate that DKMS builds for 6.1.0-56-amd64 (openafs the
one long build); SKIPPED says why each other candidate is left out."""

SKIPPED: dict[str, str] = {
    "lttng-modules-dkms": "2.13.9 does not build for 6.1.0-56 with DKMS either: "
    "tracepoint-event-impl.h: conflicting types for 'trace_hrtimer_start' (6.1.0-56's "
    "hrtimer_start tracepoint has a third argument, was_armed); the long one is openafs",
    "librem-ec-acpi-dkms": "does not build for 6.1.0-56 with DKMS either: "
    "librem_ec_acpi.c:276: incompatible pointer type (acpi_battery_hook's add_battery "
    "took a hook argument in a later 6.1)",
    "openrazer-driver-dkms": "does not build for 6.1.0-56 with DKMS either: "
    "razerkbd_driver.c:3124: too few arguments to function 'hid_report_raw_event'",
    "iptables-netflow-dkms": "its PRE_BUILD ./configure needs the iptables binary and "
    "libxtables-dev (which the package Depends on), not installed here; fails with DKMS too",
    "lime-forensics-dkms": "no AUTOINSTALL in its dkms.conf: neither autoinstall builds it",
    "west-chamber-dkms": "its dkms.conf builds in /usr/src and /var/lib/dkms by absolute "
    "path (never in a temporary tree) and needs xtables-addons' source; not run at all",
}
"""Candidates (`apt-cache search -- '-dkms$'` on Debian 12) left out, and why."""

CANDIDATES: tuple[str, ...] = (
    "acpi-call-dkms", "adv-17v35x-dkms", "bbswitch-dkms", "dahdi-dkms", "ddcci-dkms",
    "digimend-dkms", "dm-writeboost-dkms", "dpdk-kmods-dkms", "evdi-dkms",
    "falcosecurity-scap-dkms", "gost-crypto-dkms", "iptables-netflow-dkms", "jool-dkms",
    "langford-dkms", "librem-ec-acpi-dkms", "vpoll-dkms", "lime-forensics-dkms", "apfs-dkms",
    "lttng-modules-dkms", "nat-rtsp-dkms", "openafs-modules-dkms", "openrazer-driver-dkms",
    "openvpn-dco-dkms", "rapiddisk-dkms", "rtpengine-kernel-dkms", "tp-smapi-dkms",
    "v4l2loopback-dkms", "xtables-addons-dkms", "xtrx-dkms",
)  # fmt: skip
"""Every candidate that may run in a temporary tree (`--packages all` tries them)."""

INSTALLED = ("installed", "installed-weak")


@dataclass(frozen=True)
class Run:
    """One tool's autoinstall of every source."""

    tool: str
    wall: float
    """Seconds, wall clock."""
    cpu: float
    """Seconds of user+sys CPU time of everything the tool ran (and waited for)."""
    cores: int
    exit_code: int
    installed: tuple[str, ...]
    """NAME/VERSION of each source installed for the kernel."""
    failed: dict[str, str]
    """NAME/VERSION → the first error of its log (or the state it was left in)."""
    output: str
    """What the tool printed (stdout and stderr)."""
    started: float = 0.0
    """When it started (time.time())."""
    builds: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    """NAME → (seconds after the start that its build began, seconds it took)."""

    @property
    def limit(self) -> float:
        """The machine's limit: Σ CPU ÷ CPUs, the least wall time this work could take."""
        return self.cpu / self.cores

    def summary(self) -> str:
        return (
            f"wall {self.wall:7.1f} s   CPU {self.cpu:7.1f} s   "
            f"the machine's limit (CPU ÷ {self.cores}) {self.limit:6.1f} s   "
            f"installed {len(self.installed)}, failed {len(self.failed)}"
        )

    def longest(self, count: int = 3) -> str:
        ranked = sorted(self.builds.items(), key=lambda item: -item[1][1])[:count]
        return ", ".join(f"{n} {took:.0f} s from {at:.0f} s" for n, (at, took) in ranked)


@dataclass(frozen=True)
class Result:
    kernel: str
    packages: tuple[str, ...]
    sources: tuple[str, ...]
    """NAME/VERSION of every source in both trees."""
    kmodd: Run
    dkms: Run

    def row(self) -> tuple[str, str, str, str]:
        """bench/run's table row: what, kmodd, reference, kmodd ÷ reference (wall)."""

        def cell(command: str, run: Run) -> str:
            return (
                f"{command} {run.wall:.1f} s (CPU {run.cpu:.1f} s, Σ CPU ÷ {run.cores} "
                f"{run.limit:.1f} s; {len(run.installed)} installed, {len(run.failed)} failed)"
            )

        what = (
            f"{len(self.sources)} real Debian `*-dkms` sources (openafs the long one) "
            f"built and installed for {self.kernel}, none built before: wall time (CPU "
            "user+sys of everything run; Σ CPU ÷ CPUs, the machine's limit)"
        )
        ratio = f"{self.kmodd.wall / self.dkms.wall:.2f}" if self.dkms.wall > 0 else "—"
        return (
            what,
            cell("`kmodctl autoinstall`", self.kmodd),
            cell("`dkms autoinstall`", self.dkms),
            ratio,
        )


def progress(text: str) -> None:
    print(f"bench_sources: {text}", file=sys.stderr, flush=True)


# the sources -------------------------------------------------------------------------------


def fetch_debs(packages: Sequence[str]) -> None:
    """Download the packages not in .cache/debs yet, as .ci/fetch-debs does: as root
    (apt's _apt sandbox user cannot write there), `apt-get update` once if it fails."""
    missing = [p for p in packages if not any(DEBS.glob(f"{p}_*.deb"))]
    if not missing:
        return
    progress(f"downloading {', '.join(missing)} into {DEBS}")
    DEBS.mkdir(parents=True, exist_ok=True)
    download = ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", *missing]
    if subprocess.run(download, cwd=DEBS, check=False).returncode != 0:
        subprocess.run(["apt-get", "-q", "update"], check=True)
        subprocess.run(download, cwd=DEBS, check=True)


_ASSIGN = re.compile(r"""^\s*PACKAGE_(NAME|VERSION)=["']?([^"'\s]+)""", re.MULTILINE)


def identity(source_dir: Path) -> str:
    """NAME/VERSION of a source dir, from its dkms.conf's literal PACKAGE_NAME and
    PACKAGE_VERSION (every candidate's are literal); else from the dir's name."""
    found = dict(_ASSIGN.findall((source_dir / "dkms.conf").read_text(errors="replace")))
    name = found.get("NAME") or source_dir.name.rpartition("-")[0]
    version = found.get("VERSION") or source_dir.name.removeprefix(f"{name}-")
    return f"{name}/{version}"


def make_tree(root: Path, packages: Sequence[str]) -> dict[str, str]:
    """A root with KERNEL's headers and every package's source; → NAME/VERSION → package."""
    (root / "etc").mkdir(parents=True)
    root.chmod(0o755)  # the build user reads it, as a real system's /usr/src
    shutil.copy("/etc/os-release", root / "etc/os-release")
    install_headers(root, KERNEL, full=True)
    return {identity(unpack_dkms_package(p, root)): p for p in packages}


def make_key(where: Path) -> tuple[Path, Path]:
    """A throw-away module signing key and its DER certificate, as DKMS makes its own."""
    key, cert = where / "mok.key", where / "mok.pub"
    subprocess.run(
        ["openssl", "req", "-new", "-x509", "-nodes", "-days", "36500", "-subj",
         "/CN=kmodd bench signing key", "-newkey", "rsa:2048", "-keyout", os.fspath(key),
         "-outform", "DER", "-out", os.fspath(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


def warm(root: Path) -> None:
    """Read the headers once, untimed, so that neither tool pays for a cold page cache."""
    for path in (root / "usr/src").rglob("*"):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                path.read_bytes()


# the tools ---------------------------------------------------------------------------------


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Adopt the orphans of what runs from here, so that their CPU time is counted.

    kmodd runs package code under `bwrap --unshare-pid`, whose outer process exits
    without waiting for the PID namespace's init (which reaps the whole build): without
    this, that init goes to the machine's init, and RUSAGE_CHILDREN misses every
    sandboxed build (measured: 0.4 s of CPU for two module builds that take 3.6 s)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def children() -> set[int]:
    """The PIDs of this process's children (adopted orphans included)."""
    found: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            found.update(int(pid) for pid in (task / "children").read_text().split())
    return found


def reap_orphans(ours: set[int], timeout: float = 60.0) -> None:
    """Wait for every child not in `ours` (what ran before the command, such as the
    fleet's registry): adopted orphans, whose CPU time joins RUSAGE_CHILDREN when reaped."""
    deadline = time.monotonic() + timeout
    while waiting := children() - ours:
        for pid in waiting:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        if time.monotonic() > deadline:
            progress(f"orphans still running after the command: {sorted(waiting)}; "
                     "their CPU is not counted")  # fmt: skip
            return
        time.sleep(0.01)


def timed(tool: str, argv: list[str], env: dict[str, str] | None = None) -> Run:
    """Run `argv`: its wall time, the CPU time of it and of everything it started, its
    output (the caller fills in the sources' outcomes)."""
    progress(f"{tool}: {' '.join(argv)}")
    ours = children()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    start = time.perf_counter()
    proc = subprocess.run(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
    )
    wall = time.perf_counter() - start
    reap_orphans(ours)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    progress(f"{tool}: exit {proc.returncode} after {wall:.1f} s (CPU {cpu:.1f} s)")
    return Run(tool, wall, cpu, os.cpu_count() or 1, proc.returncode, (), {}, proc.stdout,
               started)  # fmt: skip


def kmodctl(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "kmodd.edges.cli", "--root", os.fspath(root), *args]


def sign_like_dkms(root: Path, key: Path, cert: Path, more: str = "") -> None:
    """kmodd signs with the throw-away key DKMS is given (dkms_env); kmodd.conf gets
    `more` settings too."""
    (root / "etc/kmodd").mkdir(parents=True)
    shutil.copy(key, root / "etc/kmodd/mok.key")
    shutil.copy(cert, root / "etc/kmodd/mok.pub")
    (root / "etc/kmodd/kmodd.conf").write_text(
        "sign_key = /etc/kmodd/mok.key\nsign_cert = /etc/kmodd/mok.pub\n" + more
    )


def run_kmodd(root: Path, key: Path, cert: Path) -> Run:
    sign_like_dkms(root, key, cert)
    run = timed("kmodd", kmodctl(root, "autoinstall", "-k", KERNEL, "--no-initrd"))
    status = subprocess.run(
        kmodctl(root, "status", "--json", "-k", KERNEL),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    installed, failed = [], {}
    for line in json.loads(status.stdout):
        if line.get("kernel") != KERNEL:
            continue
        source, state = f"{line['module']}/{line['version']}", line["state"]
        if state in INSTALLED:
            installed.append(source)
        else:
            why = first_error(_inside(root, line.get("log"))) if state == "failed" else ""
            why = why or line.get("detail") or ""
            failed[source] = f"{state}: {why}" if why else state
    return dataclasses.replace(
        run, installed=tuple(sorted(installed)), failed=failed, builds=kmodd_builds(root, run)
    )


def kmodd_builds(root: Path, run: Run) -> dict[str, tuple[float, float]]:
    """When each build began and how long it took, from the time kmodd records of each
    build (to start the longest first next time); {} if that record cannot be read."""
    try:
        uri = f"file:{root / 'var/lib/kmodd/state.db'}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            rows = db.execute("SELECT name, seconds, finished FROM durations").fetchall()
    except sqlite3.Error:
        return {}
    return {name: (finished - took - run.started, took) for name, took, finished in rows}


def dkms_trees(root: Path) -> list[str]:
    return [
        "--sourcetree", os.fspath(root / "usr/src"),
        "--dkmstree", os.fspath(root / "var/lib/dkms"),
        "--installtree", os.fspath(root / "lib/modules"),
    ]  # fmt: skip


def register_with_dkms(root: Path, sources: Sequence[str]) -> dict[str, str]:
    """`dkms add` every source (untimed: kmodd finds /usr/src by itself); → the sources
    DKMS refused, with what it said."""
    (root / "var/lib/dkms").mkdir(parents=True)
    refused = {}
    for source in sources:
        name, _, version = source.partition("/")
        proc = subprocess.run(
            ["dkms", "add", "-m", name, "-v", version, *dkms_trees(root)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
            refused[source] = f"dkms add: {said[0] if said else proc.returncode}"
    return refused


def dkms_env(root: Path, key: Path, cert: Path) -> dict[str, str]:
    """DKMS's environment: the key to sign with (it would make /var/lib/dkms/mok.key),
    and a `depmod` that works in the tree (DKMS runs `depmod -a KVER` on the host's
    /lib/modules after each install)."""
    shims = root.parent / "dkms-bin"
    shims.mkdir()
    depmod = shutil.which("depmod", path="/usr/sbin:/sbin:/usr/bin:/bin") or "/usr/sbin/depmod"
    (shims / "depmod").write_text(f'#!/bin/sh\nexec {depmod} -b "{root}" "$@"\n')
    (shims / "depmod").chmod(0o755)
    inside = root / "var/lib/dkms"
    shutil.copy(key, inside / "mok.key")
    shutil.copy(cert, inside / "mok.pub")
    return {
        **os.environ,
        "PATH": f"{shims}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
        "mok_signing_key": os.fspath(inside / "mok.key"),
        "mok_certificate": os.fspath(inside / "mok.pub"),
    }


_DKMS_STATUS = re.compile(
    r"^(?P<source>[^,:]+/[^,:]+)(?:, (?P<kernel>[^,]+), [^:]+)?: (?P<state>.*)$"
)


def run_dkms(root: Path, sources: Sequence[str], key: Path, cert: Path) -> Run:
    refused = register_with_dkms(root, sources)
    env = dkms_env(root, key, cert)
    run = timed("dkms", ["dkms", "autoinstall", "-k", KERNEL, *dkms_trees(root)], env)
    status = subprocess.run(
        ["dkms", "status", *dkms_trees(root)], capture_output=True, text=True, env=env,
        check=True,
    )  # fmt: skip
    states: dict[str, str] = {}
    for line in status.stdout.splitlines():
        match = _DKMS_STATUS.match(line.strip())
        if match and match["kernel"] in (KERNEL, None):
            states.setdefault(match["source"], match["state"])
            if match["kernel"] == KERNEL:
                states[match["source"]] = match["state"]
    installed, failed = [], {}
    for source in sources:
        state = states.get(source, "not in dkms status")
        if state.startswith("installed"):
            installed.append(source)
        else:
            log = root / "var/lib/dkms" / source / "build/make.log"
            why = refused.get(source) or first_error(log) or _dkms_said(run.output, source)
            failed[source] = f"{state}: {why}"
    return dataclasses.replace(
        run, installed=tuple(sorted(installed)), failed=failed, builds=dkms_builds(root, run)
    )


def dkms_builds(root: Path, run: Run) -> dict[str, tuple[float, float]]:
    """DKMS builds one source after another: each began when the one before ended (its
    make.log written), the first when DKMS started."""
    ends = []
    for log in (root / "var/lib/dkms").glob(f"*/*/{KERNEL}/*/log/make.log"):
        ends.append((log.stat().st_mtime, log.parents[4].name))
    for log in (root / "var/lib/dkms").glob("*/*/build/make.log"):  # the failed builds
        ends.append((log.stat().st_mtime, log.parents[2].name))
    out, previous = {}, run.started
    for end, name in sorted(ends):
        out[name] = (previous - run.started, end - previous)
        previous = end
    return out


def _dkms_said(output: str, source: str) -> str:
    """DKMS's own error about `source` (BUILD_EXCLUSIVE, a missing header…)."""
    name = source.partition("/")[0]
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Error!") and any(name in x for x in lines[max(0, i - 3) : i + 2]):
            return line.strip()
    return "no make.log, DKMS printed no error"


# logs --------------------------------------------------------------------------------------

_ERRORS = (
    re.compile(r"(?<![\w-])(fatal )?error:"),  # the compiler's, or a tool's "error:"
    re.compile(r"\*\*\*|(?<![\w-])error\b(?![.\w-])", re.IGNORECASE),  # make's; any other
)


def first_error(log: Path | None) -> str:
    """The first line of a build log that says what went wrong: a compiler's `error:`
    if any, else make's `***` or any other line naming an error ('' when none does)."""
    if log is None or not log.is_file():
        return ""
    lines = log.read_text(errors="replace").splitlines()
    for pattern in _ERRORS:
        for line in lines:
            if pattern.search(line) and not line.startswith("# kmodd: build failed"):
                return line.strip()[:300]
    return ""


def _inside(root: Path, path: str | None) -> Path | None:
    """A path kmodd reports (inside its root) as seen from here."""
    if not path:
        return None
    if Path(path).is_relative_to(root):
        return Path(path)
    return root / path.lstrip("/")


def keep_evidence(result: Result, a: Path, b: Path, evidence: Path) -> None:
    """Copy each failed source's logs (both tools') and what each tool printed."""
    evidence.mkdir(parents=True, exist_ok=True)
    for run in (result.kmodd, result.dkms):
        (evidence / f"{run.tool}-output.txt").write_text(run.output)
    for source in sorted({*result.kmodd.failed, *result.dkms.failed}):
        flat = source.replace("/", "-")
        store = a / "var/lib/kmodd/builds" / source / KERNEL
        for log in sorted(store.glob("*/*.log")):
            shutil.copy(log, evidence / f"kmodd-{flat}-{log.name}")
        log = b / "var/lib/dkms" / source / "build/make.log"
        if log.is_file():
            shutil.copy(log, evidence / f"dkms-{flat}-make.log")


# the measurement ---------------------------------------------------------------------------


def measure(
    packages: Sequence[str] = SOURCES,
    *,
    evidence: Path | None = None,
    keep: Path | None = None,
) -> Result:
    """Build `packages` for KERNEL with kmodd, then with DKMS, each in its own new tree.
    `evidence`: where to copy the logs of failed sources; `keep`: build the trees there
    and leave them (else in a temporary dir, removed)."""
    fetch_debs(packages)
    become_subreaper()
    with contextlib.ExitStack() as stack:
        if keep is None:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kmodd-bench-")))
        else:
            base = keep
            base.mkdir(parents=True)
        base.chmod(0o755)
        a, b = base / "kmodd" / "root", base / "dkms" / "root"
        progress(f"trees {a} and {b}: headers of {KERNEL}, {len(packages)} sources")
        sources = make_tree(a, packages)
        make_tree(b, packages)
        key, cert = make_key(base)
        warm(a)
        kmodd_run = run_kmodd(a, key, cert)
        dkms_run = run_dkms(b, sorted(sources), key, cert)
        result = Result(KERNEL, tuple(packages), tuple(sorted(sources)), kmodd_run, dkms_run)
        if evidence is not None:
            keep_evidence(result, a, b, evidence)
    return result


def report(result: Result) -> None:
    print(
        f"{len(result.sources)} sources for {result.kernel} on {os.cpu_count()} CPUs: "
        + ", ".join(result.sources)
    )
    for label, run in (("kmodctl autoinstall", result.kmodd), ("dkms autoinstall   ", result.dkms)):
        print(f"  {label}  {run.summary()}   (exit {run.exit_code})")
    print(f"  kmodd ÷ dkms, wall: {result.kmodd.wall / max(result.dkms.wall, 1e-9):.2f}")
    for run in (result.kmodd, result.dkms):
        print(f"  {run.tool}'s longest builds: {run.longest() or '?'}")
    for run in (result.kmodd, result.dkms):
        for source, why in sorted(run.failed.items()):
            print(f"  failed with {run.tool}: {source}: {why}")
    only = sorted(set(result.kmodd.failed) - set(result.dkms.failed))
    if only:
        print(f"  FAILED ONLY WITH KMODD: {', '.join(only)}")
    for package, why in SKIPPED.items():
        print(f"  not measured: {package}: {why}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--packages",
        nargs="+",
        metavar="PKG",
        help="these *-dkms packages instead of SOURCES ('all': every candidate)",
    )
    parser.add_argument("--evidence", type=Path, help="copy failed sources' logs here")
    parser.add_argument("--keep", type=Path, help="build the trees in this new dir; keep them")
    args = parser.parse_args()
    packages = SOURCES if not args.packages else tuple(args.packages)
    if packages == ("all",):
        packages = CANDIDATES
    report(measure(packages, evidence=args.evidence, keep=args.keep))


if __name__ == "__main__":
    main()
