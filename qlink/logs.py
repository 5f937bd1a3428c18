"""structlog, configured once: fields in journald under systemd, JSON lines when piped,
readable text on a terminal."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog

from qlink.journal import JournalLogger, stderr_is_journal

# What every record carries, whichever way it is written.
_ENRICH: list[structlog.types.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.format_exc_info,
]


def under_systemd() -> bool:
    """systemd sets JOURNAL_STREAM when stderr is connected to the journal."""
    return "JOURNAL_STREAM" in os.environ or "INVOCATION_ID" in os.environ


def configure(
    json: bool | None = None,
    level: int = logging.INFO,
    stream: TextIO | None = None,
    journal: bool | None = None,
) -> None:
    """`journal` None: journald's native protocol when systemd connected stderr to it."""
    stream = stream or sys.stderr
    if journal or (journal is None and json is None and stderr_is_journal()):
        _configure_journal(level, stream)
        return
    as_json = under_systemd() or not stream.isatty() if json is None else json
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[*_ENRICH, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )


def _configure_journal(level: int, fallback: TextIO) -> None:
    journal = JournalLogger("qlinkd", fallback)  # one socket for every logger
    structlog.configure(
        # the event dict itself reaches the logger, which makes it journald fields
        processors=[*_ENRICH, lambda _logger, _name, event: event],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *_args: journal,
        cache_logger_on_first_use=True,
    )
