"""Cluster state for placement: replace it whole (PUT) or send events; versioned with ETag / If-Match."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from service.api.deps import ClustersRead, ClustersWrite, SessionDep
from service.api.errors import ProblemError, problem_responses
from service.auth import cluster_key
from service.db import clusters as cluster_store
from service.placement.cluster import MAX_EVENTS, Cluster
from service.placement_service import ClusterCache, current_state, post_events, put_cluster

router = APIRouter(prefix="/v1/clusters", tags=["clusters"])

ClusterName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
PROBLEMS = problem_responses(
    (401, "No API key, or a malformed, unknown or revoked one"),
    (403, "The API key lacks the operation's scope"),
    (404, "No cluster with that name (of the caller's tenant)"),
    (409, "If-Match names a version that is no longer current"),
    (413, "Body too large"),
    (422, "Invalid cluster state or events"),
)


class ClusterSummary(BaseModel):
    """What a write produced."""

    name: str
    version: int
    servers: int
    gpus: int
    busy_gpus: int
    instances: int
    reservations: int


class EventsBody(BaseModel):
    """Changes to apply in order: instance started/stopped, checkpoint cached/evicted, load finished, ..."""

    model_config = ConfigDict(extra="forbid")
    events: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_EVENTS)


def cache_of(request: Request) -> ClusterCache:
    """The app's parsed-cluster cache."""
    cache: ClusterCache = request.app.state.cluster_cache
    return cache


def parse_if_match(value: str | None) -> int | None:
    """A version from an If-Match header ("3", 3 or W/"3"); `*` or absent means no condition."""
    if value is None or value.strip() == "*":
        return None
    text = value.strip().removeprefix("W/").strip('"')
    if not text.isdigit():
        raise ProblemError(422, f'If-Match must be a cluster version such as "3" (got {value!r})')
    return int(text)


def summary(name: str, version: int, cluster: Cluster) -> ClusterSummary:
    """Counts that tell a client its write landed."""
    gpus = [g for s in cluster.servers for g in s.gpus]
    return ClusterSummary(
        name=name,
        version=version,
        servers=len(cluster.servers),
        gpus=len(gpus),
        busy_gpus=sum(1 for g in gpus if g.busy),
        instances=len(cluster.instances),
        reservations=len(cluster.reservations),
    )


def stale(exc: cluster_store.StaleVersionError) -> ProblemError:
    """The 409 answer to a write based on an old version."""
    return ProblemError(
        409,
        f"the cluster changed (current version {exc.current}); read it again and retry",
        title="Version conflict",
        current_version=exc.current,
    )


@router.put(
    "/{name}",
    operation_id="putCluster",
    summary="Create or replace a cluster state",
    response_model=ClusterSummary,
    responses={201: {"description": "Created", "model": ClusterSummary}, **PROBLEMS},
)
def put(
    name: ClusterName,
    body: Cluster,
    request: Request,
    response: Response,
    session: SessionDep,
    principal: ClustersWrite,
    if_match: Annotated[str | None, Header()] = None,
) -> ClusterSummary:
    """Store the whole state; with If-Match only over that version (409 otherwise)."""
    try:
        version, created, cluster = put_cluster(
            session,
            cache=cache_of(request),
            name=cluster_key(principal.tenant, name),
            document=body.model_dump(mode="json"),
            if_match=parse_if_match(if_match),
        )
    except cluster_store.StaleVersionError as exc:
        raise stale(exc) from None
    response.status_code = 201 if created else 200
    response.headers["ETag"] = f'"{version}"'
    return summary(name, version, cluster)


@router.get("/{name}", operation_id="getCluster", summary="Read a cluster state", responses=PROBLEMS)
def get(
    name: ClusterName, request: Request, response: Response, session: SessionDep, principal: ClustersRead
) -> dict[str, Any]:
    """The current state with its version (also in the ETag header)."""
    try:
        version, cluster = current_state(session, cache=cache_of(request), name=cluster_key(principal.tenant, name))
    except cluster_store.ClusterNotFoundError:
        raise ProblemError(404, f"no cluster named {name!r}") from None
    response.headers["ETag"] = f'"{version}"'
    return {"name": name, "version": version, "state": cluster.model_dump(mode="json")}


@router.post(
    "/{name}/events",
    operation_id="postClusterEvents",
    summary="Apply events to a cluster",
    response_model=ClusterSummary,
    responses=PROBLEMS,
)
def events(
    name: ClusterName,
    body: EventsBody,
    request: Request,
    response: Response,
    session: SessionDep,
    principal: ClustersWrite,
    if_match: Annotated[str | None, Header()] = None,
) -> ClusterSummary:
    """Apply the events in order, all or none; a bad event answers 422 naming it."""
    try:
        version, cluster = post_events(
            session,
            cache=cache_of(request),
            name=cluster_key(principal.tenant, name),
            events=body.events,
            if_match=parse_if_match(if_match),
        )
    except cluster_store.ClusterNotFoundError:
        raise ProblemError(404, f"no cluster named {name!r}") from None
    except cluster_store.StaleVersionError as exc:
        raise stale(exc) from None
    response.headers["ETag"] = f'"{version}"'
    return summary(name, version, cluster)
