"""A real system bus for the tests and the bench: `dbus-daemon` with a Debian-like
system policy plus kmodd's own `systemd/io.kmodd1.conf`, a stand-in logind, the kmodd
service as a separate process, clients as another uid, and a signal recorder.

`python -m tests.dbus_harness serve ROOT` is the service without the file watcher:
Service + dbus.serve() over $DBUS_SYSTEM_BUS_ADDRESS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import MessageType, NameFlag, RequestNameReply
from dbus_next.message import Message
from dbus_next.service import ServiceInterface

from kmodd.edges.dbus import BUS_NAME, INTERFACE, OBJECT_PATH, Client
from kmodd.edges.dbus._common import disconnect, method
from tests.conftest import require, require_tool

TOP = Path(__file__).resolve().parent.parent
POLICY = TOP / "systemd/io.kmodd1.conf"
LOGIND_POLICY = Path("/usr/share/dbus-1/system.d/org.freedesktop.login1.conf")
NOBODY = 65534

# Debian 12's /usr/share/dbus-1/system.conf, minus what only a booted system has (the
# messagebus user, fork, activation, syslog), listening in a temporary directory.
_SYSTEM_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={socket}</listen>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.DBus.Debug.Stats"/>
  </policy>
  <include>{policy}</include>
  <include>{logind_policy}</include>
</busconfig>
"""

# logind's own policy where systemd is not installed: root owns it, anyone may Inhibit
_LOGIND_POLICY = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="root"><allow own="org.freedesktop.login1"/></policy>
  <policy context="default">
    <allow send_destination="org.freedesktop.login1"
           send_interface="org.freedesktop.login1.Manager" send_member="Inhibit"/>
  </policy>
</busconfig>
"""


@dataclass
class Bus:
    address: str
    process: subprocess.Popen[str]
    socket_dir: Path

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.address, **extra}


@contextlib.contextmanager
def system_bus(workdir: Path) -> Iterator[Bus]:
    """A real dbus-daemon configured like a system bus; its address is in `Bus.env()`.

    The socket lives in a directory of its own under /tmp (mode 0755), so clients
    running as another uid reach it."""
    daemon = require_tool("dbus-daemon")
    socket_dir = Path(tempfile.mkdtemp(prefix="kmodd-bus-"))
    socket_dir.chmod(0o755)
    workdir.mkdir(parents=True, exist_ok=True)
    logind_policy = LOGIND_POLICY
    if not logind_policy.is_file():
        logind_policy = workdir / "org.freedesktop.login1.conf"
        logind_policy.write_text(_LOGIND_POLICY)
    config = workdir / "system.conf"
    config.write_text(
        _SYSTEM_CONF.format(
            socket=socket_dir / "system_bus_socket",
            policy=POLICY,
            logind_policy=logind_policy,
        )
    )
    with (workdir / "dbus-daemon.log").open("w") as log:
        process = subprocess.Popen(
            [daemon, f"--config-file={config}", "--nofork", "--nopidfile", "--print-address=1"],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    try:
        assert process.stdout is not None
        address = process.stdout.readline().strip()
        assert address.startswith("unix:"), f"dbus-daemon printed {address!r}"
        yield Bus(address, process, socket_dir)
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(socket_dir, ignore_errors=True)


# the stand-in logind ---------------------------------------------------------------------


@dataclass
class InhibitCall:
    what: str
    who: str
    why: str
    mode: str
    released: bool = False
    """The read end of the lock's pipe saw EOF: every copy of the fd was closed."""


class _Login1Manager(ServiceInterface):
    """What introspection shows; Inhibit itself is answered by FakeLogind's handler,
    which must know when the reply is on the wire before it drops its copy of the fd."""

    def __init__(self) -> None:
        super().__init__("org.freedesktop.login1.Manager")

    @method("h", what="s", who="s", why="s", mode="s")
    def Inhibit(self, what: str, who: str, why: str, mode: str) -> int:
        raise NotImplementedError


class FakeLogind:
    """org.freedesktop.login1 on the test bus, in a thread with its own loop. Each
    Inhibit returns the write end of a fresh pipe; the read end's EOF marks the call
    released."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.calls: list[InhibitCall] = []
        self._changed = threading.Condition()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="fake-logind", daemon=True)

    def __enter__(self) -> FakeLogind:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        assert self._ready.is_set(), "the stand-in logind did not come up"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def wait_for(self, predicate: Any, timeout: float) -> bool:
        """Until `predicate(calls)` holds, or `timeout`."""
        with self._changed:
            return bool(self._changed.wait_for(lambda: predicate(self.calls), timeout))

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception as err:  # noqa: BLE001 (handed over to the test's thread)
            self._error = err
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        bus = await MessageBus(bus_address=self.address, negotiate_unix_fd=True).connect()
        self._bus = bus
        bus.add_message_handler(self._handle)
        bus.export("/org/freedesktop/login1", _Login1Manager())
        reply = await bus.request_name("org.freedesktop.login1", NameFlag.DO_NOT_QUEUE)
        assert reply == RequestNameReply.PRIMARY_OWNER, reply
        self._ready.set()
        await self._stop.wait()
        disconnect(bus)

    def _handle(self, msg: Message) -> bool:
        if not (
            msg.message_type is MessageType.METHOD_CALL
            and msg.interface == "org.freedesktop.login1.Manager"
            and msg.member == "Inhibit"
            and msg.signature == "ssss"
        ):
            return False
        read_end, write_end = os.pipe()
        call = InhibitCall(*msg.body)
        with self._changed:
            self.calls.append(call)
            self._changed.notify_all()
        reply = Message.new_method_return(msg, "h", [0], unix_fds=[write_end])
        sent = self._bus.send(reply)
        sent.add_done_callback(lambda _: os.close(write_end))
        assert self._loop is not None
        self._loop.add_reader(read_end, self._readable, read_end, call)
        return True

    def _readable(self, fd: int, call: InhibitCall) -> None:
        if os.read(fd, 64):
            return
        assert self._loop is not None
        self._loop.remove_reader(fd)
        os.close(fd)
        with self._changed:
            call.released = True
            self._changed.notify_all()


# signals ---------------------------------------------------------------------------------------


class SignalRecorder:
    """Every signal io.kmodd1 sends, as (member, body), recorded in a thread."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.signals: list[tuple[str, list[Any]]] = []
        self._changed = threading.Condition()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="signals", daemon=True)

    def __enter__(self) -> SignalRecorder:
        self._thread.start()
        assert self._ready.wait(10), "the signal recorder did not come up"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def wait_for(self, predicate: Any, timeout: float) -> bool:
        with self._changed:
            return bool(self._changed.wait_for(lambda: predicate(self.signals), timeout))

    def _main(self) -> None:
        asyncio.run(self._record())

    async def _record(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        bus = await MessageBus(bus_address=self.address).connect()
        rule = f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}'"
        await bus.call(
            Message(
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "AddMatch",
                signature="s",
                body=[rule],
            )
        )
        bus.add_message_handler(self._handle)
        self._ready.set()
        await self._stop.wait()
        disconnect(bus)

    def _handle(self, msg: Message) -> bool:
        if msg.message_type is MessageType.SIGNAL and msg.interface in (
            INTERFACE,
            "org.freedesktop.DBus.Properties",
        ):
            with self._changed:
                self.signals.append((str(msg.member), list(msg.body)))
                self._changed.notify_all()
        return False


# the service ---------------------------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    log: Path
    argv: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def server_argv(root: Path, *, daemon: bool) -> list[str]:
    """`kmodd.edges.daemon` (with its file watcher), or this module's watcher-less service."""
    if daemon:
        return [sys.executable, "-m", "kmodd.edges.daemon", "--root", os.fspath(root)]
    return [sys.executable, "-m", "tests.dbus_harness", "serve", os.fspath(root)]


@contextlib.contextmanager
def running_service(
    bus: Bus, root: Path, log: Path, *, daemon: bool = False, timeout: float = 30.0
) -> Iterator[Server]:
    """The kmodd service for `root` on `bus`, up once it owns io.kmodd1."""
    argv = server_argv(root, daemon=daemon)
    env = bus.env(PYTHONPATH=os.fspath(TOP))
    env.pop("NOTIFY_SOCKET", None)
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, env=env, cwd=TOP, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    server = Server(process, log, argv)
    try:
        wait_for_owner(bus, server, timeout)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_owner(bus: Bus, server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with _bus_address(bus.address):
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise AssertionError(f"{server.argv} exited:\n{server.output()}")
            client = Client.connect(timeout=1.0)
            if client is not None:
                client.close()
                return
            time.sleep(0.05)
    raise AssertionError(f"{server.argv} did not take {BUS_NAME}:\n{server.output()}")


@contextlib.contextmanager
def _bus_address(address: str) -> Iterator[None]:
    old = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = address
    try:
        yield
    finally:
        if old is None:
            del os.environ["DBUS_SYSTEM_BUS_ADDRESS"]
        else:
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = old


# clients as another uid ------------------------------------------------------------------------

# Run as another uid: one Client call, its result or its error as JSON on stdout.
_CLIENT = """
import json, sys
from kmodd.edges.dbus import Client
from kmodd.base.errors import KmoddError
from kmodd.act.request import Request, Verb
client = Client.connect()
if client is None:
    print(json.dumps({"connected": False})); sys.exit()
args = json.loads(sys.argv[2])
if sys.argv[1] == "submit":  # [verb, kernel, source]
    args = [Request(Verb(args[0]), args[1], args[2])]
try:
    result = getattr(client, sys.argv[1])(*args)
    print(json.dumps({"connected": True, "result": result}))
except KmoddError as err:
    print(json.dumps({"connected": True, "error": type(err).__name__,
                      "dbus_name": err.dbus_name, "text": str(err)}))
"""

_RAW = """
import json, sys
from dbus_next.signature import Variant
from kmodd.edges.dbus import Client
from kmodd.base.errors import KmoddError
member, signature, body = json.load(sys.stdin)
if signature == "a{sv}":
    body = [{k: Variant(*v) for k, v in body[0].items()}]
client = Client.connect()
try:
    result = client._call(member, signature, *body)
    print(json.dumps({"connected": True, "result": result}))
except KmoddError as err:
    print(json.dumps({"connected": True, "error": type(err).__name__,
                      "dbus_name": err.dbus_name, "text": str(err)[:10000]}))
"""

_SERVE_AS = """
import asyncio, json, sys, types
from kmodd.base import log
from kmodd.edges.dbus import serve
from kmodd.base.errors import KmoddError
log.configure()
async def main():
    # serve() only subscribes to the service's events before it claims the name
    bus = await serve(types.SimpleNamespace(on_job=[], on_ready=[], on_busy=[], queue_length=0))
    await bus.close()
try:
    asyncio.run(main())
    print(json.dumps({"served": True}))
except KmoddError as err:
    print(json.dumps({"error": type(err).__name__, "text": str(err)}))
"""


@dataclass
class OtherUser:
    """A Python that uid `uid` can run, with kmodd and its D-Bus dependencies."""

    uid: int
    argv: list[str]
    env: dict[str, str]

    def call(self, bus: Bus, name: str, *args: Any) -> dict[str, Any]:
        return self._run(bus, [*self.argv, "-c", _CLIENT, name, json.dumps(args)])

    def call_raw(self, bus: Bus, member: str, signature: str, body: list[Any]) -> dict[str, Any]:
        """One call of `member` with `body` as it is (the arguments go by stdin: they
        may be larger than a command line takes)."""
        doc = json.dumps([member, signature, body])
        return self._run(bus, [*self.argv, "-c", _RAW], stdin=doc)

    def serve(self, bus: Bus) -> dict[str, Any]:
        """Try to take io.kmodd1 as this user."""
        return self._run(bus, [*self.argv, "-c", _SERVE_AS])

    def _run(self, bus: Bus, argv: list[str], stdin: str = "") -> dict[str, Any]:
        env = {**self.env, "DBUS_SYSTEM_BUS_ADDRESS": bus.address}
        proc = subprocess.run(
            argv, env=env, cwd="/", input=stdin, capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        doc: dict[str, Any] = json.loads(proc.stdout)
        doc["stderr"] = proc.stderr
        return doc


@contextlib.contextmanager
def as_other_user(uid: int = NOBODY) -> Iterator[OtherUser]:
    """`setpriv` to `uid` with a Python it can read: this interpreter when it is
    reachable, else the system's python3 of the same version with copies of
    dbus_next and structlog (this one may live under /root, mode 0700)."""
    setpriv = require_tool("setpriv")
    drop = [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    site = Path(tempfile.mkdtemp(prefix="kmodd-site-"))
    try:
        site.chmod(0o755)
        base = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        candidates = [
            OtherUser(uid, [*drop, sys.executable], {**base, "PYTHONPATH": os.fspath(TOP)})
        ]
        system = shutil.which("python3", path="/usr/bin:/bin")
        if system:
            import dbus_next
            import pyudev
            import structlog
            import zstandard

            # what kmodctl imports, and kmodd too: the checkout may sit in a directory
            # only root can enter
            packages = (dbus_next, structlog, pyudev, zstandard)
            for src in (*(Path(str(p.__file__)).parent for p in packages), TOP / "kmodd"):
                shutil.copytree(src, site / src.name, ignore=shutil.ignore_patterns("*.pyc"))
            for path in site.rglob("*"):
                path.chmod(0o755 if path.is_dir() else 0o644)
            pythonpath = os.fspath(site)
            candidates.append(OtherUser(uid, [*drop, system], {**base, "PYTHONPATH": pythonpath}))
        problems = []
        for candidate in candidates:
            probe = subprocess.run(
                [*candidate.argv, "-c", "import kmodd.edges.dbus"],
                env=candidate.env,
                cwd="/",
                capture_output=True,
                text=True,
                check=False,
            )
            if probe.returncode == 0:
                yield candidate
                return
            problems.append(f"{candidate.argv[-1]}: {probe.stderr.strip()[-300:]}")
        require(f"a Python uid {uid} can run with kmodd importable ({problems})", False)
    finally:
        shutil.rmtree(site, ignore_errors=True)


# `python -m tests.dbus_harness serve ROOT` ---------------------------------------------------


async def _serve(root: str) -> None:
    from kmodd.base import log as kmodd_log
    from kmodd.base.paths import Root
    from kmodd.edges import dbus
    from kmodd.service.core import Service
    from kmodd.state import store

    kmodd_log.configure(level=logging.INFO)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    at = Root.at(root)
    with store.lock(at, wait=False):
        service = Service(at, concurrency=1)
        served = await dbus.serve(service)
        await service.start()
        await stop.wait()
        await service.stop()
        await served.close()


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve"] or len(sys.argv) != 3:
        sys.exit("usage: python -m tests.dbus_harness serve ROOT")
    asyncio.run(_serve(sys.argv[2]))
