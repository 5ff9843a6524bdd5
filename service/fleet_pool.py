"""What the local process pool of a fleet plan runs, apart from the job and database modules: a spawned process
imports only the search, about half the start-up of importing the job runner (bench/RESULTS.md, issue 17)."""

from __future__ import annotations

import time
from multiprocessing.synchronize import Event as EventType
from typing import Any

from service.placement.fleet_candidates import run_candidate_search
from service.planning.catalog import Catalog


class SearchAbortedError(Exception):
    """The plan this search belongs to was canceled or superseded."""


_POOL_CATALOG: Catalog | None = None
_POOL_STOP: EventType | None = None


def init_pool(catalog: Catalog, stop: EventType) -> None:
    """Each pool process keeps the catalog and the plan's stop event."""
    global _POOL_CATALOG, _POOL_STOP
    _POOL_CATALOG, _POOL_STOP = catalog, stop


def pool_checkpoint() -> None:
    """Raise when the plan stopped (canceled, or failed elsewhere)."""
    if _POOL_STOP is not None and _POOL_STOP.is_set():
        raise SearchAbortedError


def pool_search(spec: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """One candidate search in a pool process, and its seconds."""
    assert _POOL_CATALOG is not None
    pool_checkpoint()
    started = time.perf_counter()
    result = run_candidate_search(spec, catalog=_POOL_CATALOG, checkpoint=pool_checkpoint)
    return result, time.perf_counter() - started
