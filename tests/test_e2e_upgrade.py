"""A kernel upgrade from start to finish, checked on the real kernel.

Kernel A has modules kmodd installed: two real Debian *-dkms packages (acpi-call-dkms;
dpdk-kmods-dkms, whose igb_uio needs the in-tree uio) and the test sources kmt-base
(REMAKE_INITRD), kmt-pair (kmt_pkgb uses kmt_pkga) and kmt-misc. Then kernel B arrives
(its modules dir, then its headers) while the real daemon runs on a real dbus-daemon.
kmodd weak-links what is reusable and rebuilds the rest. Then:

- B, booted under qemu with exactly what kmodd installed for it and its modules.dep,
  loads every module with busybox's `modprobe` (dependencies from modules.dep);
- B refuses A's build of every module kmodd rebuilt ("disagrees about version of
  symbol"), so the verdicts hold in both directions;
- Debian's real `mkinitramfs` makes B an initrd holding the REMAKE_INITRD module, and
  B booted with that initrd loads it with the initrd's own modprobe;
- across an ABI break (6.1.0-47 → 6.1.0-56, module_layout changed) everything is
  rebuilt and loads.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import (
    K47,
    K56,
    K111,
    K113,
    host_headers,
    install_headers,
    require,
    require_tool,
)
from tests.dbus_harness import running_service, system_bus
from tests.debs import unpack_dkms_package
from tests.oracles import qemu
from tests.oracles.qemu_modprobe import boot_and_modprobe, sort_by_dependencies
from tests.sources import write_source
from tests.test_autoinstall import initrd_calls, make_system
from tests.test_daemon import kmodctl, until

# source → the modules it installs
SOURCES: dict[str, tuple[str, ...]] = {
    "acpi-call": ("acpi_call",),
    "dpdk-kmods": ("igb_uio",),
    "kmt-base": ("kmt_simple",),
    "kmt-pair": ("kmt_pkga", "kmt_pkgb"),
    "kmt-misc": ("kmt_misc",),
}
DEBS = ("acpi-call-dkms", "dpdk-kmods-dkms")
# What the kernel package ships that the modules above need or modprobe reads: igb_uio
# uses uio's exports. (Not the whole tree: depmod over 4,000 .ko.xz takes ~9 s.)
IN_TREE = ("kernel/drivers/uio/uio.ko", "modules.builtin", "modules.builtin.modinfo")
FINAL = ("installed", "installed-weak", "failed", "excluded")
REFUSED = "disagrees about version of symbol"


@dataclass
class Upgrade:
    root: Path
    old: str
    new: str
    states: dict[tuple[str, str], dict[str, object]]
    """`kmodctl status --json`, from the service, once B was done."""
    checked: dict[str, bool]
    """`kmodctl check -k B` on A's installed modules: module → reusable."""
    service_log: str

    @property
    def new_dir(self) -> Path:
        return self.root / "lib/modules" / self.new

    def installed(self, kver: str) -> dict[str, Path]:
        """Module name → file, for every module kmodd installed for `kver`."""
        moddir = self.root / "lib/modules" / kver
        found = {}
        for sub in ("updates", "weak-updates"):
            for path in (moddir / sub).rglob("*.ko*"):
                found[path.name.split(".", 1)[0]] = path
        return found


def vmlinuz(kver: str) -> Path:
    path = Path(f"/boot/vmlinuz-{kver}")
    require(f"{path} (package linux-image-{kver})", path.is_file())
    require("qemu-system-x86_64", shutil.which(qemu.QEMU) is not None)
    require("busybox (package busybox-static)", qemu.BUSYBOX.is_file())
    return path


def host_module(kver: str, rel: str) -> Path | None:
    """The kernel package's own file `rel` (a module in any compression), if installed."""
    for suffix in ("", ".xz", ".zst", ".gz"):
        path = Path("/lib/modules", kver, rel + suffix)
        if path.is_file():
            return path
    return None


def ship_kernel_files(moddir: Path, kver: str, *, required: bool) -> None:
    for rel in IN_TREE:
        src = host_module(kver, rel)
        if src is None:
            require(f"/lib/modules/{kver}/{rel} (package linux-image-{kver})", not required)
            continue
        dst = moddir / src.relative_to(Path("/lib/modules", kver))
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def kernel_arrives(root: Path, kver: str) -> None:
    """What a kernel package and then its headers package put in place: the modules dir
    (renamed in whole, as the daemon may look at any moment), an initrd, the headers."""
    stage = root / "staging" / kver
    stage.mkdir(parents=True)
    ship_kernel_files(stage, kver, required=True)
    stage.rename(root / "lib/modules" / kver)
    (root / f"boot/initrd.img-{kver}").write_bytes(b"initrd made by the kernel package")
    # Both 6.1 ABIs use one linux-kbuild-6.1, which the new headers' kbuild replaces (as
    # dpkg would); conftest.install_headers cannot link a tree over an existing one.
    kbuild = (host_headers(kver) / "scripts").resolve().parent
    shutil.rmtree(root / kbuild.relative_to("/"), ignore_errors=True)
    install_headers(root, kver, full=True)


def decompressed(path: Path, dest_dir: Path, name: str) -> Path:
    """`path` (.ko, .ko.xz, .ko.gz) as an uncompressed `dest_dir/NAME.ko`."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        data = lzma.decompress(data)
    elif path.name.endswith(".gz"):
        data = gzip.decompress(data)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{name}.ko"
    dest.write_bytes(data)
    return dest


def run_upgrade(base: Path, old: str, new: str) -> Upgrade:
    require_tool("make")
    require_tool("depmod")
    root = make_system(base / "root", (old,))
    ship_kernel_files(root / "lib/modules" / old, old, required=False)
    for deb in DEBS:
        unpack_dkms_package(deb, root)
    for name in ("kmt-base", "kmt-pair", "kmt-misc"):
        write_source(root, name)
    with (
        system_bus(base / "bus") as bus,
        running_service(bus, root, base / "kmodd.log", daemon=True) as server,
    ):
        done = kmodctl(bus, root, "autoinstall", "-k", old)
        assert done.returncode == 0, done.stdout + done.stderr + server.output()

        kernel_arrives(root, new)

        def states() -> dict[tuple[str, str], dict[str, object]]:
            proc = kmodctl(bus, root, "status", "--json")
            assert proc.returncode == 0, proc.stderr
            assert "not running" not in proc.stderr, "status must come from the service"
            return {(s["module"], s["kernel"]): s for s in json.loads(proc.stdout)}

        def all_done() -> bool:
            now = states()
            return all(now.get((name, new), {}).get("state") in FINAL for name in SOURCES)

        until(all_done, 300)
        waited = kmodctl(bus, root, "wait", "-k", new, "--timeout", "300")
        assert waited.returncode == 0, waited.stdout + waited.stderr + server.output()
        final = states()
        old_files = [
            os.fspath(p)
            for p in (root / "lib/modules" / old / "updates").rglob("*.ko*")
            if p.is_file()
        ]
        check = kmodctl(bus, root, "check", "-k", new, "--json", *sorted(old_files))
        assert check.returncode in (0, 1), check.stdout + check.stderr
        checked = {m["name"]: m["reusable"] for m in json.loads(check.stdout)["modules"]}
        output = server.output()
    return Upgrade(root, old, new, final, checked, output)


@pytest.fixture(scope="module")
def point_release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upgrade]:
    yield run_upgrade(tmp_path_factory.mktemp("point-release"), K111, K113)


@pytest.fixture(scope="module")
def abi_break(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upgrade]:
    yield run_upgrade(tmp_path_factory.mktemp("abi-break"), K47, K56)


def expected_modules() -> set[str]:
    return {module for modules in SOURCES.values() for module in modules}


def test_point_release_weak_links_what_is_reusable_and_rebuilds_the_rest(
    point_release: Upgrade,
) -> None:
    up = point_release
    assert "Traceback" not in up.service_log
    for source, modules in SOURCES.items():
        old = up.states[(source, up.old)]
        assert old["state"] == "installed", (source, old)
        new = up.states[(source, up.new)]
        reusable = all(up.checked[m] for m in modules)
        if reusable:
            assert new["state"] == "installed-weak", (source, new)
            assert new["weak_from"] == up.old
        else:
            assert new["state"] == "installed", (source, new)
    # what is known of these kernels' kABI (tests/test_compat.py)
    assert up.states[("kmt-base", up.new)]["state"] == "installed-weak"
    assert up.states[("kmt-pair", up.new)]["state"] == "installed-weak"
    assert up.states[("kmt-misc", up.new)]["state"] == "installed"
    assert up.states[("dpdk-kmods", up.new)]["state"] == "installed"
    assert set(up.installed(up.new)) == expected_modules()


def test_point_release_b_loads_everything_kmodd_installed_with_modprobe(
    point_release: Upgrade, tmp_path: Path
) -> None:
    up = point_release
    kernel = vmlinuz(up.new)
    installed = up.installed(up.new)
    names = sort_by_dependencies((up.new_dir / "modules.dep").read_text(), installed)
    report = boot_and_modprobe(kernel, up.new, up.new_dir, names, tmp_path / "qemu")
    assert report.uname == up.new
    # the initrd held what kmodd installed, plus what modules.dep says igb_uio needs
    ours = {os.fspath(path.relative_to(up.new_dir)) for path in installed.values()}
    assert set(report.files) == ours | {"kernel/drivers/uio/uio.ko.xz"}, report.files
    for name in names:
        assert report.results[name].loaded, (name, report.results[name].message)
    # modprobe itself loaded igb_uio's in-tree dependency from modules.dep
    assert report.loaded == expected_modules() | {"uio"}, report.loaded
    weak = [f for f in report.files if f.startswith("weak-updates/")]
    assert {Path(f).name.split(".")[0] for f in weak} == {"kmt_simple", "kmt_pkga", "kmt_pkgb"}


def test_point_release_b_refuses_a_builds_of_what_was_rebuilt(
    point_release: Upgrade, tmp_path: Path
) -> None:
    up = point_release
    rebuilt = sorted(m for m, reusable in up.checked.items() if not reusable)
    assert {"kmt_misc", "igb_uio"} <= set(rebuilt)
    old = up.installed(up.old)
    uio = host_module(up.new, "kernel/drivers/uio/uio.ko")
    assert uio is not None
    kos = [decompressed(uio, tmp_path / "ko", "uio")]  # igb_uio needs it loaded first
    kos += [decompressed(old[m], tmp_path / "ko", m) for m in rebuilt]
    results = qemu.boot_and_insmod(vmlinuz(up.new), kos, tmp_path / "qemu")
    assert results["uio"].loaded, results["uio"].message
    for name in rebuilt:
        assert not results[name].loaded, name
        assert f"{name}: {REFUSED}" in results[name].message, results[name].message


# Debian's real initramfs-tools, against kmodd's tree ----------------------------------------

# /etc/initramfs-tools/initramfs.conf as Debian ships it, but MODULES=list: only what
# `modules` names (and the hooks add) goes in; gzip, so the kernel unpacks it quickly.
_INITRAMFS_CONF = """MODULES=list
BUSYBOX=auto
KEYMAP=n
COMPRESS=gzip
COMPRESSLEVEL=1
DEVICE=
NFSROOT=auto
RUNSIZE=10%
FSTYPE=auto
"""

# Runs after the real initrd is unpacked (rdinit=): the initrd's own kmod modprobe.
_CHECK_INIT = """#!/kmt/busybox sh
B=/kmt/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
echo 1 > /proc/sys/kernel/printk
$B dmesg -c > /dev/null
/sbin/modprobe -v kmt_simple > /tmp-kmt.out 2>&1
echo "KMT-RESULT kmt_simple $?"
$B dmesg | while IFS= read -r line; do echo "KMT-MSG kmt_simple $line"; done
while IFS= read -r line; do echo "KMT-MSG kmt_simple $line"; done < /tmp-kmt.out
echo KMT-END
$B poweroff -f
"""


def mkinitramfs(root: Path, kver: str, workdir: Path) -> Path:
    """Debian's mkinitramfs for `kver`, reading the modules of `root`.

    mkinitramfs has no root option: MODULESDIR is /lib/modules/KVER and its hooks run
    /sbin/modprobe --set-version=KVER, so `-d` (config dir) cannot point it elsewhere and
    chroot would need a whole Debian in the root. It runs in a private mount namespace
    (`unshare --mount`, propagation private) where root's lib/modules is bind-mounted
    on /lib/modules — all of it, so B's relative weak links into A's dir resolve."""
    mk = require_tool("mkinitramfs")
    unshare = require_tool("unshare")
    probe = subprocess.run(
        [unshare, "--mount", "true"], capture_output=True, text=True, check=False
    )
    require(
        f"a private mount namespace (unshare --mount: {probe.stderr.strip()})", not probe.returncode
    )
    conf = workdir / "initramfs-tools"
    for sub in ("conf.d", "hooks", "scripts"):
        (conf / sub).mkdir(parents=True)
    (conf / "initramfs.conf").write_text(_INITRAMFS_CONF)
    (conf / "modules").write_text("# the REMAKE_INITRD module kmodd installed\nkmt_simple\n")
    out = workdir / f"initrd.img-{kver}"
    script = 'mount --bind "$1/lib/modules" /lib/modules && exec "$2" -d "$3" -o "$4" "$5"'
    proc = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         root, mk, conf, out, kver],
        env={**os.environ, "TMPDIR": os.fspath(workdir)},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_the_real_initramfs_generator_takes_the_remake_initrd_module(
    point_release: Upgrade, tmp_path: Path
) -> None:
    up = point_release
    assert f"-u -k {up.new}" in initrd_calls(up.root), "kmodd asked for B's initrd to be remade"
    image = mkinitramfs(up.root, up.new, tmp_path)
    listing = subprocess.run(
        [require_tool("lsinitramfs"), image], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    ours = [line for line in listing if line.endswith("kmt_simple.ko.xz")]
    assert f"usr/lib/modules/{up.new}/weak-updates/kmt-base/kmt_simple.ko.xz" in ours, ours
    assert f"usr/lib/modules/{up.old}/updates/dkms/kmt_simple.ko.xz" in ours, ours  # its target

    # boot B on that initrd, plus a small archive whose /kmt-init runs its modprobe
    overlay = tmp_path / "overlay.cpio.gz"
    entries = [
        qemu._Entry("kmt", qemu._S_IFDIR | 0o755),
        qemu._Entry("kmt/busybox", qemu._S_IFREG | 0o755, qemu.BUSYBOX.read_bytes()),
        qemu._Entry("kmt-init", qemu._S_IFREG | 0o755, _CHECK_INIT.encode()),
    ]
    overlay.write_bytes(gzip.compress(qemu._newc_archive(entries), compresslevel=1))
    both = tmp_path / "both.img"
    both.write_bytes(image.read_bytes() + overlay.read_bytes())
    cmd = qemu.qemu_command(vmlinuz(up.new), both)
    cmd[cmd.index("-append") + 1] += " rdinit=/kmt-init"
    output = qemu._run_qemu(cmd, tmp_path / "console.log", 180)
    result = qemu.parse_console(output, ["kmt_simple"])["kmt_simple"]
    assert result.loaded, result.message


# An ABI break: module_layout changed ------------------------------------------------------


def test_abi_break_rebuilds_everything_and_b_loads_it(abi_break: Upgrade, tmp_path: Path) -> None:
    up = abi_break
    assert "Traceback" not in up.service_log
    assert not any(up.checked.values()), up.checked
    for source in SOURCES:
        assert up.states[(source, up.old)]["state"] == "installed", source
        assert up.states[(source, up.new)]["state"] == "installed", source
    installed = up.installed(up.new)
    assert set(installed) == expected_modules()
    assert not (up.new_dir / "weak-updates").exists() or not any(
        (up.new_dir / "weak-updates").rglob("*.ko*")
    )
    names = sort_by_dependencies((up.new_dir / "modules.dep").read_text(), installed)
    report = boot_and_modprobe(vmlinuz(up.new), up.new, up.new_dir, names, tmp_path / "qemu")
    assert report.uname == up.new
    for name in names:
        assert report.results[name].loaded, (name, report.results[name].message)
    assert report.loaded == expected_modules() | {"uio"}, report.loaded


def test_abi_break_b_refuses_every_a_build(abi_break: Upgrade, tmp_path: Path) -> None:
    up = abi_break
    old = up.installed(up.old)
    uio = host_module(up.new, "kernel/drivers/uio/uio.ko")
    assert uio is not None
    kos = [decompressed(uio, tmp_path / "ko", "uio")]
    kos += [decompressed(old[m], tmp_path / "ko", m) for m in sorted(old)]
    results = qemu.boot_and_insmod(vmlinuz(up.new), kos, tmp_path / "qemu")
    assert results["uio"].loaded, results["uio"].message
    for name in sorted(old):
        assert not results[name].loaded, name
        assert f"{name}: {REFUSED} module_layout" in results[name].message, results[name].message
