"""One structlog configuration for the API, the workers and the CLI: cheap, plain tracebacks, never local variables."""

from __future__ import annotations

import logging
import sys

import structlog

_configured = False


def configure_logging(*, json_lines: bool | None = None, level: int = logging.INFO) -> None:
    """Log events as JSON lines (not a terminal) or plain console lines; exceptions as plain tracebacks."""
    global _configured
    if _configured:
        return
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    # structlog's default console renderer formats exceptions with Rich and their local variables when Rich is
    # installed: seconds and hundreds of KB per error. Plain tracebacks cost microseconds.
    renderer: structlog.types.Processor
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json_lines:
        processors.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback, colors=False)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _configured = True
