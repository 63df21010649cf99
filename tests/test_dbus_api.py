"""io.kmodd1 over a real dbus-daemon configured like Debian's system bus, with kmodd's
own policy file: the service (`python -m kmodd.edges.daemon`) in its own process, a stand-in
logind, clients as root (this process) and as uid 65534 (`setpriv`), a real build."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sqlite3
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dbus_next.aio.message_bus import MessageBus
from dbus_next.message import Message
from dbus_next.signature import Variant

from kmodd.act.request import Request, Verb
from kmodd.base.errors import (
    AccessDeniedError,
    BadInputError,
    KmoddError,
    NotFoundError,
    UsageError,
)
from kmodd.base.paths import Root
from kmodd.edges.dbus import BUS_NAME, INTERFACE, OBJECT_PATH, Client, serve
from kmodd.edges.dbus._common import _classes, disconnect, from_dbus_error, kmodd_error
from kmodd.edges.dbus._inhibit import Inhibitor
from tests.conftest import K113, require_tool
from tests.dbus_harness import (
    Bus,
    FakeLogind,
    OtherUser,
    Server,
    SignalRecorder,
    as_other_user,
    running_service,
    system_bus,
)
from tests.sources import write_source
from tests.test_autoinstall import make_system

BUILD_TIMEOUT = 600.0
_PROPERTIES = "org.freedesktop.DBus.Properties"


@dataclass
class Served:
    root: Path
    bus: Bus
    logind: FakeLogind
    signals: SignalRecorder
    server: Server
    other: OtherUser


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """kmodd serving a root with 6.12.113 (full headers) and the source kmt-base."""
    require_tool("make")
    tmp = tmp_path_factory.mktemp("dbus")
    root = make_system(tmp / "root", (K113,))
    write_source(root, "kmt-base")
    with contextlib.ExitStack() as stack:
        bus = stack.enter_context(system_bus(tmp / "bus"))
        logind = stack.enter_context(FakeLogind(bus.address))
        signals = stack.enter_context(SignalRecorder(bus.address))
        server = stack.enter_context(running_service(bus, root, tmp / "kmodd.log", daemon=True))
        other = stack.enter_context(as_other_user())
        yield Served(root, bus, logind, signals, server, other)


@pytest.fixture
def client(served: Served, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", served.bus.address)
    connected = Client.connect()
    assert connected is not None, served.server.output()
    yield connected
    connected.close()


def states(lines: list[dict[str, str]]) -> dict[tuple[str, str], str]:
    return {(ln["module"], ln["kernel"]): ln["state"] for ln in lines}


def test_the_interface_is_what_kmodctl_is_written_against(served: Served) -> None:
    async def introspect() -> Any:
        bus = await MessageBus(bus_address=served.bus.address).connect()
        try:
            return await bus.introspect(BUS_NAME, OBJECT_PATH)
        finally:
            disconnect(bus)

    node = asyncio.run(introspect())
    (manager,) = [i for i in node.interfaces if i.name == INTERFACE]
    methods = {
        m.name: ("".join(a.signature for a in m.in_args), "".join(a.signature for a in m.out_args))
        for m in manager.methods
    }
    assert methods == {
        "Status": ("ss", "aa{ss}"),
        "StatusJSON": ("ss", "s"),
        "Plan": ("s", "aa{ss}"),
        "Submit": ("a{sv}", "t"),
        "Cancel": ("t", "b"),
        "Wait": ("sd", "baa{ss}"),
        "GetLog": ("t", "s"),
        "Jobs": ("", "aa{ss}"),
    }
    signals = {s.name: "".join(a.signature for a in s.args) for s in manager.signals}
    assert signals == {"JobChanged": "a{ss}", "KernelReady": "sb"}
    props = {p.name: (p.signature, p.access.value) for p in manager.properties}
    assert props == {
        "Version": ("s", "read"),
        "QueueLength": ("u", "read"),
        "Root": ("s", "read"),
    }


def test_status_answers_root_and_everyone_else(served: Served, client: Client) -> None:
    mine = client.status()
    assert states(mine) == {("kmt-base", K113): "added"}
    assert set(mine[0]) == {
        "module",
        "version",
        "kernel",
        "arch",
        "state",
        "weak_from",
        "log",
        "detail",
        "in_initrd",
        "initrd",
        "sandbox",
    }
    assert mine[0]["weak_from"] is None  # StatusJSON: as `kmodctl status --json` has it
    typed = client._call("Status", "ss", "", "")  # the same lines, typed: None travels as ""
    assert typed == [{k: "" if v is None else str(v) for k, v in line.items()} for line in mine]
    theirs = served.other.call(served.bus, "status", "", K113)
    assert theirs["connected"], theirs
    assert theirs.get("result") == mine, theirs
    assert client.version() == served.other.call(served.bus, "version")["result"]
    assert served.other.call(served.bus, "plan", K113)["result"] == client.plan(K113)
    assert client.plan(K113)[0] == {
        "name": "kmt-base",
        "version": "1.0",
        "kernel": K113,
        "action": "build",
        "reason": client.plan(K113)[0]["reason"],
        "weak_from": "",
    }


def test_only_root_may_change_the_system(served: Served, client: Client) -> None:
    for name, args in (
        ("submit", ["kernel", K113, ""]),
        ("submit", ["source", K113, "kmt-base"]),
        ("submit", ["uninstall", K113, "kmt-base"]),
        ("submit", ["remove-kernel", K113, ""]),
        ("cancel", [1]),
    ):
        answer = served.other.call(served.bus, name, *args)
        assert answer.get("error") == "AccessDeniedError", (name, answer)
        assert answer["dbus_name"] == "io.kmodd1.Error.AccessDenied"
        assert "needs root" in answer["text"]
    assert client.jobs() == []  # nothing was queued
    assert served.logind.calls == []


def test_add_kernel_builds_signals_and_holds_off_shutdown(served: Served, client: Client) -> None:
    seen: list[dict[str, str]] = []
    job = client.submit(Request(Verb.AUTOINSTALL, K113))
    done, jobs = client.wait(K113, BUILD_TIMEOUT, seen.append)
    assert done, served.server.output()
    (mine,) = [j for j in jobs if j["id"] == str(job)]
    assert mine["state"] == "done", mine
    assert mine["kind"] == "kernel"
    outcomes = json.loads(mine["outcomes"])
    assert [(o["name"], o["action"]) for o in outcomes] == [("kmt-base", "build")], outcomes
    assert states(client.status("kmt-base", K113)) == {("kmt-base", K113): "installed"}
    # on_job saw the job end (it may have been running before Wait was asked)
    assert [j["state"] for j in seen if j["id"] == str(job)][-1:] == ["done"], seen

    # every signal, from a connection of its own
    def job_states(signals: list[tuple[str, list[Any]]]) -> list[str]:
        return [b[0]["state"] for m, b in signals if m == "JobChanged" and b[0]["id"] == str(job)]

    assert served.signals.wait_for(lambda s: ("KernelReady", [K113, True]) in s, 10)
    assert job_states(served.signals.signals) == ["queued", "running", "done"]
    changed = [b[1] for m, b in served.signals.signals if m == "PropertiesChanged"]
    assert {"QueueLength"} <= {k for c in changed for k in c}

    # logind: locked while the kernel had work, released once the queue drained
    assert served.logind.wait_for(lambda calls: all(c.released for c in calls), 10), [
        vars(c) for c in served.logind.calls
    ]
    assert served.logind.calls, "no Inhibit call"
    first = served.logind.calls[0]
    assert (first.what, first.who, first.mode) == ("shutdown", "kmodd", "block")
    assert K113 in first.why, first.why
    assert client.queue_length() == 0


def test_build_by_root(served: Served, client: Client) -> None:
    before = len(served.logind.calls)
    job = client.submit(Request(Verb.INSTALL, K113, "kmt-base"))
    done, jobs = client.wait(K113, BUILD_TIMEOUT)
    assert done
    (mine,) = [j for j in jobs if j["id"] == str(job)]
    assert (mine["kind"], mine["source"], mine["state"]) == ("source", "kmt-base", "done")
    assert f"job {job}: source kmt-base {K113}: done" in client.log(job)
    assert served.logind.wait_for(
        lambda calls: len(calls) > before and all(c.released for c in calls), 10
    )
    assert client.cancel(job) is False  # no longer queued


def test_unknown_kernel_is_not_found_in_one_line(served: Served, client: Client) -> None:
    for ask in (
        lambda: client.submit(Request(Verb.AUTOINSTALL, "9.9.9-nope")),
        lambda: client.status("", "9.9.9-nope"),
        lambda: client.plan("9.9.9-nope"),
        lambda: client.log(987654),
    ):
        with pytest.raises(NotFoundError) as caught:
            ask()
        text = str(caught.value)
        assert caught.value.dbus_name == "io.kmodd1.Error.NotFound"
        assert "\n" not in text and "Traceback" not in text, text
    with pytest.raises(UsageError, match="is not a kernel release"):
        client.submit(Request(Verb.AUTOINSTALL, "../../etc"))
    # the service checks what it is sent, not only kmodctl: each one line, named
    queued = client.jobs()
    for wire, says in (
        ({"verb": ("s", "kernel"), "kernel": ("s", "../../etc")}, "is not a kernel release"),
        ({"verb": ("s", "kernel"), "kernel": ("s", "x" * 2_000_000)}, "is not a kernel release"),
        ({"verb": ("s", "kernel"), "kernel": ("u", 7)}, "kernel must be of type s"),
        ({"verb": ("s", "reboot"), "kernel": ("s", K113)}, "unknown verb 'reboot'"),
        ({"kernel": ("s", K113)}, "needs 'verb'"),
        ({"verb": ("s", "kernel"), "kernel": ("s", K113), "force": ("b", True)}, "unknown"),
        ({"verb": ("s", "kernel"), "kernel": ("s", K113), "source": ("s", "x")}, "takes no"),
        ({"verb": ("s", "source"), "kernel": ("s", K113)}, "is not a module source"),
    ):
        raw = {key: Variant(sig, value) for key, (sig, value) in wire.items()}
        with pytest.raises(UsageError, match=re.escape(says)) as refused:
            client._call("Submit", "a{sv}", raw)
        assert refused.value.dbus_name == "io.kmodd1.Error.InvalidArgs"
        assert len(str(refused.value)) < 300, str(refused.value)[:300]
    assert client.jobs() == queued
    with pytest.raises(UsageError, match="timeout"):
        client._call("Wait", "sd", K113, float("nan"))
    assert "Traceback" not in served.server.output()  # nor in kmodd's log


def test_property_misuse_is_refused_quietly(served: Served) -> None:
    async def ask() -> list[tuple[str | None, list[Any]]]:
        bus = await MessageBus(bus_address=served.bus.address).connect()
        answers: list[tuple[str | None, list[Any]]] = []
        try:
            for member, signature, body in (
                ("Set", "ssv", [INTERFACE, "Version", Variant("s", "9")]),
                ("Get", "ss", [INTERFACE, "Nope"]),
                ("Get", "ss", ["org.example.Nope", "Version"]),
                ("GetAll", "s", [INTERFACE]),
            ):
                reply = await bus.call(
                    Message(
                        BUS_NAME, OBJECT_PATH, _PROPERTIES, member, signature=signature, body=body
                    )
                )
                assert reply is not None
                answers.append((reply.error_name, reply.body))
        finally:
            disconnect(bus)
        return answers

    before = served.server.output()
    set_, get, other, get_all = asyncio.run(ask())
    assert set_[0] == "org.freedesktop.DBus.Error.PropertyReadOnly"
    assert get[0] == "org.freedesktop.DBus.Error.UnknownProperty"
    assert other[0] == "org.freedesktop.DBus.Error.UnknownInterface"
    assert get_all[0] is None and set(get_all[1][0]) == {"Version", "QueueLength", "Root"}
    assert served.server.output() == before  # nothing logged


def test_a_bug_is_an_internal_error_without_traceback(served: Served, client: Client) -> None:
    """A job whose outcomes are not JSON: GetLog's json.loads fails inside kmodd."""
    db = sqlite3.connect(Root.at(served.root).state_dir / "state.db")
    with db:
        cur = db.execute(
            "INSERT INTO jobs (kind, kernel, source, priority, state, created, finished, "
            "detail, outcomes) VALUES ('kernel', '0.0-ghost', '', 2, 'failed', ?, ?, 'x', '{')",
            (time.time(), time.time()),
        )
    db.close()
    assert cur.lastrowid is not None
    with pytest.raises(KmoddError) as caught:
        client.log(cur.lastrowid)
    assert type(caught.value) is KmoddError
    assert caught.value.dbus_name == "io.kmodd1.Error.Failed"
    text = str(caught.value)
    assert text.startswith("internal error: JSONDecodeError:"), text
    assert "\n" not in text and "Traceback" not in text and ".py" not in text, text


def test_nobody_else_can_take_the_name(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    theirs = served.other.serve(served.bus)
    assert theirs.get("error") == "AccessDeniedError", theirs
    assert theirs["text"].startswith(f"may not own {BUS_NAME} on the system bus"), theirs

    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", served.bus.address)
    stub = types.SimpleNamespace(on_job=[], on_ready=[], on_busy=[], queue_length=0)
    with pytest.raises(KmoddError) as caught:
        asyncio.run(serve(stub))  # type: ignore[arg-type]
    assert str(caught.value) == (
        f"{BUS_NAME} is already owned on the system bus by pid {served.server.pid}: "
        "is another kmodd running?"
    )
    assert stub.on_job == [] and stub.on_busy == []  # unsubscribed again


def test_no_service_no_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-socket")
    assert Client.connect() is None
    with system_bus(tmp_path / "bus") as bus:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
        assert Client.connect() is None  # a bus, but nobody owns io.kmodd1


def test_the_lock_is_skipped_without_logind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No logind on the bus: kmodd warns once and works on. (The service here is the
    harness's: Service + serve() without the daemon's file watcher.)"""
    root = make_system(tmp_path / "root", (K113,))
    write_source(root, "kmt-base")
    with (
        system_bus(tmp_path / "bus") as bus,
        running_service(bus, root, tmp_path / "kmodd.log") as server,
    ):
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
        client = Client.connect()
        assert client is not None
        try:
            client.submit(Request(Verb.AUTOINSTALL, K113))
            assert client.wait(K113, BUILD_TIMEOUT)[0]
            client.submit(Request(Verb.INSTALL, K113, "kmt-base"))
            assert client.wait(K113, BUILD_TIMEOUT)[0]
        finally:
            client.close()
        log = server.output()
    assert log.count("logind is not on the system bus") == 1, log
    assert "Traceback" not in log, log


def test_the_inhibitor_follows_the_busy_kernels(tmp_path: Path) -> None:
    """A new lock (then the old one closed) when the busy kernels change; none left
    when the queue drains or the service closes."""

    async def scenario(address: str, logind: FakeLogind) -> None:
        bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
        inhibitor = Inhibitor(bus)

        async def until(predicate: Any) -> None:
            for _ in range(200):
                if predicate(logind.calls):
                    return
                await asyncio.sleep(0.02)
            raise AssertionError([vars(c) for c in logind.calls])

        try:
            inhibitor.busy(["A"])
            await until(lambda calls: len(calls) == 1)
            inhibitor.busy(["A", "B"])
            await until(lambda calls: len(calls) == 2 and calls[0].released)
            assert logind.calls[1].why == "Installing kernel modules for A, B"
            assert not logind.calls[1].released
            inhibitor.busy([])
            await until(lambda calls: calls[1].released)
            assert not inhibitor.held
            inhibitor.busy(["C"])
            await until(lambda calls: len(calls) == 3)
            for _ in range(100):
                if inhibitor.held:
                    break
                await asyncio.sleep(0.02)
            inhibitor.close()
            await until(lambda calls: calls[2].released)
        finally:
            disconnect(bus)

    with system_bus(tmp_path / "bus") as bus, FakeLogind(bus.address) as logind:
        asyncio.run(scenario(bus.address, logind))


def test_errors_come_back_as_their_classes() -> None:
    import kmodd.state.store  # noqa: F401 - StoreError is a KmoddError too

    for cls in _classes(KmoddError):
        back = from_dbus_error(cls.dbus_name, "one line")
        assert str(back) == "one line" and back.dbus_name == cls.dbus_name
        assert issubclass(cls, type(back)), (cls, type(back))  # the most general one
        assert kmodd_error(back).type == cls.dbus_name  # a valid D-Bus error name
    bad = from_dbus_error("io.kmodd1.Error.BadInput", "/usr/src/x/dkms.conf: broken")
    assert isinstance(bad, BadInputError) and bad.exit_code == 3
    odd = from_dbus_error("org.freedesktop.DBus.Error.NoReply", "no reply")
    assert type(odd) is KmoddError and odd.dbus_name == "org.freedesktop.DBus.Error.NoReply"
    assert type(from_dbus_error("org.freedesktop.DBus.Error.AccessDenied", "policy")) is (
        AccessDeniedError
    )


def test_plan_for_anyone_comes_from_a_cache_refreshed_when_a_source_changes(
    tmp_path: Path,
) -> None:
    """Unprivileged callers cannot make root evaluate every dkms.conf once per Plan:
    the answer is cached until a source, the settings or the kernel change. (The
    dkms.conf cannot count its evaluations in a file: it runs in the sandbox, where
    nothing is writable; each evaluation gives it a version of its own instead.)"""
    require_tool("make")
    root = make_system(tmp_path / "root", (K113,))
    src = write_source(root, "kmt-base")
    conf = src / "dkms.conf"
    conf.write_text(conf.read_text() + 'PACKAGE_VERSION="1.$(date +%s%N)"\n')
    with (
        system_bus(tmp_path / "bus") as bus,
        running_service(bus, root, tmp_path / "kmodd.log") as server,
        as_other_user() as other,
    ):
        answers = [other.call(bus, "plan", K113)["result"] for _ in range(5)]
        assert all(a == answers[0] for a in answers), (answers, server.output())
        conf.write_text(conf.read_text() + "# changed\n")
        os.utime(conf, ns=(time.time_ns(), time.time_ns() + 10**9))
        again = other.call(bus, "plan", K113)["result"]
        assert again[0]["version"] != answers[0][0]["version"], "evaluated again"
