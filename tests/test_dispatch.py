"""Dispatch to Celery: a batch of plans is one broker message, which a worker turns into one task per plan."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from threading import Thread
from typing import Any

import pytest
import redis

from service.db import plans as plan_store
from service.db.models import PlanStatus
from service.db.session import SessionFactory, make_engine, make_session_factory
from service.dispatch import DISPATCH_PLANS_TASK, RUN_PLAN_TASK, CeleryDispatcher
from service.jobs import run_plan
from service.planning.catalog import Catalog
from service.settings import Settings, get_settings
from tests.conftest import REDIS_URL, migrated_settings
from tests.helpers import ThrowawayPostgres, free_port, postgres_bin, wait_for


@pytest.fixture
def queue() -> Iterator[str]:
    name = f"splan-test-dispatch-{uuid.uuid4().hex[:8]}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(name, *client.keys(f"*{name}*"))


def _task_names(queue: str) -> list[tuple[str, list[object]]]:
    client = redis.Redis.from_url(REDIS_URL)
    messages = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    return [(m["headers"]["task"], json.loads(base64.b64decode(m["body"]))[0]) for m in reversed(messages)]


def test_a_batch_is_one_message_and_a_single_plan_is_its_own_task(queue: str, tmp_path: Path) -> None:
    settings = Settings(broker_url=REDIS_URL, database_url=None, data_dir=tmp_path, queue_name=queue)
    dispatcher = CeleryDispatcher(settings)
    try:
        dispatcher.submit_many(["p1", "p2", "p3"])
        dispatcher.submit_many(["p4"])
        dispatcher.submit_many([])
    finally:
        dispatcher.close()
    assert _task_names(queue) == [(DISPATCH_PLANS_TASK, [["p1", "p2", "p3"]]), (RUN_PLAN_TASK, ["p4"])]


def test_the_worker_sends_one_run_plan_task_per_plan_of_a_batch(queue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_URL", REDIS_URL)
    get_settings.cache_clear()
    from workers import tasks  # the worker's app is built from the environment at import

    get_settings.cache_clear()
    monkeypatch.setattr(tasks, "get_settings", lambda: Settings(broker_url=REDIS_URL, queue_name=queue))
    try:
        assert tasks.dispatch_plans_task(["a", "b"]) == 2
    finally:
        get_settings.cache_clear()
    assert _task_names(queue) == [(RUN_PLAN_TASK, ["a"]), (RUN_PLAN_TASK, ["b"])]


# ------------------------------------------------------------------------------------------------ a database away

# A plan of about a second on one core (tests/test_jobs.py's search, on a 70B model).
SECOND_SPEC: dict[str, Any] = {
    "model": "llama-3.1-70b",
    "gpu": "h100-sxm",
    "max_gpus": 8,
    "workload": {"arrival": "poisson", "isl": 512, "osl": 64, "rate": 2},
    "slo": {"ttft_ms": 500, "tpot_ms": 50},
    "search": {"tp": [4], "pp": [1], "modes": ["collocated"], "requests": 1500, "simulate_top": 3},
}


@pytest.fixture(scope="module")
def stoppable_postgres() -> Iterator[ThrowawayPostgres]:
    """A PostgreSQL cluster of this module's own, which a test may stop and start."""
    if postgres_bin() is None:
        pytest.skip("needs initdb/pg_ctl")
    postgres = ThrowawayPostgres(free_port())
    postgres.start()
    yield postgres
    postgres.destroy()


@pytest.fixture
def away(stoppable_postgres: ThrowawayPostgres, tmp_path: Path) -> Iterator[tuple[ThrowawayPostgres, SessionFactory]]:
    """The stoppable cluster with the schema, and sessions on it; left running."""
    migrated_settings(stoppable_postgres.url, tmp_path)
    engine = make_engine(Settings(database_url=stoppable_postgres.url, broker_url=None, data_dir=tmp_path))
    yield stoppable_postgres, make_session_factory(engine)
    if not stoppable_postgres.running():
        stoppable_postgres.start()
    engine.dispose()


def _queued_plan(sessions: SessionFactory, spec: dict[str, Any]) -> str:
    with sessions() as session:
        new = plan_store.NewPlan(spec, "strategy", str(spec["model"]), "h100-sxm", 1)
        plan, _ = plan_store.create_plan(session, new=new, idempotency_key=None)
        return plan.id


def _run_in_thread(
    plan_id: str, sessions: SessionFactory, catalog: Catalog, tmp_path: Path
) -> tuple[Thread, list[object]]:
    """run_plan as a worker runs it, on a thread; its return value or exception lands in the list."""
    settings = Settings(database_url=str(sessions.kw["bind"].url), broker_url=None, data_dir=tmp_path)
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(run_plan(plan_id, session_factory=sessions, settings=settings, catalog=catalog))
        except Exception as exc:
            outcome.append(exc)

    thread = Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_a_plan_delivered_while_the_database_is_away_runs_when_it_returns(
    away: tuple[ThrowawayPostgres, SessionFactory], catalog: Catalog, tmp_path: Path
) -> None:
    postgres, sessions = away
    plan_id = _queued_plan(sessions, SECOND_SPEC)
    postgres.stop()
    # The plan's message reaches a worker now: its claim cannot be written, and the message is its only one.
    thread, outcome = _run_in_thread(plan_id, sessions, catalog, tmp_path)
    time.sleep(1.5)
    assert thread.is_alive(), outcome
    postgres.start()
    thread.join(timeout=60)
    assert outcome == ["succeeded"]
    with sessions() as session:
        plan = plan_store.get_plan(session, plan_id=plan_id)
    assert (plan.status, plan.attempt) == (PlanStatus.SUCCEEDED, 1)


def test_a_database_away_while_a_plan_runs_does_not_fail_it(
    away: tuple[ThrowawayPostgres, SessionFactory], catalog: Catalog, tmp_path: Path
) -> None:
    postgres, sessions = away
    plan_id = _queued_plan(sessions, SECOND_SPEC)
    thread, outcome = _run_in_thread(plan_id, sessions, catalog, tmp_path)

    def running() -> bool:
        with sessions() as session:
            return plan_store.get_plan(session, plan_id=plan_id).status == PlanStatus.RUNNING

    wait_for(running, timeout_s=30, interval_s=0.02)
    postgres.stop()
    # Away while the search ends: its last progress report and its outcome cannot be written now.
    assert thread.is_alive(), outcome
    time.sleep(3.0)
    postgres.start()
    thread.join(timeout=60)
    # Written by this attempt once the database returned, within its lease: not failed, not run twice.
    assert outcome == ["succeeded"]
    with sessions() as session:
        plan = plan_store.get_plan(session, plan_id=plan_id)
    assert (plan.status, plan.attempt, plan.error) == (PlanStatus.SUCCEEDED, 1, None)
