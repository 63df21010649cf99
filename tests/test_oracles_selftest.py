"""Self-test of the oracle harness: real Kbuild builds, real kernels booted under QEMU.

Proves that tests/oracles builds the tests/modsrc modules and reports what a real kernel
does with them: loads what has matching CRCs, refuses what has not, naming the symbol.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

from tests.oracles import LoadResult, QemuOracleError, boot_and_insmod
from tests.oracles.qemu import BUSYBOX, QEMU, parse_console

# Insmod order: each provider before its consumer.
ORDER = ("kmt_simple", "kmt_misc", "kmt_kmalloc", "kmt_pkga", "kmt_pkgb", "kmt_pkgc", "kmt_pkgd")
K6_12_111 = "6.12.111+deb12-amd64"
K6_12_113 = "6.12.113+deb12-amd64"
K6_1_47 = "6.1.0-47-amd64"
K6_1_56 = "6.1.0-56-amd64"
DISAGREES = "disagrees about version of symbol"

Builder = Callable[[str], list[Path]]


def _missing(what: str) -> NoReturn:
    message = f"real test component missing: {what}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        _missing(f"{what}: {os.fspath(path)}")
    return path


def _vmlinuz(kver: str) -> Path:
    return _require(Path("/boot") / f"vmlinuz-{kver}", "kernel image")


def _boot(kver: str, modules: list[Path], workdir: Path) -> dict[str, LoadResult]:
    vmlinuz = _vmlinuz(kver)
    if shutil.which(QEMU) is None:
        _missing(QEMU)
    _require(BUSYBOX, "static busybox (package busybox-static)")
    results = boot_and_insmod(vmlinuz, modules, workdir)
    assert list(results) == list(ORDER)
    return results


@pytest.fixture(scope="session")
def kmt_builds(built: Callable[[str], dict[str, Path]]) -> Builder:
    """kver -> the tests/modsrc modules built for it (conftest's session cache), in ORDER."""

    def build(kver: str) -> list[Path]:
        modules = built(kver)
        assert sorted(modules) == sorted(ORDER)
        return [modules[name] for name in ORDER]

    return build


def _assert_loaded(results: dict[str, LoadResult], *names: str) -> None:
    for name in names:
        assert results[name].loaded, f"{name} refused:\n{results[name].message}"


def _assert_refused(results: dict[str, LoadResult], name: str, symbol: str) -> None:
    result = results[name]
    assert not result.loaded, f"{name} loaded:\n{result.message}"
    assert f"{name}: {DISAGREES} {symbol}" in result.message, result.message


def test_builds_for_6_12_111_and_113(kmt_builds: Builder) -> None:
    for kver in (K6_12_111, K6_12_113):
        modules = kmt_builds(kver)
        assert [ko.name for ko in modules] == [f"{name}.ko" for name in ORDER]
        assert all(ko.stat().st_size > 0 for ko in modules)


def test_6_12_113_loads_its_own_builds(kmt_builds: Builder, tmp_path: Path) -> None:
    results = _boot(K6_12_113, kmt_builds(K6_12_113), tmp_path)
    _assert_loaded(results, *ORDER)
    assert "kmt_pkga: hello" in results["kmt_pkgb"].message
    assert "kmt_pkgc: hello" in results["kmt_pkgd"].message


def test_6_12_113_refuses_111_builds_with_changed_crcs(kmt_builds: Builder, tmp_path: Path) -> None:
    results = _boot(K6_12_113, kmt_builds(K6_12_111), tmp_path)
    _assert_loaded(results, "kmt_simple", "kmt_pkga", "kmt_pkgb")
    _assert_refused(results, "kmt_misc", "misc_register")
    _assert_refused(results, "kmt_kmalloc", "__kmalloc_cache_noprof")
    _assert_refused(results, "kmt_pkgc", "misc_register")
    pkgd = results["kmt_pkgd"]
    assert not pkgd.loaded
    assert "kmt_pkgd: Unknown symbol kmt_pkgc_hello" in pkgd.message, pkgd.message
    assert DISAGREES not in pkgd.message


def test_6_1_0_56_loads_its_own_builds(kmt_builds: Builder, tmp_path: Path) -> None:
    """Positive control for the next test: the 6.1 guest does load matching modules."""
    results = _boot(K6_1_56, kmt_builds(K6_1_56), tmp_path)
    _assert_loaded(results, *ORDER)


def test_6_1_0_56_refuses_6_1_0_47_builds(kmt_builds: Builder, tmp_path: Path) -> None:
    results = _boot(K6_1_56, kmt_builds(K6_1_47), tmp_path)
    for name in ORDER:
        _assert_refused(results, name, "module_layout")


def test_timeout_kills_qemu_and_reports(kmt_builds: Builder, tmp_path: Path) -> None:
    vmlinuz = _vmlinuz(K6_12_113)
    if shutil.which(QEMU) is None:
        _missing(QEMU)
    with pytest.raises(QemuOracleError, match=r"did not finish within 0\.5 s"):
        boot_and_insmod(vmlinuz, kmt_builds(K6_12_113)[:1], tmp_path, timeout=0.5)


def test_parse_console_reports_missing_results() -> None:
    console = (
        "\x1b[2JKMT-BEGIN\r\n"
        "KMT-RESULT kmt_a 0\r\n"
        "KMT-MSG kmt_a [    1.000001] kmt_a: loaded\r\n"
        "KMT-RESULT kmt_b 22\r\n"
        "KMT-MSG kmt_b [    1.200000] kmt_b: disagrees about version of symbol foo\r\n"
        "KMT-MSG kmt_b insmod: can't insert '/m/kmt_b.ko': Invalid argument\r\n"
        "KMT-END\r\n"
    )
    assert parse_console(console, ["kmt_a", "kmt_b"]) == {
        "kmt_a": LoadResult(loaded=True, message="kmt_a: loaded"),
        "kmt_b": LoadResult(
            loaded=False,
            message="kmt_b: disagrees about version of symbol foo\n"
            "insmod: can't insert '/m/kmt_b.ko': Invalid argument",
        ),
    }
    with pytest.raises(QemuOracleError, match=r"no KMT-RESULT for kmt_c"):
        parse_console(console, ["kmt_a", "kmt_c"])
