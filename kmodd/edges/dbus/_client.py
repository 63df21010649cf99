"""kmodctl's side: a synchronous client of io.kmodd1 on the system bus.

It runs its own asyncio loop, so it must not be used from inside a running one. D-Bus
errors come back as the KmoddError subclass with that `dbus_name`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import BusType, MessageType
from dbus_next.errors import AuthError, DBusError, InvalidAddressError
from dbus_next.message import Message
from dbus_next.signature import Variant

from kmodd.act.request import Request
from kmodd.base.errors import KmoddError, UsageError
from kmodd.edges.dbus._common import (
    BUS_NAME,
    INTERFACE,
    OBJECT_PATH,
    disconnect,
    disconnected,
    from_dbus_error,
)

T = TypeVar("T")
JobCallback = Callable[[dict[str, str]], None]

CALL_TIMEOUT = 120.0
"""How long any one answer may take (Plan walks every source's symbols)."""
WAIT_SLICE = 20.0
"""Wait is asked in slices, so no bus reply timeout can cut a long wait short."""

_CONNECT_ERRORS = (OSError, EOFError, TimeoutError, AuthError, InvalidAddressError, DBusError)


class Client:
    def __init__(self, loop: asyncio.AbstractEventLoop, bus: MessageBus) -> None:
        self._loop = loop
        self._bus = bus

    @classmethod
    def connect(cls, timeout: float = 2.0) -> Client | None:
        """The service, or None when there is no system bus or nobody owns io.kmodd1."""
        loop = asyncio.new_event_loop()
        try:
            bus = loop.run_until_complete(asyncio.wait_for(_open(), timeout))
        except _CONNECT_ERRORS:
            loop.close()
            return None
        if bus is None:
            loop.close()
            return None
        return cls(loop, bus)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        disconnect(self._bus)
        self._loop.run_until_complete(disconnected(self._bus, 1.0))
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # the calls -------------------------------------------------------------------------

    def status(self, module: str | None = None, kernel: str | None = None) -> list[dict[str, Any]]:
        """Status's lines as `kmodctl status --json` has them (StatusJSON)."""
        doc = self._call("StatusJSON", "ss", module or "", kernel or "")
        lines = json.loads(doc)
        if not isinstance(lines, list):
            raise KmoddError("the service's StatusJSON is not a list")
        return lines

    def plan(self, kernel: str) -> list[dict[str, str]]:
        return self._call("Plan", "s", kernel)  # type: ignore[no-any-return]

    def submit(self, request: Request) -> int:
        """Queue `request`; the job's id."""
        wire = {key: Variant(sig, value) for key, (sig, value) in request.to_wire().items()}
        return int(self._call("Submit", "a{sv}", wire))

    def cancel(self, job: int) -> bool:
        return bool(self._call("Cancel", "t", job))

    def log(self, job: int) -> str:
        return str(self._call("GetLog", "t", job))

    def jobs(self) -> list[dict[str, str]]:
        return self._call("Jobs", "")  # type: ignore[no-any-return]

    def version(self) -> str:
        return str(self._property("Version"))

    def queue_length(self) -> int:
        return int(self._property("QueueLength"))

    def root(self) -> str:
        """The root the service serves."""
        return str(self._property("Root"))

    def wait(
        self, kernel: str, timeout: float, on_job: JobCallback | None = None
    ) -> tuple[bool, list[dict[str, str]]]:
        """Until `kernel` has no work queued or running (True) or `timeout` (False), and
        its latest jobs; `on_job` sees every JobChanged for `kernel` meanwhile."""
        if not (math.isfinite(timeout) and timeout >= 0):
            raise UsageError(f"timeout must be a number of seconds, not {timeout}")
        return self._run(self._wait(kernel, timeout, on_job), timeout + CALL_TIMEOUT)

    # plumbing ------------------------------------------------------------------------------

    def _call(self, member: str, signature: str, *body: Any) -> Any:
        reply = self._run(self._ask(member, signature, list(body)), CALL_TIMEOUT)
        return reply[0] if len(reply) == 1 else reply

    def _property(self, name: str) -> Any:
        msg = Message(
            destination=BUS_NAME,
            path=OBJECT_PATH,
            interface="org.freedesktop.DBus.Properties",
            member="Get",
            signature="ss",
            body=[INTERFACE, name],
        )
        return self._run(_reply_body(self._bus, msg), CALL_TIMEOUT)[0].value

    def _run(self, work: Coroutine[Any, Any, T], timeout: float) -> T:
        try:
            return self._loop.run_until_complete(asyncio.wait_for(work, timeout))
        except TimeoutError:
            raise KmoddError(f"kmodd did not answer within {timeout:.0f} s") from None
        except (OSError, EOFError) as err:
            raise KmoddError(f"lost the connection to the system bus: {err}") from None

    async def _ask(self, member: str, signature: str, body: list[Any]) -> list[Any]:
        msg = Message(
            destination=BUS_NAME,
            path=OBJECT_PATH,
            interface=INTERFACE,
            member=member,
            signature=signature,
            body=body,
        )
        return await _reply_body(self._bus, msg)

    async def _wait(
        self, kernel: str, timeout: float, on_job: JobCallback | None
    ) -> tuple[bool, list[dict[str, str]]]:
        failure: list[BaseException] = []

        def signal(msg: Message) -> bool:
            if (
                msg.message_type is MessageType.SIGNAL
                and msg.interface == INTERFACE
                and msg.member == "JobChanged"
                and msg.path == OBJECT_PATH
                and on_job is not None
                and not failure
                and msg.body[0].get("kernel") == kernel
            ):
                try:
                    on_job(dict(msg.body[0]))
                except Exception as err:  # noqa: BLE001 (raised again once Wait returns)
                    failure.append(err)
            return False

        rule = (
            f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}',"
            f"interface='{INTERFACE}',member='JobChanged'"
        )
        if on_job is not None:
            await _bus_method(self._bus, "AddMatch", rule)
            self._bus.add_message_handler(signal)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + max(0.0, timeout)
            while True:
                left = max(0.0, deadline - loop.time())
                done, jobs = await self._ask("Wait", "sd", [kernel, min(left, WAIT_SLICE)])
                if done or left <= WAIT_SLICE:
                    break
        finally:
            if on_job is not None:
                self._bus.remove_message_handler(signal)
                with contextlib.suppress(*_CONNECT_ERRORS, KmoddError):
                    await _bus_method(self._bus, "RemoveMatch", rule)
        if failure:
            raise failure[0]
        return bool(done), [dict(j) for j in jobs]


async def _open() -> MessageBus | None:
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    try:
        owned = await _bus_method(bus, "NameHasOwner", BUS_NAME)
    except BaseException:
        disconnect(bus)
        raise
    if owned:
        return bus
    disconnect(bus)
    return None


async def _bus_method(bus: MessageBus, member: str, arg: str) -> Any:
    msg = Message(
        destination="org.freedesktop.DBus",
        path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus",
        member=member,
        signature="s",
        body=[arg],
    )
    body = await _reply_body(bus, msg)
    return body[0] if body else None


async def _reply_body(bus: MessageBus, msg: Message) -> list[Any]:
    reply = await bus.call(msg)
    if reply is None:
        raise KmoddError("lost the connection to the system bus")
    if reply.message_type is MessageType.ERROR:
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        raise from_dbus_error(reply.error_name or "", text)
    return list(reply.body)
