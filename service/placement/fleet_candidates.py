"""Fleet candidate searches: per deployment class and GPU type, the goodput search's strategies sized per instance.

A candidate search answers "how many requests per second does one instance of each good layout serve within the
SLOs" for one (model, engine, dtypes, workload shape, SLOs, search limits) on one GPU type. The rate is not part of
it (the bisection finds the rate), so deployments that differ only in rate, name or priority share one search, and
its content hash, which also covers the catalog and calibration entries it reads, keys the cache.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.planning.catalog import Catalog
from service.planning.plan_spec import parse_plan_spec
from service.planning.search import Checkpoint, plan
from service.planning.specs import PlanningError

# Bumped whenever what a candidate search computes changes, so that cached results of older code are not reused.
CANDIDATE_SEARCH_VERSION = 2
# Fields of a fleet deployment that do not change what its search finds.
NOT_SEARCHED = frozenset({"name", "gpu_types", "search", "priority", "rate_profile"})


@dataclass(frozen=True, slots=True)
class CandidateTask:
    """One candidate search: its cache key and the plan spec it runs (rate normalised to 1 req/s)."""

    key: str
    gpu_type: str
    spec: dict[str, Any]


def search_spec(deployment: dict[str, Any], gpu_type: str) -> dict[str, Any]:
    """The plan spec of a deployment's candidate search on one GPU type (collocated, up to its widest layout)."""
    search = dict(deployment.get("search") or {})
    tps = search.get("tp") or [1, 2, 4, 8]
    pps = search.get("pp") or [1]
    largest = max(tps) * max(pps)
    workload = {**deployment["workload"], "rate": 1.0}
    spec = {k: v for k, v in deployment.items() if k not in NOT_SEARCHED and v is not None}
    return {
        **spec,
        "workload": workload,
        "gpu": gpu_type,
        "max_gpus": largest,
        "search": {**search, "modes": ["collocated"]},
    }


def catalog_fingerprint(catalog: Catalog, *, model: str, gpu_type: str, engine: str) -> str:
    """A digest of every catalog and calibration entry a candidate search reads."""
    gpu = catalog.gpu(gpu_type)
    parts = (
        catalog.model(model),
        gpu,
        catalog.engine(engine),
        catalog.calibration_for(gpu),
        catalog.moe_calibration_for(gpu),
    )
    # Whole arrays, never numpy's elided "..." form, so that two calibrations never share a digest.
    with np.printoptions(threshold=sys.maxsize):
        text = "\n".join(repr(part) for part in parts)
    return hashlib.sha256(text.encode()).hexdigest()


def candidate_key(spec: dict[str, Any], fingerprint: str) -> str:
    """The content hash of one candidate search."""
    doc = {"version": CANDIDATE_SEARCH_VERSION, "spec": spec, "catalog": fingerprint}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def candidate_tasks(
    deployments: Iterable[tuple[dict[str, Any], list[str]]], *, catalog: Catalog
) -> tuple[list[CandidateTask], list[dict[str, str]]]:
    """The distinct candidate searches of (deployment document, its GPU types) pairs, in first-seen order, and per
    deployment the key of its search on each GPU type."""
    tasks: dict[str, CandidateTask] = {}
    keys: list[dict[str, str]] = []
    fingerprints: dict[tuple[str, str, str], str] = {}
    for deployment, gpu_types in deployments:
        by_type: dict[str, str] = {}
        for gpu_type in gpu_types:
            spec = search_spec(deployment, gpu_type)
            ident = (str(spec.get("model")), gpu_type, str(spec.get("engine", "vllm")))
            if ident not in fingerprints:
                fingerprints[ident] = catalog_fingerprint(catalog, model=ident[0], gpu_type=ident[1], engine=ident[2])
            key = candidate_key(spec, fingerprints[ident])
            tasks.setdefault(key, CandidateTask(key=key, gpu_type=gpu_type, spec=spec))
            by_type[gpu_type] = key
        keys.append(by_type)
    return list(tasks.values()), keys


def run_candidate_search(
    spec: dict[str, Any], *, catalog: Catalog, checkpoint: Checkpoint | None = None
) -> dict[str, Any]:
    """Run one candidate search: each simulated layout with the rate one instance serves within the SLOs."""
    try:
        result = plan(parse_plan_spec(spec, catalog=catalog), catalog=catalog, checkpoint=checkpoint)
    except PlanningError as exc:
        return {"gpu_type": spec["gpu"], "options": [], "reason": str(exc)}
    options = []
    for strategy in result.strategies:
        layout = strategy["layout"]
        replicas = int(layout.get("replicas", 1)) or 1
        per_instance = float(strategy["goodput_rps"]) / replicas
        if per_instance <= 0:
            continue
        tp, pp = int(layout["tp"]), int(layout.get("pp", 1))
        dp = int(layout.get("attention_dp", 1))
        options.append(
            {
                "strategy": strategy["label"].split(" x")[0],
                "tp": tp,
                "pp": pp,
                "attention_dp": dp,
                "moe_ep": int(layout.get("moe_ep", 1)),
                "gpus_per_instance": tp * pp * dp,
                "goodput_per_instance_rps": per_instance,
                "ttft_ms": strategy.get("ttft_ms"),
                "tpot_ms": strategy.get("tpot_ms"),
            }
        )
    reason = None
    if not options:
        reason = f"no strategy on {spec['gpu']} meets the SLOs at any rate"
        if result.rejected:
            reason += f" ({result.rejected[0].strategy}: {result.rejected[0].reason})"
    return {"gpu_type": spec["gpu"], "options": options, "reason": reason}


SearchRunner = Callable[[list[CandidateTask], Callable[[int], None]], dict[str, dict[str, Any]]]


def run_sequentially(
    tasks: list[CandidateTask],
    done: Callable[[int], None],
    *,
    catalog: Catalog,
    checkpoint: Checkpoint | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every candidate search here, one after another; ``done`` gets the count finished so far."""
    results: dict[str, dict[str, Any]] = {}
    for index, task in enumerate(tasks, 1):
        results[task.key] = run_candidate_search(task.spec, catalog=catalog, checkpoint=checkpoint)
        done(index)
    return results
