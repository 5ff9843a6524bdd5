"""Synchronous single-deployment estimates, bounded to answer within about a second."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.api.deps import CatalogDep, EstimatesScope, SettingsDep
from service.api.routers.plans import PROBLEMS
from service.api.schemas import EstimateBody
from service.planning.estimate import run_estimate

router = APIRouter(prefix="/v1/estimates", tags=["estimates"])


@router.post("", operation_id="createEstimate", summary="Estimate one deployment", responses=PROBLEMS)
def create_estimate(
    body: EstimateBody, catalog: CatalogDep, settings: SettingsDep, _principal: EstimatesScope
) -> dict[str, Any]:
    """Latency and throughput of one deployment under one workload (as `splan estimate --json`).

    Priced before it runs: a workload that cannot fit the work budget is a 422; one cut short says `truncated`.
    """
    request = body.to_request(max_sequence_steps=settings.estimate_max_sequence_steps)
    return run_estimate(request, catalog=catalog).as_dict()
