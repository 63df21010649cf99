"""Module.symvers and symvers.gz/.xz: what a kernel exports, with each symbol's CRC.

Line layouts (all tab-separated):
  CRC  symbol  module  EXPORT_TYPE                  (up to 5.3)
  CRC  symbol  namespace  module  EXPORT_TYPE       (5.4, 5.5)
  CRC  symbol  module  EXPORT_TYPE  [namespace]     (5.6 and later)
Parsing is strict: a line that fits none of them is an error naming file and line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kmodd.base.errors import BadInputError
from kmodd.world.compression import read_bytes


@dataclass(frozen=True)
class Exports:
    """Symbol → CRC and symbol → exporting module (`vmlinux` or a module name)."""

    source: Path
    crcs: dict[str, int]
    owners: dict[str, str]
    namespaces: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.crcs)


def load(path: Path) -> Exports:
    data = read_bytes(path)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise BadInputError(path, "not a symvers file: non-ASCII bytes", line=line) from err
    return parse(path, text)


def parse(path: Path, text: str) -> Exports:
    crcs: dict[str, int] = {}
    owners: dict[str, str] = {}
    namespaces: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        cols = line.split("\t")
        n = len(cols)
        if n == 4 or (n == 5 and cols[3].startswith("EXPORT_")):
            crc, symbol, module, kind = cols[0], cols[1], cols[2], cols[3]
            namespace = cols[4] if n == 5 else ""
        elif n == 5 and cols[4].startswith("EXPORT_"):
            crc, symbol, namespace, module, kind = cols
        else:
            raise BadInputError(
                path, f"expected 4 or 5 tab-separated columns, found {n}", line=number
            )
        if not kind.startswith("EXPORT_") or not symbol or not module:
            raise BadInputError(path, f"malformed export line {line[:80]!r}", line=number)
        try:
            crcs[symbol] = int(crc, 16)
        except ValueError:
            raise BadInputError(path, f"CRC {crc[:20]!r} is not hexadecimal", line=number) from None
        owners[symbol] = module
        if namespace:
            namespaces[symbol] = namespace
    if not crcs:
        raise BadInputError(path, "no exported symbols")
    return Exports(path, crcs, owners, namespaces)
