"""FastAPI dependencies: database session, catalog, dispatcher, settings, and the caller (API key and scopes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from service.api.admission import PlanAdmission
from service.api.metrics import ApiMetrics
from service.auth import KEYLESS, Principal, PrincipalCache, Scope, authenticate, is_remote_address, parse_token
from service.dispatch import Dispatcher
from service.planning.catalog import Catalog
from service.settings import Settings


async def _session(request: Request) -> AsyncIterator[Session]:
    # An async generator: its teardown (closing the session, returning the connection) runs on the event
    # loop and never waits for a worker thread, which are all busy when the pool is contended.
    with request.app.state.session_factory() as session:
        yield session


def _state(name: str) -> Callable[[Request], Awaitable[Any]]:
    """A dependency returning one attribute of the app state (built once by create_app)."""

    # Async, so FastAPI calls it on the event loop: a sync dependency costs a worker-thread round trip.
    async def get(request: Request) -> Any:
        return getattr(request.app.state, name)

    return get


# Sync endpoints serialize their response on a worker thread before dependency teardown runs, so read
# paths end their transaction themselves (service.db.plans.release) instead of holding a connection.
SessionDep = Annotated[Session, Depends(_session)]
CatalogDep = Annotated[Catalog, Depends(_state("catalog"))]
DispatcherDep = Annotated[Dispatcher, Depends(_state("dispatcher"))]
SettingsDep = Annotated[Settings, Depends(_state("settings"))]
MetricsDep = Annotated[ApiMetrics, Depends(_state("metrics"))]
AdmissionDep = Annotated[PlanAdmission, Depends(_state("admission"))]

# auto_error off: a missing or malformed header is answered below as problem+json with WWW-Authenticate.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    bearerFormat="splan_<key id>_<secret>",
    description="An API key from `splan keys create`; the scopes each operation needs are listed with it.",
)


def _unauthorized(detail: str, *, error: str | None) -> HTTPException:
    challenge = 'Bearer realm="splan"' + (f', error="{error}"' if error else "")
    return HTTPException(401, detail, headers={"WWW-Authenticate": challenge})


async def _principal_of(request: Request, token: str) -> Principal | None:
    """The token's principal through the process's short-lived cache; concurrent misses on one token read it once."""
    cache: PrincipalCache = request.app.state.principal_cache
    found, principal = cache.get(token)
    if found:
        return principal
    checking: dict[str, asyncio.Future[Principal | None]] = request.app.state.keys_being_checked
    pending = checking.get(token)
    if pending is not None:
        return await asyncio.shield(pending)
    future: asyncio.Future[Principal | None] = asyncio.get_running_loop().create_future()
    checking[token] = future
    try:

        def lookup() -> Principal | None:
            with request.app.state.session_factory() as session:
                return authenticate(session, token)

        principal = await run_in_threadpool(lookup)
        cache.put(token, principal)
        future.set_result(principal)
        return principal
    except Exception as exc:
        future.set_exception(exc)
        future.exception()  # marked retrieved: no other request may be waiting for it
        raise
    finally:
        if not future.done():  # this request was cancelled mid-check: those waiting on it are too
            future.cancel()
        checking.pop(token, None)


async def caller(
    security_scopes: SecurityScopes,
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The tenant and scopes of the request's key (keyless: the default tenant); 401 without one, 403 short a scope."""
    settings: Settings = request.app.state.settings
    header = request.headers.get("authorization")
    if header is None:
        if settings.api_keys_required:
            raise _unauthorized("an API key is required: send Authorization: Bearer <key>", error=None)
        client = request.client.host if request.client else None
        if client is not None and is_remote_address(client) and not settings.insecure:
            raise _unauthorized(
                "keyless access is for loopback clients only: send an API key, or start the server with --insecure",
                error=None,
            )
        principal = KEYLESS
    else:
        scheme, _, token = header.strip().partition(" ")
        found = None
        if scheme.lower() == "bearer" and parse_token(token.strip()) is not None:
            found = await _principal_of(request, token.strip())
        if found is None:
            raise _unauthorized("the API key is malformed, unknown or revoked", error="invalid_token")
        principal = found
    missing = [scope for scope in security_scopes.scopes if not principal.allows(Scope(scope))]
    if missing:
        raise HTTPException(
            403,
            f"this key lacks the scope {missing[0]!r} (it has: {', '.join(sorted(principal.scopes)) or 'none'})",
            headers={"WWW-Authenticate": f'Bearer realm="splan", error="insufficient_scope", scope="{missing[0]}"'},
        )
    return principal


def _needs(scope: Scope) -> Any:
    return Security(caller, scopes=[scope.value])


PlansRead = Annotated[Principal, _needs(Scope.PLANS_READ)]
PlansWrite = Annotated[Principal, _needs(Scope.PLANS_WRITE)]
EstimatesScope = Annotated[Principal, _needs(Scope.ESTIMATES)]
ClustersRead = Annotated[Principal, _needs(Scope.CLUSTERS_READ)]
ClustersWrite = Annotated[Principal, _needs(Scope.CLUSTERS_WRITE)]
PlacementsScope = Annotated[Principal, _needs(Scope.PLACEMENTS)]
