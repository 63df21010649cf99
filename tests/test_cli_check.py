"""`kmodctl check`: the contract scripts rely on: exit codes, JSON shape, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import K111, K113

Built = Callable[[str], dict[str, Path]]


def kmodctl(*args: str | Path, root: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KMODD_ROOT"}
    if root is not None:
        env["KMODD_ROOT"] = os.fspath(root)
    return subprocess.run(
        [sys.executable, "-m", "kmodd.edges.cli", *(os.fspath(a) for a in args)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def test_json_contract_and_exit_1_when_a_rebuild_is_needed(
    built: Built, make_root: Callable[..., Path]
) -> None:
    root = make_root(K113)
    mods = built(K111)
    proc = kmodctl(
        "--root", root, "check", "--kernel", K113, "--json", mods["kmt_simple"], mods["kmt_misc"]
    )
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["kernel"] == K113
    simple, misc = doc["modules"]
    assert simple == {
        "path": os.fspath(mods["kmt_simple"]),
        "name": "kmt_simple",
        "reusable": True,
        "changed": [],
        "missing": [],
        "reasons": [],
    }
    assert misc["reusable"] is False
    assert {c["symbol"] for c in misc["changed"]} == {"misc_register", "misc_deregister"}
    for change in misc["changed"]:
        assert set(change) == {"symbol", "module_crc", "kernel_crc"}
        assert (
            change["module_crc"].startswith("0x") and change["module_crc"] != change["kernel_crc"]
        )
    assert any("misc_register changed" in r for r in misc["reasons"])


def test_exit_0_and_a_short_human_answer(built: Built, make_root: Callable[..., Path]) -> None:
    root = make_root(K113)
    mods = built(K111)
    ok = kmodctl("check", "-k", K113, mods["kmt_pkga"], mods["kmt_pkgb"], root=root)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count(": reusable") == 2
    bad = kmodctl("check", "-k", K113, mods["kmt_pkgc"], mods["kmt_pkgd"], root=root)
    assert bad.returncode == 1
    pkgc, pkgd = bad.stdout.splitlines()
    assert "rebuild: changed misc_deregister, misc_register" in pkgc
    assert "needs sibling kmt_pkgc (not reusable)" in pkgd


def test_without_modules_checks_installed_out_of_tree_modules(
    built: Built, make_root: Callable[..., Path]
) -> None:
    """The main job: every installed kernel against what is installed for the others."""
    root = make_root(K111, K113)
    updates = root / "lib/modules" / K111 / "updates/dkms"
    updates.mkdir(parents=True)
    for name in ("kmt_simple", "kmt_misc"):
        shutil.copy(built(K111)[name], updates)
    proc = kmodctl("--root", root, "check", "--json")
    assert proc.returncode == 1, proc.stderr
    reports = {r["kernel"]: r for r in json.loads(proc.stdout)}
    assert reports[K111]["modules"] == []
    verdicts = {m["name"]: m["reusable"] for m in reports[K113]["modules"]}
    assert verdicts == {"kmt_simple": True, "kmt_misc": False}


def test_bad_input_is_one_line_with_a_documented_code(
    built: Built, make_root: Callable[..., Path], tmp_path: Path
) -> None:
    root = make_root(K113)
    truncated = tmp_path / "cut.ko"
    truncated.write_bytes(built(K111)["kmt_simple"].read_bytes()[:3000])
    cases = [
        ((truncated,), 3, f"kmodctl: {truncated}: truncated"),
        ((tmp_path / "absent.ko",), 4, f"kmodctl: {tmp_path / 'absent.ko'}: no such module file"),
        ((Path("/etc/hostname"),), 3, "kmodctl: /etc/hostname: not an ELF file"),
    ]
    for modules, code, message in cases:
        proc = kmodctl("--root", root, "check", "-k", K113, *modules)
        assert proc.returncode == code, proc.stderr
        assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr
    symvers = root / f"usr/src/linux-headers-{K113}/Module.symvers"
    symvers.unlink()
    symvers.write_text("0x1\tgood\tvmlinux\tEXPORT_SYMBOL\nbroken line\n")
    proc = kmodctl("--root", root, "check", "-k", K113, built(K111)["kmt_simple"])
    assert proc.returncode == 3
    assert proc.stderr == f"kmodctl: {symvers}:2: expected 4 or 5 tab-separated columns, found 1\n"
    symvers.unlink()
    proc = kmodctl("--root", root, "check", "-k", K113, built(K111)["kmt_simple"])
    assert proc.returncode == 4 and f"kernel {K113} has no exports file" in proc.stderr
    assert kmodctl("--root", root, "check", "-k", "9.9", truncated).returncode == 4
    usage = kmodctl("--root", root, "check", built(K111)["kmt_simple"])
    assert usage.returncode == 2 and "needs --kernel" in usage.stderr
    assert kmodctl("--root", root, "frobnicate").returncode == 2
