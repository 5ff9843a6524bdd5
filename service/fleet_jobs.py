"""Fleet plan orchestration: candidate searches from the database cache, then here, on a local process pool
(`--jobs N`), or fanned out over Celery workers, each search claimed under a lease so a lost worker loses only
its own search."""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing.synchronize import Event as EventType
from typing import Any

import structlog

from service.db import fleet_cache
from service.db import plans as plan_store
from service.db.models import PlanStatus
from service.db.session import SessionFactory
from service.fleet_pool import SearchAbortedError, init_pool, pool_search
from service.placement.fleet_candidates import CandidateTask, run_candidate_search
from service.planning.catalog import Catalog
from service.planning.search import Checkpoint

log = structlog.get_logger("splan.fleet")

# How often a waiting plan looks for finished searches, and how often a search renews its claim.
POLL_S = 0.2
# A Celery fan-out: send the candidate searches of a plan (its id, its attempt, the keys) to the workers.
FanOut = Callable[[str, int, list[str]], None]


def _stopped_by(stop: EventType) -> Checkpoint:
    """A checkpoint that raises once the plan's searches are told to stop."""

    def checkpoint() -> None:
        if stop.is_set():
            raise SearchAbortedError

    return checkpoint


class FleetSearches:
    """Runs a fleet plan's candidate searches: cached ones are read, the rest searched and stored."""

    def __init__(
        self,
        *,
        catalog: Catalog,
        session_factory: SessionFactory | None = None,
        jobs: int = 1,
        checkpoint: Checkpoint | None = None,
        fan_out: FanOut | None = None,
        plan_id: str = "",
        attempt: int = 0,
        worker: str = "local",
        lease_s: float = 10.0,
    ) -> None:
        self.catalog = catalog
        self.session_factory = session_factory
        self.jobs = max(1, jobs)
        self.checkpoint = checkpoint
        self.fan_out = fan_out
        self.plan_id = plan_id
        self.attempt = attempt
        self.worker = worker
        self.lease_s = lease_s
        self.reused = 0

    def reused_count(self) -> int:
        """Searches the last run read from the cache."""
        return self.reused

    def __call__(self, tasks: list[CandidateTask], done: Callable[[int], None]) -> dict[str, dict[str, Any]]:
        """Results of every task, by key; ``done`` gets the count finished so far."""
        results: dict[str, dict[str, Any]] = {}
        if self.session_factory is not None:
            with self.session_factory() as session:
                results = fleet_cache.done_results(session, (t.key for t in tasks))
        self.reused = len(results)
        done(len(results))
        misses = [t for t in tasks if t.key not in results]
        if not misses:
            return results
        if self.fan_out is not None and self.session_factory is not None:
            self._distributed(misses, results, done)
        elif self.jobs > 1 and len(misses) > 1:
            # One search gains nothing from a pool but the start-up of a process.
            self._pool(misses, results, done)
        else:
            for task in misses:
                started = time.perf_counter()
                result = run_candidate_search(task.spec, catalog=self.catalog, checkpoint=self.checkpoint)
                self._store(task, result, time.perf_counter() - started)
                results[task.key] = result
                done(len(results))
        return results

    def _store(self, task: CandidateTask, result: dict[str, Any], search_s: float) -> None:
        if self.session_factory is None:
            return
        with self.session_factory() as session:
            fleet_cache.put(session, key=task.key, spec=task.spec, result=result, search_s=search_s)

    def _pool(
        self, misses: list[CandidateTask], results: dict[str, dict[str, Any]], done: Callable[[int], None]
    ) -> None:
        # The plan's own process searches too, on a thread beside jobs - 1 pool processes: a spawned process costs
        # about a second of start-up, which a re-plan with a search or two would wait for.
        # Spawned, not forked: the parent may hold threads (heartbeat, progress bar) that a fork would copy mid-step.
        context = multiprocessing.get_context("spawn")
        stop = context.Event()
        waiting = deque(misses)
        lock = threading.Lock()
        own: queue.Queue[tuple[CandidateTask, dict[str, Any], float] | BaseException | None] = queue.Queue()

        def take() -> CandidateTask | None:
            with lock:
                return waiting.popleft() if waiting and not stop.is_set() else None

        def search_here() -> None:
            try:
                while (task := take()) is not None:
                    started = time.perf_counter()
                    result = run_candidate_search(task.spec, catalog=self.catalog, checkpoint=_stopped_by(stop))
                    own.put((task, result, time.perf_counter() - started))
            except BaseException as exc:
                own.put(exc)
            own.put(None)

        pool_size = min(self.jobs, len(misses)) - 1
        pool = ProcessPoolExecutor(
            max_workers=pool_size,
            mp_context=context,
            initializer=init_pool,
            initargs=(self.catalog, stop),
        )
        searcher = threading.Thread(target=search_here, name="splan-fleet-search", daemon=True)
        in_flight: dict[Future[tuple[dict[str, Any], float]], CandidateTask] = {}

        def collect(task: CandidateTask, result: dict[str, Any], search_s: float) -> None:
            self._store(task, result, search_s)
            results[task.key] = result
            done(len(results))

        try:
            searcher.start()
            searching_here = True
            while searching_here or in_flight or waiting:
                if self.checkpoint is not None:
                    self.checkpoint()
                while len(in_flight) < pool_size and (task := take()) is not None:
                    in_flight[pool.submit(pool_search, task.spec)] = task
                if in_flight:
                    finished, _ = wait(set(in_flight), timeout=POLL_S, return_when=FIRST_COMPLETED)
                    for future in finished:
                        collect(in_flight.pop(future), *future.result())
                else:
                    time.sleep(POLL_S / 4)
                while not own.empty():
                    item = own.get()
                    if item is None:
                        searching_here = False
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        collect(*item)
        except BaseException:
            # Every part stops: queued searches are dropped, running ones stop at their next simulation.
            stop.set()
            raise
        finally:
            stop.set()
            searcher.join()
            pool.shutdown(wait=True, cancel_futures=True)

    def _distributed(
        self, misses: list[CandidateTask], results: dict[str, dict[str, Any]], done: Callable[[int], None]
    ) -> None:
        assert self.session_factory is not None
        assert self.fan_out is not None
        with self.session_factory() as session:
            fleet_cache.add_pending(session, [(t.key, t.spec) for t in misses])
        self.fan_out(self.plan_id, self.attempt, [t.key for t in misses])
        pending = {t.key for t in misses}
        while pending:
            if self.checkpoint is not None:
                self.checkpoint()
            with self.session_factory() as session:
                finished = fleet_cache.done_results(session, pending)
            for key, result in finished.items():
                results[key] = result
                pending.discard(key)
            if finished:
                done(len(results))
            if not pending:
                return
            # The plan's own worker searches too: what nobody holds, and what a lost worker held.
            with self.session_factory() as session:
                keys = fleet_cache.claimable(session, pending, limit=1)
            if not keys or not self._search_claimed(keys[0]):
                time.sleep(POLL_S)

    def _search_claimed(self, key: str) -> bool:
        assert self.session_factory is not None
        return (
            search_under_claim(
                key,
                session_factory=self.session_factory,
                catalog=self.catalog,
                worker=self.worker,
                lease_s=self.lease_s,
                still_wanted=self.checkpoint,
            )
            == "done"
        )


def search_under_claim(
    key: str,
    *,
    session_factory: SessionFactory,
    catalog: Catalog,
    worker: str,
    lease_s: float,
    still_wanted: Callable[[], None] | None = None,
    renew_every_s: float = 1.0,
) -> str:
    """Claim one cached search, run it renewing the claim, store the result; what happened.

    ``still_wanted`` raises when the plan no longer wants the search: the claim is given back.
    """
    with session_factory() as session:
        spec = fleet_cache.claim(session, key=key, worker=worker, lease_s=lease_s)
    if spec is None:
        return "not-claimed"
    last_beat = time.monotonic()

    def checkpoint() -> None:
        nonlocal last_beat
        if still_wanted is not None:
            still_wanted()
        now = time.monotonic()
        if now - last_beat < renew_every_s:
            return
        last_beat = now
        with session_factory() as session:
            if not fleet_cache.renew(session, key=key, worker=worker, lease_s=lease_s):
                raise SearchAbortedError

    started = time.perf_counter()
    try:
        result = run_candidate_search(spec, catalog=catalog, checkpoint=checkpoint)
    except BaseException:
        with session_factory() as session:
            fleet_cache.release(session, key=key, worker=worker)
        raise
    with session_factory() as session:
        fleet_cache.finish(session, key=key, result=result, search_s=time.perf_counter() - started)
    return "done"


def run_fleet_candidate(
    plan_id: str,
    attempt: int,
    key: str,
    *,
    session_factory: SessionFactory,
    catalog: Catalog,
    worker: str,
    lease_s: float,
    check_every_s: float = 1.0,
) -> str:
    """One part of a fanned-out fleet plan, on a worker: search the key unless its plan was canceled or moved on."""
    last_check = -float("inf")

    def still_wanted() -> None:
        nonlocal last_check
        now = time.monotonic()
        if now - last_check < check_every_s:
            return
        last_check = now
        with session_factory() as session:
            try:
                plan = plan_store.get_plan(session, plan_id=plan_id)
            except plan_store.PlanNotFoundError:
                raise SearchAbortedError from None
        if plan.status != PlanStatus.RUNNING or plan.attempt != attempt:
            raise SearchAbortedError

    try:
        still_wanted()
        outcome = search_under_claim(
            key,
            session_factory=session_factory,
            catalog=catalog,
            worker=worker,
            lease_s=lease_s,
            still_wanted=still_wanted,
        )
    except SearchAbortedError:
        log.info("fleet.candidate_aborted", plan_id=plan_id, key=key)
        return "aborted"
    return outcome
