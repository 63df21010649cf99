"""Package code runs in kmodd's sandbox: dkms.conf and every build step run as the
unprivileged build user, with the filesystem read-only but their own build dir, no
/etc/shadow, no signing key, no network, and no process outliving them. Each attempt
below fails and is said, and nothing of it reaches this machine; a source that truly
needs more is allowed it in kmodd.conf, and status says so."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cli import kmodctl
from tests.conftest import K113, require_tool
from tests.procs import all_gone
from tests.sources import write_source
from tests.test_autoinstall import make_system
from tests.test_signing import make_key, write_config

TOP = Path(__file__).resolve().parent.parent


@dataclass
class Listener:
    """A TCP server on this machine's loopback, counting who reaches it."""

    port: int = 0
    reached: list[str] = field(default_factory=list)


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    found = Listener(server.getsockname()[1])
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            found.reached.append(f"{peer}")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield found
    stop.set()
    thread.join()
    server.close()


@pytest.fixture
def root(tmp_path: Path, built: object) -> Path:
    require_tool("bwrap")
    root = make_system(tmp_path / "root", (K113,))
    key, cert = make_key(root)
    write_config(root, f"sign_key = {key}\nsign_cert = {cert}\n")
    return root


def source(root: Path, name: str, make: str, given: bytes) -> Path:
    """A source whose MAKE runs `make`, then puts the given module in place, installed
    under a name of its own (so the sources of one test do not conflict)."""
    dest = name.replace("-", "_")
    extra = f'AUTOINSTALL="yes"\nMAKE[0]="{make}; cp given.ko kmt_simple.ko"\n'
    extra += f'DEST_MODULE_NAME[0]="{dest}"\n'
    src = write_source(root, name, modules=("kmt_simple",), extra=extra)
    (src / "given.ko").write_bytes(given)
    return src


def make_log(root: Path, name: str) -> str:
    return next((root / "var/lib/kmodd/builds" / name).rglob("make.log")).read_text()


def secret_key(root: Path) -> str:
    pem = (root / "etc/kmodd/keys/key.pem").read_text()
    return pem.splitlines()[1]  # a line of the key itself


CANARY = Path("/etc/kmodd-sandbox-canary")


def test_a_build_can_neither_write_nor_read_what_is_not_its_own(
    root: Path, built: object, listener: Listener
) -> None:
    assert callable(built)
    given = built(K113)["kmt_simple"].read_bytes()
    attempts = {
        "kmt-w": f"touch {CANARY}",
        "kmt-shadow": "head -c 200 /etc/shadow",
        "kmt-key": f"cat {root}/etc/kmodd/keys/key.pem",
        "kmt-net": f"(exec 3<>/dev/tcp/127.0.0.1/{listener.port}) && echo REACHED-\\$((2+3))",
        "kmt-daemon": "setsid -f sleep 65",
        "kmt-who": "echo WHO=\\$(id -un)",
    }
    for name, make in attempts.items():
        source(root, name, make, given)
    done = kmodctl(root, "autoinstall", "-k", K113, "--no-initrd")
    assert done.returncode == 0, done.stdout + done.stderr  # each attempt fails; the build goes on
    assert not CANARY.exists()
    assert "Read-only file system" in make_log(root, "kmt-w")
    shadow = make_log(root, "kmt-shadow")
    assert "root:" not in shadow and "Permission denied" in shadow, shadow
    key = make_log(root, "kmt-key")
    assert secret_key(root) not in key and f"cat: {root}/etc/kmodd/keys/key.pem: " in key, key
    assert "REACHED-5" not in make_log(root, "kmt-net") and listener.reached == []
    daemon = make_log(root, "kmt-daemon")
    assert "kmodd: sandbox: processes left behind, killed with the sandbox (1): sleep 65" in daemon
    assert all_gone("sleep 65")
    assert "WHO=kmodd-build" in make_log(root, "kmt-who")
    for module in (root / "lib/modules" / K113 / "updates/dkms").iterdir():
        assert secret_key(root).encode() not in module.read_bytes()
    module = root / "lib/modules" / K113 / "updates/dkms/kmt_who.ko.xz"
    signed = subprocess.run(["modinfo", "-F", "signer", module], capture_output=True, text=True)
    assert signed.stdout.strip() == "kmodd test signer"  # signing, privileged, still works


def test_a_dkms_conf_can_neither_write_nor_read_what_is_not_its_own(
    root: Path, listener: Listener
) -> None:
    src = root / "usr/src/kmt-conf-1.0"
    src.mkdir(parents=True)
    version = (
        "1.$(touch /etc/kmodd-sandbox-canary 2>/dev/null && echo W)"
        "$(cat /etc/shadow 2>/dev/null | wc -c)"
        f"$(cat {root}/etc/kmodd/keys/key.pem 2>/dev/null | wc -c)"
        f"$( (exec 3<>/dev/tcp/127.0.0.1/{listener.port}) 2>/dev/null && echo N)"
    )
    (src / "dkms.conf").write_text(
        f'PACKAGE_NAME="kmt-conf"\nPACKAGE_VERSION="{version}"\n'
        'BUILT_MODULE_NAME[0]="kmt_simple"\nDEST_MODULE_LOCATION[0]="/updates"\n'
        'AUTOINSTALL="yes"\nsetsid -f sleep 66\n'
    )
    done = kmodctl(root, "plan", "-k", K113, "--json")
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert row["version"] == "1.00", row  # nothing written, nothing read, no connection
    assert not CANARY.exists() and listener.reached == []
    assert "processes left behind" in done.stderr and "sleep 66" in done.stderr
    assert all_gone("sleep 66")


def test_kmodd_conf_allows_a_source_the_network_or_no_sandbox_and_status_says_so(
    root: Path, built: object, listener: Listener
) -> None:
    assert callable(built)
    given = built(K113)["kmt_simple"].read_bytes()
    net = f"(exec 3<>/dev/tcp/127.0.0.1/{listener.port}) && echo REACHED-\\$((2+3))"
    source(root, "kmt-net", net, given)
    source(root, "kmt-free", "echo UID=\\$(id -u)", given)
    config = root / "etc/kmodd/kmodd.conf"
    config.write_text(config.read_text() + "sandbox.kmt-net = network\nsandbox.kmt-free = off\n")
    done = kmodctl(root, "autoinstall", "-k", K113, "--no-initrd")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "REACHED-5" in make_log(root, "kmt-net") and len(listener.reached) == 1
    assert "UID=0" in make_log(root, "kmt-free")
    lines = {ln.split("/")[0]: ln for ln in kmodctl(root, "status").stdout.splitlines()}
    assert lines["kmt-net"].endswith(", builds with network access (kmodd.conf)"), lines
    assert lines["kmt-free"].endswith(", builds as root without a sandbox (kmodd.conf)"), lines
    states = {
        d["module"]: d["sandbox"] for d in json.loads(kmodctl(root, "status", "--json").stdout)
    }
    assert states == {"kmt-net": "network", "kmt-free": "off"}


def test_a_missing_build_user_fails_each_source_saying_how_to_fix_it(root: Path) -> None:
    write_source(root, "kmt-base")
    config = root / "etc/kmodd/kmodd.conf"
    config.write_text(config.read_text() + "build_user = no-such-kmodd-user\n")
    done = kmodctl(root, "autoinstall", "-k", K113, "--no-initrd")
    assert done.returncode == 7, done.stdout + done.stderr
    assert "the build user no-such-kmodd-user does not exist (install.sh creates it" in done.stdout
