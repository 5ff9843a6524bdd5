"""Placement: where the next instances of a model start soonest, with free GPUs now or by freeing others.

Every server gets its options priced on one timeline (see ``estimators``): A, free GPUs now, costing the load
from the server's fastest tier behind its loading queue; and, when the server lacks free GPUs, ways to free
them: stopping instances that are only kept alive (idle), waiting for requests whose remaining tokens are
known, one migration, or several. Each way frees the GPUs at some time F; the load then either starts once
they are free (``max(queue, F) + transfer``) or, when the plan stages the checkpoint into host memory first
(DRAM room permitting), overlaps them (``max(queue + staging, F) + host-to-GPU copy``). Options are compared
on startup latency plus the harm (the pause each migrated request sees at handover; for a stopped idle instance,
the reload its next request would need within its keep-alive, when it states its request rate); the
candidate reports the breakdown. None of these beats A's load on the same server, so the others are priced
only while that lower bound can still enter the ranking.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from service.placement.cluster import (
    Cluster,
    ClusterError,
    Degree,
    DTypeField,
    HeldLoad,
    Hold,
    LoadingTask,
    Name,
    Reservation,
    RunningInstance,
    TierKind,
    validated,
)
from service.placement.estimators import (
    ClusterView,
    EstimatorOptions,
    LoadEstimate,
    MigrationEstimate,
    RecomputeCost,
    ServerStatic,
    checkpoint_bytes,
    cluster_static,
    derived_recompute_cost,
    migration_timeline,
    recompute_cost,
    remaining_s,
    shard_bytes,
)
from service.planning.catalog import Catalog
from service.planning.specs import DType, EngineSpec, GpuSpec, ModelSpec, PlanningError
from service.planning.stepcost import ParallelLayout, validate_layout

GIB = 1024.0**3
MAX_INSTANCES_PER_REQUEST = 64


class PlacementRequest(BaseModel):
    """Where should ``instances`` new instances of a model start?"""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    model: Name = Field(description="catalog model name")
    weight_dtype: DTypeField = DType.BF16
    tp: Degree = 1
    pp: Degree = 1
    gpus: Degree | None = Field(default=None, description="GPUs per instance; default tp * pp")
    instances: Annotated[int, Field(ge=1, le=MAX_INSTANCES_PER_REQUEST)] = 1
    allow_migration: bool = True
    gpu_type: Name | None = Field(default=None, description="only GPUs of this catalog type")
    engine: Name = Field(default="vllm", description="engine whose prefill cost prices KV recomputation")
    checkpoint: Name | None = Field(default=None, description="checkpoint name in the tiers; default: model")
    max_candidates: Annotated[int, Field(ge=1, le=256)] = 8


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoadBreakdown(_Out):
    """Queue wait and transfer of one checkpoint load."""

    tier: TierKind
    queue_wait_s: float
    transfer_s: float
    bandwidth_bytes_per_s: float
    checkpoint_bytes: float
    total_s: float

    @classmethod
    def of(cls, load: LoadEstimate) -> LoadBreakdown:
        """From the estimator's dataclass."""
        return cls(
            tier=load.tier,
            queue_wait_s=load.queue_wait_s,
            transfer_s=load.transfer_s,
            bandwidth_bytes_per_s=load.bandwidth_bytes_per_s,
            checkpoint_bytes=load.checkpoint_bytes,
            total_s=load.total_s,
        )


class PlannedMigration(_Out):
    """A running instance the decision moves away, where to, and what it costs."""

    instance_id: str
    checkpoint: str
    from_server: str
    to_server: str
    to_gpu_ids: list[int]
    load: LoadBreakdown
    tokens: int
    recompute_s: float
    recompute_source: str
    finish_s: float
    pause_s: float = Field(default=0.0, description="interruption the migrated request sees at handover")


class Candidate(_Out):
    """One way to start an instance: server, GPUs, the tier it loads from and the estimated startup latency."""

    server: str
    gpu_type: str
    gpu_ids: list[int]
    tier: TierKind
    startup_latency_s: float
    load: LoadBreakdown
    migration_s: float = Field(description="when the migrations free the GPUs (0 without migration)")
    migrations: list[PlannedMigration]
    option: str = Field(
        default="free", description="free | stop-idle | wait | migrate | migrate-several, with -staged when staging"
    )
    gpus_free_s: float = Field(default=0.0, description="when the GPUs the instance needs are free")
    staged_from: TierKind | None = Field(
        default=None, description="the checkpoint is first read into host memory from this tier"
    )
    staging_s: float = Field(default=0.0, description="time of that read (behind the loading queue)")
    harm_s: float = Field(
        default=0.0,
        description="pause the migrated requests see at handover, summed, plus the expected reload the stopped idle "
        "instances' next requests would need",
    )
    score_s: float = Field(default=0.0, description="what the ranking compares: startup latency plus harm")
    stopped_instances: list[str] = Field(default_factory=list, description="idle instances stopped for the GPUs")
    awaited_instances: list[str] = Field(default_factory=list, description="instances whose requests finish first")


class Exclusion(_Out):
    """A server that cannot host the instance, and why."""

    server: str
    reason: str


class PlacementDecision(_Out):
    """The chosen placements (one per instance, chosen greedily), the ranked options for the first, exclusions."""

    model: str
    checkpoint: str
    weight_dtype: DType
    gpus_per_instance: int
    requested_instances: int
    placements: list[Candidate]
    candidates: list[Candidate]
    excluded: list[Exclusion]
    unplaced_reason: str | None = None


@dataclass(slots=True)
class PlacementOption:
    startup_s: float
    server: str
    gpu_type: str
    gpu_ids: list[int]
    load: LoadEstimate
    migrations: tuple[MigrationEstimate, ...] = ()
    gpus_free_s: float = 0.0
    staged_from: TierKind | None = None
    staging_s: float = 0.0
    harm_s: float = 0.0
    stopped: tuple[str, ...] = ()
    awaited: tuple[str, ...] = ()
    kind: str = "free"
    score_s: float = -1.0

    def __post_init__(self) -> None:
        if self.score_s < 0:
            self.score_s = self.startup_s + self.harm_s

    @property
    def migration_s(self) -> float:
        """When the migrations free the GPUs (0 without migration)."""
        return max((m.finish_s for m in self.migrations), default=0.0)

    @property
    def loader_busy_s(self) -> float:
        """When the server's loader is free again after this option's load."""
        if self.staged_from is not None:
            return self.load.queue_wait_s + self.staging_s
        return max(self.load.queue_wait_s, self.gpus_free_s) + self.load.transfer_s

    def sort_key(self) -> tuple[float, int, int, str]:
        """Lowest score first, then fewer migrations, fewer stopped instances, then server name."""
        return (self.score_s, len(self.migrations), len(self.stopped), self.server)

    def to_candidate(self) -> Candidate:
        """The output model of this option."""
        return Candidate(
            server=self.server,
            gpu_type=self.gpu_type,
            gpu_ids=self.gpu_ids,
            tier=self.load.tier,
            startup_latency_s=self.startup_s,
            load=LoadBreakdown.of(self.load),
            migration_s=self.migration_s,
            migrations=[
                PlannedMigration(
                    instance_id=m.instance_id,
                    checkpoint=m.checkpoint,
                    from_server=m.from_server,
                    to_server=m.to_server,
                    to_gpu_ids=list(m.to_gpu_ids),
                    load=LoadBreakdown.of(m.load),
                    tokens=m.tokens,
                    recompute_s=m.recompute_s,
                    recompute_source=m.recompute_source,
                    finish_s=m.finish_s,
                    pause_s=m.pause_s,
                )
                for m in self.migrations
            ],
            option=self.kind,
            gpus_free_s=self.gpus_free_s,
            staged_from=self.staged_from,
            staging_s=self.staging_s,
            harm_s=self.harm_s,
            score_s=self.score_s,
            stopped_instances=list(self.stopped),
            awaited_instances=list(self.awaited),
        )


@dataclass(frozen=True, slots=True)
class InstanceNeed:
    """What one instance of the requested model needs."""

    checkpoint: str
    checkpoint_bytes: float
    shard_bytes: float
    gpus: int
    gpu_type: str | None

    @classmethod
    def of(
        cls,
        model: ModelSpec,
        *,
        checkpoint: str,
        weight_dtype: DType,
        tp: int,
        pp: int,
        gpus: int,
        gpu_type: str | None,
    ) -> InstanceNeed:
        """The need of one instance of ``model`` in that dtype and layout."""
        return cls(
            checkpoint=checkpoint,
            checkpoint_bytes=checkpoint_bytes(model, weight_dtype=weight_dtype),
            shard_bytes=shard_bytes(model, weight_dtype=weight_dtype, tp=tp, pp=pp),
            gpus=gpus,
            gpu_type=gpu_type,
        )


def weights_fit_reason(shard: float, *, gpu: GpuSpec, engine: EngineSpec, tp: int, pp: int, label: str) -> str | None:
    """Why a shard of ``shard`` bytes per GPU does not fit the memory the engine may use on ``gpu`` (None when it
    fits); ``label`` names the GPU type in the message."""
    usable = gpu.memory_bytes * engine.gpu_memory_fraction
    if shard < usable:
        return None
    return (
        f"{shard / GIB:.1f} GiB of weights per GPU at tp={tp} pp={pp} exceed the {usable / GIB:.1f} GiB usable on "
        f"{label}"
    )


@dataclass(frozen=True, slots=True)
class MovableInstance:
    """A running instance priced for migration."""

    instance: RunningInstance
    gpu_type: str
    need: InstanceNeed
    recompute: RecomputeCost


@dataclass(slots=True)
class PlacementContext:
    """Per-call caches: catalog lookups, instance pricing, destination rankings."""

    catalog: Catalog
    engine: EngineSpec
    fit_reasons: dict[str, str | None] = field(default_factory=dict)
    movables: dict[str, MovableInstance | None] = field(default_factory=dict)
    priced: dict[str, tuple[Catalog, MovableInstance | None]] | None = None
    destinations: dict[tuple[str, float, int, str], list[tuple[float, str, TierKind, float]]] = field(
        default_factory=dict
    )
    solo_s: dict[str, float] = field(default_factory=dict)
    rooms: dict[tuple[str, int], list[str]] = field(default_factory=dict)

    def view_changed(self) -> None:
        """Forget what depends on the view (destinations, migration costs): a choice was committed to it."""
        self.destinations.clear()
        self.solo_s.clear()
        self.rooms.clear()

    def room_for(self, view: ClusterView, *, gpu_type: str, gpus: int) -> list[str]:
        """Servers with at least ``gpus`` free GPUs of that type; valid until the view changes."""
        key = (gpu_type, gpus)
        names = self.rooms.get(key)
        if names is None:
            names = [name for name, by_type in view.free.items() if len(by_type.get(gpu_type, ())) >= gpus]
            self.rooms[key] = names
        return names

    def fit_reason(self, gpu_type: str, *, need: InstanceNeed, request: PlacementRequest) -> str | None:
        """Why the weights do not fit on that GPU type (None when they fit or the type is unknown)."""
        if gpu_type not in self.fit_reasons:
            reason = None
            gpu = self.catalog.gpus.get(gpu_type.lower())
            if gpu is not None:
                reason = weights_fit_reason(
                    need.shard_bytes, gpu=gpu, engine=self.engine, tp=request.tp, pp=request.pp, label=gpu_type
                )
            self.fit_reasons[gpu_type] = reason
        return self.fit_reasons[gpu_type]

    def movable(self, view: ClusterView, *, inst: RunningInstance) -> MovableInstance | None:
        """Price an instance for migration; None when its model or GPU is not in the catalog. The price depends
        only on the instance and the catalog, so it is kept with the parsed cluster for later calls too."""
        if inst.id not in self.movables:
            if self.priced is None:
                self.priced = view.cluster.cached("placement.priced", _new_prices)
            hit = self.priced.get(inst.id)
            if hit is None or hit[0] is not self.catalog:
                hit = (self.catalog, self._price(view, inst))
                self.priced[inst.id] = hit
            self.movables[inst.id] = hit[1]
        return self.movables[inst.id]

    def _price(self, view: ClusterView, inst: RunningInstance) -> MovableInstance | None:
        gpu_type = view.static.gpu_type_of_instance[inst.id]
        try:
            model = self.catalog.model(inst.model)
            gpu = self.catalog.gpu(gpu_type)
            engine = self.catalog.engine(inst.engine)
            derived = derived_recompute_cost(
                model,
                gpu=gpu,
                engine=engine,
                calibration=self.catalog.calibration_for(gpu),
                weight_dtype=inst.weight_dtype,
                tp=inst.tp,
                pp=inst.pp,
            )
        except PlanningError:
            return None
        learned = view.static.learned_migrations.get((inst.model, gpu_type, inst.tp))
        need = InstanceNeed.of(
            model,
            checkpoint=inst.checkpoint_name,
            weight_dtype=inst.weight_dtype,
            tp=inst.tp,
            pp=inst.pp,
            gpus=len(inst.gpu_ids),
            gpu_type=gpu_type,
        )
        return MovableInstance(inst, gpu_type, need, recompute_cost(learned, derived=derived))

    def destinations_for(self, view: ClusterView, *, need: InstanceNeed) -> list[tuple[float, str, TierKind, float]]:
        """Servers with room for ``need`` as (load total, server, tier, transfer), soonest first; valid until
        the view changes."""
        assert need.gpu_type is not None
        key = (need.checkpoint, need.shard_bytes, need.gpus, need.gpu_type)
        ranked = self.destinations.get(key)
        if ranked is None:
            ranked = []
            for name in self.room_for(view, gpu_type=need.gpu_type, gpus=need.gpus):
                transfer_s, tier = view.transfer(
                    name,
                    checkpoint=need.checkpoint,
                    checkpoint_bytes=need.checkpoint_bytes,
                    shard_bytes=need.shard_bytes,
                )
                ranked.append((view.queue_wait_s[name] + transfer_s, name, tier, transfer_s))
            ranked.sort()
            self.destinations[key] = ranked
        return ranked


def _new_prices(_: Cluster) -> dict[str, tuple[Catalog, MovableInstance | None]]:
    return {}


def resolve_need(request: PlacementRequest, *, model: ModelSpec) -> InstanceNeed:
    """What one instance of the request needs; PlanningError when the layout does not suit the model."""
    validate_layout(model, ParallelLayout(request.tp, request.pp))
    gpus = request.gpus if request.gpus is not None else request.tp * request.pp
    if gpus < request.tp * request.pp:
        raise PlanningError(f"gpus={gpus} is fewer than tp*pp = {request.tp * request.pp}")
    return InstanceNeed.of(
        model,
        checkpoint=request.checkpoint or request.model,
        weight_dtype=request.weight_dtype,
        tp=request.tp,
        pp=request.pp,
        gpus=gpus,
        gpu_type=request.gpu_type,
    )


@dataclass(frozen=True, slots=True)
class _Release:
    """One way to free GPUs on a busy server: what it does and when the GPUs are free."""

    kind: str
    gpus_free_s: float
    gpu_ids: tuple[int, ...]
    migrations: tuple[MigrationEstimate, ...] = ()
    awaited: tuple[str, ...] = ()
    harm_s: float = 0.0
    stopped: tuple[str, ...] = ()


def _moves(
    view: ClusterView,
    ctx: PlacementContext,
    st: ServerStatic,
    movables: Sequence[MovableInstance],
    *,
    short: int,
) -> tuple[MigrationEstimate, ...] | None:
    """Migrate ``movables`` in order, each to its soonest destination with room, until ``short`` GPUs are freed;
    None when the destinations run out. Loads sent to one destination queue behind each other."""
    used: dict[str, int] = {}
    extra_wait_s: dict[str, float] = {}
    chosen: list[MigrationEstimate] = []
    freed = 0
    for m in movables:
        if freed >= short:
            break
        assert m.need.gpu_type is not None
        for _, dest, tier, transfer_s in ctx.destinations_for(view, need=m.need):
            room = view.free[dest][m.need.gpu_type]
            start = used.get(dest, 0)
            if dest == st.name or len(room) - start < m.need.gpus:
                continue
            dest_load = view.estimate(dest, tier=tier, transfer_s=transfer_s, checkpoint_bytes=m.need.checkpoint_bytes)
            if dest in extra_wait_s:
                dest_load = replace(dest_load, queue_wait_s=dest_load.queue_wait_s + extra_wait_s[dest])
            used[dest] = start + m.need.gpus
            extra_wait_s[dest] = extra_wait_s.get(dest, 0.0) + dest_load.transfer_s
            timeline = migration_timeline(m.instance, dest_load_s=dest_load.total_s, recompute=m.recompute)
            chosen.append(
                MigrationEstimate(
                    instance_id=m.instance.id,
                    checkpoint=m.need.checkpoint,
                    from_server=st.name,
                    to_server=dest,
                    to_gpu_ids=tuple(room[start : start + m.need.gpus]),
                    load=dest_load,
                    tokens=timeline.tokens,
                    recompute_s=timeline.recompute_s,
                    recompute_source=m.recompute.source,
                    pause_s=timeline.pause_s,
                    gpus_free_s=timeline.gpus_free_s,
                )
            )
            freed += len(m.instance.gpu_ids)
            break
        else:
            return None
    return tuple(chosen) if freed >= short else None


def _solo_cost_s(view: ClusterView, ctx: PlacementContext, st: ServerStatic, m: MovableInstance) -> float:
    """When moving this instance alone frees its GPUs (plus its pause when ranking on harm)."""
    # Kept until the view changes; an instance is on one server, so its id is the key.
    cost = ctx.solo_s.get(m.instance.id)
    if cost is None:
        # What _moves(..., [m], short=1) would price, without building its records: the soonest other server
        # with room (every ranked server has room for the instance), then the migration's timeline.
        # The loader charge is left out here: it orders the movers; the option's score carries it.
        cost = float("inf")
        for total_s, dest, _, _ in ctx.destinations_for(view, need=m.need):
            if dest != st.name:
                timeline = migration_timeline(m.instance, dest_load_s=total_s, recompute=m.recompute)
                cost = timeline.gpus_free_s + (timeline.pause_s if view.options.harm_aware else 0.0)
                break
        ctx.solo_s[m.instance.id] = cost
    return cost


def _releases(
    view: ClusterView,
    ctx: PlacementContext,
    st: ServerStatic,
    gpu_type: str,
    free: list[int],
    need: InstanceNeed,
) -> list[_Release] | str:
    """Ways to free enough GPUs on a server that lacks them (stop idle, wait, one migration, several); a reason
    when there is none."""
    held = view.reserved.get(st.name, set())
    idle: list[RunningInstance] = []
    waitable: list[tuple[float, RunningInstance]] = []
    movable: list[MovableInstance] = []
    for inst in st.instances:
        if inst.id in view.moved or view.static.gpu_type_of_instance[inst.id] != gpu_type:
            continue
        if held and not held.isdisjoint(inst.gpu_ids):
            continue
        if inst.idle_since_s is not None:
            idle.append(inst)
            continue
        left_s = remaining_s(inst)
        if left_s is not None:
            waitable.append((left_s, inst))
        priced = ctx.movable(view, inst=inst)
        if priced is not None:
            movable.append(priced)
    # Idle instances go first: stopping them costs no running work anything, only the next request that would
    # have found them warm (least of that first, then longest idle first).
    harm_aware = view.options.harm_aware
    stop_harm_s = {i.id: _stop_harm_s(view, ctx, st, i) if harm_aware else 0.0 for i in idle}
    idle.sort(key=lambda i: (stop_harm_s[i.id], i.idle_since_s or 0.0, i.id))
    ids = list(free)
    stopped: list[str] = []
    for inst in idle:
        if len(ids) >= need.gpus:
            break
        stopped.append(inst.id)
        ids.extend(inst.gpu_ids)
    view_stops = tuple(stopped)
    if len(ids) >= need.gpus:
        harm_s = sum(stop_harm_s[i] for i in view_stops)
        return [_Release("stop-idle", 0.0, tuple(ids), stopped=view_stops, harm_s=harm_s)]
    short = need.gpus - len(ids)
    out: list[_Release] = []
    waitable.sort(key=lambda item: (item[0], item[1].id))
    awaited: list[str] = []
    waited_ids = list(ids)
    for left_s, inst in waitable:
        awaited.append(inst.id)
        waited_ids.extend(inst.gpu_ids)
        if len(waited_ids) >= need.gpus:
            out.append(_Release("wait", left_s, tuple(waited_ids), awaited=tuple(awaited)))
            break
    limit = view.options.max_migrations
    by_id = {m.instance.id: m for m in movable}
    # Only instances that some other server has room for can move (a full cluster prices no migration).
    movers = []
    for m in movable:
        assert m.need.gpu_type is not None
        rooms = ctx.room_for(view, gpu_type=m.need.gpu_type, gpus=m.need.gpus)
        if len(rooms) > 1 or (rooms and rooms[0] != st.name):
            movers.append(m)
    if limit is None or limit >= 1:
        solo = sorted((_solo_cost_s(view, ctx, st, m), m.instance.id) for m in movers)
        singles = [(cost, iid) for cost, iid in solo if cost < float("inf") and by_id[iid].need.gpus >= short]
        if singles:
            moves = _moves(view, ctx, st, [by_id[singles[0][1]]], short=short)
            if moves is not None:
                out.append(
                    _release_of(
                        "migrate", ids, moves, by_id, harm_aware=harm_aware, loader_pressure=view.loader_pressure
                    )
                )
        if (limit is None or limit > 1) and len(movers) > 1:
            # Cheapest GPUs first: a large instance that moves as fast as a small one frees more.
            ranked = sorted(movers, key=lambda m: (_solo_cost_s(view, ctx, st, m) / m.need.gpus, m.instance.id))
            moves = _moves(view, ctx, st, ranked, short=short)
            if moves is not None and len(moves) > 1 and (limit is None or len(moves) <= limit):
                out.append(
                    _release_of(
                        "migrate-several",
                        ids,
                        moves,
                        by_id,
                        harm_aware=harm_aware,
                        loader_pressure=view.loader_pressure,
                    )
                )
    if not out:
        freeable = sum(m.need.gpus for m in movable)
        if len(ids) + freeable < need.gpus:
            return (
                f"needs {need.gpus} free {gpu_type} GPUs, has {len(free)}; stopping {len(view_stops)} idle and "
                f"moving its {len(movable)} movable instances would free only {len(ids) - len(free) + freeable} more"
            )
        what = "more than one migration" if limit is not None and limit < 2 else "other servers lack room"
        return f"needs {need.gpus} free {gpu_type} GPUs, has {len(free)}; freeing them needs {what}"
    return [replace(r, stopped=view_stops) for r in out]


def _stop_harm_s(view: ClusterView, ctx: PlacementContext, st: ServerStatic, inst: RunningInstance) -> float:
    """Expected startup latency that stopping an idle instance costs: the chance that a request for it arrives
    before its keep-alive ends, times reloading it on its server (0 when the instance does not state its rate)."""
    if inst.requests_per_s is None or inst.keep_alive_s is None or inst.idle_since_s is None:
        return 0.0
    left_s = inst.keep_alive_s - (view.now_s - inst.idle_since_s)
    priced = ctx.movable(view, inst=inst)
    if left_s <= 0 or inst.requests_per_s <= 0 or priced is None:
        return 0.0
    transfer_s, _ = view.transfer(
        st.name,
        checkpoint=priced.need.checkpoint,
        checkpoint_bytes=priced.need.checkpoint_bytes,
        shard_bytes=priced.need.shard_bytes,
    )
    return -math.expm1(-inst.requests_per_s * left_s) * transfer_s


def _release_of(
    kind: str,
    ids: list[int],
    moves: tuple[MigrationEstimate, ...],
    by_id: dict[str, MovableInstance],
    *,
    harm_aware: bool,
    loader_pressure: float,
) -> _Release:
    freed = [g for m in moves for g in by_id[m.instance_id].instance.gpu_ids]
    free_s = max(m.finish_s for m in moves)
    # Harm: the pause the migrated requests see, and the loader time each destination load takes from the cold
    # starts to come, in proportion to how busy the loaders are.
    harm = sum(m.pause_s + loader_pressure * m.load.transfer_s for m in moves) if harm_aware else 0.0
    return _Release(kind, free_s, (*ids, *sorted(freed)), migrations=moves, harm_s=harm)


def _freeing_options(
    view: ClusterView,
    ctx: PlacementContext,
    st: ServerStatic,
    gpu_type: str,
    free: list[int],
    load: LoadEstimate,
    need: InstanceNeed,
) -> list[PlacementOption] | str:
    """Options on a server without enough free GPUs: each way to free them, loading directly once they are free
    or staging the checkpoint into host memory meanwhile, whichever starts sooner."""
    releases = _releases(view, ctx, st, gpu_type, free, need)
    if isinstance(releases, str):
        return releases
    staging = (
        view.staging(st.name, checkpoint=need.checkpoint, checkpoint_bytes=need.checkpoint_bytes)
        if view.options.allow_staging
        else None
    )
    gpu_stage_s = view.gpu_stage_s(st.name, shard_bytes=need.shard_bytes)
    options: list[PlacementOption] = []
    for r in releases:
        q = load.queue_wait_s
        startup_s = max(q, r.gpus_free_s) + load.transfer_s
        chosen_load, staged_from, staging_s, kind = load, None, 0.0, r.kind
        if staging is not None and r.gpus_free_s > q:
            staged_s = max(q + staging[0], r.gpus_free_s) + gpu_stage_s
            if staged_s < startup_s:
                startup_s, staged_from, staging_s, kind = staged_s, staging[1], staging[0], f"{r.kind}-staged"
                chosen_load = replace(
                    load,
                    tier=staging[1],
                    transfer_s=gpu_stage_s,
                    bandwidth_bytes_per_s=need.checkpoint_bytes / max(staging[0], 1e-12),
                )
        gpu_ids = sorted(r.gpu_ids[: need.gpus])
        options.append(
            PlacementOption(
                startup_s,
                st.name,
                gpu_type,
                gpu_ids,
                chosen_load,
                r.migrations,
                gpus_free_s=r.gpus_free_s,
                staged_from=staged_from,
                staging_s=staging_s,
                harm_s=r.harm_s,
                stopped=r.stopped,
                awaited=r.awaited,
                kind=kind,
            )
        )
    return options


def rank_options(
    view: ClusterView,
    *,
    ctx: PlacementContext,
    request: PlacementRequest,
    need: InstanceNeed,
    keep: int,
) -> tuple[list[PlacementOption], list[Exclusion]]:
    """Best options (at most ``keep``, ranked) for one instance, and the servers that cannot host it."""
    options: list[PlacementOption] = []
    reasons: dict[str, list[str]] = {}
    deferred: list[tuple[float, ServerStatic, str, list[int], LoadEstimate]] = []
    hosted: set[str] = set()
    for st in view.static.servers:
        types = st.gpu_ids_by_type
        if need.gpu_type is not None and need.gpu_type not in types:
            reasons[st.name] = [f"no {need.gpu_type} GPUs (has {', '.join(sorted(types))})"]
            continue
        for gpu_type, all_ids in types.items():
            if need.gpu_type is not None and gpu_type != need.gpu_type:
                continue
            fit = ctx.fit_reason(gpu_type, need=need, request=request)
            if fit is not None:
                reasons.setdefault(st.name, []).append(fit)
                continue
            if len(all_ids) < need.gpus:
                reasons.setdefault(st.name, []).append(
                    f"has only {len(all_ids)} {gpu_type} GPUs, an instance needs {need.gpus}"
                )
                continue
            free = view.free[st.name][gpu_type]
            load = view.load(
                st.name,
                checkpoint=need.checkpoint,
                checkpoint_bytes=need.checkpoint_bytes,
                shard_bytes=need.shard_bytes,
            )
            if len(free) >= need.gpus:
                options.append(PlacementOption(load.total_s, st.name, gpu_type, free[: need.gpus], load))
                hosted.add(st.name)
            elif not request.allow_migration:
                reserved = len(view.reserved.get(st.name, ()))
                held = f" ({reserved} reserved)" if reserved else ""
                reasons.setdefault(st.name, []).append(
                    f"needs {need.gpus} free {gpu_type} GPUs, has {len(free)}{held}; migration not allowed"
                )
            else:
                deferred.append((load.total_s, st, gpu_type, free, load))
    options.sort(key=PlacementOption.sort_key)
    deferred.sort(key=lambda item: (item[0], item[1].name))
    for lower_bound_s, st, gpu_type, free, load in deferred:
        bound_s = options[keep - 1].score_s if len(options) >= keep else float("inf")
        if lower_bound_s >= bound_s:
            # Freeing GPUs starts no earlier than the load; the ranking is already full of better options.
            reasons.setdefault(st.name, []).append(
                f"needs {need.gpus} free {gpu_type} GPUs, has {len(free)}; freeing them it would start no "
                f"sooner than {lower_bound_s:.2f} s, slower than the {keep} best options"
            )
            continue
        priced = _freeing_options(view, ctx, st, gpu_type, free, load, need)
        if isinstance(priced, str):
            reasons.setdefault(st.name, []).append(priced)
            continue
        hosted.add(st.name)
        # One option per server in the ranking: its best way to free the GPUs.
        bisect.insort(options, min(priced, key=PlacementOption.sort_key), key=PlacementOption.sort_key)
    excluded = [Exclusion(server=name, reason="; ".join(r)) for name, r in reasons.items() if name not in hosted]
    return options[:keep], excluded


def commit_option(view: ClusterView, *, option: PlacementOption) -> None:
    """Apply a chosen option to the working view: GPUs taken, loads queued, instances moved."""
    view.take(option.server, gpu_ids=option.gpu_ids)
    view.enqueue(option.server, load=option.load, loader_busy_s=option.loader_busy_s)
    view.moved.update(option.stopped)
    view.moved.update(option.awaited)
    for m in option.migrations:
        view.take(m.to_server, gpu_ids=list(m.to_gpu_ids))
        view.enqueue(m.to_server, load=m.load)
        view.moved.add(m.instance_id)


def place(
    cluster: Cluster,
    request: PlacementRequest,
    *,
    now_s: float,
    catalog: Catalog,
    model_spec: ModelSpec | None = None,
    options: EstimatorOptions | None = None,
    holds: Sequence[Hold] = (),
) -> PlacementDecision:
    """Choose servers and GPUs for ``request.instances`` new instances, soonest startup first.

    Instances are placed greedily, each on a working copy that already holds the previous choices (GPUs taken,
    loads queued, instances moved), so two instances never share GPUs. Raises PlanningError on a bad request.
    """
    model = model_spec or catalog.model(request.model)
    engine = catalog.engine(request.engine)
    need = resolve_need(request, model=model)
    view = ClusterView(cluster, now_s=now_s, options=options, holds=holds)
    ctx = PlacementContext(catalog=catalog, engine=engine)
    placements: list[Candidate] = []
    ranked: list[Candidate] = []
    excluded: list[Exclusion] = []
    unplaced: str | None = None
    for index in range(request.instances):
        ctx.view_changed()
        keep = request.max_candidates if index == 0 else 1
        best, excluded_now = rank_options(view, ctx=ctx, request=request, need=need, keep=keep)
        if index == 0:
            ranked = [o.to_candidate() for o in best]
            excluded = excluded_now
        if not best:
            what = f"{need.gpus} {need.gpu_type or ''} GPUs".replace("  ", " ")
            unplaced = (
                f"no server can host an instance on {what} (see excluded)"
                if index == 0
                else f"placed {index} of {request.instances} instances; no server has room for more"
            )
            break
        commit_option(view, option=best[0])
        placements.append(ranked[0] if index == 0 else best[0].to_candidate())
    return PlacementDecision(
        model=request.model,
        checkpoint=need.checkpoint,
        weight_dtype=request.weight_dtype,
        gpus_per_instance=need.gpus,
        requested_instances=request.instances,
        placements=placements,
        candidates=ranked,
        excluded=excluded,
        unplaced_reason=unplaced,
    )


def _reservation_id(existing: set[str], *parts: object) -> str:
    """A deterministic id for the same inputs, unique among ``existing``."""
    salt = 0
    while True:
        digest = hashlib.blake2b(repr((*parts, salt)).encode(), digest_size=6).hexdigest()
        rid = f"rsv-{digest}"
        if rid not in existing:
            existing.add(rid)
            return rid
        salt += 1


def hold_decision(
    cluster: Cluster,
    decision: PlacementDecision,
    *,
    now_s: float,
    ttl_s: float,
    holds: Sequence[Hold] = (),
) -> list[Hold]:
    """What the decision uses (its GPUs, migration destinations and queued loads) as holds until now + ttl.

    Raises ClusterError when the decision no longer fits the cluster and the holds already taken."""
    if ttl_s <= 0:
        raise ClusterError(f"ttl_s must be positive (got {ttl_s:g})")
    static = cluster_static(cluster)
    reservations = [*cluster.reservations, *(h.reservation for h in holds)]
    active = {r.id for r in reservations if r.active(now_s)}
    # GPUs held by live reservations, then also those this decision takes, per server.
    used: dict[str, set[int]] = {}
    for r in reservations:
        if r.id in active:
            used.setdefault(r.server, set()).update(r.gpu_ids)
    ids = {r.id for r in reservations}
    instances = static.instance_by_id
    new: list[Hold] = []
    expires_at_s = now_s + ttl_s

    def hold(
        server: str,
        gpu_ids: list[int],
        checkpoint: str,
        load: LoadBreakdown,
        movable: Iterable[int],
        migrating_instance: str | None = None,
        *,
        starts_in_s: float = 0.0,
        staged: bool = False,
    ) -> None:
        """Reserve the GPUs for the checkpoint (a new reservation) and queue its load on the server."""
        st = static.by_name.get(server)
        if st is None:
            raise ClusterError(f"decision uses unknown server {server!r}")
        busy = used.setdefault(server, set())
        allowed = {g for ids_ in st.idle_by_type.values() for g in ids_ if g not in busy} | set(movable)
        taken = [g for g in gpu_ids if g not in allowed]
        if taken:
            raise ClusterError(f"GPUs {taken} on {server!r} are no longer free; place again")
        busy.update(gpu_ids)
        rid = _reservation_id(ids, server, tuple(gpu_ids), checkpoint, now_s)
        task = LoadingTask(
            model=checkpoint,
            tier=load.tier,
            remaining_bytes=load.checkpoint_bytes,
            bandwidth_bytes_per_s=load.bandwidth_bytes_per_s,
            reservation_id=rid,
            starts_in_s=starts_in_s,
            staged=staged,
        )
        reservation = Reservation(
            id=rid,
            server=server,
            gpu_ids=list(gpu_ids),
            model=checkpoint,
            expires_at_s=expires_at_s,
            migrating_instance=migrating_instance,
        )
        new.append(Hold(reservation=reservation, loads=[HeldLoad(server=server, task=task)]))

    for placement in decision.placements:
        leaving: list[int] = []
        for m in placement.migrations:
            inst = instances.get(m.instance_id)
            if inst is None or inst.server != placement.server:
                raise ClusterError(f"instance {m.instance_id!r} is no longer on {placement.server!r}; place again")
            leaving.extend(inst.gpu_ids)
            hold(m.to_server, m.to_gpu_ids, m.checkpoint, m.load, (), migrating_instance=m.instance_id)
        for iid in (*placement.stopped_instances, *placement.awaited_instances):
            inst = instances.get(iid)
            if inst is None or inst.server != placement.server:
                raise ClusterError(f"instance {iid!r} is no longer on {placement.server!r}; place again")
            leaving.extend(inst.gpu_ids)
        staged = placement.staged_from is not None
        if staged:
            load = placement.load.model_copy(
                update={"bandwidth_bytes_per_s": placement.load.checkpoint_bytes / max(placement.staging_s, 1e-9)}
            )
        else:
            load = placement.load
        hold(
            placement.server,
            placement.gpu_ids,
            decision.checkpoint,
            load,
            leaving,
            starts_in_s=0.0 if staged else placement.gpus_free_s,
            staged=staged,
        )
    return new


def with_holds(cluster: Cluster, holds: Sequence[Hold], *, now_s: float) -> Cluster:
    """The cluster with the holds written into it (reservations and queued loads); expired ones dropped."""
    kept = [r for r in cluster.reservations if r.active(now_s)]
    kept_ids = {r.id for r in kept}
    live = [h for h in holds if h.reservation.active(now_s)]
    kept_ids |= {h.reservation.id for h in live}
    queues: dict[str, list[LoadingTask]] = {
        s.name: [t for t in s.loading_queue if t.reservation_id is None or t.reservation_id in kept_ids]
        for s in cluster.servers
    }
    for h in live:
        for load in h.loads:
            if load.server not in queues:
                raise ClusterError(f"a reservation uses unknown server {load.server!r}")
            queues[load.server].append(load.task)
    servers = [s.model_copy(update={"loading_queue": queues[s.name]}) for s in cluster.servers]
    return validated(
        "reserving leaves an inconsistent cluster",
        lambda: Cluster(
            servers=servers,
            instances=list(cluster.instances),
            remote_store_bandwidth_bytes_per_s=cluster.remote_store_bandwidth_bytes_per_s,
            reservations=[*kept, *(h.reservation for h in live)],
            learned=cluster.learned,
        ),
    )


def reserve(cluster: Cluster, decision: PlacementDecision, *, now_s: float, ttl_s: float) -> Cluster:
    """A new Cluster that holds what the decision uses until ``now_s + ttl_s``; expired reservations are
    dropped. Raises ClusterError when the decision no longer fits the cluster."""
    return with_holds(cluster, hold_decision(cluster, decision, now_s=now_s, ttl_s=ttl_s), now_s=now_s)
