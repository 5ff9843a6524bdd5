"""The Celery app of the workers: Redis broker, late acks, time limits, a beat schedule for the sweeper."""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path
from typing import Any

from celery import Celery
from celery.worker.consumer import Consumer
from kombu import Queue

from service.logging_setup import configure_logging
from service.settings import Settings, get_settings

# Seconds between the worker's tries to reach a broker that went away. Kombu's default waits 2, 4, 6, ... up to
# 30 s between tries, so a worker could come back up to 30 s after the broker; plans sent meanwhile would wait.
RECONNECT_INTERVAL_S = 0.5


class PromptReconnectConsumer(Consumer):
    """Celery's consumer, retrying a lost broker every RECONNECT_INTERVAL_S instead of backing off to 30 s."""

    def ensure_connected(self, conn: Any) -> Any:
        """Connect as Celery does, with short, constant retry intervals."""
        conn.ensure_connection = functools.partial(
            conn.ensure_connection,
            interval_start=RECONNECT_INTERVAL_S,
            interval_step=0,
            interval_max=RECONNECT_INTERVAL_S,
        )
        return super().ensure_connected(conn)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        """Celery's cleanup of a lost connection, surviving kombu's failure to restore unacked messages."""
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError:
            # kombu 5.7's Redis channel, closed with unacknowledged messages, rebuilds its connection pool from a
            # connection already torn down ('NoneType' has no 'hostname') and Celery calls that unrecoverable: the
            # worker would exit. The messages stay in Redis's unacked set (redelivered after the visibility
            # timeout, then not claimed: the plan is finished or leased), so reconnecting loses nothing.
            logging.getLogger("splan.worker").warning("broker connection closed uncleanly; reconnecting")


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
        worker_consumer=f"{PromptReconnectConsumer.__module__}:{PromptReconnectConsumer.__qualname__}",
    )
    return app


app = create_celery(get_settings())
