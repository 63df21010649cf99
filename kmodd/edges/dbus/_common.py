"""What server and client share: names, the dict shapes on the wire, error mapping,
and typed wrappers around dbus-next's decorators (they read D-Bus signatures from
annotations, which mypy cannot check; here they are given as strings instead)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import PropertyAccess
from dbus_next.errors import DBusError
from dbus_next.service import dbus_property, signal
from dbus_next.service import method as dbus_method

from kmodd.base.errors import AccessDeniedError, KmoddError
from kmodd.base.log import get_logger

if TYPE_CHECKING:
    from kmodd.decide.plan import Decision
    from kmodd.service.jobs import Job
    from kmodd.state.report import Line

log = get_logger(__name__)

BUS_NAME = "io.kmodd1"
OBJECT_PATH = "/io/kmodd1"
INTERFACE = "io.kmodd1.Manager"
FAILED = KmoddError.dbus_name
"""`io.kmodd1.Error.Failed`: what any exception that is not a KmoddError becomes."""

F = TypeVar("F", bound=Callable[..., Any])


# the wire's dicts ------------------------------------------------------------------------


def line_dict(line: Line) -> dict[str, str]:
    return {k: "" if v is None else str(v) for k, v in line.json().items()}


def decision_dict(d: Decision) -> dict[str, str]:
    return d.json()


def job_dict(job: Job) -> dict[str, str]:
    return {
        "id": str(job.id),
        "kind": job.kind.value,
        "kernel": job.kernel,
        "source": job.source,
        "state": job.state.value,
        "detail": job.detail,
        "outcomes": job.outcomes,
        "after": ",".join(str(i) for i in job.after),
        "initrd": "yes" if job.request.initrd else "no",
        "avoid": ",".join(sorted(job.request.avoid)),
    }


# errors ------------------------------------------------------------------------------------


def one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def dbus_error(name: str, text: str) -> DBusError:
    error: DBusError = DBusError(name, text)  # type: ignore[no-untyped-call]
    return error


def kmodd_error(err: KmoddError) -> DBusError:
    """A KmoddError on the bus: its `dbus_name`, its one line of text."""
    return dbus_error(err.dbus_name, str(err))


def internal_error(err: Exception) -> DBusError:
    """Any other exception: `Failed`, one line of text; the traceback stays in the
    service's log (the caller logs it), never on the bus."""
    return dbus_error(FAILED, f"internal error: {one_line(f'{type(err).__name__}: {err}')}")


def disconnect(bus: MessageBus) -> None:
    bus.disconnect()  # type: ignore[no-untyped-call]


async def disconnected(bus: MessageBus, timeout: float) -> None:
    """Until `bus` has closed (or `timeout`); how it closed does not matter here."""
    waiting = bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
    with contextlib.suppress(TimeoutError, OSError, EOFError):
        await asyncio.wait_for(waiting, timeout)


# on the other side: DBus error names of the standard ones worth a KmoddError class of ours
_BUS_ERRORS: dict[str, type[KmoddError]] = {
    "org.freedesktop.DBus.Error.AccessDenied": AccessDeniedError,
}


def _classes(base: type[KmoddError]) -> list[type[KmoddError]]:
    found = [base]
    for sub in base.__subclasses__():
        found.extend(_classes(sub))
    return found


def from_dbus_error(name: str, text: str) -> KmoddError:
    """The KmoddError subclass whose `dbus_name` is `name` (the most general one when
    several share it), carrying the server's message; KmoddError when none does."""
    cls = _BUS_ERRORS.get(name)
    if cls is None:
        cls = next((c for c in _classes(KmoddError) if c.dbus_name == name), None)
    if cls is None:
        err = KmoddError(text or name)
        err.dbus_name = name
        return err
    try:
        return cls(text)
    except TypeError:  # a class with structured fields: carry the text only
        made = cls.__new__(cls)
        Exception.__init__(made, text)
        return made


# typed decorators ----------------------------------------------------------------------------


def _annotate(fn: Callable[..., Any], out: str, params: dict[str, str]) -> None:
    """Give `fn` the signature dbus-next reads: D-Bus type strings as annotations."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("self", kind)]
        + [inspect.Parameter(name, kind, annotation=sig) for name, sig in params.items()],
        return_annotation=out or inspect.Signature.empty,
    )


def guarded(fn: F, member: str) -> F:
    """`fn` with every exception turned into a named DBusError without a traceback."""
    if asyncio.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def run_async(*args: Any) -> Any:
            try:
                return await fn(*args)
            except DBusError:
                raise
            except KmoddError as err:
                raise kmodd_error(err) from None
            except Exception as err:
                log.exception("D-Bus call failed", member=member)
                raise internal_error(err) from None

        return run_async  # type: ignore[return-value]

    @functools.wraps(fn)
    def run(*args: Any) -> Any:
        try:
            return fn(*args)
        except DBusError:
            raise
        except KmoddError as err:
            raise kmodd_error(err) from None
        except Exception as err:
            log.exception("D-Bus call failed", member=member)
            raise internal_error(err) from None

    return run  # type: ignore[return-value]


def method(out: str = "", **params: str) -> Callable[[F], F]:
    """`@method("t", kernel="s")`: a D-Bus method named after the Python one, taking
    `params` (name → D-Bus type, in order) and returning `out`."""

    def decorate(fn: F) -> F:
        wrapped = guarded(fn, fn.__name__)
        _annotate(wrapped, out, params)
        result: F = dbus_method(name=fn.__name__)(wrapped)
        return result

    return decorate


def signal_of(out: str) -> Callable[[F], F]:
    """`@signal_of("sb")`: a D-Bus signal; calling the method emits what it returns."""

    def decorate(fn: F) -> F:
        _annotate(fn, out, {})
        result: F = signal(name=fn.__name__)(fn)
        return result

    return decorate


def readonly(out: str) -> Callable[[Callable[[Any], Any]], Any]:
    """`@readonly("u")`: a read-only D-Bus property."""

    def decorate(fn: Callable[[Any], Any]) -> Any:
        wrapped = guarded(fn, fn.__name__)
        _annotate(wrapped, out, {})
        return dbus_property(access=PropertyAccess.READ, name=fn.__name__)(wrapped)

    return decorate
