"""run_plan(plan_id): the one entry point that executes a stored plan, in-process or on a Celery worker."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import structlog

from service.auth import cluster_key
from service.catalog.loader import default_catalog
from service.db import clusters as cluster_store
from service.db import plans as plan_store
from service.db.models import Plan, utcnow
from service.db.session import DATABASE_UNAVAILABLE, SessionFactory
from service.fleet_jobs import FanOut, FleetSearches
from service.placement.cluster import Cluster, ClusterError, parse_cluster
from service.placement.fleet_plan import parse_fleet_spec, plan_fleet
from service.planning.catalog import Catalog
from service.planning.plan_spec import parse_plan_spec
from service.planning.profile import profiled_catalog
from service.planning.search import plan as search_plan
from service.planning.specs import PlanningError
from service.settings import Settings

log = structlog.get_logger("splan.jobs")

PROGRESS_INTERVAL_S = 0.5
# How often a worker retries a write while the database is away.
DATABASE_RETRY_S = 0.5


class PlanAbortedError(Exception):
    """The plan was canceled, or another attempt owns it now."""


class PlanTimeLimitError(Exception):
    """The plan ran past its time limit."""


def worker_name() -> str:
    """Who is running plans in this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def problem(title: str, status: int, detail: str) -> dict[str, Any]:
    """An RFC 9457 problem document."""
    return {"type": "about:blank", "title": title, "status": status, "detail": detail}


T = TypeVar("T")


def _waiting_for_database(write: Callable[[], T], *, wait_s: float, plan_id: str, what: str) -> T:
    """`write()`, retried while the database is away, for up to `wait_s` (then its error is raised)."""
    deadline = time.monotonic() + wait_s
    tries = 0
    while True:
        try:
            return write()
        except DATABASE_UNAVAILABLE as exc:
            if time.monotonic() >= deadline:
                raise
            if tries == 0:  # one line per outage, not one per retry
                log.warning(
                    f"plan.{what}_deferred", plan_id=plan_id, error=type(exc).__name__, retry_s=DATABASE_RETRY_S
                )
            tries += 1
            time.sleep(DATABASE_RETRY_S)


def execute_spec(
    kind: str,
    spec: dict[str, Any],
    *,
    catalog: Catalog,
    progress: Callable[[int, int], None],
    checkpoint: Callable[[], None] | None = None,
    cluster_loader: Callable[[str], Cluster] | None = None,
    fleet_searches: FleetSearches | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one stored spec: the result document and its summary columns (a fleet's candidate searches through
    ``fleet_searches``: cached, pooled or fanned out; here one by one without it)."""
    if kind == "fleet":
        fleet = parse_fleet_spec(spec)
        cluster = None
        if fleet.cluster is not None:
            if cluster_loader is None:
                raise PlanningError("this executor cannot read stored clusters")
            cluster = cluster_loader(fleet.cluster)
        result = plan_fleet(
            fleet,
            catalog=catalog,
            cluster=cluster,
            now_s=time.time(),
            progress=progress,
            checkpoint=checkpoint,
            run_searches=fleet_searches,
            reused=fleet_searches.reused_count if fleet_searches is not None else None,
        )
        return result, {"best_gpus": result["total_gpus"]}
    request = parse_plan_spec(spec, catalog=catalog)
    catalog, warnings = profiled_catalog(
        catalog, spec.get("profile"), gpu=request.gpu, engine=request.engine, model=request.model.name
    )
    result = search_plan(request, catalog=catalog, progress=progress, checkpoint=checkpoint).as_dict()
    result["warnings"] = warnings
    best = result["strategies"][0] if result["strategies"] else None
    summary = {
        "best_goodput_rps": best["goodput_rps"] if best else None,
        "best_gpus": best["gpus"] if best else None,
    }
    return result, summary


def run_plan(
    plan_id: str,
    *,
    session_factory: SessionFactory,
    settings: Settings,
    catalog: Catalog | None = None,
    worker: str | None = None,
    fan_out: FanOut | None = None,
) -> str:
    """Claim the plan, run it, write its outcome guarded by the attempt; returns what happened (a fleet plan's
    candidate searches go to the workers through ``fan_out`` when given, else run here; cached ones are reused)."""
    worker = worker or worker_name()

    def claim() -> tuple[int, Plan] | None:
        with session_factory() as session:
            attempt = plan_store.claim_plan(
                session,
                plan_id=plan_id,
                worker=worker,
                lease_s=settings.plan_lease_s,
                max_attempts=settings.max_attempts,
            )
            return None if attempt is None else (attempt, plan_store.get_plan(session, plan_id=plan_id))

    # This delivery is the plan's only message: a worker that gave up on a database away for a moment would drop
    # it, and the plan would wait in queued for the sweeper's requeue_queued_after_s (issue 14). Past that wait,
    # the sweeper sends it again anyway.
    claimed = _waiting_for_database(claim, wait_s=settings.requeue_queued_after_s, plan_id=plan_id, what="claim")
    if claimed is None:
        log.info("plan.not_claimed", plan_id=plan_id)
        return "not-claimed"
    attempt, stored = claimed
    kind, spec, tenant = stored.kind, stored.spec, stored.tenant_id
    log.info("plan.started", plan_id=plan_id, attempt=attempt, worker=worker)
    started = time.monotonic()
    last_report = 0.0

    lost = threading.Event()
    finished = threading.Event()

    def heartbeat() -> None:
        # Renews the lease while a long simulation holds the search; a canceled or superseded plan is noticed
        # here within one beat, and the search stops at its next checkpoint.
        away = False
        while not finished.wait(settings.plan_heartbeat_s):
            try:
                with session_factory() as session:
                    owned = plan_store.renew_lease(
                        session, plan_id=plan_id, attempt=attempt, lease_s=settings.plan_lease_s
                    )
            except DATABASE_UNAVAILABLE as exc:
                # The database may be away for a moment: the next beat retries and the lease decides. One line per
                # outage, not a traceback every beat.
                if not away:
                    log.warning("plan.heartbeat_deferred", plan_id=plan_id, error=type(exc).__name__)
                away = True
                continue
            except Exception:
                log.warning("plan.heartbeat_failed", plan_id=plan_id, exc_info=True)
                continue
            if away:
                log.info("plan.heartbeat_resumed", plan_id=plan_id)
            away = False
            if not owned:
                lost.set()
                return

    def checkpoint() -> None:
        if lost.is_set():
            raise PlanAbortedError
        if time.monotonic() - started > settings.plan_time_limit_s:
            raise PlanTimeLimitError

    def progress(done: int, total: int) -> None:
        nonlocal last_report
        checkpoint()
        now = time.monotonic()
        if done < total and now - last_report < PROGRESS_INTERVAL_S:
            return
        last_report = now
        try:
            with session_factory() as session:
                owned = plan_store.record_progress(
                    session, plan_id=plan_id, attempt=attempt, done=done, total=total, lease_s=settings.plan_lease_s
                )
        except DATABASE_UNAVAILABLE:  # progress can wait for the database; the heartbeat and the lease decide ownership
            log.warning("plan.progress_deferred", plan_id=plan_id)
            return
        if not owned:
            raise PlanAbortedError

    result: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    beat = threading.Thread(target=heartbeat, name=f"splan-heartbeat-{plan_id}", daemon=True)
    beat.start()
    try:
        progress(0, 1)
        catalog = catalog or default_catalog()
        searches = FleetSearches(
            catalog=catalog,
            session_factory=session_factory,
            checkpoint=checkpoint,
            fan_out=fan_out,
            plan_id=plan_id,
            attempt=attempt,
            worker=worker,
            lease_s=settings.plan_lease_s,
        )
        result, summary = execute_spec(
            kind,
            spec,
            catalog=catalog,
            progress=progress,
            checkpoint=checkpoint,
            fleet_searches=searches if kind == "fleet" else None,
            # A fleet plan names its tenant's cluster: the stored key carries the tenant.
            cluster_loader=lambda name: load_cluster(session_factory, cluster_key(tenant, name)),
        )
    except PlanAbortedError:
        log.info("plan.aborted", plan_id=plan_id, attempt=attempt)
        return "aborted"
    except DATABASE_UNAVAILABLE as exc:
        # Not the plan's fault: no outcome is written, the lease lapses and the sweeper runs it again.
        log.warning("plan.interrupted", plan_id=plan_id, attempt=attempt, error=type(exc).__name__)
        return "interrupted"
    except PlanningError as exc:
        error = problem("Plan failed", 422, str(exc))
    except PlanTimeLimitError:
        error = problem("Plan timed out", 504, f"the plan ran past its {settings.plan_time_limit_s:g} s time limit")
    except Exception as exc:  # a bug must fail the plan, not leave it running until the lease expires
        log.exception("plan.crashed", plan_id=plan_id)
        error = problem("Plan failed", 500, f"internal error while planning ({type(exc).__name__})")
    finally:
        finished.set()
        beat.join()

    def finish() -> bool:
        with session_factory() as session:
            return plan_store.finish_plan(
                session, plan_id=plan_id, attempt=attempt, result=result, error=error, summary=summary
            )

    # Within the lease the outcome is still this attempt's to write; after it, another attempt may run the plan.
    written = _waiting_for_database(finish, wait_s=settings.plan_lease_s, plan_id=plan_id, what="finish")
    outcome = ("succeeded" if error is None else "failed") if written else "superseded"
    log.info("plan.finished", plan_id=plan_id, attempt=attempt, outcome=outcome, run_s=time.monotonic() - started)
    return outcome


def load_cluster(session_factory: SessionFactory, name: str) -> Cluster:
    """A stored cluster, parsed; a missing one fails the plan with a clear reason."""
    with session_factory() as session:
        try:
            stored = cluster_store.get_cluster(session, name=name)
        except cluster_store.ClusterNotFoundError:
            raise PlanningError(f"no cluster named {name!r}") from None
    try:
        return parse_cluster(stored.state)
    except ClusterError as exc:
        raise PlanningError(str(exc)) from None


def requeue_stale(
    *,
    session_factory: SessionFactory,
    settings: Settings,
    dispatch: Callable[[str], None],
    every_queued: bool = False,
) -> int:
    """Hand plans stuck in queued (all queued ones with `every_queued`), or with an expired lease, to the executor."""
    now = utcnow()
    queued_before = now if every_queued else now - timedelta(seconds=settings.requeue_queued_after_s)
    with session_factory() as session:
        stale = plan_store.plans_to_requeue(session, queued_before=queued_before, now=now)
        for plan_id in stale:
            dispatch(plan_id)
            plan_store.mark_enqueued(session, plan_id=plan_id)
    if stale:
        log.info("plans.requeued", count=len(stale))
    return len(stale)
