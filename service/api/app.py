"""The FastAPI application factory."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from service.api.admission import plan_admission
from service.api.errors import install_problem_handlers
from service.api.metrics import ApiMetrics, PlanCollector
from service.api.middleware import BodySizeLimitMiddleware, ControlCharacterMiddleware, RequestMetricsMiddleware
from service.api.routers import catalog, clusters, estimates, health, placements, plans
from service.auth import DEFAULT_TENANT, PrincipalCache
from service.catalog.loader import default_catalog
from service.db.session import SessionFactory, make_engine, make_session_factory
from service.dispatch import CeleryDispatcher, Dispatcher, InProcessDispatcher
from service.logging_setup import configure_logging
from service.placement_service import ClusterCache
from service.settings import Execution, Settings, get_settings

API_VERSION = "1.0.0"
log = structlog.get_logger("splan.api")


def make_dispatcher(settings: Settings, session_factory: SessionFactory) -> Dispatcher:
    """Celery when a broker is configured, else the in-process pool."""
    if settings.execution is Execution.CELERY:
        return CeleryDispatcher(settings)
    return InProcessDispatcher(settings, session_factory)


def create_app(settings: Settings | None = None, *, start_executor: bool = True) -> FastAPI:
    """The API app; `start_executor=False` builds it without an executor (for the OpenAPI document)."""
    settings = settings or get_settings()
    configure_logging()
    engine = make_engine(settings)
    session_factory = make_session_factory(engine)
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if start_executor:
            # Long-lived objects (catalog, parsed clusters) out of the collector's way: shorter GC pauses.
            gc.collect()
            gc.freeze()
            app.state.dispatcher = make_dispatcher(settings, session_factory)
            app.state.admission = plan_admission(settings, session_factory, app.state.dispatcher)
            metrics.registry.register(PlanCollector(session_factory, app.state.dispatcher.queue_depth))
            if settings.api_keys_required:
                log.info("auth.api_keys_required", scheme="Authorization: Bearer")
            else:
                log.info(
                    "auth.keyless",
                    tenant=DEFAULT_TENANT,
                    clients="any (--insecure)" if settings.insecure else "loopback only",
                    note="requests without a key act as the default tenant with every scope",
                )
        try:
            yield
        finally:
            if start_executor:
                await app.state.admission.idle()
                app.state.dispatcher.close()
            engine.dispose()

    app = FastAPI(
        title="serving-planner",
        version=API_VERSION,
        summary="Plans how to serve large language models: strategy search, latency estimates, placement.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.session_factory = session_factory
    app.state.catalog = default_catalog()
    app.state.metrics = metrics
    app.state.cluster_cache = ClusterCache()
    app.state.principal_cache = PrincipalCache(settings.key_cache_ttl_s)
    app.state.keys_being_checked = {}
    install_problem_handlers(app)
    for router in (plans.router, estimates.router, clusters.router, placements.router, catalog.router, health.router):
        app.include_router(router)
    app.add_middleware(RequestMetricsMiddleware, histogram=metrics.request_latency)
    app.add_middleware(ControlCharacterMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    return app
