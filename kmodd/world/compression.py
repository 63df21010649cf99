"""Reading and writing files by their compression suffix: none, .gz, .xz, .zst."""

from __future__ import annotations

import gzip
import io
import lzma
import os
import stat
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


MAX_BYTES = 256 * 1024 * 1024
"""The most kmodd reads of one file, before and after decompression: more than any
module or Module.symvers a kernel has (tens of MB); an xz bomb stops here."""


def read_bytes(path: Path, limit: int = MAX_BYTES) -> bytes:
    """The decompressed content of `path`, a regular file (a FIFO or a device is refused
    without blocking on it) of at most `limit` bytes, decompressed too; a corrupt
    stream is a BadInputError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise NotFoundError("no such file", path) from err
    except OSError as err:
        raise BadInputError(path, f"cannot read: {err.strerror}") from err
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise BadInputError(path, "is a directory, not a file")
        raise BadInputError(path, "is not a regular file (a FIFO, socket or device?)")
    with os.fdopen(fd, "rb") as f:
        if st.st_size > limit:
            raise BadInputError(path, f"is larger than {limit >> 20} MB")
        try:
            raw = f.read(limit + 1)
        except OSError as err:
            raise BadInputError(path, f"cannot read: {err.strerror}") from err
    return decompress(path, raw, limit)


def decompress(path: Path, raw: bytes, limit: int = MAX_BYTES) -> bytes:
    """`raw` decompressed by `path`'s suffix, at most `limit` bytes of it."""
    kind = Compression.of(path)
    try:
        if kind is Compression.GZIP:
            gz = zlib.decompressobj(wbits=31)
            out, ended = gz.decompress(raw, limit + 1), gz.eof
        elif kind is Compression.XZ:
            xz = lzma.LZMADecompressor()
            out, ended = xz.decompress(raw, limit + 1), xz.eof
        elif kind is Compression.ZSTD:
            out, ended = _unzstd(raw, limit + 1)
        else:
            return raw
    except (OSError, EOFError, lzma.LZMAError, zlib.error, zstandard.ZstdError) as err:
        raise BadInputError(path, f"corrupt {kind.value[1:]} data: {err}") from err
    if len(out) > limit:
        raise BadInputError(path, f"decompresses to more than {limit >> 20} MB")
    if not ended:
        raise BadInputError(path, f"corrupt {kind.value[1:]} data: the stream is cut short")
    return out


def _unzstd(raw: bytes, most: int) -> tuple[bytes, bool]:
    """At most `most` bytes of the zstd stream `raw`, and whether it ended there."""
    chunks: list[bytes] = []
    size = 0
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)) as reader:
        while size < most:
            chunk = reader.read(min(1 << 20, most - size))
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks), False


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
