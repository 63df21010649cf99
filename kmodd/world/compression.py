"""Reading and writing files by their compression suffix: none, .gz, .xz, .zst."""

from __future__ import annotations

import gzip
import lzma
import zlib
from enum import StrEnum
from pathlib import Path

import zstandard

from kmodd.base.errors import BadInputError, NotFoundError


class Compression(StrEnum):
    NONE = ""
    GZIP = ".gz"
    XZ = ".xz"
    ZSTD = ".zst"

    @classmethod
    def of(cls, path: Path) -> Compression:
        for kind in (cls.GZIP, cls.XZ, cls.ZSTD):
            if path.name.endswith(kind.value):
                return kind
        return cls.NONE


def read_bytes(path: Path) -> bytes:
    """The decompressed content of `path`; a corrupt stream is a BadInputError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise NotFoundError("no such file", path) from err
    except IsADirectoryError as err:
        raise BadInputError(path, "is a directory, not a file") from err
    except OSError as err:
        raise BadInputError(path, f"cannot read: {err.strerror}") from err
    return decompress(path, raw)


def decompress(path: Path, raw: bytes) -> bytes:
    kind = Compression.of(path)
    try:
        if kind is Compression.GZIP:
            return gzip.decompress(raw)
        if kind is Compression.XZ:
            return lzma.decompress(raw)
        if kind is Compression.ZSTD:
            return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    except (OSError, EOFError, lzma.LZMAError, zlib.error, zstandard.ZstdError) as err:
        raise BadInputError(path, f"corrupt {kind.value[1:]} data: {err}") from err
    return raw


def compress(kind: Compression, data: bytes) -> bytes:
    """`data` compressed the way the kernel's own `make modules_install` would."""
    if kind is Compression.GZIP:
        return gzip.compress(data, compresslevel=9, mtime=0)
    if kind is Compression.XZ:
        # the kernel's scripts use `xz --check=crc32 --lzma2=dict=1MiB`
        filters = [{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 20}]
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=filters)
    if kind is Compression.ZSTD:
        return zstandard.ZstdCompressor(level=19, write_content_size=True).compress(data)
    return data
