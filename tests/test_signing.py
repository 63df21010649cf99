"""Module signing with the key named in /etc/kmodd/kmodd.conf, through the kernel's own
scripts/sign-file; checked with kmod's modinfo and with openssl verifying the appended
PKCS#7 signature over the module."""

from __future__ import annotations

import lzma
import os
import struct
import subprocess
from pathlib import Path

from tests.cli import kmodctl
from tests.conftest import K113, require_tool
from tests.sources import write_source
from tests.test_autoinstall import make_system

SIGNER = "kmodd test signer"
MAGIC = b"~Module signature appended~\n"
PKEY_ID_PKCS7 = 2


def make_key(root: Path) -> tuple[str, str]:
    """A throwaway RSA key and self-signed DER certificate inside `root`; their paths as
    seen from inside the root."""
    openssl = require_tool("openssl")
    keys = root / "etc/kmodd/keys"
    keys.mkdir(parents=True)
    argv = [openssl, "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    argv += ["-subj", f"/CN={SIGNER}/", "-keyout", os.fspath(keys / "key.pem")]
    argv += ["-outform", "DER", "-out", os.fspath(keys / "cert.der")]
    subprocess.run(argv, capture_output=True, check=True)
    return "/etc/kmodd/keys/key.pem", "/etc/kmodd/keys/cert.der"


def write_config(root: Path, text: str) -> Path:
    path = root / "etc/kmodd/kmodd.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def modinfo(field: str, path: Path) -> str:
    exe = require_tool("modinfo")
    proc = subprocess.run([exe, "-F", field, path], capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def installed_module(root: Path) -> Path:
    path = root / "lib/modules" / K113 / "updates/dkms/kmt_simple.ko.xz"
    assert path.is_file()
    return path


def signed_system(tmp_path: Path, config: str | None) -> Path:
    require_tool("make")
    root = make_system(tmp_path / "root", (K113,))
    write_source(root, "kmt-base")
    if config is not None:
        key, cert = make_key(root)
        write_config(root, config.format(key=key, cert=cert))
    proc = kmodctl(root, "autoinstall", "-k", K113, "--no-initrd")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [f"kmodd: kmt-base/1.0 for {K113}: built"]
    return root


def split_signature(module: bytes) -> tuple[bytes, bytes]:
    """(signed content, PKCS#7 signature) of a module sign-file signed: content, the
    signature, struct module_signature (12 bytes, big-endian sig_len last), the magic."""
    assert module.endswith(MAGIC), "no appended signature"
    info = module[-len(MAGIC) - 12 : -len(MAGIC)]
    assert info[2] == PKEY_ID_PKCS7
    (sig_len,) = struct.unpack(">I", info[8:])
    end = len(module) - len(MAGIC) - 12
    return module[: end - sig_len], module[end - sig_len : end]


def openssl_verifies(tmp_path: Path, content: bytes, signature: bytes, cert_der: Path) -> bool:
    openssl = require_tool("openssl")
    work = tmp_path / "verify"
    work.mkdir(exist_ok=True)
    (work / "content").write_bytes(content)
    (work / "sig.p7").write_bytes(signature)
    pem = work / "cert.pem"
    subprocess.run(
        [openssl, "x509", "-inform", "DER", "-in", cert_der, "-out", pem],
        check=True,
        capture_output=True,
    )
    argv = [openssl, "cms", "-verify", "-binary", "-inform", "DER", "-noverify", "-nointern"]
    argv += ["-in", os.fspath(work / "sig.p7"), "-content", os.fspath(work / "content")]
    argv += ["-certfile", os.fspath(pem), "-out", os.devnull]
    proc = subprocess.run(argv, capture_output=True, check=False)
    return proc.returncode == 0


def test_a_configured_key_signs_the_installed_module(tmp_path: Path) -> None:
    root = signed_system(tmp_path, "sign_key = {key}\nsign_cert = {cert}  # DER\n")
    module = installed_module(root)
    assert modinfo("signer", module) == SIGNER
    assert modinfo("sig_hashalgo", module) == "sha256"  # Debian 6.12: MODULE_SIG_HASH
    openssl = require_tool("openssl")
    cert = root / "etc/kmodd/keys/cert.der"
    serial = subprocess.run(
        [openssl, "x509", "-inform", "DER", "-in", cert, "-noout", "-serial"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert modinfo("sig_key", module).replace(":", "") == serial.removeprefix("serial=")

    content, signature = split_signature(lzma.decompress(module.read_bytes()))
    assert openssl_verifies(tmp_path, content, signature, cert)
    tampered = content[:-1] + bytes([content[-1] ^ 1])
    assert not openssl_verifies(tmp_path, tampered, signature, cert)
    # the build store holds the same signed module
    artefact = root / "var/lib/kmodd/builds/kmt-base/1.0" / K113 / "x86_64" / module.name
    assert artefact.read_bytes() == module.read_bytes()


def test_without_a_config_modules_are_unsigned(tmp_path: Path) -> None:
    root = signed_system(tmp_path, None)
    module = installed_module(root)
    assert modinfo("signer", module) == ""
    assert not lzma.decompress(module.read_bytes()).endswith(MAGIC)


def refused(tmp_path: Path, config: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
    root = make_system(tmp_path / "root", (K113,))
    write_source(root, "kmt-base")
    key, cert = make_key(root)
    path = write_config(root, config.format(key=key, cert=cert))
    proc = kmodctl(root, "autoinstall", "-k", K113, "--no-initrd")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert not (root / "lib/modules" / K113 / "updates").exists()
    assert not (root / "var/lib/kmodd/builds").exists()
    return path, proc


def test_a_key_without_a_certificate_is_refused(tmp_path: Path) -> None:
    path, proc = refused(tmp_path, "build_timeout = 600\nsign_key = {key}\n")
    assert proc.stderr == f"kmodctl: {path}: sign_key and sign_cert go together\n"


def test_an_unknown_setting_is_refused_naming_its_line(tmp_path: Path) -> None:
    path, proc = refused(tmp_path, "# signing\nsign_key = {key}\nsign_certificate = {cert}\n")
    assert proc.stderr.startswith(f"kmodctl: {path}:3: ")
    assert proc.stderr.count("\n") == 1 and "sign_cert" in proc.stderr
