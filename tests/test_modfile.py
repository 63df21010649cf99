from __future__ import annotations

import contextlib
import random
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from kmodd.base.errors import BadInputError, NotFoundError
from kmodd.world import modfile
from tests.conftest import K111, K113, require_tool

Built = Callable[[str], dict[str, Path]]


def _tool(argv: list[str | Path]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.mark.parametrize("kver", [K111, K113])
def test_modversions_and_modinfo_match_kmods_own_tools(built: Built, kver: str) -> None:
    modprobe, modinfo = require_tool("modprobe"), require_tool("modinfo")
    for name, ko in built(kver).items():
        info = modfile.read(ko)
        dumped = _tool([modprobe, "--dump-modversions", ko])
        expected = {s: int(c, 16) for c, s in (line.split("\t") for line in dumped.splitlines())}
        assert info.versions == expected, name
        assert info.name == _tool([modinfo, "-F", "name", ko]).strip() == name
        assert info.vermagic == _tool([modinfo, "-F", "vermagic", ko]).rstrip("\n")
        assert info.srcversion == _tool([modinfo, "-F", "srcversion", ko]).strip()
        depends = _tool([modinfo, "-F", "depends", ko]).strip()
        assert info.depends == tuple(d for d in depends.split(",") if d)
        assert info.arch == "x86_64"
        assert "module_layout" in info.versions


def test_imports_and_exports_of_a_package(built: Built) -> None:
    mods = {name: modfile.read(ko) for name, ko in built(K113).items()}
    assert mods["kmt_pkga"].exports == {"kmt_pkga_hello"}
    assert "kmt_pkga_hello" in mods["kmt_pkgb"].imports
    assert mods["kmt_pkgb"].depends == ("kmt_pkga",)
    assert "misc_register" in mods["kmt_misc"].imports
    assert mods["kmt_simple"].exports == frozenset()


@pytest.mark.parametrize(("tool", "suffix"), [("gzip", ".gz"), ("xz", ".xz"), ("zstd", ".zst")])
def test_compressed_modules_read_the_same(
    built: Built, tmp_path: Path, tool: str, suffix: str
) -> None:
    exe = require_tool(tool)
    ko = built(K113)["kmt_pkga"]
    packed = tmp_path / f"kmt_pkga.ko{suffix}"
    packed.write_bytes(subprocess.run([exe, "-c", ko], check=True, capture_output=True).stdout)
    assert modfile.read(packed) == modfile.parse(packed, ko.read_bytes())


def test_extended_modversions_sections(built: Built, tmp_path: Path) -> None:
    """Kernels >= 6.15 may carry long names in __version_ext_crcs/__version_ext_names."""
    objcopy = require_tool("objcopy")
    long_name = "a_symbol_whose_name_is_far_too_long_for_the_classic_versions_table"
    crcs, names = tmp_path / "crcs", tmp_path / "names"
    crcs.write_bytes(struct.pack("<II", 0xDEADBEEF, 0x12345678))
    names.write_bytes(f"{long_name}\0short_one\0".encode())
    out = tmp_path / "ext.ko"
    subprocess.run(
        [
            objcopy,
            "--add-section",
            f"__version_ext_crcs={crcs}",
            "--add-section",
            f"__version_ext_names={names}",
            built(K113)["kmt_simple"],
            out,
        ],
        check=True,
    )
    info = modfile.read(out)
    assert info.versions[long_name] == 0xDEADBEEF
    assert info.versions["short_one"] == 0x12345678
    assert "module_layout" in info.versions


def test_signed_module_is_recognised(built: Built, tmp_path: Path) -> None:
    ko = tmp_path / "signed.ko"
    data = built(K113)["kmt_simple"].read_bytes()
    ko.write_bytes(data + b"\0" * 12 + b"~Module signature appended~\n")
    assert modfile.read(ko).signed and not modfile.read(built(K113)["kmt_simple"]).signed


def test_bad_files_each_get_one_clear_error(built: Built, tmp_path: Path) -> None:
    gcc = require_tool("gcc")
    ko = built(K113)["kmt_misc"].read_bytes()
    cases: dict[str, tuple[bytes, str]] = {
        "truncated.ko": (ko[: len(ko) // 2], "truncated"),
        "header_only.ko": (ko[:40], "not an ELF file"),
        "text.ko": (b"hello, I am not a module\n", "not an ELF file"),
        "broken.ko.xz": (b"\xfd7zXZ\0 not really", "corrupt xz data"),
        "program.ko": (Path("/bin/true").read_bytes(), "ELF file is not relocatable"),
    }
    obj_src = tmp_path / "plain.c"
    obj_src.write_text("int plain(void) { return 1; }\n")
    subprocess.run([gcc, "-c", obj_src, "-o", tmp_path / "plain.o"], check=True)
    cases["plain.ko"] = ((tmp_path / "plain.o").read_bytes(), "not a kernel module")
    for name, (data, problem) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(BadInputError) as err:
            modfile.read(path)
        assert str(err.value) == f"{path}: {err.value.problem}"
        assert problem in err.value.problem, name
    with pytest.raises(NotFoundError, match="no such module file"):
        modfile.read(tmp_path / "absent.ko")


def test_every_truncation_point_is_an_error_not_a_crash(built: Built, tmp_path: Path) -> None:
    ko = built(K113)["kmt_pkgb"].read_bytes()
    path = tmp_path / "cut.ko"
    for cut in range(0, len(ko), max(1, len(ko) // 300)):
        path.write_bytes(ko[:cut])
        with pytest.raises(BadInputError):
            modfile.read(path)


def test_module_name_from_file_name() -> None:
    assert modfile.module_name(Path("/x/v4l2-loopback.ko.zst")) == "v4l2_loopback"
    assert modfile.is_module_file(Path("a.ko.xz")) and not modfile.is_module_file(Path("a.o"))


def test_corrupted_bytes_never_crash_the_reader(built: Built, tmp_path: Path) -> None:
    """Flip bytes in the ELF and section headers: a BadInputError or a result, nothing else."""
    ko = bytearray(built(K113)["kmt_pkgb"].read_bytes())
    shoff = struct.unpack_from("<Q", ko, 0x28)[0]
    hot = [*range(0, 64), *range(shoff, len(ko))]
    rng = random.Random(4)
    path = tmp_path / "flipped.ko"
    for _ in range(2000):
        data = bytearray(ko)
        for offset in rng.sample(hot, 3):
            data[offset] = rng.randrange(256)
        path.write_bytes(data)
        with contextlib.suppress(BadInputError):
            modfile.read(path)
