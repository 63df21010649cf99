"""Broken sources: each gets one clear error naming its file and directive, the good
source beside them still installs, and nothing is written outside the kernel's
updates/ and weak-updates/ dirs and kmodd's own state."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.cli import kmodctl
from tests.conftest import K113, require_tool
from tests.sources import write_source
from tests.test_autoinstall import make_system

SIMPLE = ("kmt_simple",)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(("linux-headers-", "linux-kbuild-"))]
        for name in files:
            path = Path(dirpath, name)
            st = path.lstat()
            found[os.fspath(path.relative_to(root))] = (st.st_mtime_ns, st.st_size)
    return found


def allowed(path: str) -> bool:
    kernel_dir = f"lib/modules/{K113}/"
    if path == "initrd-calls":  # the recording initrd generator (kmt-base is REMAKE_INITRD)
        return True
    if path.startswith(("var/lib/kmodd/", kernel_dir + "updates/", kernel_dir + "weak-updates/")):
        return True
    return path.startswith(kernel_dir + "modules.")  # depmod's indices


def test_each_broken_source_fails_alone_with_a_named_error(tmp_path: Path) -> None:
    require_tool("make")
    root = make_system(tmp_path / "root", (K113,))
    write_source(root, "kmt-base")
    write_source(
        root,
        "kmt-dotdot",
        modules=SIMPLE,
        extra='AUTOINSTALL=yes\nDEST_MODULE_LOCATION[0]="/updates/../../etc"\n',
    )
    write_source(root, "kmt-loop", modules=SIMPLE, extra="AUTOINSTALL=yes\nwhile :; do :; done\n")
    write_source(root, "kmt-syntax", modules=SIMPLE, extra="AUTOINSTALL=yes\nif then fi (\n")
    write_source(
        root,
        "kmt-noko",
        modules=SIMPLE,
        extra='AUTOINSTALL=yes\nBUILT_MODULE_NAME[0]="kmt_absent"\n',
    )
    vanish = write_source(
        root, "kmt-vanish", modules=("kmt_pkga",), extra='AUTOINSTALL=yes\nPRE_BUILD="gone"\n'
    )
    (vanish / "gone").write_text(f"#!/bin/sh\nrm -rf {vanish}\n")
    (vanish / "gone").chmod(0o755)
    # its package code may remove its own source only outside kmodd's sandbox
    (root / "etc/kmodd").mkdir(parents=True)
    (root / "etc/kmodd/kmodd.conf").write_text("sandbox.kmt-vanish = off\n")
    before = snapshot(root)

    proc = kmodctl(root, "autoinstall", "-k", K113)

    assert proc.returncode == 7, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    states = {s["module"]: s for s in json.loads(kmodctl(root, "status", "--json").stdout)}
    assert states["kmt-base"]["state"] == "installed"
    # the private build copy finishes although the source dir vanished under it
    assert states["kmt-vanish"]["state"] == "installed"
    conf = os.fspath(root) + "/usr/src/{}-1.0/dkms.conf"
    expected = {
        "kmt-dotdot": f"{conf.format('kmt-dotdot')}: DEST_MODULE_LOCATION[0]:",
        "kmt-loop": f"{conf.format('kmt-loop')}: ",
        "kmt-syntax": f"{conf.format('kmt-syntax')}: ",
        "kmt-noko": f"{conf.format('kmt-noko')}: BUILT_MODULE_NAME[0]: make produced no "
        "kmt_absent.ko",
    }
    for name, start in expected.items():
        detail = str(states[name]["detail"])
        assert states[name]["state"] == "failed", name
        assert detail.startswith(start) and "\n" not in detail, (name, detail)
    assert "10 s" in str(states["kmt-loop"]["detail"])
    assert "syntax error" in str(states["kmt-syntax"]["detail"])
    assert states["kmt-noko"]["log"] and Path(str(states["kmt-noko"]["log"])).is_file()

    after = snapshot(root)
    touched = {p for p in after if before.get(p) != after[p]} | (before.keys() - after.keys())
    touched -= {p for p in before if p.startswith("usr/src/kmt-vanish-1.0/")}
    assert not [p for p in touched if not allowed(p)], sorted(touched)
    assert not (root / "etc" / "kmt_simple.ko.xz").exists()


def test_build_depends_cycles_fail_their_members_named_and_the_rest_go_on(
    tmp_path: Path,
) -> None:
    """A cycle (a → b → a), a source that needs itself, and one that needs a cycle's
    member all fail, each saying why; a source beside them installs. Once this spun at
    100% CPU forever, holding the writers' lock: the run is bounded here."""
    require_tool("make")
    root = make_system(tmp_path / "root", (K113,))
    needs = {"kmt-a": "kmt-b", "kmt-b": "kmt-a", "kmt-self": "kmt-self", "kmt-after": "kmt-a"}
    for name, dep in needs.items():
        write_source(
            root, name, modules=SIMPLE, extra=f'AUTOINSTALL=yes\nBUILD_DEPENDS=("{dep}")\n'
        )
    write_source(root, "kmt-free", modules=SIMPLE, extra="AUTOINSTALL=yes\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kmodd.edges.cli",
            "--root",
            os.fspath(root),
            "autoinstall",
            "-k",
            K113,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 7, proc.stdout + proc.stderr
    lines = {line.split(":")[1].strip().split("/")[0]: line for line in proc.stdout.splitlines()}
    for name in ("kmt-a", "kmt-b"):
        assert re.search(r"failed \(BUILD_DEPENDS cycle: kmt-(a|b) -> kmt-(a|b) -> kmt-\1\)$",
                         lines[name]), lines[name]  # fmt: skip
    assert lines["kmt-self"].endswith("failed (BUILD_DEPENDS cycle: kmt-self -> kmt-self)")
    assert lines["kmt-after"].endswith("failed (BUILD_DEPENDS kmt-a failed)")
    assert lines["kmt-free"].endswith(f"kmt-free/1.0 for {K113}: built")
    states = {s["module"]: s["state"] for s in json.loads(kmodctl(root, "status", "--json").stdout)}
    assert states == {"kmt-a": "failed", "kmt-b": "failed", "kmt-self": "failed",
                      "kmt-after": "failed", "kmt-free": "installed"}  # fmt: skip


def test_dest_module_location_kernel_never_touches_the_kernels_own_module(
    tmp_path: Path,
) -> None:
    """On a system kmodd knows no convention for (no os-release), DEST_MODULE_LOCATION
    is honoured, but /kernel/... goes to updates/...: the kernel's own module of the same
    name is neither overwritten nor, at uninstall, deleted."""
    require_tool("make")
    root = make_system(tmp_path / "root", (K113,))
    (root / "etc/os-release").unlink()
    theirs = root / "lib/modules" / K113 / "kernel/drivers/misc/kmt_simple.ko"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"the kernel package's own module")
    write_source(
        root, "kmt-loc", modules=SIMPLE,
        extra='AUTOINSTALL=yes\nDEST_MODULE_LOCATION[0]="/kernel/drivers/misc"\n',
    )  # fmt: skip
    done = kmodctl(root, "autoinstall", "-k", K113)
    assert done.returncode == 0, done.stdout + done.stderr
    ours = root / "lib/modules" / K113 / "updates/drivers/misc"
    assert [p.name for p in ours.iterdir()] == ["kmt_simple.ko.xz"]
    assert theirs.read_bytes() == b"the kernel package's own module"
    gone = kmodctl(root, "uninstall", "-m", "kmt-loc", "-k", K113)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert not ours.exists()
    assert theirs.read_bytes() == b"the kernel package's own module"


def test_two_sources_claiming_one_module_name_are_a_conflict_not_an_overwrite(
    tmp_path: Path,
) -> None:
    require_tool("make")
    root = make_system(tmp_path / "root", (K113,))
    for name in ("kmt-one", "kmt-two"):
        write_source(root, name, modules=SIMPLE, extra="AUTOINSTALL=yes\n")
    proc = kmodctl(root, "autoinstall", "-k", K113)
    assert proc.returncode == 7, proc.stdout + proc.stderr
    states = {s["module"]: s for s in json.loads(kmodctl(root, "status", "--json").stdout)}
    winner, loser = sorted(states, key=lambda name: states[name]["state"] != "installed")
    assert states[winner]["state"] == "installed"
    assert states[loser]["state"] == "failed"
    assert states[loser]["detail"] == (
        f"conflict: module kmt_simple is already installed by {winner}/1.0 for {K113}; "
        "uninstall one of the two"
    )
    installed = root / "lib/modules" / K113 / "updates/dkms/kmt_simple.ko.xz"
    before = installed.read_bytes()
    gone = kmodctl(root, "uninstall", "-m", loser, "-k", K113)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert installed.read_bytes() == before, "the winner's module stays"
    again = kmodctl(root, "autoinstall", "-k", K113)
    assert f"kmodd: {winner}/1.0 for {K113}: built (up-to-date)" in again.stdout.splitlines()


def test_a_conflict_names_the_version_installed_at_the_end_whatever_finished_first(
    tmp_path: Path,
) -> None:
    """kmt-one 1.0 has kmt_simple installed; kmt-one is upgraded to 2.0 (slow to build)
    while kmt-two, with a module of the same name, arrives. kmt-two is ready first, but
    its conflict is with kmt-one/2.0, which has the module when the run is over: never
    with the 1.0 the same run replaced."""
    require_tool("make")
    root = make_system(tmp_path / "root", (K113,))
    old = write_source(root, "kmt-one", "1.0", modules=SIMPLE, extra="AUTOINSTALL=yes\n")
    assert kmodctl(root, "autoinstall", "-k", K113).returncode == 0
    shutil.rmtree(old)
    write_source(root, "kmt-one", "2.0", modules=SIMPLE,
                 extra='AUTOINSTALL=yes\nPRE_BUILD="slow.sh"\n')  # fmt: skip
    slow = root / "usr/src/kmt-one-2.0/slow.sh"
    slow.write_text("#!/bin/sh\nsleep 4\n")
    slow.chmod(0o755)
    write_source(root, "kmt-two", modules=SIMPLE, extra="AUTOINSTALL=yes\n")
    proc = kmodctl(root, "autoinstall", "-k", K113, "--jobs", "2")
    assert proc.returncode == 7, proc.stdout + proc.stderr
    states = {
        (s["module"], s["version"]): s for s in json.loads(kmodctl(root, "status", "--json").stdout)
    }
    assert states[("kmt-one", "2.0")]["state"] == "installed"
    assert ("kmt-one", "1.0") not in states
    assert states[("kmt-two", "1.0")]["detail"] == (
        f"conflict: module kmt_simple is already installed by kmt-one/2.0 for {K113}; "
        "uninstall one of the two"
    )


def test_a_failed_source_whose_package_went_is_forgotten(tmp_path: Path) -> None:
    """A source that failed to build is removed (its prerm uninstalls it, then dpkg
    takes its dir): the next autoinstall no longer shows a failure of what is gone."""
    require_tool("make")
    root = make_system(tmp_path / "root", (K113,))
    src = write_source(root, "kmt-broken", modules=SIMPLE,
                       extra='AUTOINSTALL=yes\nMAKE="false"\n')  # fmt: skip
    assert kmodctl(root, "autoinstall", "-k", K113).returncode == 7
    assert kmodctl(root, "uninstall", "-m", "kmt-broken/1.0", "-k", K113).returncode == 0
    shutil.rmtree(src)
    proc = kmodctl(root, "autoinstall", "-k", K113)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(kmodctl(root, "status", "--json").stdout) == []
