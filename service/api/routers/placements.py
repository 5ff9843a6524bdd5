"""Placement for autoscalers: where should the next instance start so that it loads fastest."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from pydantic import Field

from service.api.deps import CatalogDep, MetricsDep, PlacementsScope, SessionDep
from service.api.errors import ProblemError
from service.api.routers.clusters import PROBLEMS, ClusterName, cache_of, stale
from service.auth import cluster_key
from service.db import clusters as cluster_store
from service.placement.cluster import ClusterError
from service.placement.optimizer import PlacementRequest
from service.placement.prewarm import PrewarmRequest
from service.placement_service import place_on_cluster, prewarm_on_cluster
from service.planning.specs import PlanningError

router = APIRouter(prefix="/v1/placements", tags=["placements"])


class PlacementBody(PlacementRequest):
    """`POST /v1/placements` body: the cluster, what to start, and whether to reserve it."""

    cluster: ClusterName
    dry_run: bool = False
    ttl_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=60.0, description="how long the reservation holds unless an instance_started event confirms it"
    )


@router.post(
    "",
    operation_id="createPlacement",
    summary="Place new instances on a cluster",
    responses=PROBLEMS,
    response_model=dict[str, Any],
)
def create_placement(
    body: PlacementBody,
    request: Request,
    session: SessionDep,
    catalog: CatalogDep,
    metrics: MetricsDep,
    principal: PlacementsScope,
) -> Response:
    """Ranked candidates with startup-latency breakdowns, exclusions, and (unless dry_run) reserved GPUs."""
    started = time.perf_counter()
    try:
        outcome = place_on_cluster(
            session,
            cache=cache_of(request),
            catalog=catalog,
            name=cluster_key(principal.tenant, body.cluster),
            request=body,
            dry_run=body.dry_run,
            ttl_s=body.ttl_s,
        )
    except cluster_store.ClusterNotFoundError:
        raise ProblemError(404, f"no cluster named {body.cluster!r}; PUT /v1/clusters/{body.cluster} first") from None
    except cluster_store.StaleVersionError as exc:
        raise stale(exc) from None
    for chosen in outcome.decision.placements:
        metrics.placement_decisions.labels(chosen.tier.value).inc()
        metrics.migrations.inc(len(chosen.migrations))
    extra = {
        "cluster": body.cluster,
        "cluster_version": outcome.cluster_version,
        "dry_run": outcome.dry_run,
        "reservation_ids": outcome.reservation_ids,
    }
    # The decision is serialized once, by pydantic, and the few extra fields spliced in: re-validating and
    # re-encoding its dict cost more than deciding a dry run does.
    decision = outcome.decision.model_dump_json()
    content = f"{decision[:-1]},{json.dumps(extra, separators=(',', ':'))[1:]}"
    metrics.placement_latency.observe(time.perf_counter() - started)
    return Response(content=content, media_type="application/json")


class PrewarmBody(PrewarmRequest):
    """`POST /v1/placements/prewarm` body: the cluster and the recent (or forecast) request rate per checkpoint."""

    cluster: ClusterName


@router.post(
    "/prewarm",
    operation_id="advisePrewarm",
    summary="Which checkpoints to copy into which server tier now, which to evict, and keep-alive per model",
    responses=PROBLEMS,
)
def advise_prewarming(
    body: PrewarmBody, request: Request, session: SessionDep, catalog: CatalogDep, principal: PlacementsScope
) -> dict[str, Any]:
    """Copies and evictions that lower the expected cold-start latency most per second of copying, and
    keep-alive advice per checkpoint; nothing is changed on the cluster."""
    try:
        version, advice = prewarm_on_cluster(
            session,
            cache=cache_of(request),
            catalog=catalog,
            name=cluster_key(principal.tenant, body.cluster),
            request=body,
        )
    except cluster_store.ClusterNotFoundError:
        raise ProblemError(404, f"no cluster named {body.cluster!r}; PUT /v1/clusters/{body.cluster} first") from None
    except (PlanningError, ClusterError) as exc:
        raise ProblemError(422, str(exc)) from None
    return {**advice.model_dump(mode="json"), "cluster": body.cluster, "cluster_version": version}
