"""The service on the system bus: `io.kmodd1` at `/io/kmodd1`, interface
`io.kmodd1.Manager`.

Every method call is answered by one message handler (returning True from a dbus-next
message handler stops dbus-next's own dispatch), because dbus-next's dispatch neither
tells a method who called it nor stays quiet about errors (each error reply is also
logged with a traceback). The handler asks the bus for the caller's uid before a
changing call (Submit, Cancel: uid 0 only; reads are open to
everyone), and turns every error into a named D-Bus error of one line. The entries
dbus-next holds for the methods only describe them (introspection) and refuse;
properties and signals are dbus-next's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import BusType, MessageFlag, MessageType, NameFlag, RequestNameReply
from dbus_next.errors import AuthError, DBusError, InvalidAddressError
from dbus_next.message import Message
from dbus_next.service import ServiceInterface
from dbus_next.signature import SignatureTree, Variant

from kmodd import __version__
from kmodd.act.request import Request, check_release, check_source
from kmodd.base.errors import AccessDeniedError, KmoddError, NotFoundError, UsageError
from kmodd.base.log import get_logger
from kmodd.edges.dbus._common import (
    BUS_NAME,
    INTERFACE,
    OBJECT_PATH,
    dbus_error,
    decision_dict,
    disconnect,
    disconnected,
    internal_error,
    job_dict,
    kmodd_error,
    line_dict,
    method,
    readonly,
    signal_of,
)
from kmodd.edges.dbus._inhibit import Inhibitor

if TYPE_CHECKING:
    from kmodd.service.core import Service
    from kmodd.service.jobs import Job
    from kmodd.state.report import Line

log = get_logger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

_PROPERTIES = "org.freedesktop.DBus.Properties"
_READ_ONLY = "org.freedesktop.DBus.Error.PropertyReadOnly"
_UNKNOWN_INTERFACE = "org.freedesktop.DBus.Error.UnknownInterface"
_UNKNOWN_PROPERTY = "org.freedesktop.DBus.Error.UnknownProperty"
_DBUS = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")
_MAX_WAIT = 7 * 24 * 3600.0


@dataclass(frozen=True)
class _Call:
    name: str
    in_signature: str
    out_signature: str
    fn: Callable[..., Any]
    root_only: bool
    many_out: bool
    """The result is a list of several out arguments."""


_CALLS: dict[str, _Call] = {}


def call(out: str, *, root_only: bool = False, **params: str) -> Callable[[F], F]:
    """A method of io.kmodd1.Manager, taking `params` (name → D-Bus type, in order) and
    returning `out`. ServiceBus's message handler answers it (after checking the caller
    is root, for `root_only`); the entry dbus-next gets only describes it."""

    def decorate(fn: F) -> F:
        name = fn.__name__
        many = len(SignatureTree(out).types) > 1
        _CALLS[name] = _Call(name, "".join(params.values()), out, fn, root_only, many)

        def refuse(self: Any, *args: Any) -> Any:
            raise AccessDeniedError(f"{name} is answered by kmodd's own dispatcher only")

        refuse.__name__ = name
        return method(out, **params)(refuse)  # type: ignore[return-value]

    return decorate


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Reads that walk the disk run beside the loop, so signals and other calls flow."""
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))


def _release_arg(kernel: str) -> str:
    return check_release(kernel)


def _job_arg(job: int) -> int:
    """Job ids are SQLite rowids: 1 to 2^63 - 1."""
    if not 0 < job < 2**63:
        raise NotFoundError(f"no job {job}")
    return job


class Manager(ServiceInterface):
    """io.kmodd1.Manager: a thin exporter of Service."""

    def __init__(self, service: Service) -> None:
        super().__init__(INTERFACE)
        self._service = service

    # reads ------------------------------------------------------------------------------

    @call("aa{ss}", module="s", kernel="s")
    async def Status(self, module: str, kernel: str) -> list[dict[str, str]]:
        return [line_dict(line) for line in await self._status(module, kernel)]

    @call("s", module="s", kernel="s")
    async def StatusJSON(self, module: str, kernel: str) -> str:
        """Status's lines as `kmodctl status --json` prints them, in one string: what
        kmodctl asks for (a string costs the bus, and both ends, far less than 200
        dicts of 11 strings)."""
        return json.dumps([line.json() for line in await self._status(module, kernel)])

    async def _status(self, module: str, kernel: str) -> list[Line]:
        """Status's lines for Status and StatusJSON, their arguments checked first."""
        if module:
            check_source(module)
        if kernel:
            check_release(kernel)
        return await _in_thread(self._service.status, module or None, kernel or None)

    @call("aa{ss}", kernel="s")
    async def Plan(self, kernel: str) -> list[dict[str, str]]:
        decisions = await _in_thread(self._service.plan, _release_arg(kernel))
        return [decision_dict(d) for d in decisions]

    @call("baa{ss}", kernel="s", timeout="d")
    async def Wait(self, kernel: str, timeout: float) -> list[Any]:
        if not (math.isfinite(timeout) and 0 <= timeout <= _MAX_WAIT):
            raise UsageError(f"timeout must be 0 to {_MAX_WAIT:.0f} seconds, not {timeout}")
        done, jobs = await self._service.wait(check_release(kernel), timeout)
        return [done, [job_dict(j) for j in jobs]]

    @call("s", job="t")
    def GetLog(self, job: int) -> str:
        return self._service.log(_job_arg(job))

    @call("aa{ss}")
    def Jobs(self) -> list[dict[str, str]]:
        return [job_dict(j) for j in self._service.jobs()]

    # changes: root only --------------------------------------------------------------------

    @call("t", root_only=True, request="a{sv}")
    def Submit(self, request: dict[str, Variant]) -> int:
        """Queue a Request (`verb`, `kernel`, `source`, `initrd`, `avoid`); the job's id."""
        typed = {key: (value.signature, value.value) for key, value in request.items()}
        return self._service.submit(Request.from_wire(typed)).id

    @call("b", root_only=True, job="t")
    def Cancel(self, job: int) -> bool:
        return self._service.cancel(_job_arg(job)) is not None

    # signals and properties --------------------------------------------------------------------

    @signal_of("a{ss}")
    def JobChanged(self, job: dict[str, str]) -> dict[str, str]:
        return job

    @signal_of("sb")
    def KernelReady(self, kernel: str, ok: bool) -> list[Any]:
        return [kernel, ok]

    @readonly("s")
    def Version(self) -> str:
        return __version__

    @readonly("u")
    def QueueLength(self) -> int:
        return self._service.queue_length

    @readonly("s")
    def Root(self) -> str:
        """The system it serves: `/`, or the prefix of an image or a test's tree."""
        return os.fspath(self._service.root.prefix)


class ServiceBus:
    """The service's presence on the system bus; `close()` takes it all down."""

    def __init__(self, bus: MessageBus, service: Service) -> None:
        self.bus = bus
        self.service = service
        self.manager = Manager(service)
        self.inhibitor = Inhibitor(bus)
        self._tasks: set[asyncio.Task[None]] = set()
        self._queue_length = -1
        self._closed = False
        self._properties = {p.name for p in self.manager.introspect().properties}
        bus.add_message_handler(self._intercept)
        bus.export(OBJECT_PATH, self.manager)
        service.on_job.append(self._job_changed)
        service.on_ready.append(self._kernel_ready)
        service.on_busy.append(self.inhibitor.busy)

    async def claim_name(self) -> None:
        try:
            reply = await self.bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        except DBusError as err:
            raise AccessDeniedError(
                f"may not own {BUS_NAME} on the system bus (is io.kmodd1.conf installed in "
                f"/usr/share/dbus-1/system.d, and is kmodd running as root?): {err.text}"
            ) from None
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise KmoddError(f"{BUS_NAME} is already owned on the system bus{await self._owner()}")

    async def _owner(self) -> str:
        """`(by pid N: is another kmodd running?)`, as far as the bus tells."""
        owner = await self._bus_call("GetNameOwner", "s", BUS_NAME)
        pid = await self._bus_call("GetConnectionUnixProcessID", "s", owner) if owner else None
        return f" by pid {pid}: is another kmodd running?" if pid else ""

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for listeners, listener in (
            (self.service.on_job, self._job_changed),
            (self.service.on_ready, self._kernel_ready),
            (self.service.on_busy, self.inhibitor.busy),
        ):
            with contextlib.suppress(ValueError):
                listeners.remove(listener)  # type: ignore[arg-type]
        self.inhibitor.close()
        for task in list(self._tasks):
            task.cancel()
        self.bus.remove_message_handler(self._intercept)
        self.bus.unexport(OBJECT_PATH)
        if self.bus.connected:
            with contextlib.suppress(TimeoutError, OSError, EOFError, DBusError):
                await asyncio.wait_for(self.bus.release_name(BUS_NAME), 2.0)
        disconnect(self.bus)
        await disconnected(self.bus, 2.0)

    # the calls -------------------------------------------------------------------------------

    def _intercept(self, msg: Message) -> bool:
        """dbus-next message handler: every call of ours is answered here (True takes it
        away from dbus-next, whose own dispatch would log a traceback for each error)."""
        if msg.message_type is not MessageType.METHOD_CALL or msg.path != OBJECT_PATH:
            return False
        if msg.interface == _PROPERTIES:
            return self._refuse_property(msg)
        found = _CALLS.get(msg.member or "")
        if msg.interface != INTERFACE or found is None or msg.signature != found.in_signature:
            return False  # dbus-next answers UnknownMethod (quietly)
        task = asyncio.get_running_loop().create_task(self._answer(msg, found))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _refuse_property(self, msg: Message) -> bool:
        """Answer the Properties calls dbus-next would refuse by raising (and logging a
        traceback for); pass the good ones (Get and GetAll of ours) on to it."""
        name = msg.body[1] if msg.member == "Get" and msg.signature == "ss" else None
        if msg.member == "Set":
            error = dbus_error(_READ_ONLY, "kmodd's properties are read-only")
        elif msg.member not in ("Get", "GetAll") or msg.signature not in ("ss", "s"):
            return False  # dbus-next answers UnknownMethod (quietly)
        elif msg.body[0] != INTERFACE:
            error = dbus_error(_UNKNOWN_INTERFACE, f"{OBJECT_PATH} has no interface {msg.body[0]}")
        elif name is not None and name not in self._properties:
            error = dbus_error(_UNKNOWN_PROPERTY, f"{INTERFACE} has no property {name}")
        else:
            return False
        if not msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            self.bus.send(_error_reply(msg, error))
        return True

    async def _answer(self, msg: Message, call: _Call) -> None:
        try:
            if call.root_only:
                uid = await self._bus_call("GetConnectionUnixUser", "s", msg.sender)
                if uid != 0:
                    log.info("refused", member=call.name, uid=uid, sender=msg.sender)
                    raise AccessDeniedError(f"{call.name} needs root")
            result = call.fn(self.manager, *msg.body)
            if inspect.isawaitable(result):
                result = await result
            body = result if call.many_out else [result]
            reply = Message.new_method_return(msg, call.out_signature, body)
        except KmoddError as err:
            reply = _error_reply(msg, kmodd_error(err))
        except Exception as err:
            log.exception("D-Bus call failed", member=call.name)
            reply = _error_reply(msg, internal_error(err))
        if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return
        try:
            self.bus.send(reply)  # marshals now: a result not fitting the signature raises
        except Exception as err:
            log.exception("D-Bus reply not sent", member=call.name)
            self.bus.send(_error_reply(msg, internal_error(err)))

    async def _bus_call(self, member: str, signature: str, *body: Any) -> Any:
        """One call to org.freedesktop.DBus; its single result, None on an error reply."""
        dest, path, iface = _DBUS
        reply = await self.bus.call(
            Message(dest, path, iface, member, signature=signature, body=list(body))
        )
        if reply is None or reply.message_type is not MessageType.METHOD_RETURN:
            return None
        return reply.body[0]

    # the service's events ----------------------------------------------------------------------

    def _job_changed(self, job: Job) -> None:
        if self._closed:
            return
        try:
            self.manager.JobChanged(job_dict(job))
            length = self.service.queue_length
            if length != self._queue_length:
                self._queue_length = length
                self.manager.emit_properties_changed({"QueueLength": length})
        except Exception as err:  # a listener must not break the service
            log.warning("JobChanged not sent", error=str(err), exc_info=err)

    def _kernel_ready(self, kernel: str, ok: bool) -> None:
        if self._closed:
            return
        try:
            self.manager.KernelReady(kernel, ok)
        except Exception as err:
            log.warning("KernelReady not sent", error=str(err), exc_info=err)


def _error_reply(msg: Message, error: DBusError) -> Message:
    reply: Message = Message.new_error(msg, error.type, error.text)
    return reply


async def serve(service: Service) -> ServiceBus:
    """Connect to the system bus ($DBUS_SYSTEM_BUS_ADDRESS honoured), export the
    manager, take `io.kmodd1`, subscribe to the service's events."""
    address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/run/dbus/system_bus_socket")
    try:
        bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
    except (OSError, EOFError, AuthError, InvalidAddressError) as err:
        raise KmoddError(f"cannot connect to the system bus at {address}: {err}") from None
    served = ServiceBus(bus, service)
    try:
        await served.claim_name()
    except BaseException:
        await served.close()
        raise
    log.info("on the system bus", name=BUS_NAME, unique_name=bus.unique_name)
    return served
