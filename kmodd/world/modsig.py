"""A module's appended signature (scripts/sign-file's PKCS#7), checked against a
certificate with openssl, as the kernel checks it against its keyring."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kmodd.base.errors import CommandError
from kmodd.base.run import run

MARKER = b"~Module signature appended~\n"
_INFO = 12
"""struct module_signature: algo, hash, id_type, signer_len, key_id_len, pad[3], sig_len."""
_PKEY_ID_PKCS7 = 2


def split(module: bytes) -> tuple[bytes, bytes] | None:
    """The signed content and its PKCS#7 signature; None when it carries none."""
    if not module.endswith(MARKER) or len(module) < len(MARKER) + _INFO:
        return None
    end = len(module) - len(MARKER) - _INFO
    info = module[end : end + _INFO]
    sig_len = int.from_bytes(info[8:12], "big")
    if info[2] != _PKEY_ID_PKCS7 or not 0 < sig_len <= end:
        return None
    return module[: end - sig_len], module[end - sig_len : end]


def signed_by(module: bytes, cert: Path) -> bool:
    """Whether `module` (uncompressed) carries a valid signature by `cert` (DER or PEM)."""
    parts = split(module)
    if parts is None:
        return False
    content, signature = parts
    with tempfile.TemporaryDirectory(prefix="kmodd-sig-") as tmp:
        work = Path(tmp)
        (work / "content").write_bytes(content)
        (work / "sig").write_bytes(signature)
        pem = work / "cert.pem"
        kind = "DER" if not cert.read_bytes().startswith(b"-----BEGIN") else "PEM"
        try:
            run(["openssl", "x509", "-inform", kind, "-in", cert, "-out", pem], timeout=30)
            run(
                ["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-noverify",
                 "-nointern", "-in", work / "sig", "-content", work / "content",
                 "-certfile", pem, "-out", os.devnull],
                timeout=30,
            )  # fmt: skip
        except CommandError:
            return False
    return True
