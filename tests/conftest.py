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
    """Settings for a database with the schema applied."""
    settings = Settings(database_url=url, broker_url=None, data_dir=data_dir, **overrides)
    upgrade(settings)
    return settings


@pytest.fixture(params=["sqlite", "postgresql"])
def db_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings on a migrated database: a SQLite file, and a fresh schema on the real PostgreSQL."""
    if request.param == "sqlite":
        return migrated_settings(f"sqlite:///{tmp_path / 'splan.db'}", tmp_path)
    url: str = request.getfixturevalue("postgres_url")
    settings = Settings(database_url=url, broker_url=None, data_dir=tmp_path)
    engine = make_engine(settings)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return migrated_settings(url, tmp_path)
