"""kmodd on a real Debian 12 machine, as an admin would meet it: systemd as PID 1 in a
container with its own system bus and logind, kmodd installed with the README's command,
then Debian's own kernel packages through apt (their postinst hooks, initramfs-tools or
dracut), and every initrd the distribution's generator made booted under qemu, where the
initrd's own modprobe must load the REMAKE_INITRD modules.

Three machines, each a module-scoped fixture that lives through its story once and
keeps what the tests look at:
- `upgrade`: 6.12.111 and its headers before kmodd; 6.12.113 and its headers in one apt
  run; then `apt-get purge` of 6.12.111.
- `late`: kmodd first, on a machine with no kernel; the image in one apt run, its
  headers in a later one (kmodd builds then, and remakes the initrd itself).
- `dracut`: Debian's dracut instead of initramfs-tools; a kernel and headers in one run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import K111, K113
from tests.sources import write_source
from tests.system.initrd_boot import boot_initrd_and_modprobe, loaded_modules
from tests.system.machine import TOP, Machine, booted_machine

# REMAKE_INITRD sources: a pair (kmt_pkgb needs kmt_pkga; reusable from .111 to .113, so
# weak-linked there) and one that .113 must rebuild (misc_register changed)
INITRD_MODULES = ("kmt_misc", "kmt_pkga", "kmt_pkgb")
SOURCES = ("kmt-broken", "kmt-initrd", "kmt-misc")
BROKEN_C = """#include <linux/module.h>
#error "kmt_broken: this source never builds"
MODULE_LICENSE("GPL");
"""
APT_TIMEOUT = 1200


def readme_command() -> str:
    """The README's install command, exactly as written."""
    for line in (TOP / "README.md").read_text().splitlines():
        if line.startswith("./install.sh"):
            return line
    raise AssertionError("README.md has no ./install.sh command line")


def put_sources(m: Machine) -> None:
    """The test sources in the machine's /usr/src, as `*-dkms` packages leave them."""
    root = m.path("/")
    initrd = 'AUTOINSTALL="yes"\nREMAKE_INITRD="yes"\n'
    write_source(root, "kmt-initrd", modules=("kmt_pkga", "kmt_pkgb"), extra=initrd)
    write_source(root, "kmt-misc", modules=("kmt_misc",), extra=initrd)
    broken = write_source(root, "kmt-broken", modules=("kmt_broken",), extra='AUTOINSTALL="yes"\n')
    (broken / "kmt_broken.c").write_text(BROKEN_C)


def install_kmodd(m: Machine) -> subprocess.CompletedProcess[str]:
    m.copy_project("/root/kmodd")
    return m.run(f"cd /root/kmodd && {readme_command()}", check=False)


def apt(m: Machine, args: str) -> str:
    """`apt-get ARGS` inside; apt must succeed (a failing module never fails it). Its
    output and the hooks' (stderr) interleaved, as an admin reads it."""
    return m.run(f"apt-get -y {args} 2>&1", timeout=APT_TIMEOUT).stdout


def status(m: Machine, user: str = "root") -> subprocess.CompletedProcess[str]:
    return m.run("kmodctl status", user=user, check=False)


def status_json(m: Machine) -> dict[tuple[str, str], dict[str, Any]]:
    docs = json.loads(m.run("kmodctl status --json").stdout)
    return {(d["module"], d["kernel"]): d for d in docs}


def initrd_listing(m: Machine, kver: str) -> str:
    lister = "lsinitramfs" if m.path("/usr/bin/lsinitramfs").exists() else "lsinitrd"
    return m.run(f"{lister} /boot/initrd.img-{kver}").stdout


def listed_modules(listing: str) -> set[str]:
    found = re.findall(r"/(kmt_[a-z]+)\.ko(?:\.xz|\.zst|\.gz)?\b", listing)
    return set(found)


def dangling_links(m: Machine) -> list[str]:
    return m.run("find /usr/lib/modules -xtype l").stdout.split()


def service_may_write(m: Machine, inside: str) -> bool:
    """Can kmodd.service, in its own mount namespace, create a file in dir `inside`?"""
    pid = m.run("systemctl show -p MainPID --value kmodd.service").stdout.strip()
    assert pid not in ("", "0"), "kmodd.service is not running"
    probe = f"{inside.rstrip('/')}/.kmodd-write-probe"
    proc = m.run(f"nsenter -t {pid} -m -- sh -c 'touch {probe} && rm {probe}'", check=False)
    return proc.returncode == 0


class InhibitorWatch:
    """Polls logind's inhibitor list inside the machine, in a transient unit, while it runs."""

    def __init__(self, m: Machine) -> None:
        self.m = m

    def __enter__(self) -> InhibitorWatch:
        self.m.run(
            "systemd-run -q --unit=kmt-inhibitors sh -c 'while :; do "
            "systemd-inhibit --list --no-pager --no-legend >> /root/inhibitors.log 2>&1; "
            "sleep 0.2; done'"
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.m.run("systemctl stop kmt-inhibitors", check=False)

    def seen(self) -> str:
        return self.m.path("/root/inhibitors.log").read_text()


@dataclass
class Booted:
    """A kernel and the initrd its machine made, copied out to boot under qemu."""

    kver: str
    vmlinuz: Path
    initrd: Path
    listing: str


def keep_initrd(m: Machine, kver: str, dest: Path) -> Booted:
    dest.mkdir(parents=True, exist_ok=True)
    vmlinuz = shutil.copy(m.path(f"/boot/vmlinuz-{kver}"), dest / f"vmlinuz-{kver}")
    initrd = shutil.copy(m.path(f"/boot/initrd.img-{kver}"), dest / f"initrd.img-{kver}")
    return Booted(kver, Path(vmlinuz), Path(initrd), initrd_listing(m, kver))


def assert_boots_with_its_modules(booted: Booted, workdir: Path) -> None:
    """The initrd's own modprobe loads every REMAKE_INITRD module, dependencies first."""
    results, console = boot_initrd_and_modprobe(
        booted.vmlinuz, booted.initrd, ["kmt_pkgb", "kmt_misc"], workdir
    )
    for name, result in results.items():
        assert result.loaded, f"{name} in {booted.kver}'s initrd: {result.message}"
    loaded = loaded_modules(console)
    assert {"kmt_pkga", "kmt_pkgb", "kmt_misc"} <= loaded, loaded


def assert_apt_names_every_source(output: str, kver: str, fates: dict[str, str]) -> None:
    """One `kmodd: NAME/VERSION for KVER: FATE` line per source in apt's output."""
    for name, fate in fates.items():
        pattern = rf"^kmodd: {re.escape(name)}/1\.0 for {re.escape(kver)}: {fate}"
        assert re.search(pattern, output, re.M), f"no line for {name}: {pattern}\n{output}"


BROKEN_FATE = (
    r"failed \(first error: \S+kmt_broken\.c:2:2: error: #error .*; log: /var/lib/kmodd/\S+\)$"
)


# the upgrade: a kernel before kmodd, then a newer one, then the old one purged -------------


@dataclass
class Upgrade:
    readme: subprocess.CompletedProcess[str]
    apt_output: str
    status_root: subprocess.CompletedProcess[str]
    status_alice: subprocess.CompletedProcess[str]
    states: dict[tuple[str, str], dict[str, Any]]
    inhibitors: str
    new: Booted
    purge_output: str
    dangling_after_purge: list[str]
    states_after_purge: dict[tuple[str, str], dict[str, Any]]
    after_purge: Booted
    timings: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def upgrade(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upgrade]:
    tmp = tmp_path_factory.mktemp("upgrade")
    with booted_machine(tmp, name="kmt-upgrade") as m:
        apt(m, f"install linux-image-{K111} linux-headers-{K111}")
        put_sources(m)
        readme = install_kmodd(m)
        with InhibitorWatch(m) as watch:
            apt_output = apt(m, f"install linux-image-{K113} linux-headers-{K113}")
        inhibitors = watch.seen()
        new = keep_initrd(m, K113, tmp / "before-purge")
        states = status_json(m)
        root_status, alice_status = status(m), status(m, "alice")
        purge = apt(m, f"purge linux-image-{K111} linux-headers-{K111}")
        yield Upgrade(
            readme,
            apt_output,
            root_status,
            alice_status,
            states,
            inhibitors,
            new,
            purge,
            dangling_links(m),
            status_json(m),
            keep_initrd(m, K113, tmp / "after-purge"),
        )


def test_readme_command_installs_kmodd_and_builds_for_the_kernel_already_there(
    upgrade: Upgrade,
) -> None:
    out = upgrade.readme.stdout + upgrade.readme.stderr
    assert "kmodd installed and running" in out, out
    assert_apt_names_every_source(
        out, K111, {"kmt-initrd": "built", "kmt-misc": "built", "kmt-broken": BROKEN_FATE}
    )
    assert f"kmt-initrd/1.0, {K111}, x86_64: installed, in initrd" in out, out


def test_apt_output_names_every_source_with_its_fate(upgrade: Upgrade) -> None:
    assert_apt_names_every_source(
        upgrade.apt_output,
        K113,
        {"kmt-initrd": f"weak-linked from {re.escape(K111)}", "kmt-misc": "built",
         "kmt-broken": BROKEN_FATE},
    )  # fmt: skip
    assert re.search(
        rf"^kmodd: initrd /boot/initrd\.img-{re.escape(K113)} for {re.escape(K113)} holds "
        r"kmt_misc, kmt_pkga, kmt_pkgb$",
        upgrade.apt_output,
        re.M,
    ), upgrade.apt_output
    # the weak-linked module went into the initrd as a file, not as a link that
    # mkinitramfs cannot decompress
    assert "Is a symbolic link" not in upgrade.apt_output, upgrade.apt_output


def test_the_new_kernel_gets_weak_links_and_builds_as_judged(upgrade: Upgrade) -> None:
    s = upgrade.states
    assert s[("kmt-initrd", K113)]["state"] == "installed-weak"
    assert s[("kmt-initrd", K113)]["weak_from"] == K111
    assert s[("kmt-misc", K113)]["state"] == "installed"
    assert s[("kmt-broken", K113)]["state"] == "failed"
    for name in ("kmt-initrd", "kmt-misc"):
        assert s[(name, K113)]["in_initrd"] is True, s[(name, K113)]


def test_status_over_the_system_bus_for_root_and_for_a_user(upgrade: Upgrade) -> None:
    for proc in (upgrade.status_root, upgrade.status_alice):
        assert proc.returncode == 0, proc.stderr
        assert "not running" not in proc.stderr, "status must come from the service"
    assert upgrade.status_alice.stdout == upgrade.status_root.stdout
    lines = upgrade.status_root.stdout.splitlines()
    assert f"kmt-initrd/1.0, {K113}, x86_64: installed-weak (from {K111}), in initrd" in lines
    assert f"kmt-misc/1.0, {K113}, x86_64: installed, in initrd" in lines


def test_the_logind_inhibitor_is_held_while_the_work_runs(upgrade: Upgrade) -> None:
    assert re.search(r"kmodd .*shutdown .*block", upgrade.inhibitors), upgrade.inhibitors[-2000:]


def test_initramfs_tools_initrd_holds_the_remake_initrd_modules(upgrade: Upgrade) -> None:
    assert set(INITRD_MODULES) <= listed_modules(upgrade.new.listing), upgrade.new.listing
    assert "kmt_broken" not in upgrade.new.listing


def test_the_new_kernel_boots_its_initrd_and_loads_them(upgrade: Upgrade, tmp_path: Path) -> None:
    assert_boots_with_its_modules(upgrade.new, tmp_path)


def test_purging_the_old_kernel_leaves_no_dangling_link_and_rebuilds_what_linked(
    upgrade: Upgrade,
) -> None:
    assert upgrade.dangling_after_purge == []
    s = upgrade.states_after_purge
    assert not [key for key in s if key[1] == K111], s
    assert s[("kmt-initrd", K113)]["state"] == "installed", s[("kmt-initrd", K113)]
    assert s[("kmt-misc", K113)]["state"] == "installed"
    assert_apt_names_every_source(upgrade.purge_output, K113, {"kmt-initrd": "built"})


def test_after_the_purge_the_remaining_initrd_still_loads_its_modules(
    upgrade: Upgrade, tmp_path: Path
) -> None:
    assert set(INITRD_MODULES) <= listed_modules(upgrade.after_purge.listing)
    assert_boots_with_its_modules(upgrade.after_purge, tmp_path)


# kmodd first: the first kernel arrives later, its headers later still ------------------


@dataclass
class Stopped:
    """A ten-minute build under the service, stopped by `systemctl stop`, run again at
    the next start, then cancelled (`kmodctl cancel`)."""

    stop_seconds: float
    state_after_stop: str
    job_after_stop: str
    ran_again: bool
    cancel_seconds: float
    job_after_cancel: str
    state_after_cancel: str


SLOW = "sleep 600"
_JOBS = (
    "/opt/kmodd/bin/python -c 'import json; from kmodd.edges.dbus import Client; "
    "print(json.dumps(Client.connect().jobs()))'"
)


_QUEUED_STATE = """import sqlite3
db = sqlite3.connect("/var/lib/kmodd/state.db")
print(db.execute("SELECT state FROM jobs WHERE source = 'kmt-slow'").fetchone()[0])
"""
"""The slow job's state in the queue, read while the service is stopped."""


def slow_job(m: Machine) -> dict[str, str]:
    return next(j for j in json.loads(m.run(_JOBS).stdout) if j["source"] == "kmt-slow")


def seconds_until(m: Machine, running: bool, timeout: float) -> float:
    """How long until a `sleep 600` of the slow build runs (or none does) in `m`."""
    start = time.monotonic()
    while (m.run(f"pgrep -x -f '{SLOW}'", check=False).returncode == 0) != running:
        assert time.monotonic() - start < timeout, f"{SLOW} running={not running} still"
        time.sleep(0.2)
    return time.monotonic() - start


def slow_state(m: Machine) -> str:
    (line,) = json.loads(m.run("kmodctl status --json -m kmt-slow").stdout)
    return str(line["state"])


def stop_and_cancel(m: Machine) -> Stopped:
    src = write_source(m.path("/"), "kmt-slow", modules=("kmt_simple",),
                       extra='MAKE[0]="bash ./slow.sh"\n')  # fmt: skip
    (src / "slow.sh").write_text(f"{SLOW} &\nwait\n")
    m.run(f"systemd-run -q --unit=kmt-install kmodctl install -m kmt-slow -k {K111}")
    seconds_until(m, True, 120)
    m.run("systemctl stop kmodd")
    stop_seconds = seconds_until(m, False, 30)
    after_stop = slow_state(m)
    m.write("/root/slow-job.py", _QUEUED_STATE)
    job_after_stop = m.run("/opt/kmodd/bin/python /root/slow-job.py").stdout.strip()
    m.run("systemctl start kmodd")
    ran_again = seconds_until(m, True, 120) >= 0
    job = slow_job(m)
    m.run(f"kmodctl cancel {job['id']}")
    cancel_seconds = seconds_until(m, False, 30)
    m.run("systemctl stop kmt-install", check=False)
    return Stopped(stop_seconds, after_stop, job_after_stop, ran_again, cancel_seconds,
                   slow_job(m)["state"], slow_state(m))  # fmt: skip


@dataclass
class Late:
    readme: subprocess.CompletedProcess[str]
    image_output: str
    headers_output: str
    states: dict[tuple[str, str], dict[str, Any]]
    writable: dict[str, bool]
    booted: Booted
    stopped: Stopped


WRITES = {
    # what kmodd, depmod and the initrd generator write: created after the unit started
    f"/usr/lib/modules/{K111}/updates": True,
    "/boot": True,
    "/var/lib/kmodd": True,
    # and nothing more
    "/var/lib": False,
    "/etc": False,
    "/usr/bin": False,
    "/var/lib/dpkg": False,
    f"/usr/src/linux-headers-{K111}": False,
    "/root": False,
}


@pytest.fixture(scope="module")
def late(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Late]:
    tmp = tmp_path_factory.mktemp("late")
    with booted_machine(tmp, name="kmt-late") as m:
        put_sources(m)
        readme = install_kmodd(m)
        image = apt(m, f"install linux-image-{K111}")
        headers = apt(m, f"install linux-headers-{K111}")
        writable = {path: service_may_write(m, path) for path in WRITES}
        states, booted = status_json(m), keep_initrd(m, K111, tmp)
        yield Late(readme, image, headers, states, writable, booted, stop_and_cancel(m))


def test_status_tells_sources_without_kernels_from_no_sources(late: Late) -> None:
    out = late.readme.stdout
    assert "no module sources" not in out + late.readme.stderr
    for name in SOURCES:
        assert f"{name}/1.0: added (no kernel installed)" in out.splitlines(), out


def test_without_headers_apt_says_every_source_waits_for_them(late: Late) -> None:
    assert_apt_names_every_source(
        late.image_output, K111, {name: "waiting-for-headers" for name in SOURCES}
    )


def test_headers_in_a_later_run_build_and_remake_the_initrd(late: Late) -> None:
    assert_apt_names_every_source(
        late.headers_output,
        K111,
        {"kmt-initrd": "built", "kmt-misc": "built", "kmt-broken": BROKEN_FATE},
    )
    assert "Read-only file system" not in late.headers_output
    assert set(INITRD_MODULES) <= listed_modules(late.booted.listing), late.booted.listing
    assert late.states[("kmt-misc", K111)]["in_initrd"] is True


def test_the_unit_writes_where_kmodd_needs_and_nowhere_else(late: Late) -> None:
    assert late.writable == WRITES


def test_late_initrd_boots_and_loads_them(late: Late, tmp_path: Path) -> None:
    assert_boots_with_its_modules(late.booted, tmp_path)


def test_systemctl_stop_and_cancel_end_a_ten_minute_build_within_seconds(late: Late) -> None:
    """`systemctl stop kmodd` mid-build: the build (in its sandbox, run by the unit) is
    gone within 10 s, its job left to run again at the next start, where it does;
    `kmodctl cancel` then ends it within 10 s, cancelled. Never left `building`."""
    s = late.stopped
    assert s.stop_seconds < 10 and s.cancel_seconds < 10, s
    assert s.job_after_stop == "running" and s.ran_again, s  # `recover` queues it again
    assert s.job_after_cancel == "cancelled", s
    assert s.state_after_stop != "building" and s.state_after_cancel != "building", s


# dracut instead of initramfs-tools ---------------------------------------------------------


@dataclass
class Dracut:
    apt_output: str
    states: dict[tuple[str, str], dict[str, Any]]
    booted: Booted


@pytest.fixture(scope="module")
def dracut(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dracut]:
    tmp = tmp_path_factory.mktemp("dracut")
    with booted_machine(tmp, name="kmt-dracut") as m:
        apt(m, "install dracut")
        put_sources(m)
        readme = install_kmodd(m)
        assert "kmodd installed and running" in readme.stderr, readme.stderr
        output = apt(m, f"install linux-image-{K113} linux-headers-{K113}")
        yield Dracut(output, status_json(m), keep_initrd(m, K113, tmp))


def test_dracut_initrd_holds_the_modules_and_apt_says_so(dracut: Dracut) -> None:
    assert "update-initramfs" not in dracut.apt_output  # dracut made it, not initramfs-tools
    assert_apt_names_every_source(
        dracut.apt_output,
        K113,
        {"kmt-initrd": "built", "kmt-misc": "built", "kmt-broken": BROKEN_FATE},
    )
    assert re.search(
        rf"^kmodd: initrd /boot/initrd\.img-{re.escape(K113)} for {re.escape(K113)} holds ",
        dracut.apt_output,
        re.M,
    ), dracut.apt_output
    assert set(INITRD_MODULES) <= listed_modules(dracut.booted.listing)
    assert dracut.states[("kmt-initrd", K113)]["in_initrd"] is True


def test_dracut_initrd_boots_and_loads_them(dracut: Dracut, tmp_path: Path) -> None:
    assert_boots_with_its_modules(dracut.booted, tmp_path)
