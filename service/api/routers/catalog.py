"""The catalog of models, GPUs and engines the planner knows."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.api.deps import CatalogDep

router = APIRouter(prefix="/v1/catalog", tags=["catalog"])


@router.get("/models", operation_id="listModels", summary="Models")
def list_models(catalog: CatalogDep) -> dict[str, Any]:
    """Every model with its architecture numbers, keyed by name."""
    return catalog.table("models")


@router.get("/gpus", operation_id="listGpus", summary="GPUs")
def list_gpus(catalog: CatalogDep) -> dict[str, Any]:
    """Every GPU with its peak rates, memory, links and price, keyed by name."""
    return catalog.table("gpus")


@router.get("/engines", operation_id="listEngines", summary="Engines")
def list_engines(catalog: CatalogDep) -> dict[str, Any]:
    """Every serving engine with its CPU costs and default scheduler knobs, keyed by name."""
    return catalog.table("engines")
