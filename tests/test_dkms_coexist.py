"""Living beside a real DKMS: Debian's dkms 3 builds and installs acpi-call into a
temporary root; kmodd reports it as DKMS's, leaves it alone, and takes it over only
when told to (`kmodctl adopt`)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli import kmodctl
from tests.conftest import K113, require_tool
from tests.debs import unpack_dkms_package
from tests.test_autoinstall import make_system, status_json

ARCH = "x86_64"
HOST_DKMS = Path("/var/lib/dkms")


@dataclass(frozen=True)
class DkmsSystem:
    root: Path
    dkms: str
    outputs: dict[str, str]

    @property
    def tree(self) -> Path:
        return self.root / "var/lib/dkms"

    @property
    def updates(self) -> Path:
        return self.root / "lib/modules" / K113 / "updates/dkms"

    def installed(self) -> Path:
        files = sorted(self.updates.glob("acpi_call.ko*"))
        assert len(files) == 1, files
        return files[0]

    def run(self, action: str) -> subprocess.CompletedProcess[str]:
        return dkms(self.dkms, self.root, action)


def dkms(exe: str, root: Path, action: str) -> subprocess.CompletedProcess[str]:
    """Real dkms confined to `root`: its trees, the root's headers, no host depmod.

    DKMS signs what it builds when the kernel has sign-file (Debian's default key is
    /var/lib/dkms/mok.key, created on first use); the framework.conf variables, taken
    from the environment, point it at a key inside the root's DKMS tree instead."""
    headers = root / "usr/src" / f"linux-headers-{K113}"
    env = dict(
        os.environ,
        sign_file=os.fspath(headers / "scripts/sign-file"),
        mok_signing_key=os.fspath(root / "var/lib/dkms/mok.key"),
        mok_certificate=os.fspath(root / "var/lib/dkms/mok.pub"),
    )
    argv = [exe, action, "-m", "acpi-call", "-v", "1.2.2", "-k", K113]
    argv += ["--sourcetree", os.fspath(root / "usr/src")]
    argv += ["--dkmstree", os.fspath(root / "var/lib/dkms")]
    argv += ["--installtree", os.fspath(root / "lib/modules")]
    argv += ["--kernelsourcedir", os.fspath(headers)]
    if action != "status":
        argv.append("--no-depmod")
    return subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=600)


def host_traces() -> dict[str, object]:
    """What a DKMS run that escaped the root would leave on this machine."""
    key = HOST_DKMS / "mok.key"
    return {
        "dkms tree entry": (HOST_DKMS / "acpi-call").exists(),
        "source": Path("/usr/src/acpi-call-1.2.2").exists(),
        "module": sorted(Path("/lib/modules").glob("*/updates/dkms/acpi_call.ko*")),
        "mok.key": key.stat().st_mtime_ns if key.exists() else None,
    }


def modinfo(field: str, path: Path) -> str:
    exe = require_tool("modinfo")
    proc = subprocess.run([exe, "-F", field, path], capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def identity(path: Path) -> tuple[int, int, bytes]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, path.read_bytes()


@pytest.fixture
def system(tmp_path: Path) -> DkmsSystem:
    """A root with K113 and acpi-call 1.2.2 added, built and installed by real DKMS."""
    require_tool("make")
    exe = require_tool("dkms")
    root = make_system(tmp_path / "root", (K113,))
    unpack_dkms_package("acpi-call-dkms", root)
    (root / "var/lib/dkms").mkdir(parents=True)
    before = host_traces()
    outputs = {}
    for action in ("add", "build", "install"):
        proc = dkms(exe, root, action)
        assert proc.returncode == 0, f"dkms {action}:\n{proc.stdout}{proc.stderr}"
        outputs[action] = proc.stdout
    assert host_traces() == before, "dkms wrote outside the root"
    return DkmsSystem(root, exe, outputs)


def test_what_real_dkms_leaves_behind(system: DkmsSystem) -> None:
    marker = system.tree / "acpi-call" / f"kernel-{K113}-{ARCH}"
    assert marker.is_symlink()
    assert marker.readlink() == Path(f"1.2.2/{K113}/{ARCH}")
    built = system.tree / "acpi-call/1.2.2" / K113 / ARCH
    assert (built / "log/make.log").is_file()
    source = system.tree / "acpi-call/1.2.2/source"
    assert source.resolve() == (system.root / "usr/src/acpi-call-1.2.2").resolve()
    # DEST_MODULE_LOCATION="/extra" becomes /updates/dkms on Debian; the copy is DKMS's build
    installed = system.installed()
    (kept,) = (built / "module").iterdir()
    assert kept.name == installed.name
    assert kept.read_bytes() == installed.read_bytes()
    assert f"Installing to {system.updates}/" in system.outputs["install"]
    assert not (system.root / "lib/modules" / K113 / "extra").exists()
    # signed with the key DKMS generated inside the root
    assert f"Signing key: {system.tree}/mok.key" in system.outputs["build"]
    assert (system.tree / "mok.key").is_file()
    assert modinfo("signer", installed) == "DKMS module signing key"
    assert modinfo("vermagic", installed).startswith(f"{K113} SMP ")
    status = system.run("status")
    assert f"acpi-call/1.2.2, {K113}, {ARCH}: installed" in status.stdout.splitlines()


def test_kmodd_reports_what_dkms_installed_and_leaves_it_alone(system: DkmsSystem) -> None:
    proc = kmodctl(system.root, "status")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"acpi-call/1.2.2, {K113}, {ARCH}: managed-by-dkms"]

    installed = system.installed()
    before = identity(installed)
    proc = kmodctl(system.root, "autoinstall", "-k", K113)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [
        f"kmodd: acpi-call/1.2.2 for {K113}: managed-by-dkms (DKMS installed acpi-call/1.2.2 "
        f"for {K113}; `kmodctl adopt -m acpi-call` takes it over)"
    ]
    assert identity(installed) == before
    assert sorted(system.updates.iterdir()) == [installed]
    assert not (system.root / "lib/modules" / K113 / "modules.dep").exists(), "no depmod"
    assert not (system.root / "var/lib/kmodd/builds").exists(), "nothing built"
    state = status_json(system.root)[("acpi-call", K113)]
    assert state["state"] == "managed-by-dkms"
    assert "kmodctl adopt -m acpi-call" in str(state["detail"])


def test_adopt_replaces_dkms_build_with_kmodds(system: DkmsSystem) -> None:
    dkms_bytes = system.installed().read_bytes()
    proc = kmodctl(system.root, "adopt", "-m", "acpi-call")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [f"kmodd: acpi-call/1.2.2 for {K113}: built"]

    proc = kmodctl(system.root, "status")
    assert proc.stdout.splitlines() == [f"acpi-call/1.2.2, {K113}, {ARCH}: installed"]
    installed = system.installed()
    artefacts = system.root / "var/lib/kmodd/builds/acpi-call/1.2.2" / K113 / ARCH
    assert installed.read_bytes() == (artefacts / installed.name).read_bytes()
    assert installed.read_bytes() != dkms_bytes
    assert modinfo("signer", installed) == "", "kmodd has no key configured: unsigned"
    assert modinfo("vermagic", installed).startswith(f"{K113} SMP ")
    deps = (system.root / "lib/modules" / K113 / "modules.dep").read_text().splitlines()
    assert deps == [f"updates/dkms/{installed.name}:"]

    # DKMS no longer claims the install, so its uninstall cannot delete kmodd's file;
    # its own build tree stays
    assert not (system.tree / "acpi-call" / f"kernel-{K113}-{ARCH}").is_symlink()
    assert (system.tree / "acpi-call" / "1.2.2" / K113 / ARCH).is_dir()

    again = kmodctl(system.root, "autoinstall", "-k", K113)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.splitlines() == [f"kmodd: acpi-call/1.2.2 for {K113}: built (up-to-date)"]
    assert installed.read_bytes() == (artefacts / installed.name).read_bytes()
