"""Module signatures checked in process (kmodd.world.modsig) against `openssl cms
-verify`, the oracle, on signatures made as the kernel's sign-file makes them (no signed
attributes, no certificates, detached, binary), with RSA and EC keys, and on each of
their corruptions; a signature of another shape goes to openssl itself."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from kmodd.world import modsig
from tests.conftest import require_tool

CONTENT = b"\x7fELF" + bytes(range(256)) * 40


def make_cert(where: Path, kind: str) -> tuple[Path, Path]:
    """A key of `kind` (rsa or ec) and its self-signed DER certificate."""
    openssl = require_tool("openssl")
    key, cert = where / f"{kind}.key", where / f"{kind}.der"
    new = ["-newkey", "rsa:2048"] if kind == "rsa" else ["-newkey", "ec", "-pkeyopt",
                                                           "ec_paramgen_curve:P-384"]  # fmt: skip
    subprocess.run(
        [openssl, "req", "-new", "-x509", "-nodes", "-days", "1", "-subj", f"/CN={kind}",
         *new, "-keyout", key, "-outform", "DER", "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


def another_cert(where: Path, kind: str) -> Path:
    """A certificate of another key of `kind`: what signed nothing here."""
    (where / "another").mkdir()
    return make_cert(where / "another", kind)[1]


def signed(where: Path, key: Path, cert: Path, *, attributes: bool = False,
           digest: str = "sha256") -> bytes:  # fmt: skip
    """CONTENT with a signature appended as sign-file appends it (its flags: no
    attributes, no certificates, binary, detached), or with signed attributes."""
    openssl = require_tool("openssl")
    (where / "content").write_bytes(CONTENT)
    argv: list[str | Path] = [openssl, "cms", "-sign", "-binary", "-nocerts", "-outform",
                              "DER", "-md", digest, "-in", where / "content", "-signer", cert,
                              "-inkey", key, "-out", where / "sig"]  # fmt: skip
    if not attributes:
        argv.append("-noattr")
    subprocess.run(argv, check=True, capture_output=True)
    pkcs7 = (where / "sig").read_bytes()
    info = struct.pack(">BBBBB3xI", 0, 0, 2, 0, 0, len(pkcs7))  # struct module_signature
    return CONTENT + pkcs7 + info + modsig.MARKER


def openssl_says(where: Path, module: bytes, cert: Path) -> bool:
    parts = modsig.split(module)
    if parts is None:
        return False
    (where / "c").write_bytes(parts[0])
    (where / "s").write_bytes(parts[1])
    argv: list[str | Path] = ["openssl", "cms", "-verify", "-binary", "-inform", "DER",
                              "-noverify", "-nointern", "-in", where / "s", "-content",
                              where / "c", "-certfile", cert, "-out", os.devnull]  # fmt: skip
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


@pytest.mark.parametrize(("kind", "digest"), [("rsa", "sha256"), ("rsa", "sha512"),
                                              ("ec", "sha384")])  # fmt: skip
def test_a_sign_file_signature_is_checked_in_process_and_openssl_agrees(
    tmp_path: Path, kind: str, digest: str
) -> None:
    key, cert = make_cert(tmp_path, kind)
    other = another_cert(tmp_path, kind)
    module = signed(tmp_path, key, cert, digest=digest)
    assert modsig._signer(modsig.split(module)[1]) is not None  # type: ignore[index]
    assert modsig.signed_by(module, cert) is True
    assert modsig.signed_by(module, other) is False
    assert openssl_says(tmp_path, module, cert) and not openssl_says(tmp_path, module, other)
    content_flipped = bytes([module[0] ^ 1]) + module[1:]
    assert modsig.signed_by(content_flipped, cert) is False
    assert not openssl_says(tmp_path, content_flipped, cert)


def test_no_corruption_of_the_signature_is_accepted_that_openssl_refuses(
    tmp_path: Path,
) -> None:
    """Each byte of the PKCS#7 flipped in turn. kmodd may refuse more than openssl: it
    checks what the kernel's PKCS#7 parser checks and openssl does not (the versions,
    the content type, the signer's digest OID and NULL parameters); it never accepts
    what openssl refuses, and never raises."""
    key, cert = make_cert(tmp_path, "rsa")
    module = signed(tmp_path, key, cert)
    start = len(CONTENT)
    end = len(module) - len(modsig.MARKER) - 12
    accepted, refused = [], 0
    for pos in range(start, end):
        bad = bytearray(module)
        bad[pos] ^= 0x01 if pos % 2 else 0x80
        ours = modsig.signed_by(bytes(bad), cert)
        refused += not ours
        if ours and not openssl_says(tmp_path, bytes(bad), cert):
            accepted.append(pos - start)
    assert not accepted
    assert refused >= (end - start) * 9 // 10  # the signature, the signer, the structure


def test_a_signature_with_signed_attributes_goes_to_openssl(tmp_path: Path) -> None:
    key, cert = make_cert(tmp_path, "rsa")
    module = signed(tmp_path, key, cert, attributes=True)
    assert modsig._signer(modsig.split(module)[1]) is None  # type: ignore[index]
    assert modsig.signed_by(module, cert) is True
    other = another_cert(tmp_path, "rsa")
    assert modsig.signed_by(module, other) is False


def test_a_truncated_or_foreign_blob_is_no_signature(tmp_path: Path) -> None:
    key, cert = make_cert(tmp_path, "rsa")
    module = signed(tmp_path, key, cert)
    content, pkcs7 = modsig.split(module)  # type: ignore[misc]
    for blob in (pkcs7[:-1], pkcs7[: len(pkcs7) // 2], b"\x30\x00", b"\x30\x84\xff\xff\xff\xff",
                 b"\x04\x03abc", b"\x30\x03\x06\x01\xff"):  # fmt: skip
        info = struct.pack(">BBBBB3xI", 0, 0, 2, 0, 0, len(blob))
        assert modsig.signed_by(content + blob + info + modsig.MARKER, cert) is False
