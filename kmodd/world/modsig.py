"""A module's appended signature (scripts/sign-file's PKCS#7), checked against a
certificate as the kernel checks it against its keyring.

sign-file signs with no signed attributes: the one signer's signature is over the
module's content itself. That is checked in process with `cryptography` (an
`openssl cms` process costs ~23 ms a module here, most of a fleet machine's pull); a
signature of any other shape goes to `openssl cms -verify`, as before.
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from kmodd.base.errors import CommandError
from kmodd.base.run import run

MARKER = b"~Module signature appended~\n"
_INFO = 12
"""struct module_signature: algo, hash, id_type, signer_len, key_id_len, pad[3], sig_len."""
_PKEY_ID_PKCS7 = 2

_SIGNED_DATA = "1.2.840.113549.1.7.2"
_DATA = "1.2.840.113549.1.7.1"
_DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {
    "2.16.840.1.101.3.4.2.1": hashes.SHA256,
    "2.16.840.1.101.3.4.2.2": hashes.SHA384,
    "2.16.840.1.101.3.4.2.3": hashes.SHA512,
    "2.16.840.1.101.3.4.2.4": hashes.SHA224,
    "1.3.14.3.2.26": hashes.SHA1,
}
_RSA = ("1.2.840.113549.1.1.1", "1.2.840.113549.1.1.5", "1.2.840.113549.1.1.11",
        "1.2.840.113549.1.1.12", "1.2.840.113549.1.1.13", "1.2.840.113549.1.1.14")  # fmt: skip
"""rsaEncryption and sha*WithRSAEncryption: PKCS#1 v1.5, what sign-file makes with RSA."""
_ECDSA = ("1.2.840.10045.2.1", "1.2.840.10045.4.1", "1.2.840.10045.4.3.1",
          "1.2.840.10045.4.3.2", "1.2.840.10045.4.3.3", "1.2.840.10045.4.3.4")  # fmt: skip
_INTEGER, _OCTETS, _OID, _SEQUENCE, _SET = 0x02, 0x04, 0x06, 0x30, 0x31
_CONTEXT_0, _KEY_ID = 0xA0, 0x80


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
    content, pkcs7 = parts
    certificate = _certificate(cert.read_bytes())
    try:
        signer = _signer(pkcs7)
    except _Malformed:
        return False
    if signer is None or certificate is None:
        return _openssl_verifies(content, pkcs7, cert)
    if not signer.identifies(certificate):
        return False  # signed by another certificate's key, as the kernel matches it
    key = certificate.public_key()
    try:
        if signer.scheme in _RSA and isinstance(key, rsa.RSAPublicKey):
            key.verify(signer.signature, content, padding.PKCS1v15(), signer.digest())
        elif signer.scheme in _ECDSA and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signer.signature, content, ec.ECDSA(signer.digest()))
        else:  # a scheme this certificate's key does not sign with
            return False
    except InvalidSignature:
        return False
    return True


class _Malformed(Exception):
    """Not DER, or not a PKCS#7 SignedData as sign-file makes them: no signature at all."""


@dataclass(frozen=True)
class _Signer:
    """The one signer of a PKCS#7 SignedData that signed the content itself."""

    issuer: bytes | None
    """Its certificate's issuer (DER) and serial, or its subject key identifier."""
    serial: int | None
    key_id: bytes | None
    digest: type[hashes.HashAlgorithm]
    scheme: str
    """The signature algorithm's OID."""
    signature: bytes

    def identifies(self, cert: x509.Certificate) -> bool:
        if self.key_id is not None:
            try:
                ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            except x509.ExtensionNotFound:
                return False
            return ski.value.digest == self.key_id
        return self.issuer == cert.issuer.public_bytes() and self.serial == cert.serial_number


def _signer(pkcs7: bytes) -> _Signer | None:
    """The signer of `pkcs7` when it has the shape sign-file gives it: SignedData with
    detached data, no certificates, one signer, no attributes, a digest and scheme known
    here (None: openssl judges it). What breaks that shape is _Malformed."""
    outer = _items(pkcs7, *_only(pkcs7, 0, len(pkcs7), _SEQUENCE))
    if len(outer) != 2 or _oid(pkcs7, outer[0]) != _SIGNED_DATA or outer[1].tag != _CONTEXT_0:
        raise _Malformed
    signed_data = _items(pkcs7, *_only(pkcs7, outer[1].start, outer[1].end, _SEQUENCE))
    if len(signed_data) != 4:  # certificates or CRLs: not sign-file's
        return None
    version, digests, encapsulated, infos = signed_data
    _expect(version, _INTEGER)
    _expect(digests, _SET)
    _expect(encapsulated, _SEQUENCE)
    _expect(infos, _SET)
    data = _items(pkcs7, encapsulated.start, encapsulated.end)
    if pkcs7[version.start : version.end] not in (b"\x01", b"\x03"):
        raise _Malformed
    if len(data) != 1 or _oid(pkcs7, data[0]) != _DATA:  # detached: no content inside
        raise _Malformed
    listed = {_algorithm(pkcs7, item) for item in _items(pkcs7, digests.start, digests.end)}
    signers = _items(pkcs7, infos.start, infos.end)
    if len(signers) != 1:
        return None
    _expect(signers[0], _SEQUENCE)
    fields = _items(pkcs7, signers[0].start, signers[0].end)
    if len(fields) != 5:  # signed or unsigned attributes: openssl's
        return None
    info_version, sid, digest_algorithm, scheme, signature = fields
    _expect(info_version, _INTEGER)
    _expect(digest_algorithm, _SEQUENCE)
    _expect(scheme, _SEQUENCE)
    _expect(signature, _OCTETS)
    digest_oid = _algorithm(pkcs7, digest_algorithm)
    if digest_oid not in listed:
        raise _Malformed
    issuer = serial = key_id = None
    if sid.tag == _SEQUENCE and pkcs7[info_version.start : info_version.end] == b"\x01":
        pair = _items(pkcs7, sid.start, sid.end)
        if len(pair) != 2 or pair[0].tag != _SEQUENCE or pair[1].tag != _INTEGER:
            raise _Malformed
        name, number = pair
        issuer = pkcs7[name.whole : name.end]
        serial = int.from_bytes(pkcs7[number.start : number.end], "big", signed=True)
    elif sid.tag == _KEY_ID and pkcs7[info_version.start : info_version.end] == b"\x03":
        key_id = pkcs7[sid.start : sid.end]
    else:
        raise _Malformed
    digest = _DIGESTS.get(digest_oid)
    scheme_oid = _algorithm(pkcs7, scheme)
    if digest is None or scheme_oid not in (*_RSA, *_ECDSA):
        return None
    return _Signer(
        issuer, serial, key_id, digest, scheme_oid, pkcs7[signature.start : signature.end]
    )


@dataclass(frozen=True)
class _Item:
    """A DER item: its tag, where its content starts and ends, where its header starts."""

    tag: int
    start: int
    end: int
    whole: int


def _items(data: bytes, start: int, end: int) -> list[_Item]:
    """The DER items between `start` and `end`, which they must fill exactly."""
    found = []
    pos = start
    while pos < end:
        whole = pos
        if end - pos < 2 or data[pos] & 0x1F == 0x1F:  # no multi-byte tags in PKCS#7
            raise _Malformed
        tag, length = data[pos], data[pos + 1]
        pos += 2
        if length & 0x80:
            size = length & 0x7F
            if not 0 < size <= 4 or pos + size > end:
                raise _Malformed
            length = int.from_bytes(data[pos : pos + size], "big")
            pos += size
        if pos + length > end:
            raise _Malformed
        found.append(_Item(tag, pos, pos + length, whole))
        pos += length
    return found


def _only(data: bytes, start: int, end: int, tag: int) -> tuple[int, int]:
    """Where the content of the one item between `start` and `end` lies; it has `tag`."""
    items = _items(data, start, end)
    if len(items) != 1:
        raise _Malformed
    _expect(items[0], tag)
    return items[0].start, items[0].end


def _expect(item: _Item, tag: int) -> None:
    if item.tag != tag:
        raise _Malformed


def _algorithm(data: bytes, item: _Item) -> str:
    """The OID of an AlgorithmIdentifier (parameters absent or NULL)."""
    _expect(item, _SEQUENCE)
    parts = _items(data, item.start, item.end)
    if not 1 <= len(parts) <= 2 or (
        len(parts) == 2 and data[parts[1].whole : parts[1].end] != b"\x05\x00"
    ):
        raise _Malformed
    return _oid(data, parts[0])


def _oid(data: bytes, item: _Item) -> str:
    _expect(item, _OID)
    if item.start == item.end or data[item.end - 1] & 0x80 or item.end - item.start > 64:
        raise _Malformed
    arcs: list[int] = []
    value = 0
    for byte in data[item.start : item.end]:
        value = value << 7 | byte & 0x7F
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]]))


@functools.lru_cache(maxsize=4)
def _certificate(cert: bytes) -> x509.Certificate | None:
    """Certificate `cert` (DER or PEM); None when `cryptography` cannot read it or its
    key is neither RSA nor EC (openssl then judges)."""
    try:
        if cert.lstrip().startswith(b"-----BEGIN"):
            parsed = x509.load_pem_x509_certificate(cert)
        else:
            parsed = x509.load_der_x509_certificate(cert)
        key = parsed.public_key()
    except ValueError:
        return None
    return parsed if isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)) else None


def _openssl_verifies(content: bytes, pkcs7: bytes, cert: Path) -> bool:
    with tempfile.TemporaryDirectory(prefix="kmodd-sig-") as tmp:
        work = Path(tmp)
        (work / "content").write_bytes(content)
        (work / "sig").write_bytes(pkcs7)
        try:  # OpenSSL 3 reads -certfile as DER or PEM
            run(
                ["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-noverify",
                 "-nointern", "-in", work / "sig", "-content", work / "content",
                 "-certfile", cert, "-out", os.devnull],
                timeout=30,
            )  # fmt: skip
        except CommandError:
            return False
    return True
