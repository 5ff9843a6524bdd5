"""Readiness answers 503 with Retry-After, naming what is unreachable: the database or the broker (real ports)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.errors import DATABASE_RETRY_AFTER_S
from service.settings import Settings
from tests.conftest import REDIS_URL, TEST_QUEUE_PREFIX, migrated_settings
from tests.helpers import free_port
from tests.test_api import assert_problem


@contextmanager
def _client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, start_executor=False)) as client:
        yield client


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    return migrated_settings(f"sqlite:///{tmp_path / 'health.db'}", tmp_path)


def test_ready_when_the_database_and_the_broker_answer(sqlite_settings: Settings) -> None:
    settings = sqlite_settings.model_copy(update={"broker_url": REDIS_URL, "queue_name": f"{TEST_QUEUE_PREFIX}health"})
    with _client(settings) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}
        assert client.get("/livez").json()["status"] == "ok"


def test_not_ready_while_the_broker_is_unreachable(sqlite_settings: Settings) -> None:
    # Nothing listens on a fresh loopback port: the connection is refused at once.
    away = f"redis://127.0.0.1:{free_port()}/0"
    settings = sqlite_settings.model_copy(update={"broker_url": away, "queue_name": f"{TEST_QUEUE_PREFIX}health"})
    with _client(settings) as client:
        response = client.get("/readyz")
        body = assert_problem(response, 503)
        assert body["title"] == "Not ready"
        assert body["detail"] == "broker unreachable (ConnectionError)"
        assert response.headers["Retry-After"] == str(DATABASE_RETRY_AFTER_S)


def test_a_database_that_is_away_answers_503_with_retry_after(tmp_path: Path) -> None:
    away = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    settings = Settings(database_url=away, broker_url=None, data_dir=tmp_path, require_api_keys=False)
    with _client(settings) as client:
        ready = client.get("/readyz")
        assert assert_problem(ready, 503)["detail"] == "database unreachable (OperationalError)"
        assert ready.headers["Retry-After"] == str(DATABASE_RETRY_AFTER_S)
        listed = client.get("/v1/plans")
        body = assert_problem(listed, 503)
        assert body["title"] == "Database unavailable"
        expected = f"the database is unreachable (OperationalError); retry in {DATABASE_RETRY_AFTER_S} s"
        assert body["detail"] == expected
        assert body["instance"] == "/v1/plans"
        assert listed.headers["Retry-After"] == str(DATABASE_RETRY_AFTER_S)
