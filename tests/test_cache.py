"""The module cache: a fleet builds each module once per kernel. A real registry
(Debian's docker-registry, the CNCF distribution registry) on 127.0.0.1; two roots
stand for two machines with the same kernel and sources: the first builds and pushes,
the second installs everything with zero compiles, and what it installed loads in the
real kernel under qemu. Whatever does not check out is a local build, never an
install: a tampered blob, another kernel's exports, another signing key, modules whose
modversions the kernel refuses, a registry that is down or that hangs. Offline, an
exported build imports on a machine with the same source and kernel, and on no other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmodd.act import artefact
from kmodd.base.paths import Root
from kmodd.decide import plan
from kmodd.world import buildkey, compression, config, dkmsconf, kernel
from kmodd.world.registry import Blob, Client
from tests.cli import kmodctl
from tests.conftest import K111, K113, require, require_tool
from tests.debs import unpack_dkms_package
from tests.oracles import qemu
from tests.sources import write_source
from tests.test_autoinstall import make_system
from tests.test_signing import make_key

TOP = Path(__file__).resolve().parent.parent
SOURCES = ("kmt-base", "kmt-pair", "kmt-misc")
MODULES = ("kmt_simple", "kmt_pkga", "kmt_pkgb", "kmt_misc", "acpi_call")
FLEET = {**{name: "1.0" for name in SOURCES}, "acpi-call": "1.2.2"}
"""The fleet's sources: Debian's acpi-call among them, whose MAKE names the kernel's
headers and DKMS's tree by path (each machine's root is elsewhere: the key is not)."""


@dataclass
class Registry:
    host: str
    storage: Path
    process: subprocess.Popen[bytes]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def registry(workdir: Path) -> Iterator[Registry]:
    """Debian's docker-registry serving 127.0.0.1 only, storing under `workdir`."""
    exe = require_tool("docker-registry")
    port = free_port()
    storage = workdir / "storage"
    storage.mkdir(parents=True)
    conf = workdir / "config.yml"
    conf.write_text(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {storage}\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    log = (workdir / "registry.log").open("wb")
    proc = subprocess.Popen([exe, "serve", os.fspath(conf)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert proc.poll() is None and time.monotonic() < deadline, (
                workdir / "registry.log"
            ).read_text()
            time.sleep(0.1)
        yield Registry(f"127.0.0.1:{port}", storage, proc)
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def machine(
    root: Path,
    host: str | None,
    *,
    kernels: tuple[str, ...] = (K113,),
    sources: tuple[str, ...] = SOURCES,
    key_from: Path | None = None,
    timeout: float = 10,
) -> Path:
    """A root with `kernels`, `sources`, a signing key (copied from `key_from`'s, so
    two machines sign alike) and the registry at `host` in kmodd.conf."""
    make_system(root, kernels)
    for name in sources:
        write_source(root, name)
    if key_from is None:
        make_key(root)
    else:
        shutil.copytree(key_from / "etc/kmodd/keys", root / "etc/kmodd/keys")
    lines = ["sign_key = /etc/kmodd/keys/key.pem", "sign_cert = /etc/kmodd/keys/cert.der"]
    if host is not None:
        lines += [f"registry = {host}/fleet", "registry_insecure = yes",
                  f"registry_timeout = {timeout}"]  # fmt: skip
    (root / "etc/kmodd/kmodd.conf").write_text("\n".join(lines) + "\n")
    return root


def make_runs(root: Path, kver: str = K113) -> int:
    """How many times a make ran for `kver` in `root` (its build logs say each)."""
    logs = (root / "var/lib/kmodd/builds").glob(f"*/*/{kver}/*/make.log")
    return sum(log.read_text().count("+ bash -c 'make") for log in logs)


def installed(root: Path, kver: str = K113) -> dict[str, bytes]:
    found = (root / "lib/modules" / kver / "updates/dkms").glob("*.ko*")
    return {p.name.split(".")[0]: p.read_bytes() for p in found}


@dataclass
class Fleet:
    registry: Registry
    first: Path
    second: Path
    built: subprocess.CompletedProcess[str]
    pulled: subprocess.CompletedProcess[str]
    status: str


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    with registry(tmp / "registry") as reg:
        first = machine(tmp / "first", reg.host)
        second = machine(tmp / "second", reg.host, key_from=first)
        for root in (first, second):
            unpack_dkms_package("acpi-call-dkms", root)
        built = kmodctl(first, "autoinstall", "-k", K113, "--no-initrd")
        pulled = kmodctl(second, "autoinstall", "-k", K113, "--no-initrd")
        status = kmodctl(second, "status").stdout
        yield Fleet(reg, first, second, built, pulled, status)


def test_the_first_machine_builds_and_pushes(fleet: Fleet) -> None:
    assert fleet.built.returncode == 0, fleet.built.stdout + fleet.built.stderr
    assert make_runs(fleet.first) == len(FLEET)
    for name, version in FLEET.items():
        assert f"kmodd: {name}/{version} for {K113}: built\n" in fleet.built.stdout


def test_the_second_machine_installs_every_module_with_zero_compiles(fleet: Fleet) -> None:
    assert fleet.pulled.returncode == 0, fleet.pulled.stdout + fleet.pulled.stderr
    assert make_runs(fleet.second) == 0
    for name, version in FLEET.items():
        line = next(ln for ln in fleet.pulled.stdout.splitlines() if f" {name}/{version} " in ln)
        assert line.startswith(f"kmodd: {name}/{version} for {K113}: pulled (from cache "), line
        assert f"{fleet.registry.host}/fleet/{name}:" in line, line
        status = next(
            ln for ln in fleet.status.splitlines() if ln.startswith(f"{name}/{version}, ")
        )
        assert f"x86_64: installed (from cache {fleet.registry.host}/fleet/{name}:" in status
    assert installed(fleet.second) == installed(fleet.first)
    assert set(installed(fleet.second)) == set(MODULES)
    depmod = subprocess.run(["depmod", "-b", fleet.second, "-n", "-e", "-E",
                             next((fleet.second / "usr/src").glob(f"linux-headers-{K113}"))
                             / "Module.symvers", K113],
                            capture_output=True, text=True, check=True)  # fmt: skip
    assert "unknown symbol" not in depmod.stderr and "disagrees" not in depmod.stderr


def test_what_the_second_machine_pulled_loads_in_the_real_kernel(
    fleet: Fleet, tmp_path: Path
) -> None:
    image = Path(f"/boot/vmlinuz-{K113}")
    require_tool("qemu-system-x86_64")
    require(f"{image} (package linux-image-{K113})", image.is_file())
    order = ["kmt_simple", "kmt_pkga", "kmt_pkgb", "kmt_misc"]
    kos = []
    for name in order:
        (path,) = (fleet.second / "lib/modules" / K113 / "updates/dkms").glob(f"{name}.ko*")
        plain = tmp_path / "ko" / f"{name}.ko"
        plain.parent.mkdir(exist_ok=True)
        plain.write_bytes(compression.decompress(path, path.read_bytes()))
        kos.append(plain)
    results = qemu.boot_and_insmod(image, kos, tmp_path / "qemu")
    for name in order:
        assert results[name].loaded, (name, results[name].message)


def test_plan_says_a_pull_will_replace_a_build(fleet: Fleet, tmp_path: Path) -> None:
    third = machine(tmp_path / "third", fleet.registry.host, key_from=fleet.first)
    proc = kmodctl(third, "plan", "-k", K113, "--json")
    assert proc.returncode == 0, proc.stderr
    for row in json.loads(proc.stdout):
        assert row["action"] == "build", row
        ref = f"{fleet.registry.host}/fleet/{row['name']}:"
        assert f"the module cache has it ({ref}" in row["reason"], row


def orphan_source(root: Path, depends: bool) -> None:
    """kmt-orphan: a module importing a symbol that neither the kernel nor the source
    exports, as Debian's dahdi's dahdi_echocan_oslec imports oslec_create."""
    extra = 'AUTOINSTALL="yes"\n' + ('BUILD_DEPENDS=("kmt-base")\n' if depends else "")
    src = write_source(root, "kmt-orphan", modules=("kmt_orphan",), extra=extra)
    with (src / "Kbuild").open("a") as kbuild:
        kbuild.write("KBUILD_MODPOST_WARN := 1\n")


@pytest.mark.parametrize("depends", [False, True], ids=["alone", "with-build-depends"])
def test_a_symbol_no_one_exports_is_pulled_as_the_local_build_would_import_it(
    tmp_path: Path, depends: bool
) -> None:
    """Its key holds the kernel's exports: a build here would import kmt_nowhere
    unresolved just the same, so the artefact is pulled. With BUILD_DEPENDS the symbol
    may come from another source's build, which the key does not hold: a local build."""
    with registry(tmp_path / "registry") as reg:
        machines: list[Path] = []
        for name in ("first", "second"):
            root = machine(tmp_path / name, reg.host, sources=("kmt-base",),
                           key_from=machines[0] if machines else None)  # fmt: skip
            orphan_source(root, depends)
            machines.append(root)
        first, second = machines
        built = kmodctl(first, "autoinstall", "-k", K113, "--no-initrd")
        assert f"kmodd: kmt-orphan/1.0 for {K113}: built\n" in built.stdout, built.stdout
        proc = kmodctl(second, "autoinstall", "-k", K113, "--no-initrd")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        said = next(ln for ln in proc.stdout.splitlines() if " kmt-orphan/1.0 " in ln)
        if depends:
            assert said == f"kmodd: kmt-orphan/1.0 for {K113}: built", said
            assert "kmt_nowhere is not exported by the kernel" in proc.stderr, proc.stderr
            assert make_runs(second) == 1
        else:
            assert said.startswith(f"kmodd: kmt-orphan/1.0 for {K113}: pulled (from cache "), said
            assert make_runs(second) == 0
            assert installed(second) == installed(first)


# what does not check out: a local build, never an install -------------------------------


def key_of(root: Path, name: str, kver: str = K113) -> buildkey.BuildKey:
    where = Root.at(root)
    k = kernel.find(where, kver)
    (source,) = [s for s in dkmsconf.find_sources(where) if s.name == name]
    conf = plan.evaluate_for(where, source, k)
    return buildkey.compute(where, conf, k, config.load(where))


def repush(host: str, name: str, modules: list[Path], key: buildkey.BuildKey, tmp: Path) -> None:
    """Push `modules` under `key`, as an artefact that says it was built from it."""
    settings = config.Registry(host, "fleet", insecure=True, timeout=10)
    doc = {"kmodd": key.inputs["format"], "key": key.digest, "inputs": key.inputs,
           "source": name, "version": "1.0", "kernel": K113, "log_sha256": "",
           "modules": [{"file": m.name, "dest": m.name.split(".")[0],
                        "sha256": hashlib.sha256(m.read_bytes()).hexdigest()}
                       for m in modules]}  # fmt: skip
    config_file = tmp / "config.json"
    config_file.write_text(json.dumps(doc))
    Client(settings).push(
        settings.reference(name, key.digest),
        Blob(config_file, artefact.CONFIG_TYPE),
        [Blob(m, artefact.MODULE_TYPE) for m in modules],
    )


def built_here(root: Path, proc: subprocess.CompletedProcess[str], name: str) -> None:
    """`name` was built on this machine and installed as built: the cache's artefact
    was not installed."""
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"kmodd: {name}/1.0 for {K113}: built\n" in proc.stdout, proc.stdout
    assert make_runs(root) == 1
    (line,) = json.loads(kmodctl(root, "status", "--json").stdout)
    assert (line["state"], line["detail"]) == ("installed", "built"), line


def test_a_tampered_blob_is_a_local_build(tmp_path: Path) -> None:
    with registry(tmp_path / "registry") as reg:
        first = machine(tmp_path / "first", reg.host, sources=("kmt-base",))
        assert kmodctl(first, "autoinstall", "-k", K113, "--no-initrd").returncode == 0
        xz = b"\xfd7zXZ\x00"
        (blob,) = [p for p in reg.storage.rglob("data") if p.read_bytes().startswith(xz)]
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
        second = machine(tmp_path / "second", reg.host, sources=("kmt-base",), key_from=first)
        proc = kmodctl(second, "autoinstall", "-k", K113, "--no-initrd")
        built_here(second, proc, "kmt-base")
        assert "does not match its digest" in proc.stderr, proc.stderr


def test_another_kernels_exports_are_another_key_and_a_local_build(tmp_path: Path) -> None:
    with registry(tmp_path / "registry") as reg:
        first = machine(tmp_path / "first", reg.host, sources=("kmt-base",))
        assert kmodctl(first, "autoinstall", "-k", K113, "--no-initrd").returncode == 0
        second = machine(tmp_path / "second", reg.host, sources=("kmt-base",), key_from=first)
        symvers = second / f"usr/src/linux-headers-{K113}/Module.symvers"
        text = symvers.read_text()
        symvers.unlink()  # a new file: the headers' are linked from this machine's
        symvers.write_text(text + "0x00000001\tkmt_only_here\tvmlinux\tEXPORT_SYMBOL\t\n")
        ours, theirs = key_of(second, "kmt-base"), key_of(first, "kmt-base")
        assert ours.inputs["exports"] != theirs.inputs["exports"]
        proc = kmodctl(second, "autoinstall", "-k", K113, "--no-initrd")
        built_here(second, proc, "kmt-base")


def test_modules_signed_with_another_key_are_a_local_build(tmp_path: Path) -> None:
    with registry(tmp_path / "registry") as reg:
        first = machine(tmp_path / "first", reg.host, sources=("kmt-base",))
        assert kmodctl(first, "autoinstall", "-k", K113, "--no-initrd").returncode == 0
        second = machine(tmp_path / "second", reg.host, sources=("kmt-base",))  # its own key
        theirs = sorted((first / "lib/modules" / K113 / "updates/dkms").glob("*.ko*"))
        repush(reg.host, "kmt-base", theirs, key_of(second, "kmt-base"), tmp_path)
        proc = kmodctl(second, "autoinstall", "-k", K113, "--no-initrd")
        built_here(second, proc, "kmt-base")
        assert "not signed with this machine's key" in proc.stderr, proc.stderr


def test_modversions_the_kernel_refuses_are_a_local_build(tmp_path: Path) -> None:
    """An artefact under this build's key whose module was built for 6.12.111:
    misc_register's CRC changed in .113, so the verdict refuses it."""
    with registry(tmp_path / "registry") as reg:
        first = machine(tmp_path / "first", None, kernels=(K111,), sources=("kmt-misc",))
        assert kmodctl(first, "autoinstall", "-k", K111, "--no-initrd").returncode == 0
        second = machine(tmp_path / "second", reg.host, sources=("kmt-misc",), key_from=first)
        old = sorted((first / "lib/modules" / K111 / "updates/dkms").glob("*.ko*"))
        repush(reg.host, "kmt-misc", old, key_of(second, "kmt-misc"), tmp_path)
        proc = kmodctl(second, "autoinstall", "-k", K113, "--no-initrd")
        built_here(second, proc, "kmt-misc")
        assert "changed: module has" in proc.stderr, proc.stderr


def test_a_registry_that_is_down_is_a_local_build(tmp_path: Path) -> None:
    second = machine(tmp_path / "second", f"127.0.0.1:{free_port()}", sources=("kmt-base",))
    proc = kmodctl(second, "autoinstall", "-k", K113, "--no-initrd")
    built_here(second, proc, "kmt-base")
    assert "Connection refused" in proc.stderr, proc.stderr


def test_a_registry_that_hangs_costs_one_timeout_then_a_local_build(tmp_path: Path) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def hang() -> None:  # accept, and never answer
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=hang, daemon=True)
    thread.start()
    try:
        host = f"127.0.0.1:{server.getsockname()[1]}"
        second = machine(tmp_path / "second", host, sources=("kmt-base", "kmt-misc"), timeout=2)
        proc = kmodctl(second, "autoinstall", "-k", K113, "--no-initrd")
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert make_runs(second) == 2
    assert len(accepted) == 1, "asked again after it hung once"
    assert "no answer within 2 s" in proc.stderr, proc.stderr


# offline: export and import -------------------------------------------------------------


def test_an_exported_build_imports_with_no_compile_where_it_fits_only(
    fleet: Fleet, tmp_path: Path
) -> None:
    archive = tmp_path / "kmt-misc.tar"
    done = kmodctl(fleet.first, "export", "-m", "kmt-misc", "-k", K113, "-o", os.fspath(archive))
    assert done.returncode == 0, done.stderr
    with tarfile.open(archive) as tar:
        assert {"oci-layout", "index.json"} <= set(tar.getnames())

    offline = machine(tmp_path / "offline", None, sources=("kmt-misc",), key_from=fleet.first)
    done = kmodctl(offline, "import", os.fspath(archive), "--no-initrd")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"kmodd: kmt-misc/1.0 for {K113}: pulled (from cache imported ")
    assert make_runs(offline) == 0
    assert installed(offline)["kmt_misc"] == installed(fleet.first)["kmt_misc"]

    other = machine(tmp_path / "other", None, sources=("kmt-misc",), key_from=fleet.first)
    c_file = other / "usr/src/kmt-misc-1.0/kmt_misc.c"
    c_file.write_text(c_file.read_text() + "\n/* another source */\n")
    done = kmodctl(other, "import", os.fspath(archive), "--no-initrd")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "built from other inputs than kmt-misc/1.0" in done.stderr
    assert "(they differ in: source); nothing installed" in done.stderr
    assert installed(other) == {}


@pytest.mark.parametrize("member", ["../escape", "blobs/sha256/../../x", "etc/passwd"])
def test_an_archive_with_anything_but_a_layout_is_refused(tmp_path: Path, member: str) -> None:
    root = make_system(tmp_path / "root", (K113,))
    archive = tmp_path / "evil.tar"
    payload = tmp_path / "payload"
    payload.write_text("not a layout\n")
    with tarfile.open(archive, "w") as tar:
        tar.add(payload, arcname=member)
    done = kmodctl(root, "import", os.fspath(archive))
    assert done.returncode == 3, done.stdout + done.stderr
    assert "has no place in a layout" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "escape").exists() and not (tmp_path / "x").exists()
