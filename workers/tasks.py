"""Celery tasks: run a plan, and re-enqueue plans left behind; both call service.jobs."""

from __future__ import annotations

from functools import lru_cache

from service.catalog.loader import default_catalog
from service.db.session import SessionFactory, make_engine, make_session_factory
from service.dispatch import REQUEUE_TASK, RUN_PLAN_TASK
from service.jobs import requeue_stale, run_plan
from service.settings import get_settings
from workers.celery_app import app


@lru_cache(maxsize=1)
def _session_factory() -> SessionFactory:
    return make_session_factory(make_engine(get_settings()))


@app.task(name=RUN_PLAN_TASK, acks_late=True)
def run_plan_task(plan_id: str) -> str:
    """Run one stored plan; safe to deliver twice (the claim is conditional)."""
    return run_plan(plan_id, session_factory=_session_factory(), settings=get_settings(), catalog=default_catalog())


@app.task(name=REQUEUE_TASK)
def requeue_stale_plans() -> int:
    """Re-send plans stuck in queued, or running with an expired lease."""
    settings = get_settings()

    def send(plan_id: str) -> None:
        app.send_task(RUN_PLAN_TASK, args=[plan_id], queue=settings.queue_name)

    return requeue_stale(session_factory=_session_factory(), settings=settings, dispatch=send)
