"""A whole Debian 12 system booted with systemd as PID 1 in a systemd-nspawn container.

The system tier of the suite installs kmodd into such a machine exactly as the README
says, then installs real kernels with apt, so Debian's own kernel hooks, initramfs-tools
(or dracut), systemd and logind are the real ones.

- :func:`base_tree` debootstraps bookworm once per host (cached outside the repo);
- :func:`booted_machine` copies it, boots the copy and yields a :class:`Machine`, which
  runs commands inside through ``nsenter`` and powers the container off afterwards.

Every ``.deb`` apt downloads inside goes to one shared host directory (bound over
``/var/cache/apt/archives``), so each package is downloaded once across machines and runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from tests.conftest import require, require_tool

log = logging.getLogger(__name__)

TOP = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STAMP = ".kmodd-test-recipe"
LISTS_STAMP = ".kmodd-test-apt-update"
LISTS_MAX_AGE = 24 * 3600.0
BOOT_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
_TAIL_LINES = 40
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Host files that let apt and pip inside through the TLS proxy, refreshed at every boot
# so a tree cached before the proxy's CA changed still works.
_HOST_CONFIG = (
    "etc/apt/sources.list.d/debian.sources",
    "etc/apt/sources.list",
    "etc/apt/apt.conf.d/99artifact-registry",
    "etc/pip.conf",
)
_HOST_CA_BUNDLE = "etc/ssl/certs/ca-certificates.crt"
_HOST_LOCAL_CAS = Path("/usr/local/share/ca-certificates")


class MachineError(RuntimeError):
    """The container did not boot, or did not stop."""


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _clean_env(**extra: str) -> dict[str, str]:
    """A login-like environment: nothing of the test process (VIRTUAL_ENV, DBUS_*, CI…)
    leaks into the machine or changes how host tools behave."""
    return {"PATH": PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive", **extra}


def _kill_group(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    """SIGKILL everything in the process group `proc` leads (started with start_new_session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _spawn(
    argv: list[str], timeout: float, *, merge_stderr: bool = False
) -> tuple[int | None, str, str]:
    """Run `argv` in its own process group with a clean environment: (exit status, or
    None when it timed out and its whole group was killed; stdout; stderr)."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        text=True,
        errors="replace",
        env=_clean_env(),
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, stderr = proc.communicate()
        return None, stdout, stderr or ""
    return proc.returncode, stdout, stderr or ""


def _run(argv: list[str], timeout: float) -> str:
    """Run a host command in its own process group; raise with its output tail on failure."""
    returncode, output, _ = _spawn(argv, timeout, merge_stderr=True)
    if returncode is None:
        raise MachineError(f"{argv} timed out after {timeout:g} s")
    if returncode != 0:
        raise MachineError(f"{argv} exited {returncode}:\n{_tail(output)}")
    return output


def _remove_tree(path: Path) -> None:
    """rm -rf that first unmounts whatever a killed debootstrap left mounted below `path`
    and never crosses into another file system (a forgotten /proc or /sys bind)."""
    if not path.exists():
        return
    prefix = os.fspath(path.resolve()) + "/"
    mounts = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(prefix)
    ]
    for mount in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False, timeout=60)
    _run(["rm", "-rf", "--one-file-system", os.fspath(path)], timeout=600)


# --- the cached base tree ---------------------------------------------------------------


def cache_dir() -> Path:
    """Outside the repository, so it survives fresh clones on the same machine."""
    return Path(os.environ.get("KMODD_TEST_CACHE") or Path.home() / ".cache" / "kmodd-tests")


def apt_archives() -> Path:
    """The host directory shared by every machine as /var/cache/apt/archives."""
    path = cache_dir() / "apt-archives"
    (path / "partial").mkdir(parents=True, exist_ok=True)
    return path


def _install_host_config(root: Path) -> None:
    """Give the tree the host's apt sources, CA bundle and pip configuration: the archive
    and PyPI are only reachable through a TLS proxy the host trusts."""
    for rel in _HOST_CONFIG:
        host = Path("/", rel)
        if host.is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(host, root / rel)
    if not Path("/etc/apt/sources.list").exists():
        # debootstrap's own sources.list would repeat the host's debian.sources
        (root / "etc/apt/sources.list").unlink(missing_ok=True)
    # local CAs too, so an update-ca-certificates run inside keeps the proxy's CA
    if _HOST_LOCAL_CAS.is_dir():
        local = root / _HOST_LOCAL_CAS.relative_to("/")
        local.mkdir(parents=True, exist_ok=True)
        for cert in _HOST_LOCAL_CAS.glob("*.crt"):
            shutil.copyfile(cert, local / cert.name)
    bundle = root / _HOST_CA_BUNDLE
    bundle.unlink(missing_ok=True)  # never write through a link to somewhere else
    shutil.copyfile(Path("/", _HOST_CA_BUNDLE), bundle)


def _build_base(tree: Path, archives: Path) -> None:
    """The recipe: a minimal bookworm that boots with systemd, has its own system bus and
    logind, can build modules, and whose apt keeps every .deb it downloads."""
    packages = [
        "systemd", "systemd-sysv", "dbus", "ca-certificates", "python3", "python3-venv",
        "kmod", "make", "gcc", "patch", "binutils", "xz-utils", "zstd", "cpio", "procps",
    ]  # fmt: skip
    debootstrap = require_tool("debootstrap")
    _run(
        [
            debootstrap, "--variant=minbase", f"--include={','.join(packages)}",
            f"--cache-dir={os.fspath(archives)}", SUITE, os.fspath(tree), MIRROR,
        ],
        timeout=3600,
    )  # fmt: skip
    _install_host_config(tree)
    conf = tree / "etc/apt/apt.conf.d"
    for docker in conf.glob("docker-*"):  # an image's docker-clean would delete the .debs
        docker.unlink()
    (conf / "90kmodd-tests").write_text(
        'APT::Install-Recommends "false";\n'
        'APT::Keep-Downloaded-Packages "true";\n'
        'Binary::apt::APT::Keep-Downloaded-Packages "true";\n'
        'Acquire::Languages "none";\n'
    )
    (tree / "etc/hostname").write_text("kmodd-test\n")
    with (tree / "etc/hosts").open("a") as hosts:
        hosts.write("127.0.1.1\tkmodd-test\n")
    # Units with nothing to do in a container that slow the boot, wait on a console
    # nobody reads, or (apt-daily) take apt's lock in the middle of a test.
    for unit in (
        "console-getty.service", "getty@.service", "serial-getty@.service",
        "container-getty@.service", "systemd-networkd-wait-online.service",
        "systemd-firstboot.service", "apt-daily.service", "apt-daily.timer",
        "apt-daily-upgrade.service", "apt-daily-upgrade.timer", "e2scrub_all.timer",
        "e2scrub_reap.service", "fstrim.timer", "dpkg-db-backup.timer",
    ):  # fmt: skip
        link = tree / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    for argv in (
        ["useradd", "--create-home", "--shell", "/bin/bash", "alice"],
        ["passwd", "--delete", "root"],
        ["update-ca-certificates"],
        ["apt-get", "-q", "update"],
    ):
        _run(["chroot", os.fspath(tree), *argv], timeout=600)
    _install_host_config(tree)  # the host's bundle, byte for byte, over the regenerated one
    tree.chmod(0o755)


def _recipe_stamp() -> str:
    """Changes whenever the recipe's code does, so an edited recipe rebuilds the tree."""
    source = "".join(inspect.getsource(f) for f in (_build_base, _install_host_config))
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    return f"{SUITE} {digest}\n"


@contextlib.contextmanager
def _locked(*, shared: bool = False) -> Iterator[None]:
    """flock on the base tree: exclusive to build or refresh it (two test processes never
    build it at once), shared to copy it (never a half-refreshed tree)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with (cache_dir() / f"{SUITE}-base.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield


def _refresh_lists(tree: Path) -> None:
    """apt-get update in the cached tree once a day: the security archive drops superseded
    kernels from its pool, so week-old lists would point apt at files that are gone."""
    marker = tree / LISTS_STAMP
    if marker.is_file() and time.time() - marker.stat().st_mtime < LISTS_MAX_AGE:
        return
    _install_host_config(tree)
    _run(["chroot", os.fspath(tree), "apt-get", "-q", "update"], timeout=600)
    marker.touch()


def base_tree() -> Path:
    """The cached debootstrap tree, built (atomically: in a temporary directory next to it,
    renamed into place when complete) when missing or made by another recipe."""
    require("root (debootstrap, systemd-nspawn)", os.geteuid() == 0)
    cache = cache_dir()
    tree = cache / f"{SUITE}-base"
    stamp = _recipe_stamp()
    with _locked():
        if (tree / STAMP).is_file() and (tree / STAMP).read_text() == stamp:
            _refresh_lists(tree)
            return tree
        for leftover in cache.glob(f"{SUITE}-base.*.tmp"):
            _remove_tree(leftover)
        building = Path(tempfile.mkdtemp(prefix=f"{SUITE}-base.", suffix=".tmp", dir=cache))
        started = time.monotonic()
        try:
            _build_base(building, apt_archives())
            (building / STAMP).write_text(stamp)
            (building / LISTS_STAMP).touch()
        except BaseException:
            _remove_tree(building)
            raise
        log.info("built %s in %.1f s", tree, time.monotonic() - started)
        if tree.exists():
            old = tree.rename(building.with_suffix(".old.tmp"))
            building.rename(tree)
            _remove_tree(old)
        else:
            building.rename(tree)
    return tree


# --- paths inside a tree ----------------------------------------------------------------


def resolve_inside(root: Path, inside: str) -> Path:
    """Host path of `inside` in the tree at `root`, following symlinks as a process in
    the machine would: an absolute link (``/lib/modules/K/build``) points into `root`."""
    todo = list(reversed(PurePosixPath("/", inside).parts[1:]))
    done: list[str] = []
    links = 0
    while todo:
        part = todo.pop()
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = root.joinpath(*done, part)
        if candidate.is_symlink():
            links += 1
            if links > 40:
                raise OSError(f"too many levels of symbolic links: {inside}")
            target = PurePosixPath(candidate.readlink())
            if target.is_absolute():
                done = []
            todo.extend(reversed([p for p in target.parts if p != "/"]))
            continue
        done.append(part)
    return root.joinpath(*done)


# --- a booted machine -------------------------------------------------------------------


def _container_inits(nspawn: int) -> list[tuple[int, str]]:
    """(pid, name) of each descendant of `nspawn` that is PID 1 of a PID namespace of its
    own: the container's init, before and after it execs systemd."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found: list[tuple[int, str]] = []
    todo = list(children.get(nspawn, []))
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            fields = dict(line.split(":\t", 1) for line in status if ":\t" in line)
            nspids = fields.get("NSpid", "").split()
            if len(nspids) > 1 and nspids[-1] == "1":
                found.append((pid, fields.get("Name", "")))
        todo.extend(children.get(pid, []))
    return found


class Machine:
    """A booted copy of the base tree. `root` is its file system seen from the host,
    `pid1` its systemd, `timings` how long copying and booting took (seconds)."""

    def __init__(self, directory: Path, name: str) -> None:
        self.name = name
        self.directory = directory
        self.root = directory / "root"
        self.console_log = directory / "console.log"
        self.timings: dict[str, float] = {}
        self.pid1 = 0
        self._nspawn: subprocess.Popen[bytes] | None = None

    # -- files --

    def path(self, inside: str) -> Path:
        """Host path of the file `inside` names in the machine, symlinks followed as inside.

        While it runs, through its systemd's /proc/PID/root: so what is mounted only in
        the machine (/tmp and /run are tmpfs there) is seen too."""
        running = self.pid1 and self._nspawn is not None and self._nspawn.poll() is None
        return resolve_inside(Path(f"/proc/{self.pid1}/root") if running else self.root, inside)

    def write(self, inside: str, text: str, mode: int = 0o644) -> Path:
        """Create or replace a file inside (parents created), owned by root."""
        path = self.path(inside)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
        return path

    def copy_project(self, dest: str = "/root/kmodd") -> Path:
        """Put the repository's files at `dest` as a fresh clone would have them, with the
        uncommitted work in progress (tracked and untracked, minus what .gitignore drops),
        modes kept. Returns the host path of `dest`."""
        listing = subprocess.run(
            ["git", "-C", os.fspath(TOP), "ls-files", "--cached", "--others",
             "--exclude-standard", "-z"],
            check=True, capture_output=True, timeout=60,
        ).stdout  # fmt: skip
        target = self.path(dest)
        if target.exists():
            shutil.rmtree(target)
        for rel in sorted({name for name in listing.decode().split("\0") if name}):
            src, dst = TOP / rel, target / rel
            if not src.is_symlink() and not src.is_file():
                continue  # deleted in the work tree but still in the index, or a submodule
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_symlink():
                dst.symlink_to(src.readlink())
            else:
                shutil.copy2(src, dst)
        return target

    # -- commands --

    def _home(self, user: str) -> str:
        for line in self.path("/etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == user and len(fields) == 7:
                return fields[5]
        raise KeyError(f"no user {user!r} in {self.name}")

    def _argv(self, cmd: str, user: str, env: dict[str, str] | None) -> list[str]:
        home = self._home(user)
        variables = _clean_env(HOME=home, USER=user, LOGNAME=user, SHELL="/bin/bash")
        variables.update(env or {})
        inner = ["env", "-i", f"--chdir={home}", *(f"{k}={v}" for k, v in variables.items())]
        as_user = [] if user == "root" else ["runuser", "-u", user, "--"]
        nsenter = ["nsenter", "-t", str(self.pid1), "-a"]
        return [*nsenter, *as_user, *inner, "bash", "-c", cmd]

    def run(
        self,
        cmd: str,
        *,
        user: str = "root",
        check: bool = True,
        timeout: float = 900,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``bash -c cmd`` inside as `user`, in a login-like environment (plus `env`),
        from the user's home. With `check`, a non-zero exit raises an AssertionError
        showing the command, its status and the tail of both streams."""
        argv = self._argv(cmd, user, env)
        returncode, stdout, stderr = _spawn(argv, timeout)
        if returncode is None:
            raise AssertionError(
                f"in {self.name} as {user}, timed out after {timeout:g} s (killed): {cmd}\n"
                f"--- stdout tail ---\n{_tail(stdout)}\n--- stderr tail ---\n{_tail(stderr)}"
            )
        result = subprocess.CompletedProcess(argv, returncode, stdout, stderr)
        if check and result.returncode != 0:
            raise AssertionError(
                f"in {self.name} as {user}, exit status {result.returncode}: {cmd}\n"
                f"--- stdout tail ---\n{_tail(stdout)}\n--- stderr tail ---\n{_tail(stderr)}"
            )
        return result

    # -- life cycle --

    def _console_tail(self) -> str:
        text = self.console_log.read_text(errors="replace").replace("\r", "")
        return _tail(_ANSI_RE.sub("", text))

    def _find_pid1(self, nspawn: int) -> int:
        """The container's systemd (see _container_inits); 0 while it has not exec'd yet."""
        for pid, name in _container_inits(nspawn):
            if name == "systemd":
                return pid
        return 0

    def _boot_failure(self, why: str) -> MachineError:
        failed = ""
        if self.pid1:
            with contextlib.suppress(AssertionError):
                failed = self.run("systemctl --failed --no-pager", check=False, timeout=15).stdout
        return MachineError(
            f"{self.name}: {why}\n--- systemctl --failed ---\n{failed}"
            f"--- console tail ({self.console_log}) ---\n{self._console_tail()}"
        )

    def boot(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Start systemd-nspawn in its own process group, console to `console_log`, and wait
        until systemd says the system is running (or degraded).

        ``--console=passive`` rather than ``pipe``: with a pipe the container has no
        /dev/console, so systemd's boot messages (asked for with show_status) are lost,
        and the console log is what explains a machine that does not come up."""
        nspawn = require_tool("systemd-nspawn")
        require_tool("nsenter")
        started = time.monotonic()
        deadline = started + timeout
        with self.console_log.open("wb") as console:
            self._nspawn = subprocess.Popen(
                [
                    nspawn, "-q", "--register=no", "--keep-unit", f"--machine={self.name}",
                    "-D", os.fspath(self.root), "-b", "--console=passive",
                    f"--bind={os.fspath(apt_archives())}:/var/cache/apt/archives",
                    "systemd.show_status=true",
                ],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                env=_clean_env(), start_new_session=True,
            )  # fmt: skip
        while not self.pid1:
            if self._nspawn.poll() is not None:
                raise self._boot_failure(f"systemd-nspawn exited {self._nspawn.returncode}")
            if time.monotonic() > deadline:
                raise self._boot_failure(f"no systemd in the container after {timeout:g} s")
            self.pid1 = self._find_pid1(self._nspawn.pid)
            time.sleep(0.05)
        state = ""
        while state not in ("running", "degraded"):
            left = deadline - time.monotonic()
            if left <= 0 or self._nspawn.poll() is not None:
                raise self._boot_failure(f"not booted after {timeout:g} s (state: {state!r})")
            with contextlib.suppress(AssertionError):  # the run itself timed out
                result = self.run("systemctl is-system-running --wait", check=False, timeout=left)
                state = result.stdout.strip()
            if state not in ("running", "degraded"):
                time.sleep(0.2)  # the manager's socket is not there yet
        self.timings["boot"] = time.monotonic() - started

    def stop(self) -> None:
        """Power off (SIGRTMIN+3 to its systemd) and wait for systemd-nspawn (bounded); then
        kill whatever is left. The container's PID 1 is in a session of its own, out of
        reach of a kill of nspawn's process group, and would outlive it: so nspawn's group
        is frozen, every container init below it killed (which takes its whole PID
        namespace with it), and only then the group killed."""
        proc, self._nspawn = self._nspawn, None
        if proc is None:
            return
        started = time.monotonic()
        if self.pid1 and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGRTMIN + 3)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("%s did not power off in %g s; killing it", self.name, STOP_TIMEOUT)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGSTOP)
            for pid, _ in _container_inits(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        _kill_group(proc)
        self.timings["stop"] = time.monotonic() - started


@contextlib.contextmanager
def booted_machine(
    directory: Path, *, name: str = "kmodd-test", boot_timeout: float = BOOT_TIMEOUT
) -> Iterator[Machine]:
    """A fresh copy of :func:`base_tree` in ``directory/name/root``, booted; powered off
    and deleted (it can be ~1 GB) on exit. ``directory/name/console.log`` is kept."""
    require("root (systemd-nspawn, nsenter)", os.geteuid() == 0)
    base = base_tree()
    machine = Machine(directory / name, name)
    machine.directory.mkdir(parents=True, exist_ok=True)
    try:
        started = time.monotonic()
        with _locked(shared=True):
            _run(["cp", "-a", "--reflink=auto", os.fspath(base), os.fspath(machine.root)], 600)
        machine.timings["copy"] = time.monotonic() - started
        _install_host_config(machine.root)
        # its own identity: the journal, D-Bus and logind key things on it
        (machine.root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
        machine.boot(boot_timeout)
        log.info("%s: %s", name, machine.timings)
        yield machine
    finally:
        machine.stop()
        _remove_tree(machine.root)
