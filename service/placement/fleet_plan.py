"""Fleet planning: each deployment's strategy from the goodput search, sized to its rate, then packed on the fleet."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.placement.cluster import Cluster
from service.placement.fleet import FleetDeployment, pack_fleet
from service.planning.catalog import Catalog
from service.planning.plan_spec import SearchSpec, SloSpec, WorkloadSpec, parse_plan_spec
from service.planning.search import plan
from service.planning.specs import PlanningError

MAX_FLEET_DEPLOYMENTS = 64


class FleetDeploymentSpec(BaseModel):
    """One model to serve: its traffic (with a request rate) and its SLOs."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    model: str = Field(min_length=1, max_length=200)
    engine: str = "vllm"
    weight_dtype: str = "bf16"
    kv_dtype: str | None = None
    workload: WorkloadSpec
    slo: SloSpec
    search: SearchSpec = SearchSpec(modes=["collocated"], pp=[1])
    gpu_types: list[str] | None = Field(default=None, description="restrict to these GPU types of the fleet")

    @model_validator(mode="after")
    def _needs_rate(self) -> FleetDeploymentSpec:
        if self.workload.arrival == "closed" or self.workload.rate is None:
            raise ValueError("a fleet deployment needs an open-loop workload with a rate (requests per second)")
        return self


class FleetSpec(BaseModel):
    """A fleet plan: deployments to serve, and the fleet (GPU counts by type, or a stored cluster)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["fleet"] = "fleet"
    deployments: list[FleetDeploymentSpec] = Field(min_length=1, max_length=MAX_FLEET_DEPLOYMENTS)
    gpus: dict[str, int] | None = Field(default=None, description="GPU counts by catalog type")
    cluster: str | None = Field(default=None, description="a cluster stored with PUT /v1/clusters/{name}")

    @model_validator(mode="after")
    def _one_fleet(self) -> FleetSpec:
        if (self.gpus is None) == (self.cluster is None):
            raise ValueError("give the fleet as `gpus` (counts by type) or as a stored `cluster`, exactly one")
        if self.gpus is not None and any(count < 0 for count in self.gpus.values()):
            raise ValueError("GPU counts must not be negative")
        names = [d.name for d in self.deployments]
        if len(set(names)) != len(names):
            raise ValueError("deployment names must be unique")
        return self


def parse_fleet_spec(raw: Any) -> FleetSpec:
    """A validated fleet spec, or a one-line PlanningError."""
    try:
        return FleetSpec.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        raise PlanningError(f"invalid fleet spec at {where}: {err['msg']}") from None


def fleet_gpu_types(spec: FleetSpec, cluster: Cluster | None) -> dict[str, int]:
    """GPU counts by type of the fleet."""
    if spec.gpus is not None:
        return {name.lower(): count for name, count in spec.gpus.items()}
    assert cluster is not None
    counts: dict[str, int] = {}
    for server in cluster.servers:
        for gpu in server.gpus:
            counts[gpu.type.lower()] = counts.get(gpu.type.lower(), 0) + 1
    return counts


def _sized_choice(deployment: FleetDeploymentSpec, gpu_type: str, *, catalog: Catalog) -> dict[str, Any] | None:
    """The collocated strategy on this GPU type that serves the rate with the fewest GPUs, sized in replicas."""
    search = deployment.search
    largest = max(search.tp) * max(search.pp)
    raw = {
        **deployment.model_dump(mode="json", exclude={"name", "gpu_types", "search"}, exclude_none=True),
        "gpu": gpu_type,
        "max_gpus": largest,
        "search": {**search.model_dump(mode="json", exclude_none=True), "modes": ["collocated"]},
    }
    result = plan(parse_plan_spec(raw, catalog=catalog), catalog=catalog)
    rate = float(deployment.workload.rate or 0.0)
    best: dict[str, Any] | None = None
    for strategy in result.strategies:
        layout = strategy["layout"]
        replicas = int(layout.get("replicas", 1))
        per_replica = strategy["goodput_rps"] / replicas if replicas else 0.0
        if per_replica <= 0:
            continue
        needed = max(1, math.ceil(rate / per_replica))
        replica_gpus = int(layout["tp"]) * int(layout.get("pp", 1))
        choice = {
            "gpu_type": gpu_type,
            "strategy": strategy["label"].split(" x")[0],
            "tp": int(layout["tp"]),
            "pp": int(layout.get("pp", 1)),
            "gpus_per_instance": replica_gpus,
            "instances": needed,
            "gpus": needed * replica_gpus,
            "goodput_per_instance_rps": per_replica,
            "required_rps": rate,
            "ttft_ms": strategy.get("ttft_ms"),
            "tpot_ms": strategy.get("tpot_ms"),
            "cost_per_million_output_tokens_usd": strategy.get("cost_per_million_output_tokens_usd"),
        }
        if best is None or (choice["gpus"], choice["cost_per_million_output_tokens_usd"] or 0.0) < (
            best["gpus"],
            best["cost_per_million_output_tokens_usd"] or 0.0,
        ):
            best = choice
    return best


def plan_fleet(
    spec: FleetSpec,
    *,
    catalog: Catalog,
    cluster: Cluster | None = None,
    now_s: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Size every deployment with the goodput search, then pack all of them; say which cannot be met and why."""
    available = fleet_gpu_types(spec, cluster)
    total = sum(len(_types_for(d, available)) for d in spec.deployments)
    done = 0
    sized: list[dict[str, Any]] = []
    unmet: list[dict[str, str]] = []
    for deployment in spec.deployments:
        types = _types_for(deployment, available)
        choices = []
        for gpu_type in types:
            choice = _sized_choice(deployment, gpu_type, catalog=catalog)
            if choice is not None:
                choices.append(choice)
            done += 1
            if progress is not None:
                progress(done, max(total, 1))
        if not types:
            unmet.append({"name": deployment.name, "reason": "none of its gpu_types is in the fleet"})
            continue
        if not choices:
            slo = deployment.slo
            unmet.append(
                {
                    "name": deployment.name,
                    "reason": f"no strategy on {', '.join(types)} meets TTFT {slo.ttft_ms:g} ms and TPOT "
                    f"{slo.tpot_ms:g} ms for {slo.attainment:.0%} of requests at any rate",
                }
            )
            continue
        best = min(choices, key=lambda c: (c["gpus"], c["cost_per_million_output_tokens_usd"] or 0.0))
        sized.append({"name": deployment.name, "model": deployment.model, **best})
    by_name = {d.name: d for d in spec.deployments}
    packing = pack_fleet(
        [
            FleetDeployment(
                name=s["name"],
                model=s["model"],
                gpu_type=s["gpu_type"],
                gpus_per_instance=s["gpus_per_instance"],
                instances=s["instances"],
                weight_dtype=by_name[s["name"]].weight_dtype,  # type: ignore[arg-type]
                tp=s["tp"],
                pp=s["pp"],
                engine=by_name[s["name"]].engine,
            )
            for s in sized
        ],
        catalog=catalog,
        gpus_by_type=available if cluster is None else None,
        cluster=cluster,
        now_s=now_s,
    )
    placed = {p.name: p for p in packing.placed}
    for miss in packing.unplaced:
        unmet.append({"name": miss.name, "reason": miss.reason})
    deployments = []
    for s in sized:
        packed = placed.get(s["name"])
        deployments.append({**s, "placed": packed is not None, "instances_placed": _instances(packed)})
    return {
        "kind": "fleet",
        "deployments": deployments,
        "unmet": unmet,
        "all_slos_met": not unmet,
        "gpus_available_by_type": packing.gpus_available_by_type,
        "gpus_used_by_type": packing.gpus_used_by_type,
        "total_gpus": sum(packing.gpus_used_by_type.values()),
    }


def _types_for(deployment: FleetDeploymentSpec, available: dict[str, int]) -> list[str]:
    wanted = [t.lower() for t in deployment.gpu_types] if deployment.gpu_types else sorted(available)
    return [t for t in wanted if available.get(t, 0) > 0]


def _instances(packed: Any) -> list[dict[str, Any]]:
    if packed is None:
        return []
    return [instance.model_dump(mode="json") for instance in packed.instances]
