"""structlog, configured once: JSON lines under systemd, readable text on a terminal."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog


def under_systemd() -> bool:
    """systemd sets JOURNAL_STREAM when stderr is connected to the journal."""
    return "JOURNAL_STREAM" in os.environ or "INVOCATION_ID" in os.environ


def configure(
    json: bool | None = None, level: int = logging.INFO, stream: TextIO | None = None
) -> None:
    stream = stream or sys.stderr
    as_json = under_systemd() or not stream.isatty() if json is None else json
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
