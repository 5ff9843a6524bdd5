"""FastAPI dependencies: database session, catalog, dispatcher, settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.api.metrics import ApiMetrics
from service.dispatch import Dispatcher
from service.planning.catalog import Catalog
from service.settings import Settings


async def _session(request: Request) -> AsyncIterator[Session]:
    # An async generator: its teardown (closing the session, returning the connection) runs on the event
    # loop and never waits for a worker thread, which are all busy when the pool is contended.
    with request.app.state.session_factory() as session:
        yield session


def _state(name: str) -> Callable[[Request], Any]:
    """A dependency returning one attribute of the app state (built once by create_app)."""

    def get(request: Request) -> Any:
        return getattr(request.app.state, name)

    return get


# Sync endpoints serialize their response on a worker thread before dependency teardown runs, so read
# paths end their transaction themselves (service.db.plans.release) instead of holding a connection.
SessionDep = Annotated[Session, Depends(_session)]
CatalogDep = Annotated[Catalog, Depends(_state("catalog"))]
DispatcherDep = Annotated[Dispatcher, Depends(_state("dispatcher"))]
SettingsDep = Annotated[Settings, Depends(_state("settings"))]
MetricsDep = Annotated[ApiMetrics, Depends(_state("metrics"))]
