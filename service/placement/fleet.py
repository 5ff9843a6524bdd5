"""Fleet packing: put already-planned deployments (model, GPUs per instance, instance count, GPU type) on a fleet.

The goodput search that chooses each deployment's strategy stays outside; this module only packs. Without a
cluster the fleet is GPU counts by type. With a cluster, instances go first-fit-decreasing onto servers
(largest instances first, each on one server), each on the free GPUs where its checkpoint loads soonest, so
servers already holding a checkpoint are preferred; loads queue up as instances are added. A deployment is
placed whole or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from service.placement.cluster import Cluster, Degree, DTypeField, Name, TierKind
from service.placement.estimators import ClusterView, shard_bytes
from service.placement.optimizer import (
    PlacementContext,
    PlacementRequest,
    commit_option,
    rank_options,
    resolve_need,
    weights_fit_reason,
)
from service.planning.catalog import Catalog
from service.planning.specs import DType, PlanningError

MAX_DEPLOYMENTS = 1024
MAX_INSTANCES_PER_DEPLOYMENT = 4096


class FleetDeployment(BaseModel):
    """One deployment whose strategy is already chosen."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    name: Name
    model: Name = Field(description="catalog model name")
    gpu_type: Name
    gpus_per_instance: Degree
    instances: Annotated[int, Field(ge=1, le=MAX_INSTANCES_PER_DEPLOYMENT)]
    weight_dtype: DTypeField = DType.BF16
    tp: Degree | None = Field(default=None, description="tensor parallel degree; default gpus_per_instance / pp")
    pp: Degree = 1
    checkpoint: Name | None = None
    engine: Name = "vllm"

    @property
    def total_gpus(self) -> int:
        """GPUs of all instances."""
        return self.gpus_per_instance * self.instances

    def layout(self) -> tuple[int, int]:
        """(tp, pp) of one instance."""
        tp = self.tp if self.tp is not None else max(1, self.gpus_per_instance // self.pp)
        return tp, self.pp


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PackedInstance(_Out):
    """Where one instance goes (server and GPUs only when packing onto a cluster)."""

    server: str | None = None
    gpu_ids: list[int] = Field(default_factory=list)
    tier: TierKind | None = None
    load_s: float | None = None


class PackedDeployment(_Out):
    """A deployment placed whole."""

    name: str
    model: str
    gpu_type: str
    gpus_per_instance: int
    instances: list[PackedInstance]


class UnplacedDeployment(_Out):
    """A deployment that does not fit, and why."""

    name: str
    reason: str


class FleetPlan(_Out):
    """Packing of deployments onto a fleet."""

    placed: list[PackedDeployment]
    unplaced: list[UnplacedDeployment]
    gpus_available_by_type: dict[str, int]
    gpus_used_by_type: dict[str, int]


def _fit_reason(deployment: FleetDeployment, catalog: Catalog) -> str | None:
    """Why one instance's weights do not fit its GPUs (None when they fit or the GPU type is unknown)."""
    model = catalog.model(deployment.model)
    tp, pp = deployment.layout()
    if tp * pp > deployment.gpus_per_instance:
        raise PlanningError(
            f"deployment {deployment.name!r}: tp*pp = {tp * pp} exceeds its "
            f"{deployment.gpus_per_instance} GPUs per instance"
        )
    gpu = catalog.gpus.get(deployment.gpu_type.lower())
    if gpu is None:
        return None
    engine = catalog.engine(deployment.engine)
    shard = shard_bytes(model, weight_dtype=deployment.weight_dtype, tp=tp, pp=pp)
    return weights_fit_reason(shard, gpu=gpu, engine=engine, tp=tp, pp=pp, label=gpu.name)


def _ordered(deployments: Sequence[FleetDeployment], limit: int) -> list[FleetDeployment]:
    names = [d.name for d in deployments]
    if len(set(names)) != len(names):
        raise PlanningError("deployment names must be unique")
    if len(deployments) > limit:
        raise PlanningError(f"at most {limit} deployments (got {len(deployments)})")
    # Decreasing instance size, then total size: big items first leaves the small ones for the gaps.
    return sorted(deployments, key=lambda d: (-d.gpus_per_instance, -d.total_gpus, d.name))


def pack_fleet(
    deployments: Sequence[FleetDeployment],
    *,
    catalog: Catalog,
    gpus_by_type: Mapping[str, int] | None = None,
    cluster: Cluster | None = None,
    now_s: float = 0.0,
    max_deployments: int = MAX_DEPLOYMENTS,
) -> FleetPlan:
    """Pack deployments onto GPU counts by type, or onto the free GPUs of a cluster when one is given;
    ``max_deployments`` is the caller's own bound on the work (a fleet plan packs each option of a deployment)."""
    ordered = _ordered(deployments, max_deployments)
    if cluster is not None:
        view = ClusterView(cluster, now_s=now_s)
        return _pack(
            ordered,
            catalog=catalog,
            available=_free_by_type(view),
            place_one=lambda d, gpu_type: _place_on_view(view, d, gpu_type=gpu_type, catalog=catalog),
            left=lambda: _free_by_type(view),
        )
    if gpus_by_type is None:
        raise PlanningError("give the fleet as GPU counts by type or as a cluster")
    if any(count < 0 for count in gpus_by_type.values()):
        raise PlanningError("GPU counts must not be negative")
    available = {t.lower(): int(c) for t, c in gpus_by_type.items()}
    left = dict(available)
    return _pack(
        ordered,
        catalog=catalog,
        available=available,
        place_one=lambda d, gpu_type: _take_counts(left, d, gpu_type=gpu_type),
        left=lambda: left,
    )


def _pack(
    ordered: list[FleetDeployment],
    *,
    catalog: Catalog,
    available: dict[str, int],
    place_one: Callable[[FleetDeployment, str], list[PackedInstance] | str],
    left: Callable[[], Mapping[str, int]],
) -> FleetPlan:
    """Place each deployment whose weights fit with ``place_one`` (its instances, or why it does not fit);
    ``left`` gives the GPUs still free by type at the end."""
    placed: list[PackedDeployment] = []
    unplaced: list[UnplacedDeployment] = []
    for d in ordered:
        gpu_type = d.gpu_type.lower()
        reason = _fit_reason(d, catalog)
        outcome = place_one(d, gpu_type) if reason is None else reason
        if isinstance(outcome, str):
            unplaced.append(UnplacedDeployment(name=d.name, reason=outcome))
            continue
        placed.append(
            PackedDeployment(
                name=d.name,
                model=d.model,
                gpu_type=gpu_type,
                gpus_per_instance=d.gpus_per_instance,
                instances=outcome,
            )
        )
    remaining = left()
    used = {t: available[t] - remaining.get(t, 0) for t in available}
    return FleetPlan(placed=placed, unplaced=unplaced, gpus_available_by_type=available, gpus_used_by_type=used)


def _take_counts(left: dict[str, int], d: FleetDeployment, *, gpu_type: str) -> list[PackedInstance] | str:
    """Take all GPUs of the deployment from the counts left, or say why there are too few."""
    have = left.get(gpu_type, 0)
    if have < d.gpus_per_instance:
        return f"needs {d.gpus_per_instance} {gpu_type} GPUs per instance, only {have} left"
    if have < d.total_gpus:
        return (
            f"needs {d.total_gpus} {gpu_type} GPUs ({d.instances} instances x {d.gpus_per_instance}), only {have} left"
        )
    left[gpu_type] = have - d.total_gpus
    return [PackedInstance() for _ in range(d.instances)]


def _free_by_type(view: ClusterView) -> dict[str, int]:
    counts: dict[str, int] = {}
    for by_type in view.free.values():
        for gpu_type, ids in by_type.items():
            counts[gpu_type] = counts.get(gpu_type, 0) + len(ids)
    return counts


def _place_on_view(
    view: ClusterView, d: FleetDeployment, *, gpu_type: str, catalog: Catalog
) -> list[PackedInstance] | str:
    """Place all instances of the deployment on the view, or leave the view as it was and say why not."""
    tp, pp = d.layout()
    request = PlacementRequest(
        model=d.model,
        weight_dtype=d.weight_dtype,
        tp=tp,
        pp=pp,
        gpus=d.gpus_per_instance,
        gpu_type=gpu_type,
        allow_migration=False,
        checkpoint=d.checkpoint,
        engine=d.engine,
        max_candidates=1,
    )
    model = catalog.model(d.model)
    need = resolve_need(request, model=model)
    ctx = PlacementContext(catalog=catalog, engine=catalog.engine(request.engine))
    saved = view.snapshot()
    instances: list[PackedInstance] = []
    for index in range(d.instances):
        best, _ = rank_options(view, ctx=ctx, request=request, need=need, keep=1)
        if not best:
            most = max((len(f.get(gpu_type, ())) for f in view.free.values()), default=0)
            view.restore(saved)
            return (
                f"needs {d.gpus_per_instance} {gpu_type} GPUs per instance on one server; only {index} of its "
                f"{d.instances} instances fit (the most free on any server is then {most}), and a deployment is "
                "placed whole or not at all: none placed"
            )
        option = best[0]
        commit_option(view, option=option)
        instances.append(
            PackedInstance(server=option.server, gpu_ids=option.gpu_ids, tier=option.load.tier, load_s=option.startup_s)
        )
    return instances
