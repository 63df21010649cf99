"""`kmodctl autoinstall` end to end in a temporary root: real Debian dkms packages and
sources written here, real make against real headers, real depmod and modinfo."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmodd.act import manage
from kmodd.base.paths import Root
from kmodd.world import modfile
from tests.cli import kmodctl
from tests.conftest import K56, K111, K113, install_headers, require_tool
from tests.debs import unpack_dkms_package
from tests.sources import write_source

BUSYBOX = Path("/bin/busybox")


def make_system(root: Path, kernels: tuple[str, ...]) -> Path:
    """A Debian-like root: os-release, the kernels with full headers, a recording
    update-initramfs (a busybox script run through chroot) and an initrd per kernel."""
    (root / "etc").mkdir(parents=True, exist_ok=True)
    shutil.copy("/etc/os-release", root / "etc/os-release")
    for kver in kernels:
        install_headers(root, kver, full=True)
        (root / "boot").mkdir(exist_ok=True)
        (root / f"boot/initrd.img-{kver}").write_bytes(b"old initrd")
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy(BUSYBOX, root / "bin/busybox")
    generator = root / "usr/sbin/update-initramfs"
    generator.parent.mkdir(parents=True, exist_ok=True)
    generator.write_text('#!/bin/busybox sh\necho "$@" >> /initrd-calls\n')
    generator.chmod(0o755)
    return root


def initrd_calls(root: Path) -> list[str]:
    calls = root / "initrd-calls"
    return calls.read_text().splitlines() if calls.exists() else []


def status_json(root: Path, *args: str) -> dict[tuple[str, str], dict[str, object]]:
    proc = kmodctl(root, "status", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return {(s["module"], s["kernel"]): s for s in json.loads(proc.stdout)}


@dataclass
class Scenario:
    root: Path
    first: subprocess.CompletedProcess[str]
    second: subprocess.CompletedProcess[str]
    acpi_call: Path


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """Five sources on 6.12.111, then 6.12.113 arrives."""
    require_tool("make")
    root = make_system(tmp_path_factory.mktemp("system") / "root", (K111, K113))
    acpi = unpack_dkms_package("acpi-call-dkms", root)
    unpack_dkms_package("v4l2loopback-dkms", root)
    for name in ("kmt-base", "kmt-pair", "kmt-misc", "kmt-excl"):
        write_source(root, name)
    first = kmodctl(root, "autoinstall", "-k", K111)
    second = kmodctl(root, "autoinstall", "-k", K113)
    yield Scenario(root, first, second, acpi)


def test_a_failing_build_is_recorded_and_the_others_install(scenario: Scenario) -> None:
    first = scenario.first
    assert first.returncode == 7, first.stdout + first.stderr
    assert "Traceback" not in first.stderr
    states = status_json(scenario.root, "-k", K111)
    v4l2 = states[("v4l2loopback", K111)]
    assert v4l2["state"] == "failed"
    log = Path(str(v4l2["log"]))
    assert log.is_file() and "error" in log.read_text().lower()
    # one line per source for apt's output: the fate, and for a failure the first error
    failed = rf"kmodd: v4l2loopback/0\.12\.7 for {re.escape(K111)}: failed \(first error: "
    assert re.search(failed + r".*error: .*; log: /\S+make\.log\)$", first.stdout, re.M), (
        first.stdout
    )
    assert f"kmodd: kmt-base/1.0 for {K111}: built" in first.stdout.splitlines()
    for name in ("acpi-call", "kmt-base", "kmt-pair", "kmt-misc"):
        assert states[(name, K111)]["state"] == "installed", (name, states)
    assert states[("kmt-excl", K111)]["state"] == "excluded"


def test_installed_modules_carry_the_kernels_vermagic(scenario: Scenario) -> None:
    modinfo = require_tool("modinfo")
    updates = scenario.root / "lib/modules" / K111 / "updates/dkms"
    installed = sorted(p.name for p in updates.iterdir())
    assert installed == [
        "acpi_call.ko.xz",
        "kmt_misc.ko.xz",
        "kmt_pkga.ko.xz",
        "kmt_pkgb.ko.xz",
        "kmt_simple.ko.xz",
    ]
    for path in updates.iterdir():
        magic = subprocess.run(
            [modinfo, "-F", "vermagic", path], capture_output=True, text=True, check=True
        ).stdout
        assert magic.startswith(f"{K111} SMP preempt mod_unload modversions"), path
    patched = subprocess.run(
        [modinfo, "-F", "version", updates / "kmt_misc.ko.xz"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert patched.strip() == "1.0-patched"
    log = scenario.root / f"var/lib/kmodd/builds/kmt-misc/1.0/{K111}/x86_64/make.log"
    assert "post-build built" in log.read_text()
    deps = (scenario.root / "lib/modules" / K111 / "modules.dep").read_text().splitlines()
    assert sorted(line.split(":")[0] for line in deps) == [f"updates/dkms/{n}" for n in installed]
    assert "updates/dkms/kmt_pkgb.ko.xz: updates/dkms/kmt_pkga.ko.xz" in deps


def test_depmod_finds_every_symbol_over_the_whole_root(scenario: Scenario) -> None:
    depmod = require_tool("depmod")
    for kver in (K111, K113):
        symvers = scenario.root / f"usr/src/linux-headers-{kver}/Module.symvers"
        proc = subprocess.run(
            [depmod, "-n", "-e", "-E", symvers, "-b", scenario.root, kver],
            capture_output=True,
            text=True,
            check=True,
        )
        bad = [line for line in proc.stderr.splitlines() if "symbol" in line]
        assert not bad, bad


def test_the_new_kernel_weak_links_what_is_reusable_and_rebuilds_the_rest(
    scenario: Scenario,
) -> None:
    second = scenario.second
    assert second.returncode == 7, second.stdout + second.stderr  # v4l2loopback again
    states = status_json(scenario.root, "-k", K113)
    for name in ("kmt-base", "kmt-pair"):
        assert states[(name, K113)]["state"] == "installed-weak"
        assert states[(name, K113)]["weak_from"] == K111
    assert states[("kmt-misc", K113)]["state"] == "installed"
    weak = scenario.root / "lib/modules" / K113 / "weak-updates"
    link = weak / "kmt-pair/kmt_pkgb.ko.xz"
    assert link.is_symlink() and not link.readlink().is_absolute()
    assert link.resolve() == (scenario.root / "lib/modules" / K111 / "updates/dkms/kmt_pkgb.ko.xz")
    # acpi_call: whatever was decided agrees with `kmodctl check` on the K111 build
    acpi = scenario.root / "lib/modules" / K111 / "updates/dkms/acpi_call.ko.xz"
    verdict = kmodctl(scenario.root, "check", "-k", K113, os.fspath(acpi))
    expected = "installed-weak" if verdict.returncode == 0 else "installed"
    assert states[("acpi-call", K113)]["state"] == expected
    rebuilt = scenario.root / "lib/modules" / K113 / "updates/dkms/kmt_misc.ko.xz"
    assert modfile.read(rebuilt).vermagic.startswith(K113 + " ")


def test_status_speaks_dkms(scenario: Scenario) -> None:
    proc = kmodctl(scenario.root, "status")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert f"kmt-pair/1.0, {K113}, x86_64: installed-weak (from {K111})" in lines
    assert f"kmt-misc/1.0, {K113}, x86_64: installed" in lines
    assert any(
        re.match(
            rf"v4l2loopback/0\.12\.7, {re.escape(K113)}, x86_64: failed \(first error: "
            r"\S+\.c:\d+:\d+: error: .*; log: /\S+/make\.log\)$",
            line,
        )
        for line in lines
    )
    assert any(line.startswith(f"kmt-excl/1.0, {K111}, x86_64: excluded") for line in lines)


def test_remake_initrd_only_when_such_a_module_changed(scenario: Scenario) -> None:
    calls = initrd_calls(scenario.root)
    assert calls == [f"-u -k {K111}", f"-u -k {K113}"]
    again = kmodctl(scenario.root, "autoinstall", "-k", K113)
    assert f"kmodd: kmt-base/1.0 for {K113}: weak-linked from {K111}" in again.stdout
    assert initrd_calls(scenario.root) == calls, "nothing changed: no new initrd"


def dangling_links(root: Path) -> list[Path]:
    return [p for p in (root / "lib/modules").rglob("*") if p.is_symlink() and not p.exists()]


def test_uninstall_and_kernel_removal_leave_no_dangling_links(tmp_path: Path) -> None:
    require_tool("make")
    root = make_system(tmp_path / "root", (K111, K113))
    for name in ("kmt-base", "kmt-pair"):
        write_source(root, name)
    assert kmodctl(root, "autoinstall", "-k", K111).returncode == 0
    assert kmodctl(root, "autoinstall", "-k", K113).returncode == 0
    states = status_json(root)
    assert states[("kmt-pair", K113)]["state"] == "installed-weak"

    # uninstalling the build K113 links to: K113 gets a build of its own
    proc = kmodctl(root, "uninstall", "-m", "kmt-pair", "-k", K111)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not dangling_links(root)
    states = status_json(root)
    assert states[("kmt-pair", K111)]["state"] == "added"
    assert states[("kmt-pair", K113)]["state"] == "installed"
    assert not (root / "lib/modules" / K111 / "updates/dkms/kmt_pkga.ko.xz").exists()
    again = kmodctl(root, "uninstall", "-m", "kmt-pair", "-k", K111)
    assert again.returncode == 0, "uninstalling what is not installed is success"

    # removing K111: what K113 weak-linked into it is rebuilt first
    calls = initrd_calls(root)
    proc = kmodctl(root, "remove-kernel", K111, "--no-initrd")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not dangling_links(root)
    states = status_json(root)
    assert states[("kmt-base", K113)]["state"] == "installed"
    assert states[("kmt-base", K111)]["state"] == "added"
    # nothing of kmodd's is left in K111's dir: once its package is removed, no empty
    # updates/ or weak-updates/ keeps it (and the kernel) looking installed
    left = {p.name for p in (root / "lib/modules" / K111).iterdir()}
    assert not left & {"updates", "weak-updates", "extra"}, left
    assert "build" in left, "the kernel's own files stay"
    assert initrd_calls(root) == calls, "--no-initrd: the initrd is left alone"
    magic = modfile.read(root / "lib/modules" / K113 / "updates/dkms/kmt_simple.ko.xz").vermagic
    assert magic.startswith(K113 + " ")

    # the disk is the truth: a module deleted behind kmodd's back is noticed and said
    (root / "lib/modules" / K113 / "updates/dkms/kmt_simple.ko.xz").unlink()
    state_db = root / "var/lib/kmodd/state.db"
    before = state_db.read_bytes()
    repaired = status_json(root)[("kmt-base", K113)]
    assert repaired["state"] == "added"
    assert repaired["detail"] == "installed files are missing; autoinstall puts them back"
    assert state_db.read_bytes() == before, "status only reads"
    assert kmodctl(root, "autoinstall", "-k", K113).returncode == 0
    assert status_json(root)[("kmt-base", K113)]["state"] == "installed"


def test_a_6_1_kernel_gets_uncompressed_modules(tmp_path: Path) -> None:
    """Debian's 6.1 kernels do not compress modules; 6.12's use xz."""
    require_tool("make")
    root = make_system(tmp_path / "root", (K56,))
    unpack_dkms_package("acpi-call-dkms", root)
    write_source(root, "kmt-base")
    proc = kmodctl(root, "autoinstall", "-k", K56)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    updates = root / "lib/modules" / K56 / "updates/dkms"
    assert sorted(p.name for p in updates.iterdir()) == ["acpi_call.ko", "kmt_simple.ko"]
    for path in updates.iterdir():
        assert modfile.read(path).vermagic.startswith(K56 + " ")


def test_build_and_install_commands(tmp_path: Path) -> None:
    require_tool("make")
    root = make_system(tmp_path / "root", (K113,))
    write_source(root, "kmt-misc")
    built = kmodctl(root, "build", "-m", "kmt-misc/1.0", "-k", K113)
    assert built.returncode == 0, built.stdout + built.stderr
    assert status_json(root)[("kmt-misc", K113)]["state"] == "built"
    assert not (root / "lib/modules" / K113 / "updates").exists()
    installed = kmodctl(root, "install", "-m", "kmt-misc", "-k", K113)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert status_json(root)[("kmt-misc", K113)]["state"] == "installed"
    missing = kmodctl(root, "install", "-m", "no-such-source", "-k", K113)
    assert missing.returncode == 4
    assert missing.stderr == "kmodctl: no module source no-such-source in /usr/src\n"


def test_dkms_hooks_run_as_dkms_runs_them(tmp_path: Path) -> None:
    """POST_ADD once, when kmodd first sees the source; PRE_INSTALL and POST_INSTALL
    around every install, built or weak-linked; POST_REMOVE after an uninstall. A failing
    PRE_INSTALL stops that install, naming the directive."""
    require_tool("make")
    root = make_system(tmp_path / "root", (K111, K113))
    record = tmp_path / "hooks.log"
    hooked = write_source(
        root, "kmt-hooked", modules=("kmt_simple",),
        extra='AUTOINSTALL=yes\nPRE_INSTALL="scripts/pre"\nPOST_INSTALL="scripts/post done"\n'
        'POST_ADD="scripts/added"\nPOST_REMOVE="scripts/removed"\n',
    )  # fmt: skip
    refused = write_source(
        root, "kmt-refused", modules=("kmt_kmalloc",), extra='AUTOINSTALL=yes\nPRE_INSTALL="no"\n'
    )
    (hooked / "scripts").mkdir()
    scripts = {
        hooked / "scripts/pre": f'echo "pre $kernelver $arch $(pwd) $#" >> {record}',
        hooked / "scripts/post": f'echo "post $kernelver $arch $(pwd) $1" >> {record}',
        hooked / "scripts/added": f'echo "added $kernelver" >> {record}',
        hooked / "scripts/removed": f'echo "removed $kernelver" >> {record}',
        refused / "no": "echo not for this kernel >&2; exit 3",
    }
    for script, body in scripts.items():
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)

    first = kmodctl(root, "autoinstall", "-k", K111)
    assert first.returncode == 7, first.stdout + first.stderr
    assert f"kmodd: kmt-hooked/1.0 for {K111}: built" in first.stdout.splitlines()
    assert re.search(
        rf"^kmodd: kmt-refused/1\.0 for {re.escape(K111)}: failed \(PRE_INSTALL no exited with "
        r"status 3; log: /\S+/hooks\.log\)$",
        first.stdout,
        re.M,
    ), first.stdout
    assert not list((root / "lib/modules" / K111).rglob("kmt_kmalloc.ko*")), "not installed"
    install_log = root / f"var/lib/kmodd/builds/kmt-refused/1.0/{K111}/x86_64/hooks.log"
    assert "not for this kernel" in install_log.read_text()

    second = kmodctl(root, "autoinstall", "-k", K113)
    assert f"kmodd: kmt-hooked/1.0 for {K113}: weak-linked from {K111}" in second.stdout
    gone = kmodctl(root, "uninstall", "-m", "kmt-hooked", "-k", K113)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert record.read_text().splitlines() == [
        f"added {K111}",
        f"pre {K111} x86_64 {hooked} 0",
        f"post {K111} x86_64 {hooked} done",
        f"pre {K113} x86_64 {hooked} 0",
        f"post {K113} x86_64 {hooked} done",
        f"removed {K113}",
    ]


def test_two_versions_of_a_source_the_newest_is_the_one_installed(tmp_path: Path) -> None:
    require_tool("make")
    root = make_system(tmp_path / "root", (K111,))
    for version in ("1.0", "1.10", "1.9"):  # DKMS's order: 1.10 is the newest
        write_source(root, "kmt-base", version)
    done = kmodctl(root, "autoinstall", "-k", K111)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [f"kmodd: kmt-base/1.10 for {K111}: built"]
    states = {
        (s["version"]): s["state"] for s in json.loads(kmodctl(root, "status", "--json").stdout)
    }
    assert states == {"1.0": "added", "1.9": "added", "1.10": "installed"}


def test_a_pinned_version_is_installed_instead_of_the_newest(tmp_path: Path) -> None:
    """kmodd.conf's pin.NAME holds a source at a version; without it the newest comes
    back; `install -m NAME/VERSION` installs that version this once."""
    require_tool("make")
    root = make_system(tmp_path / "root", (K111,))
    for version in ("1.0", "1.10", "1.9"):
        write_source(root, "kmt-base", version)
    conf = root / "etc/kmodd/kmodd.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("pin.kmt-base = 1.9   # 1.10 breaks our boards\n")

    def installed() -> dict[str, str]:
        docs = json.loads(kmodctl(root, "status", "--json").stdout)
        return {d["version"]: d["state"] for d in docs if d["state"] != "added"}

    plan = kmodctl(root, "plan", "-k", K111, "--json")
    assert [(d["name"], d["version"]) for d in json.loads(plan.stdout)] == [("kmt-base", "1.9")]
    pinned = kmodctl(root, "autoinstall", "-k", K111)
    assert pinned.stdout.splitlines() == [f"kmodd: kmt-base/1.9 for {K111}: built"], pinned.stderr
    assert installed() == {"1.9": "installed"}

    once = kmodctl(root, "install", "-m", "kmt-base/1.0", "-k", K111)
    assert once.stdout.splitlines() == [f"kmodd: kmt-base/1.0 for {K111}: built"], once.stderr
    assert installed() == {"1.0": "installed"}

    conf.write_text("pin.kmt-base = 0.5   # not in /usr/src: the newest, then\n")
    newest = kmodctl(root, "autoinstall", "-k", K111)
    assert newest.stdout.splitlines() == [f"kmodd: kmt-base/1.10 for {K111}: built"]
    assert installed() == {"1.10": "installed"}

    conf.write_text("pin.kmt-base\n")
    bad = kmodctl(root, "autoinstall", "-k", K111)
    assert bad.returncode == 3, bad.stderr
    assert f"{root}/etc/kmodd/kmodd.conf:1: expected KEY = VALUE" in bad.stderr, bad.stderr


def test_a_source_upgrade_replaces_the_old_version_and_takes_back_its_weak_links(
    tmp_path: Path,
) -> None:
    """kmt-base 1.0 built for K111 and weak-linked for K113; the package is upgraded
    (/usr/src/kmt-base-1.0 goes, 2.0 comes). K111 gets 2.0 in one step (1.0's record and
    files go); K113's link, which would now load 2.0's build never judged for K113, is
    taken away at once and K113 is judged again in a request of its own, which the
    same command runs next (the service queues it as a job)."""
    require_tool("make")
    root = make_system(tmp_path / "root", (K111, K113))
    old_src = write_source(root, "kmt-base", "1.0")
    for kver in (K111, K113):
        assert kmodctl(root, "autoinstall", "-k", kver).returncode == 0
    assert status_json(root)[("kmt-base", K113)]["weak_from"] == K111

    shutil.rmtree(old_src)
    write_source(root, "kmt-base", "2.0")
    up = kmodctl(root, "autoinstall", "-k", K111)
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"kmodd: kmt-base/2.0 for {K111}: built" in up.stdout.splitlines()
    assert re.search(
        rf"^kmodd: kmt-base/1\.0 for {re.escape(K113)}: removed \(its weak link went to "
        rf"{re.escape(K111)}'s build, now kmt-base/2\.0: to be judged again",
        up.stdout,
        re.M,
    ), up.stdout
    assert up.stdout.splitlines()[-1] == f"kmodd: kmt-base/2.0 for {K113}: weak-linked from {K111}"
    assert not dangling_links(root)
    docs = json.loads(kmodctl(root, "status", "--json").stdout)
    assert {(d["version"], d["kernel"]): d["state"] for d in docs} == {
        ("2.0", K111): "installed",
        ("2.0", K113): "installed-weak",
    }

    # the service's watcher then sees kmt-base-1.0 gone: that version only is forgotten,
    # and 2.0's files, where 1.0's were, stay
    assert manage.forget_source(Root.at(root), "kmt-base/1.0") == []
    assert status_json(root)[("kmt-base", K113)]["state"] == "installed-weak"
    assert (root / "lib/modules" / K111 / "updates/dkms/kmt_simple.ko.xz").is_file()
