"""Smoke test of the system tier's harness: a whole Debian 12 booted with systemd as PID 1
in a container, with its own system bus and logind, an unprivileged user, apt that sees
the project's kernels, and a real initrd from it that boots under QEMU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import K111
from tests.system.initrd_boot import boot_initrd_and_modprobe, loaded_modules
from tests.system.machine import Machine, booted_machine

TOP = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    with booted_machine(tmp_path_factory.mktemp("system"), name="smoke") as booted:
        yield booted


def test_systemd_is_pid_1(machine: Machine) -> None:
    assert machine.run("readlink /proc/1/exe").stdout.strip() == "/usr/lib/systemd/systemd"
    assert machine.run("ps -p 1 -o comm=").stdout.strip() == "systemd"
    state = machine.run("systemctl is-system-running", check=False).stdout.strip()
    failed = machine.run("systemctl --failed --no-pager --plain").stdout
    assert state == "running", failed


def test_system_bus_and_logind_answer(machine: Machine) -> None:
    assert "org.freedesktop.login1" in machine.run("busctl --system --no-pager list").stdout
    machine.run(
        "busctl --system call org.freedesktop.login1 /org/freedesktop/login1"
        " org.freedesktop.login1.Manager ListInhibitors"
    )
    locked = machine.run("systemd-inhibit --what=shutdown --mode=block --why=smoke"
                         " systemd-inhibit --list --no-pager")  # fmt: skip
    assert "smoke" in locked.stdout


def test_commands_run_as_alice_in_a_clean_environment(machine: Machine) -> None:
    assert machine.run("id -un", user="alice").stdout.strip() == "alice"
    env = dict(
        line.split("=", 1)
        for line in machine.run("env", user="alice").stdout.splitlines()
        if "=" in line
    )
    assert env["HOME"] == "/home/alice"
    assert machine.run("pwd", user="alice").stdout.strip() == "/home/alice"
    assert env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    login = {"PATH", "HOME", "LANG", "DEBIAN_FRONTEND", "USER", "LOGNAME", "SHELL", "PWD"}
    assert set(env) <= login | {"SHLVL", "_"}  # no VIRTUAL_ENV, DBUS_*, CI… from here
    with pytest.raises(AssertionError, match=r"exit status 3: echo oops >&2; exit 3[\s\S]*oops"):
        machine.run("echo oops >&2; exit 3")


def test_files_in_and_out(machine: Machine) -> None:
    machine.run("echo made-inside > /tmp/inside")  # /tmp is a tmpfs in the machine
    assert machine.path("/tmp/inside").read_text() == "made-inside\n"
    machine.write("/etc/kmodd-smoke", "made-outside\n", mode=0o600)
    assert machine.run("stat -c %a /etc/kmodd-smoke; cat /etc/kmodd-smoke").stdout == (
        "600\nmade-outside\n"
    )
    dest = machine.copy_project()
    assert (dest / "README.md").read_bytes() == (TOP / "README.md").read_bytes()
    machine.run("test -x /root/kmodd/install.sh && test ! -e /root/kmodd/.git")


def test_apt_sees_the_kernel_packages(machine: Machine) -> None:
    policy = machine.run(
        "apt-cache policy linux-image-6.12.111+deb12-amd64 linux-headers-6.12.113+deb12-amd64"
    ).stdout
    candidates = [line for line in policy.splitlines() if line.strip().startswith("Candidate:")]
    assert len(candidates) == 2, policy
    assert all("(none)" not in line for line in candidates), policy


def test_its_real_initrd_boots_and_modprobes(tmp_path: Path) -> None:
    """Debian's own kernel postinst and initramfs-tools make the initrd in the machine;
    the initrd's own modprobe loads what MODULES=most put in it, and only that."""
    with booted_machine(tmp_path, name="initrd") as initrd_machine:
        initrd_machine.run(f"apt-get install -y linux-image-{K111}")
        listing = initrd_machine.run(f"lsinitramfs /boot/initrd.img-{K111}").stdout
        assert "/kernel/drivers/block/virtio_blk.ko" in listing
        assert "/kernel/fs/ext4/ext4.ko" in listing
        results, console = boot_initrd_and_modprobe(
            initrd_machine.path(f"/boot/vmlinuz-{K111}"),
            initrd_machine.path(f"/boot/initrd.img-{K111}"),
            ["virtio_blk", "ext4", "kmt_nonexistent"],
            tmp_path / "qemu",
        )
    assert results["virtio_blk"].loaded, console
    assert results["ext4"].loaded, console
    assert {"virtio_blk", "ext4", "jbd2"} <= loaded_modules(console)
    assert not results["kmt_nonexistent"].loaded
    assert "not found" in results["kmt_nonexistent"].message
