"""Dispatch to Celery: a batch of plans is one broker message, which a worker turns into one task per plan."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.dispatch import DISPATCH_PLANS_TASK, RUN_PLAN_TASK, CeleryDispatcher
from service.settings import Settings, get_settings
from tests.conftest import REDIS_URL


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
