"""FastAPI dependencies: database session, catalog, dispatcher, settings."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.api.metrics import ApiMetrics
from service.dispatch import Dispatcher
from service.planning.catalog import Catalog
from service.settings import Settings


def _session(request: Request) -> Iterator[Session]:
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


# Function scope closes the session when the endpoint returns, before the response is serialized, so a
# connection is never held while a request waits for a thread (which deadlocks the pool under load).
SessionDep = Annotated[Session, Depends(_session, scope="function")]
CatalogDep = Annotated[Catalog, Depends(_catalog)]
DispatcherDep = Annotated[Dispatcher, Depends(_dispatcher)]
SettingsDep = Annotated[Settings, Depends(_settings)]
MetricsDep = Annotated[ApiMetrics, Depends(_metrics)]
