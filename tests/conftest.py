"""Shared fixtures: the built-in catalog and the reference-data directory."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from service.catalog.loader import load_catalog
from service.db.migrate import upgrade
from service.db.session import make_engine
from service.logging_setup import configure_logging
from service.planning.catalog import Catalog
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    path = Path(os.environ.get("SPLAN_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
    if not (path / "h100_sxm_gemm.csv").exists():
        pytest.skip(f"reference data not found at {path}")
    return path


PG_ADMIN_URL = os.environ.get("SPLAN_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SPLAN_TEST_REDIS", "redis://127.0.0.1:6379/0")
# Every queue a test makes is named with this prefix, so that the session can take its keys out of Redis. It is
# unique to the process: parallel sessions (pytest-xdist workers, other runs against the same Redis) each take out
# only their own queues, never those another session is still using.
TEST_QUEUE_PREFIX = f"splan-test-{uuid.uuid4().hex[:8]}-"


def forget_test_queues(client: Any, prefix: str = TEST_QUEUE_PREFIX) -> list[str]:
    """Delete the queues, kombu bindings and unacknowledged messages of test queues; the keys that were left."""
    left = [key.decode() for key in client.scan_iter(match=f"*{prefix}*")]
    if left:
        client.delete(*left)
    # Kombu keeps some bookkeeping in keys shared by every queue of the database: take out only our members.
    for member in client.zrange("_kombu.binding_deadlines", 0, -1):
        if prefix.encode() in member:
            client.zrem("_kombu.binding_deadlines", member)
            left.append(f"_kombu.binding_deadlines[{member.decode()}]")
    for tag, message in client.hscan_iter("unacked"):
        if prefix.encode() in message:
            client.hdel("unacked", tag)
            client.zrem("unacked_index", tag)
            left.append(f"unacked[{tag.decode()}]")
    return left


@pytest.fixture(scope="session", autouse=True)
def logging_to_the_sessions_stderr() -> None:
    """Configure logging once per test process, before any test (and any capsys) runs."""
    # structlog keeps the sys.stderr it was configured with: configured first inside a capsys test (which one comes
    # first differs per pytest-xdist worker), every later log line would go to that test's closed stream.
    configure_logging()


@pytest.fixture(scope="session", autouse=True)
def no_test_queues_left_in_redis() -> Iterator[None]:
    """Tests' Redis queues and keys are removed when the session ends (and what was left is printed)."""
    yield
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        left = forget_test_queues(client)
    except redis.ConnectionError:
        return  # no Redis, so nothing of ours in it
    finally:
        client.close()
    if left:
        print(f"\nremoved {len(left)} Redis keys left by test workers: {', '.join(sorted(left)[:10])}")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    import psycopg

    name = f"splan_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def migrated_settings(url: str, data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a database with the schema applied (keyless unless `require_api_keys` is given)."""
    # Tests about other things run in the keyless mode on PostgreSQL too; tests/test_auth.py turns keys on.
    overrides.setdefault("require_api_keys", False)
    settings = Settings(database_url=url, broker_url=None, data_dir=data_dir, **overrides)
    upgrade(settings)
    return settings


@pytest.fixture(params=["sqlite", "postgresql"])
def db_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings on a migrated database: a SQLite file, and a fresh schema on the real PostgreSQL."""
    if request.param == "sqlite":
        return migrated_settings(f"sqlite:///{tmp_path / 'splan.db'}", tmp_path)
    return fresh_postgres_settings(request.getfixturevalue("postgres_url"), tmp_path)


def fresh_postgres_settings(url: str, tmp_path: Path) -> Settings:
    """Settings on a fresh, migrated schema of the real PostgreSQL database at ``url``."""
    settings = Settings(database_url=url, broker_url=None, data_dir=tmp_path)
    engine = make_engine(settings)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return migrated_settings(url, tmp_path)
