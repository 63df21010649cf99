"""One GNU make jobserver for every build kmodd runs at once.

A pipe holding N tokens (bytes), N being how many jobs the machine should run. kmodd
takes one token before it starts a build and gives it back when the build ends: that
token is the build's own make's implicit job slot. Every make the build runs sees the
pipe through `MAKEFLAGS=-jN --jobserver-auth=R,W` (GNU make 4.3, which Kbuild honours)
and takes a token from it for each job beyond its first. So the whole machine runs at
most N jobs, however many builds run, and a long build takes every token the others
give back when they finish. A build whose MAKE ignores the jobserver runs on the one
token kmodd took for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import termios
import threading
from collections.abc import Iterator

from kmodd.base.errors import CancelledError

_POLL = 0.1
_TOKEN = b"+"


class Jobserver:
    def __init__(self, tokens: int) -> None:
        if tokens < 1:
            raise ValueError("a jobserver needs at least one token")
        self.tokens = tokens
        self._read, self._write = os.pipe()
        # kmodd's own reads never block: another open of the pipe, non-blocking (the
        # makes read theirs blocking, as make expects)
        self._take = os.open(f"/proc/self/fd/{self._read}", os.O_RDONLY | os.O_NONBLOCK)
        os.write(self._write, _TOKEN * tokens)
        self._closed = False

    @property
    def fds(self) -> tuple[int, int]:
        """The pipe's ends, to pass to every make (`pass_fds`)."""
        return self._read, self._write

    def makeflags(self) -> str:
        return f"-j{self.tokens} --jobserver-auth={self._read},{self._write}"

    def try_acquire(self) -> bool:
        """Take a token if one is free now."""
        try:
            return len(os.read(self._take, 1)) == 1
        except BlockingIOError:
            return False

    def wait_for_token(self, timeout: float) -> None:
        """Until a token may be free, or `timeout` seconds."""
        select.select([self._take], [], [], timeout)

    def release(self) -> None:
        os.write(self._write, _TOKEN)

    @contextlib.contextmanager
    def token(self, cancel: threading.Event | None = None) -> Iterator[None]:
        """Hold a token while the block runs; wait for one first (CancelledError if
        `cancel` is set meanwhile)."""
        while not self.try_acquire():
            if cancel is not None and cancel.is_set():
                raise CancelledError("cancelled while waiting for a job slot")
            self.wait_for_token(_POLL)
        try:
            yield
        finally:
            self.release()

    def free(self) -> int:
        """How many tokens are in the pipe now (for logs, and for tests)."""
        buf = bytearray(4)
        fcntl.ioctl(self._read, termios.FIONREAD, buf)
        return int.from_bytes(buf, "little")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for fd in (self._take, self._read, self._write):
                os.close(fd)

    def __enter__(self) -> Jobserver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
