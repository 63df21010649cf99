"""The kernel hooks, run by the real `kernel-install` (systemd 252) and `run-parts`, with
kmodd pointed at a temporary root (the service is not running: the offline path)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import K113, require_tool
from tests.sources import write_source
from tests.test_autoinstall import initrd_calls, make_system, status_json

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "kernel-install.d/40-kmodd.install"
HOOKS = REPO / "debian-hooks"


def kmodctl_wrapper(tmp: Path) -> Path:
    """`kmodctl` on PATH for the hooks: this checkout's, with this Python."""
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / "kmodctl"
    wrapper.write_text(
        f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m kmodd.edges.cli "$@"\n'
    )
    wrapper.chmod(0o755)
    return bindir


def hook_env(tmp: Path, root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERNEL_INSTALL")}
    env["PATH"] = f"{kmodctl_wrapper(tmp)}:{env.get('PATH', '/usr/bin:/bin')}"
    env["KMODD_ROOT"] = os.fspath(root)
    env["DBUS_SYSTEM_BUS_ADDRESS"] = f"unix:path={tmp}/no-bus"  # no service here
    return env


def recorder(tmp: Path, root: Path) -> tuple[Path, Path]:
    """A kernel-install plugin numbered 50 that lists, when it runs, what kmodd put in
    the new kernel's updates/ dir."""
    record = tmp / "record"
    plugin = tmp / "plugins/50-record.install"
    plugin.parent.mkdir(exist_ok=True)
    plugin.write_text(
        "#!/bin/sh\n"
        f'echo "$1 $2" >> {record}\n'
        f'ls "{root}/lib/modules/$2/updates/dkms" >> {record} 2>&1\n'
        "exit 0\n"
    )
    plugin.chmod(0o755)
    return plugin, record


def kernel_install(tmp: Path, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = require_tool("kernel-install")
    plugin, _ = recorder(tmp, root)
    env = hook_env(tmp, root)
    env["KERNEL_INSTALL_PLUGINS"] = f"{PLUGIN} {plugin}"
    env["BOOT_ROOT"] = os.fspath(tmp / "efi")
    (tmp / "efi").mkdir(exist_ok=True)
    image = tmp / "vmlinuz"
    image.write_bytes(b"not really a kernel")
    argv = [exe, "--verbose", *args]
    if args[0] == "add":
        argv.append(os.fspath(image))
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=900)


def test_kernel_install_add_puts_modules_in_place_before_plugin_50(tmp_path: Path) -> None:
    require_tool("make")
    root = make_system(tmp_path / "root", (K113,))
    write_source(root, "kmt-base")
    write_source(
        root,
        "kmt-broken",
        modules=("kmt_simple",),
        extra='AUTOINSTALL=yes\nBUILT_MODULE_NAME[0]="kmt_absent"\n',
    )
    proc = kernel_install(tmp_path, root, "add", K113)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = (tmp_path / "record").read_text().splitlines()
    assert record[0] == f"add {K113}"
    assert "kmt_simple.ko.xz" in record[1:], "installed before plugin 50 ran"
    # the broken source is reported, and did not stop kernel-install
    assert f"kmodd: some modules for {K113} are not in place" in proc.stderr
    states = status_json(root)
    assert states[("kmt-broken", K113)]["state"] == "failed"
    assert initrd_calls(root) == [], "the generator runs next: kmodd makes no initrd here"

    proc = kernel_install(tmp_path, root, "remove", K113)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (root / "lib/modules" / K113 / "updates/dkms/kmt_simple.ko.xz").exists()


def test_plugin_exits_0_even_when_kmodctl_fails_badly(tmp_path: Path) -> None:
    root = tmp_path / "not-a-root"
    env = hook_env(tmp_path, root)
    proc = subprocess.run(
        [PLUGIN, "add", "9.9.9-nonexistent", "/x", "/vmlinuz"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0
    assert "kmodd: some modules for 9.9.9-nonexistent are not in place" in proc.stderr
    assert proc.stdout == ""


def test_run_parts_runs_kmodd_before_dkms_and_initramfs_tools(tmp_path: Path) -> None:
    run_parts = require_tool("run-parts")
    hooks = tmp_path / "postinst.d"
    hooks.mkdir()
    for name in ("initramfs-tools", "dkms", "zz-update-grub"):
        (hooks / name).write_text("#!/bin/sh\n")
        (hooks / name).chmod(0o755)
    shutil.copy(HOOKS / "postinst", hooks / "40-kmodd")
    order = subprocess.run(
        [run_parts, "--test", hooks], capture_output=True, text=True, check=True
    ).stdout.split()
    assert [Path(p).name for p in order] == [
        "40-kmodd",
        "dkms",
        "initramfs-tools",
        "zz-update-grub",
    ]


@pytest.mark.parametrize("has_initrd", [True, False])
def test_header_hook_builds_and_remakes_an_existing_initrd(
    tmp_path: Path, has_initrd: bool
) -> None:
    """Headers after the image: the postinst hook finds no headers and waits; the header
    hook builds, then remakes the initrd initramfs-tools already made, if there is one."""
    require_tool("make")
    root = make_system(tmp_path / "root", (K113,))
    write_source(root, "kmt-base")  # REMAKE_INITRD=yes
    build = root / "lib/modules" / K113 / "build"
    build.rename(tmp_path / "build-later")
    if not has_initrd:
        (root / f"boot/initrd.img-{K113}").unlink()
    env = hook_env(tmp_path, root)
    post = subprocess.run(
        [HOOKS / "postinst", K113, "/boot/vmlinuz"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert post.returncode == 0 and post.stdout == ""
    assert status_json(root)[("kmt-base", K113)]["state"] == "waiting-for-headers"

    (tmp_path / "build-later").rename(build)
    hdr = subprocess.run(
        [HOOKS / "header_postinst", K113], env=env, capture_output=True, text=True, check=False
    )
    assert hdr.returncode == 0 and hdr.stdout == "", hdr.stderr
    assert status_json(root)[("kmt-base", K113)]["state"] == "installed"
    assert initrd_calls(root) == ([f"-u -k {K113}"] if has_initrd else [])


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    unit = tmp_path / "kmodd.service"
    text = (REPO / "systemd/kmodd.service").read_text()
    # verify needs the ExecStart binary to exist
    unit.write_text(text.replace("/usr/local/sbin/kmodd", shutil.which("true") or "/bin/true"))
    proc = subprocess.run([analyze, "verify", unit], capture_output=True, text=True, check=False)
    problems = [line for line in proc.stderr.splitlines() if "kmodd.service" in line]
    assert proc.returncode == 0 and not problems, proc.stderr
