"""Database engine and session factory built from the settings."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings

# What the driver raises when the database cannot be reached or dropped the connection (OperationalError and
# InterfaceError wrap psycopg's and sqlite3's), or the pool had no connection to give in time: it may be back soon.
DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,
)

SessionFactory = sessionmaker[Session]


def make_engine(settings: Settings) -> Engine:
    """An engine for the configured database; SQLite gets WAL and a busy timeout for concurrent writers."""
    url = settings.sqlalchemy_url()
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # As many connections as the API's request threads (40), so a request never waits on the pool.
    return create_engine(url, pool_size=40, max_overflow=10, pool_pre_ping=True, pool_recycle=300)


def make_session_factory(engine: Engine) -> SessionFactory:
    """Sessions that keep loaded attributes readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)
