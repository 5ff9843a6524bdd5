"""Celery tasks: run a plan, one candidate search of a fanned-out fleet plan, and re-enqueue plans left behind; all
call service.jobs or service.fleet_jobs."""

from __future__ import annotations

from functools import lru_cache

from celery import group

from service.catalog.loader import default_catalog
from service.db.session import SessionFactory, make_engine, make_session_factory
from service.dispatch import DISPATCH_PLANS_TASK, REQUEUE_TASK, RUN_PLAN_TASK
from service.fleet_jobs import run_fleet_candidate
from service.jobs import requeue_stale, run_plan, worker_name
from service.settings import get_settings
from workers.celery_app import app


@lru_cache(maxsize=1)
def _session_factory() -> SessionFactory:
    return make_session_factory(make_engine(get_settings()))


@app.task(name=RUN_PLAN_TASK, acks_late=True)
def run_plan_task(plan_id: str) -> str:
    """Run one stored plan; safe to deliver twice (the claim is conditional)."""
    return run_plan(
        plan_id,
        session_factory=_session_factory(),
        settings=get_settings(),
        catalog=default_catalog(),
        fan_out=_fan_out,
    )


@app.task(name=DISPATCH_PLANS_TASK, acks_late=True)
def dispatch_plans_task(plan_ids: list[str]) -> int:
    """Send one run_plan task per plan of a batch the API stored together; a repeat only repeats sends."""
    queue = get_settings().queue_name
    with app.producer_or_acquire() as producer:
        for plan_id in plan_ids:
            app.send_task(RUN_PLAN_TASK, args=[plan_id], queue=queue, producer=producer)
    return len(plan_ids)


FLEET_CANDIDATE_TASK = "splan.fleet_candidate"


def _fan_out(plan_id: str, attempt: int, keys: list[str]) -> None:
    """Send a fleet plan's candidate searches to the workers as one group."""
    queue = get_settings().queue_name
    group(fleet_candidate_task.si(plan_id, attempt, key).set(queue=queue) for key in keys).apply_async()


@app.task(name=FLEET_CANDIDATE_TASK, acks_late=True)
def fleet_candidate_task(plan_id: str, attempt: int, key: str) -> str:
    """One candidate search of a fleet plan; safe to deliver twice (the search is claimed under a lease)."""
    settings = get_settings()
    return run_fleet_candidate(
        plan_id,
        attempt,
        key,
        session_factory=_session_factory(),
        catalog=default_catalog(),
        worker=worker_name(),
        lease_s=settings.plan_lease_s,
    )


@app.task(name=REQUEUE_TASK)
def requeue_stale_plans() -> int:
    """Re-send plans stuck in queued, or running with an expired lease."""
    settings = get_settings()

    def send(plan_id: str) -> None:
        app.send_task(RUN_PLAN_TASK, args=[plan_id], queue=settings.queue_name)

    return requeue_stale(session_factory=_session_factory(), settings=settings, dispatch=send)
