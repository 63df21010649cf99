"""Ready before reboot: logind's shutdown inhibitor, held while kernels have work.

`Inhibit("shutdown", "kmodd", why, "block")` returns a file descriptor; the lock lasts
while it is open. Taken when the service reports busy kernels, taken anew (then the old
one closed) when the set of kernels changes, closed when the queue drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import MessageType
from dbus_next.errors import DBusError
from dbus_next.message import Message

from kmodd.base.log import get_logger

log = get_logger(__name__)

LOGIND = "org.freedesktop.login1"
LOGIND_PATH = "/org/freedesktop/login1"
LOGIND_MANAGER = "org.freedesktop.login1.Manager"
_ABSENT = (
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
)
CALL_TIMEOUT = 25.0


class Inhibitor:
    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus
        self._want: list[str] = []
        self._held: list[str] = []
        self._fd: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._warned: set[str] = set()
        self._closed = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def busy(self, kernels: list[str]) -> None:
        """Service.on_busy listener: the kernels with work queued or running."""
        self._want = list(kernels)
        if not self._closed and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._sync())

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        self._release()

    async def _sync(self) -> None:
        while not self._closed:
            want = self._want
            if want and want != self._held:
                fd = await self._take(want)
                if fd is None:
                    return  # warned; tried again when the busy kernels change
                self._release()
                self._fd, self._held = fd, want
                if self._closed:
                    self._release()
            elif not want and self._fd is not None:
                self._release()
                log.info("shutdown no longer held off: the queue drained")
            else:
                return

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd, self._held = None, []

    async def _take(self, kernels: list[str]) -> int | None:
        why = f"Installing kernel modules for {', '.join(kernels)}"
        call = Message(
            destination=LOGIND,
            path=LOGIND_PATH,
            interface=LOGIND_MANAGER,
            member="Inhibit",
            signature="ssss",
            body=["shutdown", "kmodd", why, "block"],
        )
        try:
            reply = await asyncio.wait_for(self._bus.call(call), CALL_TIMEOUT)
        except (TimeoutError, OSError, EOFError, DBusError) as err:
            self._warn("failed", f"logind's Inhibit failed: {err}")
            return None
        if reply is None:
            return None  # disconnected
        fds = list(reply.unix_fds or [])
        if reply.message_type is MessageType.ERROR:
            text = reply.body[0] if reply.body else ""
            if reply.error_name in _ABSENT:
                self._warn("absent", "logind is not on the system bus: shutdown is not held off")
            else:
                self._warn(reply.error_name or "error", f"{reply.error_name}: {text}")
            fd = None
        elif reply.signature == "h" and reply.body and reply.body[0] < len(fds):
            fd = fds.pop(reply.body[0])
            log.info("shutdown held off", why=why)
        else:
            self._warn("no-fd", "logind's Inhibit returned no file descriptor")
            fd = None
        for other in fds:
            with contextlib.suppress(OSError):
                os.close(other)
        return fd

    def _warn(self, key: str, text: str) -> None:
        if key in self._warned:
            log.debug(text)
        else:
            self._warned.add(key)
            log.warning(text)
