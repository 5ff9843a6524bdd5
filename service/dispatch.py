"""Hand committed plans to an executor: a thread pool in this process, or Celery workers through the broker."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import structlog
from celery import Celery
from tenacity import retry, stop_after_attempt, wait_exponential

from service.catalog.loader import default_catalog
from service.db.session import SessionFactory
from service.jobs import requeue_stale, run_plan
from service.settings import Settings

log = structlog.get_logger("splan.dispatch")

RUN_PLAN_TASK = "splan.run_plan"
REQUEUE_TASK = "splan.requeue_stale_plans"


class Dispatcher(Protocol):
    """Something that runs a stored plan eventually."""

    def submit(self, plan_id: str) -> None:
        """Start or enqueue the plan."""

    def close(self) -> None:
        """Stop accepting work."""

    def queue_depth(self) -> int | None:
        """Messages waiting in the broker, when there is one."""


def celery_client(settings: Settings) -> Celery:
    """A Celery app used to send tasks by name; the worker side lives in workers/."""
    app = Celery("splan", broker=settings.broker_url)
    app.conf.update(
        task_default_queue=settings.queue_name,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"socket_timeout": 5, "socket_connect_timeout": 5},
    )
    return app


class CeleryDispatcher:
    """Sends run_plan tasks to the broker; a send that fails is retried, then left to the sweeper."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = celery_client(settings)

    @retry(stop=stop_after_attempt(3), wait=wait_exponential(multiplier=0.05, max=0.5), reraise=True)
    def submit(self, plan_id: str) -> None:
        """Enqueue the plan (retried); the row is already committed, so a lost send is re-sent by the sweeper."""
        self.app.send_task(RUN_PLAN_TASK, args=[plan_id], queue=self.settings.queue_name)

    def queue_depth(self) -> int | None:
        """Length of the Redis list behind the plan queue."""
        try:
            with self.app.connection_for_write() as conn:
                client = conn.default_channel.client  # type: ignore[attr-defined]
                return int(client.llen(self.settings.queue_name))
        except Exception:
            return None

    def close(self) -> None:
        """Release broker connections."""
        self.app.close()


class InProcessDispatcher:
    """Runs plans on a thread pool inside the API process, with a sweeper for plans left behind."""

    def __init__(self, settings: Settings, session_factory: SessionFactory) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.catalog = default_catalog()
        self.pool = ThreadPoolExecutor(max_workers=settings.in_process_workers, thread_name_prefix="splan-plan")
        self.stopping = threading.Event()
        self.sweeper = threading.Thread(target=self._sweep_forever, name="splan-sweeper", daemon=True)
        self.sweeper.start()

    def submit(self, plan_id: str) -> None:
        """Run the plan on the pool."""
        self.pool.submit(self._run, plan_id)

    def _run(self, plan_id: str) -> None:
        try:
            run_plan(plan_id, session_factory=self.session_factory, settings=self.settings, catalog=self.catalog)
        except Exception:
            log.exception("plan.run_failed", plan_id=plan_id)

    def _sweep_forever(self) -> None:
        # The first sweep takes every queued plan: nothing is in flight in a process that just started.
        first = True
        while not self.stopping.is_set():
            try:
                requeue_stale(
                    session_factory=self.session_factory,
                    settings=self.settings,
                    dispatch=self.submit,
                    every_queued=first,
                )
            except Exception:
                log.exception("sweep.failed")
            first = False
            self.stopping.wait(self.settings.sweep_interval_s)

    def queue_depth(self) -> int | None:
        """Plans waiting for a pool thread."""
        return self.pool._work_queue.qsize()

    def close(self) -> None:
        """Stop the sweeper and wait for running plans."""
        self.stopping.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
