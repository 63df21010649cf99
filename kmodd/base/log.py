"""structlog, configured once by an entry point.

On a terminal: a console renderer. Under journald (JOURNAL_STREAM set) or any other
pipe: key=value lines without timestamps (journald stamps them itself).
"""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure(*, debug: bool = False, level: int = logging.WARNING) -> None:
    threshold = logging.DEBUG if debug else level
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
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
