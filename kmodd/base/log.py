"""structlog, configured once by an entry point, imported only when something logs.

On a terminal: a console renderer. Under journald (JOURNAL_STREAM set) or any other
pipe: key=value lines without timestamps (journald stamps them itself).

Every module takes its logger from `get_logger`: structlog (and the asyncio it
imports) is loaded on the first message, so `kmodctl check`, which says nothing
unless it fails, starts in a fraction of the time.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

_settings: dict[str, int] = {"level": logging.WARNING}
_configured = False


def configure(*, debug: bool = False, level: int = logging.WARNING) -> None:
    """Set the threshold; structlog is set up when the first message is logged."""
    global _configured
    _settings["level"] = logging.DEBUG if debug else level
    _configured = False
    if "structlog" in sys.modules:
        _setup()


def _setup() -> None:
    global _configured
    import structlog

    renderer: structlog.typing.Processor
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if sys.stderr.isatty() and "JOURNAL_STREAM" not in os.environ:
        processors.append(structlog.processors.TimeStamper(fmt="%H:%M:%S"))
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        processors.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.KeyValueRenderer(
            key_order=["level", "event"], drop_missing=True
        )
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_settings["level"]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


class _Lazy:
    """A logger that loads and configures structlog when it is first used."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        import structlog

        if not _configured:
            _setup()
        return getattr(structlog.get_logger(self._name), attr)


def get_logger(name: str) -> FilteringBoundLogger:
    return cast("FilteringBoundLogger", _Lazy(name))


def bind(**values: Any) -> None:
    """Bind `values` (job, module, kver) to every message logged in this context."""
    import structlog

    structlog.contextvars.bind_contextvars(**values)
