"""RFC 9457 problem details for every error the API returns."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.db.session import DATABASE_UNAVAILABLE
from service.placement.cluster import ClusterError
from service.planning.specs import PlanningError

PROBLEM_JSON = "application/problem+json"
log = structlog.get_logger("splan.api")

# How long a client should wait before retrying while the database is unreachable: PostgreSQL restarts and
# failovers take seconds, and the fault suite measures recovery within 5 s of its return (bench/RESULTS.md).
DATABASE_RETRY_AFTER_S = 5


def database_unavailable(exc: BaseException) -> bool:
    """Whether an exception (or what it was raised from) says the database is unreachable for now."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, DATABASE_UNAVAILABLE):
            return True
        if isinstance(seen, sa_exc.DBAPIError) and seen.connection_invalidated:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class ProblemError(Exception):
    """An error the API answers with a problem document."""

    def __init__(
        self, status: int, detail: str, *, title: str | None = None, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.headers = headers or {}
        self.extra = extra


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again", "schema": {"type": "integer"}}}


def problem_responses(*described: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI problem+json responses plus 503 (database unreachable); 429 and 503 carry Retry-After."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status, description in (*described, (503, "The database is unreachable; see Retry-After")):
        response: dict[str, Any] = {"description": description, "content": {"application/problem+json": {}}}
        if status in (429, 503):
            response["headers"] = _RETRY_AFTER
        responses[status] = response
    return responses


def problem_response(
    status: int, detail: str, *, title: str | None = None, instance: str | None = None, **extra: Any
) -> JSONResponse:
    """A problem+json response."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def _validation_detail(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    errors = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            errors.append({"location": "body", "message": "the request body is not valid JSON"})
            continue
        location = ".".join(str(part) for part in err.get("loc", ()) if part != "body") or "body"
        errors.append({"location": location, "message": str(err.get("msg", "invalid"))})
    first = errors[0] if errors else {"location": "body", "message": "invalid request"}
    return f"invalid request at {first['location']}: {first['message']}", errors


def install_problem_handlers(app: FastAPI) -> None:
    """Make every 4xx/5xx, validation errors included, a problem document."""

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ProblemError)
        response = problem_response(exc.status, exc.detail, title=exc.title, instance=request.url.path, **exc.extra)
        response.headers.update(exc.headers)
        return response

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        detail, errors = _validation_detail(exc)
        return problem_response(422, detail, instance=request.url.path, errors=errors)

    async def on_planning(request: Request, exc: Exception) -> JSONResponse:
        # A spec refused at the door names its field the way request-validation errors do.
        field = getattr(exc, "field", None)
        extra = {"errors": [{"location": field, "message": getattr(exc, "reason", str(exc))}]} if field else {}
        return problem_response(422, str(exc), title="Unprocessable plan", instance=request.url.path, **extra)

    async def on_cluster(request: Request, exc: Exception) -> JSONResponse:
        return problem_response(422, str(exc), title="Invalid cluster", instance=request.url.path)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        response = problem_response(exc.status_code, detail, instance=request.url.path)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def on_database(request: Request, exc: Exception) -> JSONResponse:
        # One line, no traceback: an outage makes thousands of these and the cause is already known.
        log.warning("api.database_unavailable", path=request.url.path, error=type(exc).__name__)
        response = problem_response(
            503,
            f"the database is unreachable ({type(exc).__name__}); retry in {DATABASE_RETRY_AFTER_S} s",
            title="Database unavailable",
            instance=request.url.path,
        )
        response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER_S)
        return response

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        if database_unavailable(exc):
            return await on_database(request, exc)
        log.exception("api.unhandled", path=request.url.path)
        return problem_response(500, "internal error; the request was not completed", instance=request.url.path)

    app.add_exception_handler(ProblemError, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(PlanningError, on_planning)
    app.add_exception_handler(ClusterError, on_cluster)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for unavailable in DATABASE_UNAVAILABLE:
        app.add_exception_handler(unavailable, on_database)
    app.add_exception_handler(Exception, on_unexpected)
