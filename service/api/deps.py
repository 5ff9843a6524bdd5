"""FastAPI dependencies: database session, catalog, dispatcher, settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

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


def _catalog(request: Request) -> Catalog:
    catalog: Catalog = request.app.state.catalog
    return catalog


def _dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _metrics(request: Request) -> ApiMetrics:
    metrics: ApiMetrics = request.app.state.metrics
    return metrics


# Sync endpoints serialize their response on a worker thread before dependency teardown runs, so read
# paths end their transaction themselves (service.db.plans.release) instead of holding a connection.
SessionDep = Annotated[Session, Depends(_session)]
CatalogDep = Annotated[Catalog, Depends(_catalog)]
DispatcherDep = Annotated[Dispatcher, Depends(_dispatcher)]
SettingsDep = Annotated[Settings, Depends(_settings)]
MetricsDep = Annotated[ApiMetrics, Depends(_metrics)]
