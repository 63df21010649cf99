"""The verdict, checked against two oracles no one here wrote: kmod's depmod and the
real kernel booted under qemu."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from kmodd.base.paths import Root
from kmodd.decide import verdict
from kmodd.world import kernel, modfile, symvers
from tests.conftest import K47, K56, K111, K113, host_headers, require, require_tool
from tests.oracles import qemu

Built = Callable[[str], dict[str, Path]]
# insmod order: a provider before its consumer
LOAD_ORDER = [
    "kmt_pkga",
    "kmt_pkgb",
    "kmt_pkgc",
    "kmt_pkgd",
    "kmt_simple",
    "kmt_misc",
    "kmt_kmalloc",
]
_DEPMOD = re.compile(r"WARNING: (\S+) (disagrees about version of|needs unknown) symbol (\S+)")


def judge(root: Path, kver: str, kos: list[Path]) -> dict[str, verdict.Verdict]:
    k = kernel.find(Root.at(root), kver)
    target = verdict.Target(kver, k.exports(), k.vermagic_flags, k.arch)
    return {v.module.name: v for v in verdict.judge([modfile.read(p) for p in kos], target)}


def depmod_findings(root: Path, kver: str, kos: list[Path]) -> dict[str, dict[str, set[str]]]:
    """kmod's own check: module → {"disagrees": symbols, "unknown": symbols}."""
    depmod = require_tool("depmod")
    extra = root / "lib/modules" / kver / "extra"
    extra.mkdir(parents=True, exist_ok=True)
    for ko in kos:
        shutil.copy(ko, extra)
    symvers_path = host_headers(kver) / "Module.symvers"
    proc = subprocess.run(
        [depmod, "-n", "-e", "-E", symvers_path, "-b", root, kver],
        capture_output=True,
        text=True,
        check=True,
    )
    found: dict[str, dict[str, set[str]]] = {
        ko.stem: {"disagrees": set(), "unknown": set()} for ko in kos
    }
    for path, kind, symbol in _DEPMOD.findall(proc.stderr):
        found[Path(path).stem]["disagrees" if kind.startswith("dis") else "unknown"].add(symbol)
    return found


@pytest.mark.parametrize(("built_for", "target"), [(K111, K113), (K113, K111), (K47, K56)])
def test_verdicts_agree_with_depmod(
    built: Built, make_root: Callable[..., Path], built_for: str, target: str
) -> None:
    root = make_root(target)
    kos = list(built(built_for).values())
    verdicts = judge(root, target, kos)
    oracle = depmod_findings(root, target, kos)
    for name, v in verdicts.items():
        assert {c.symbol for c in v.changed} == oracle[name]["disagrees"], name
        assert set(v.missing) == oracle[name]["unknown"], name


def test_expected_verdicts_across_6_12_point_releases(
    built: Built, make_root: Callable[..., Path]
) -> None:
    verdicts = judge(make_root(K113), K113, list(built(K111).values()))
    reusable = {name for name, v in verdicts.items() if v.reusable}
    assert reusable == {"kmt_simple", "kmt_pkga", "kmt_pkgb"}
    old, new = (symvers.load(host_headers(k) / "Module.symvers").crcs for k in (K111, K113))
    misc = verdicts["kmt_misc"]
    assert {c.symbol for c in misc.changed} == {"misc_register", "misc_deregister"}
    for c in misc.changed:
        assert (c.module_crc, c.kernel_crc) == (old[c.symbol], new[c.symbol])
    # the consumer's own symbols are fine; it is its sibling that is not
    pkgd = verdicts["kmt_pkgd"]
    assert not pkgd.changed and not pkgd.missing and pkgd.blocked_by == ("kmt_pkgc",)
    assert not pkgd.reusable


def test_module_layout_change_refuses_everything(
    built: Built, make_root: Callable[..., Path]
) -> None:
    verdicts = judge(make_root(K56), K56, list(built(K47).values()))
    for v in verdicts.values():
        assert not v.reusable
        assert "module_layout" in {c.symbol for c in v.changed}


def test_a_module_alone_misses_its_sibling(built: Built, make_root: Callable[..., Path]) -> None:
    """Judged without the provider, the consumer's symbol is simply not exported."""
    v = judge(make_root(K113), K113, [built(K111)["kmt_pkgb"]])["kmt_pkgb"]
    assert v.missing == ("kmt_pkga_hello",) and not v.reusable


def _vmlinuz(kver: str) -> Path:
    path = Path(f"/boot/vmlinuz-{kver}")
    require(f"{path} (package linux-image-{kver})", path.is_file())
    require("qemu-system-x86_64", shutil.which(qemu.QEMU) is not None)
    require("busybox (package busybox-static)", qemu.BUSYBOX.is_file())
    return path


def _bad_copies(ko: Path, workdir: Path) -> list[Path]:
    """kmt_simple with a foreign vermagic flag, and with its modversions removed."""
    data = ko.read_bytes()
    magic = workdir / "kmt_badmagic.ko"
    assert data.count(b" mod_unload ") == 1
    magic.write_bytes(data.replace(b" mod_unload ", b" mod_unlo4d "))
    nover = workdir / "kmt_nover.ko"
    subprocess.run(
        [require_tool("objcopy"), "--rename-section", "__versions=.kmt_gone", ko, nover], check=True
    )
    return [magic, nover]


@pytest.mark.parametrize(("built_for", "target"), [(K111, K113), (K113, K113), (K47, K56)])
def test_the_kernel_loads_exactly_what_was_judged_reusable(
    built: Built, make_root: Callable[..., Path], tmp_path: Path, built_for: str, target: str
) -> None:
    vmlinuz = _vmlinuz(target)
    mods = built(built_for)
    kos = [mods[n] for n in LOAD_ORDER]
    root = make_root(target)
    verdicts = judge(root, target, kos)
    by_file = {ko.stem: verdicts[ko.stem] for ko in kos}
    if built_for != target:
        # doctored copies of kmt_simple, loaded first under their own file names
        doctored = _bad_copies(mods["kmt_simple"], tmp_path)
        for bad in doctored:
            by_file[bad.stem] = judge(root, target, [bad])["kmt_simple"]
            assert not by_file[bad.stem].reusable
        assert any("vermagic" in p for p in by_file["kmt_badmagic"].problems)
        assert by_file["kmt_nover"].problems == ("built without modversions: never reused",)
        kos = doctored + kos
    results = qemu.boot_and_insmod(vmlinuz, kos, tmp_path / "qemu")
    for stem, v in by_file.items():
        result = results[stem]
        assert result.loaded == v.reusable, (stem, v.reasons, result)
        # every symbol the kernel complains about is one the verdict names as changed
        name = v.module.name
        complained = set(
            re.findall(rf"{name}: disagrees about version of symbol (\S+)", result.message)
        )
        assert complained <= {c.symbol for c in v.changed}, (stem, result.message)
        assert bool(complained) == bool(v.changed), (stem, result.message)


def test_namespaces_are_compared_not_only_crcs(make_root: Callable[..., Path]) -> None:
    """Debian's own ums-alauda for 6.12.111 imports USB_STORAGE and uses usb_stor_*
    symbols that 6.12.111 exports in that namespace: reusable there. The same module
    without the import (as if the symbols had moved into the namespace after it was
    built: their CRCs stay the same) is refused, naming the namespace, as the kernel's
    loader refuses it."""
    ko = Path(f"/lib/modules/{K111}/kernel/drivers/usb/storage/ums-alauda.ko.xz")
    require(f"{ko} (package linux-image-{K111})", ko.is_file())
    modinfo = require_tool("modinfo")
    real = modfile.read(ko)
    listed = subprocess.run(
        [modinfo, "-F", "import_ns", ko], capture_output=True, text=True, check=True
    ).stdout.split()
    assert real.import_ns == frozenset(listed) == {"USB_STORAGE"}

    k = kernel.find(Root.at(make_root(K111)), K111)
    target = verdict.Target(K111, k.exports(), k.vermagic_flags, k.arch)
    assert k.exports().namespaces["usb_stor_disconnect"] == "USB_STORAGE"
    (found,) = verdict.judge([real], target)
    assert found.reusable, found.reasons

    (found,) = verdict.judge([dataclasses.replace(real, import_ns=frozenset())], target)
    assert not found.reusable
    assert not found.changed and not found.missing, "CRCs and symbols are all fine"
    assert (
        "usb_stor_disconnect is exported in namespace USB_STORAGE, which the module does not import"
    ) in found.reasons
