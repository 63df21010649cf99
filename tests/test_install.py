"""The README's install command, run as a new user would, on this (throwaway CI)
machine: it leaves a service that answers `kmodctl status`; uninstall removes it.

It changes the machine itself (/opt/kmodd, /usr/local/sbin, /etc/kernel, the system
bus), so it runs under CI=true, or when KMODD_TEST_INSTALL=1 asks for it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool

TOP = Path(__file__).resolve().parent.parent
INSTALLED = [
    Path("/usr/local/sbin/kmodctl"),
    Path("/usr/local/sbin/kmodd"),
    Path("/usr/share/dbus-1/system.d/io.kmodd1.conf"),
    Path("/etc/kernel/install.d/40-kmodd.install"),
    Path("/etc/kernel/postinst.d/40-kmodd"),
    Path("/etc/kernel/header_postinst.d/40-kmodd"),
    Path("/etc/kernel/prerm.d/40-kmodd"),
    Path("/etc/kernel/postinst.d/zz-kmodd"),
    Path("/etc/tmpfiles.d/kmodd.conf"),
    Path("/usr/share/initramfs-tools/hooks/kmodd"),
    Path("/etc/initramfs/post-update.d/kmodd"),
    Path("/usr/lib/dracut/modules.d/90kmodd/module-setup.sh"),
]


def as_admin(*argv: str) -> subprocess.CompletedProcess[str]:
    """A login shell's environment: no test bus, no virtualenv, no KMODD_ROOT."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/root",
    }
    return subprocess.run(
        list(argv), cwd=TOP, env=env, capture_output=True, text=True, check=False, timeout=900
    )


@pytest.mark.skipif(
    os.environ.get("CI") != "true" and os.environ.get("KMODD_TEST_INSTALL") != "1",
    reason="changes this machine: runs in CI or with KMODD_TEST_INSTALL=1",
)
def test_readme_install_command_leaves_a_service_that_answers() -> None:
    require_tool("dbus-daemon")
    assert os.geteuid() == 0, "the install runs as root"
    install = as_admin("./install.sh")
    try:
        assert install.returncode == 0, install.stdout + install.stderr
        for path in INSTALLED:
            assert path.exists(), path
        status = as_admin("kmodctl", "status")
        assert status.returncode == 0, status.stderr
        assert "not running" not in status.stderr, "status must come from the service"
        version = as_admin(
            "busctl",
            "--system",
            "get-property",
            "io.kmodd1",
            "/io/kmodd1",
            "io.kmodd1.Manager",
            "Version",
        )
        if version.returncode == 0:  # busctl needs systemd's bus tools; dbus-send otherwise
            assert version.stdout.startswith('s "')
    finally:
        uninstall = as_admin("./install.sh", "--uninstall")
    assert uninstall.returncode == 0, uninstall.stderr
    for path in INSTALLED:
        assert not path.exists(), path
    after = as_admin("sh", "-c", "command -v kmodctl || echo gone")
    assert after.stdout.strip() == "gone"
