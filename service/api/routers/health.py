"""Liveness, readiness (database and, when configured, broker) and Prometheus metrics."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from service.api.deps import MetricsDep, SessionDep, SettingsDep
from service.api.errors import DATABASE_RETRY_AFTER_S, ProblemError
from service.api.schemas import HealthStatus

router = APIRouter(tags=["health"])


@router.get("/livez", operation_id="livez", summary="Liveness", response_model=HealthStatus)
def livez() -> HealthStatus:
    """The process is up."""
    return HealthStatus(status="ok")


@router.get("/readyz", operation_id="readyz", summary="Readiness", response_model=HealthStatus)
def readyz(session: SessionDep, settings: SettingsDep) -> HealthStatus:
    """The database answers and, when a broker is configured, the broker answers."""
    checks: dict[str, str] = {}
    try:
        session.execute(text("SELECT 1"))
        session.rollback()
        checks["database"] = "ok"
    except Exception as exc:
        raise ProblemError(
            503,
            f"database unreachable ({type(exc).__name__})",
            title="Not ready",
            headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
        ) from None
    if settings.broker_url:
        try:
            client = redis.Redis.from_url(settings.broker_url, socket_timeout=2, socket_connect_timeout=2)
            client.ping()
            client.close()
            checks["broker"] = "ok"
        except Exception as exc:
            raise ProblemError(
                503,
                f"broker unreachable ({type(exc).__name__})",
                title="Not ready",
                headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
            ) from None
    return HealthStatus(status="ok", checks=checks)


@router.get("/metrics", operation_id="metrics", summary="Prometheus metrics", response_class=Response)
def metrics(api_metrics: MetricsDep) -> Response:
    """Request latency, plans by status, queue depth, plan run time, placement decisions."""
    return Response(generate_latest(api_metrics.registry), media_type=CONTENT_TYPE_LATEST)
