from __future__ import annotations

import gzip
import lzma
from pathlib import Path

import pytest

from kmodd.base.errors import BadInputError
from kmodd.world import symvers
from tests.conftest import K47, K56, K111, K113, host_headers


def test_reads_real_module_symvers_with_every_line() -> None:
    path = host_headers(K113) / "Module.symvers"
    exports = symvers.load(path)
    lines = [line for line in path.read_text().splitlines() if line]
    assert len(exports) == len(lines) > 20000
    assert exports.crcs["module_layout"] == 0x7FE2A4C3
    assert exports.owners["module_layout"] == "vmlinux"
    # namespaced exports (column 5 since 5.6) keep their namespace
    namespaced = [line.split("\t") for line in lines if line.split("\t")[4]]
    assert namespaced, "Debian's 6.12 kernel has namespaced exports"
    crc, sym, module, _kind, namespace = namespaced[0]
    assert exports.namespaces[sym] == namespace
    assert exports.owners[sym] == module and exports.crcs[sym] == int(crc, 16)


def test_measured_facts_between_debian_kernels() -> None:
    a, b = (symvers.load(host_headers(k) / "Module.symvers") for k in (K111, K113))
    assert a.crcs["module_layout"] == b.crcs["module_layout"]
    assert a.crcs["_printk"] == b.crcs["_printk"]
    assert a.crcs["misc_register"] != b.crcs["misc_register"]
    old, new = (symvers.load(host_headers(k) / "Module.symvers") for k in (K47, K56))
    assert old.crcs["module_layout"] != new.crcs["module_layout"]


@pytest.mark.parametrize("suffix", [".gz", ".xz"])
def test_compressed_symvers_read_the_same(tmp_path: Path, suffix: str) -> None:
    plain = host_headers(K113) / "Module.symvers"
    packed = tmp_path / f"symvers-{K113}{suffix}"
    compress = gzip.compress if suffix == ".gz" else lzma.compress
    packed.write_bytes(compress(plain.read_bytes()))
    assert symvers.load(packed).crcs == symvers.load(plain).crcs


def test_all_column_layouts(tmp_path: Path) -> None:
    text = (
        "0x00000001\told_sym\tvmlinux\tEXPORT_SYMBOL\n"  # up to 5.3
        "0x00000002\tmid_sym\tNS_A\tsome_mod\tEXPORT_SYMBOL_GPL\n"  # 5.4, 5.5
        "0x00000003\tnew_sym\tother_mod\tEXPORT_SYMBOL_GPL\tNS_B\n"  # 5.6+
        "0x00000004\tplain_sym\tvmlinux\tEXPORT_SYMBOL\t\n"  # 5.6+, no namespace
    )
    exports = symvers.parse(tmp_path / "Module.symvers", text)
    assert exports.crcs == {"old_sym": 1, "mid_sym": 2, "new_sym": 3, "plain_sym": 4}
    assert exports.owners["mid_sym"] == "some_mod" and exports.owners["new_sym"] == "other_mod"
    assert exports.namespaces == {"mid_sym": "NS_A", "new_sym": "NS_B"}


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("0x1234\tonly_two", "expected 4 or 5 tab-separated columns, found 2"),
        ("0xZZZZ\tsym\tvmlinux\tEXPORT_SYMBOL", "CRC '0xZZZZ' is not hexadecimal"),
        ("0x1\tsym\tvmlinux\tNOT_AN_EXPORT", "malformed export line"),
        ("0x1 sym vmlinux EXPORT_SYMBOL", "found 1"),
    ],
)
def test_broken_line_names_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "Module.symvers"
    path.write_text(f"0x1\tgood\tvmlinux\tEXPORT_SYMBOL\n{line}\n")
    with pytest.raises(BadInputError) as err:
        symvers.load(path)
    assert str(err.value).startswith(f"{path}:2: ")
    assert problem in str(err.value)


def test_empty_and_binary_and_corrupt_files(tmp_path: Path) -> None:
    empty = tmp_path / "Module.symvers"
    empty.write_text("")
    with pytest.raises(BadInputError, match="no exported symbols"):
        symvers.load(empty)
    binary = tmp_path / "binary.symvers"
    binary.write_bytes(b"0x1\tsym\tvmlinux\tEXPORT_SYMBOL\n\xff\xfe\n")
    with pytest.raises(BadInputError, match=r"binary.symvers:2: not a symvers file"):
        symvers.load(binary)
    corrupt = tmp_path / "symvers.gz"
    corrupt.write_bytes(gzip.compress(b"0x1\tsym\tvmlinux\tEXPORT_SYMBOL\n")[:-8])
    with pytest.raises(BadInputError, match=r"symvers.gz: corrupt gz data"):
        symvers.load(corrupt)
