"""Hand committed plans to an executor: a thread pool in this process, or Celery workers through the broker."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import structlog
from celery import Celery

from service.catalog.loader import default_catalog
from service.db.session import SessionFactory
from service.jobs import requeue_stale, run_plan
from service.settings import Settings

log = structlog.get_logger("splan.dispatch")

RUN_PLAN_TASK = "splan.run_plan"
# One message per batch of plans the API stored together; a worker sends their run_plan tasks (issue 14: a
# burst of 200 submissions costs the API one send, not 200).
DISPATCH_PLANS_TASK = "splan.dispatch_plans"
REQUEUE_TASK = "splan.requeue_stale_plans"


class Dispatcher(Protocol):
    """Something that runs a stored plan eventually."""

    def submit(self, plan_id: str) -> None:
        """Start or enqueue the plan."""

    def submit_many(self, plan_ids: list[str]) -> None:
        """Start or enqueue several plans."""

    def close(self) -> None:
        """Stop accepting work."""

    def queue_depth(self) -> int | None:
        """Messages waiting in the broker, when there is one."""


# How often the outbox retries the broker while it is away; a plan sent during an outage leaves within this
# of the broker's return (plus the send itself).
OUTBOX_RETRY_S = 0.25
# Socket timeouts of the API's broker connection: a broker that does not answer fails a send in this long.
BROKER_SOCKET_TIMEOUT_S = 1.0


def celery_client(settings: Settings) -> Celery:
    """A Celery app used to send tasks by name; the worker side lives in workers/."""
    app = Celery("splan", broker=settings.broker_url)
    app.conf.update(
        task_default_queue=settings.queue_name,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        # One try per send: a broker that is down must not stall the request; the outbox retries instead.
        broker_transport_options={
            "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
            "socket_connect_timeout": BROKER_SOCKET_TIMEOUT_S,
            "max_retries": 0,
        },
        broker_pool_limit=10,
    )
    return app


class CeleryDispatcher:
    """Sends run_plan tasks to the broker; a send that fails goes to an outbox drained as soon as the broker is back.

    The plan row is committed (queued) before the send, so the outbox is only a fast path: if this process dies
    with plans in it, the sweeper re-sends them after `requeue_queued_after_s`.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = celery_client(settings)
        self.outbox: deque[str] = deque()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.drainer = threading.Thread(target=self._drain_forever, name="splan-outbox", daemon=True)
        self.drainer.start()

    def _send(self, plan_id: str) -> None:
        self.app.send_task(RUN_PLAN_TASK, args=[plan_id], queue=self.settings.queue_name, retry=False)

    def submit(self, plan_id: str) -> None:
        """Enqueue the plan now, or, while the broker is away (or plans wait before it), through the outbox."""
        if not self.outbox:
            try:
                self._send(plan_id)
                return
            except Exception as exc:
                log.warning("plan.enqueue_deferred", plan_id=plan_id, error=type(exc).__name__)
        # While plans wait, new ones queue behind them without a try: no request waits for an absent broker.
        self.outbox.append(plan_id)
        self.wake.set()

    def submit_many(self, plan_ids: list[str]) -> None:
        """Enqueue plans with one message (a worker sends one task per plan), or through the outbox."""
        if len(plan_ids) <= 1 or self.outbox:
            for plan_id in plan_ids:
                self.submit(plan_id)
            return
        try:
            self.app.send_task(DISPATCH_PLANS_TASK, args=[plan_ids], queue=self.settings.queue_name, retry=False)
            return
        except Exception as exc:
            log.warning("plan.enqueue_deferred", plans=len(plan_ids), error=type(exc).__name__)
        self.outbox.extend(plan_ids)
        self.wake.set()

    def pending(self) -> int:
        """Plans in the outbox, waiting for the broker."""
        return len(self.outbox)

    def _drain_forever(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait(OUTBOX_RETRY_S)
            self.wake.clear()
            self._drain()
            if self.outbox:
                self.stopping.wait(OUTBOX_RETRY_S)

    def _drain(self) -> None:
        # Only this thread (and close, after it stopped) takes from the outbox; deque appends are thread-safe.
        sent = 0
        while self.outbox:
            try:
                self._send(self.outbox[0])
            except Exception:
                break
            self.outbox.popleft()
            sent += 1
        if sent:
            log.info("plan.outbox_drained", sent=sent, left=len(self.outbox))

    def queue_depth(self) -> int | None:
        """Length of the Redis list behind the plan queue."""
        if self.outbox:  # the broker is away: do not wait for it at scrape time
            return None
        try:
            with self.app.connection_for_write() as conn:
                client = conn.default_channel.client  # type: ignore[attr-defined]
                return int(client.llen(self.settings.queue_name))
        except Exception:
            return None

    def close(self) -> None:
        """Stop the outbox (one last try to send what it holds) and release broker connections."""
        self.stopping.set()
        self.wake.set()
        self.drainer.join(timeout=5)
        self._drain()
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

    def submit_many(self, plan_ids: list[str]) -> None:
        """Run the plans on the pool, in order."""
        for plan_id in plan_ids:
            self.submit(plan_id)

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
