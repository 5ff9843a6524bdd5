"""The Celery app of the workers: Redis broker, late acks, time limits, a beat schedule for the sweeper."""

from __future__ import annotations

import tempfile
from pathlib import Path

from celery import Celery
from kombu import Queue

from service.logging_setup import configure_logging
from service.settings import Settings, get_settings


def create_celery(settings: Settings) -> Celery:
    """A worker-side Celery app; results live in the database, so no result backend."""
    if not settings.broker_url:
        raise RuntimeError("splan worker needs BROKER_URL (e.g. redis://127.0.0.1:6379/0)")
    configure_logging()
    app = Celery("splan", broker=settings.broker_url, include=["workers.tasks"])
    app.conf.update(
        task_default_queue=settings.queue_name,
        task_queues=[Queue(settings.queue_name)],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        task_soft_time_limit=settings.plan_time_limit_s + 30,
        task_time_limit=settings.plan_time_limit_s + 60,
        broker_connection_retry_on_startup=True,
        # Redis redelivers unacked tasks after this timeout; it must outlast the longest plan.
        broker_transport_options={"visibility_timeout": int(settings.plan_time_limit_s * 2 + 120)},
        beat_schedule={
            "requeue-stale-plans": {"task": "splan.requeue_stale_plans", "schedule": settings.sweep_interval_s}
        },
        beat_schedule_filename=str(Path(tempfile.gettempdir()) / f"splan-beat-{settings.queue_name}"),
        worker_hijack_root_logger=False,
    )
    return app


app = create_celery(get_settings())
