"""Logging stays cheap: exceptions are plain tracebacks without local variables, whatever extras are installed."""

from __future__ import annotations

import sys
import time
from typing import Any

import structlog

from service.logging_setup import configure_logging


def _render(event: dict[str, Any]) -> str:
    out: Any = event
    for processor in structlog.get_config()["processors"]:
        out = processor(None, "error", out)
    return str(out)


def test_an_exception_is_logged_fast_and_without_locals() -> None:
    configure_logging(json_lines=True)
    secret_local = "x" * 10_000  # a large local a locals-dumping formatter would print
    try:
        raise ValueError(secret_local[:5])
    except ValueError:
        started = time.perf_counter()
        text = _render({"event": "plan.crashed", "exc_info": sys.exc_info()})
        elapsed_s = time.perf_counter() - started
    assert "ValueError: xxxxx" in text
    assert secret_local not in text
    assert len(text) < 5_000
    assert elapsed_s < 0.05
