"""The API's outbox: plans sent while the broker is away wait in order and leave as soon as it is back."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import redis

from service.dispatch import RUN_PLAN_TASK, CeleryDispatcher
from service.settings import Settings
from tests.conftest import TEST_QUEUE_PREFIX
from tests.helpers import ThrowawayRedis, free_port, wait_for

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


def _queued_plans(url: str, queue: str) -> list[tuple[str, list[object]]]:
    """(task, its plan ids) of each message in the queue, oldest first."""
    client = redis.Redis.from_url(url)
    try:
        messages = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    finally:
        client.close()
    return [(m["headers"]["task"], json.loads(base64.b64decode(m["body"]))[0]) for m in reversed(messages)]


def test_plans_sent_while_the_broker_is_away_leave_in_order_when_it_returns(tmp_path: Path) -> None:
    broker = ThrowawayRedis(tmp_path / "redis", free_port())
    broker.start()
    queue = f"{TEST_QUEUE_PREFIX}outbox"
    dispatcher = CeleryDispatcher(
        Settings(broker_url=broker.url, database_url=None, data_dir=tmp_path, queue_name=queue)
    )
    try:
        dispatcher.submit("p0")
        assert dispatcher.queue_depth() == 1
        broker.stop()
        # Away, with nothing waiting: the depth is unknown, not an error.
        assert dispatcher.queue_depth() is None
        dispatcher.submit_many(["p1", "p2"])
        dispatcher.submit("p3")
        assert dispatcher.pending() == 3
        assert dispatcher.queue_depth() is None
        broker.start()
        wait_for(lambda: dispatcher.pending() == 0, timeout_s=10, what="the outbox to drain")
        assert dispatcher.queue_depth() == 4
        # One task per plan once the batch went through the outbox; p0 survived the restart (append-only file).
        assert _queued_plans(broker.url, queue) == [(RUN_PLAN_TASK, [p]) for p in ("p0", "p1", "p2", "p3")]
    finally:
        dispatcher.close()
        broker.stop()
