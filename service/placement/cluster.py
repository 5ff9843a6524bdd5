"""Cluster state for placement: servers, GPUs, storage tiers, loading queues, instances, reservations and events."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal, Self, TypeVar

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from service.planning.specs import DType

T = TypeVar("T")

MAX_SERVERS = 4096
MAX_GPUS_PER_SERVER = 64
MAX_CHECKPOINTS_PER_TIER = 4096
MAX_QUEUE_ENTRIES = 1024
MAX_INSTANCES = 65536
MAX_RESERVATIONS = 65536
MAX_EVENTS = 10000
MAX_LEARNED = 65536
# Migration observations kept per (model, GPU type, tp) for the least-squares fit of a, b.
MIGRATION_HISTORY = 32
# Weight of a new observation in the exponentially weighted bandwidth average: a few loads move it,
# one outlier does not.
BANDWIDTH_EWMA_WEIGHT = 0.3


class ClusterError(ValueError):
    """A cluster description or event that is inconsistent (unknown names, GPUs double-booked...)."""


class TierKind(StrEnum):
    """Where a checkpoint can be read from, fastest first."""

    DRAM = "dram"
    SSD = "ssd"
    REMOTE = "remote"


# Enums accept their string values even in strict mode (YAML and Python dicts carry strings).
TierField = Annotated[TierKind, Field(strict=False)]
DTypeField = Annotated[DType, Field(strict=False)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
NonNegative = Annotated[float, Field(ge=0.0)]
Positive = Annotated[float, Field(gt=0.0)]
GpuIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_GPUS_PER_SERVER)]
Tokens = Annotated[int, Field(ge=0, le=10_000_000)]
Degree = Annotated[int, Field(ge=1, le=MAX_GPUS_PER_SERVER)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class StorageTier(_Strict):
    """A local storage tier of one server and the checkpoints it holds."""

    kind: TierField
    capacity_bytes: NonNegative
    read_bandwidth_bytes_per_s: Positive
    checkpoints: list[Name] = Field(default_factory=list, max_length=MAX_CHECKPOINTS_PER_TIER)


class Gpu(_Strict):
    """One accelerator of a server."""

    id: Annotated[int, Field(ge=0)]
    type: Name
    busy: bool = False


class LoadingTask(_Strict):
    """A checkpoint load queued or in progress on a server; the server loads one checkpoint at a time."""

    model: Name = Field(description="checkpoint name, as the storage tiers list it")
    tier: TierField
    remaining_bytes: NonNegative
    bandwidth_bytes_per_s: Positive = Field(description="rate the load runs at (observed or estimated)")
    reservation_id: Name | None = None
    starts_in_s: NonNegative = Field(
        default=0.0, description="the load waits this long for its GPUs (a migration freeing them) before it runs"
    )
    staged: bool = Field(
        default=False, description="reads the checkpoint into host memory only; the GPU copy follows separately"
    )

    @property
    def finish_in_s(self) -> float:
        """Seconds this load still needs once it runs."""
        return self.remaining_bytes / self.bandwidth_bytes_per_s


class RunningInstance(_Strict):
    """An inference instance currently serving on some GPUs."""

    id: Name
    model: Name = Field(description="catalog model name")
    server: Name
    gpu_ids: GpuIds
    input_tokens: Tokens = 0
    generated_tokens: Tokens = 0
    expected_output_tokens: Tokens | None = None
    tp: Degree = 1
    pp: Degree = 1
    weight_dtype: DTypeField = DType.BF16
    engine: Name = "vllm"
    checkpoint: Name | None = Field(default=None, description="checkpoint name in the tiers; default: model")
    tokens_per_s: Positive | None = Field(
        default=None, description="observed generation rate: the tokens a migration recomputes grow meanwhile"
    )
    idle_since_s: float | None = Field(
        default=None, description="kept alive with no request since (epoch s): stopping it frees its GPUs at once"
    )
    keep_alive_s: NonNegative | None = Field(
        default=None, description="how long an idle instance is kept alive before it stops by itself"
    )
    requests_per_s: NonNegative | None = Field(
        default=None,
        description="recent rate of requests that would reach this instance (its checkpoint's, shared over its "
        "instances); with keep_alive_s it prices stopping it idle: the chance one arrives before its keep-alive "
        "ends, times reloading it",
    )

    @property
    def checkpoint_name(self) -> str:
        """Name under which the tiers hold this instance's weights."""
        return self.checkpoint or self.model


class Server(_Strict):
    """A GPU server with its local tiers and loading queue."""

    name: Name
    gpus: Annotated[list[Gpu], Field(min_length=1, max_length=MAX_GPUS_PER_SERVER)]
    tiers: Annotated[list[StorageTier], Field(max_length=2)] = Field(default_factory=list)
    network_bandwidth_bytes_per_s: Positive = Field(description="download rate from the remote store")
    pcie_bandwidth_bytes_per_s: Positive = Field(
        description="host-to-GPU rate per GPU: each GPU has its own link, so an instance on n GPUs loads n shards "
        "in parallel"
    )
    loading_queue: list[LoadingTask] = Field(default_factory=list, max_length=MAX_QUEUE_ENTRIES)

    def tier(self, kind: TierKind) -> StorageTier | None:
        """The local tier of that kind, if the server has one."""
        for tier in self.tiers:
            if tier.kind is kind:
                return tier
        return None


class Reservation(_Strict):
    """GPUs promised to a placement decision until it starts or the reservation expires."""

    id: Name
    server: Name
    gpu_ids: GpuIds
    model: Name = Field(description="checkpoint name the GPUs are held for")
    expires_at_s: float = Field(description="absolute epoch seconds")
    confirmed: bool = Field(default=False, description="a confirmed reservation holds until released")
    migrating_instance: Name | None = Field(default=None, description="set when the GPUs receive a migration")

    def active(self, now_s: float) -> bool:
        """Whether the reservation still holds its GPUs at ``now_s``."""
        return self.confirmed or self.expires_at_s > now_s


class LearnedBandwidth(_Strict):
    """Bandwidth learned from reported loads of one server and tier.

    dram: the host-to-GPU rate per GPU; ssd: the SSD read rate; remote: the server's download rate.
    """

    server: Name
    tier: TierField
    bandwidth_bytes_per_s: Positive
    samples: Annotated[int, Field(ge=1)]


class MigrationObservation(_Strict):
    """One reported migration: tokens recomputed and the time it took (excluding the destination load)."""

    tokens: Tokens
    duration_s: NonNegative


class LearnedMigration(_Strict):
    """Migration cost a * tokens + b fitted from reported migrations of one model on one GPU type and tp."""

    model: Name
    gpu: Name
    tp: Degree = 1
    observations: list[MigrationObservation] = Field(default_factory=list, max_length=MIGRATION_HISTORY)
    a_s_per_token: NonNegative | None = None
    b_s: NonNegative | None = None


class Learned(_Strict):
    """What the cluster learned from reported loads and migrations."""

    bandwidths: list[LearnedBandwidth] = Field(default_factory=list, max_length=MAX_LEARNED)
    migrations: list[LearnedMigration] = Field(default_factory=list, max_length=MAX_LEARNED)


class Cluster(_Strict):
    """The whole cluster state a placement decision reads."""

    servers: Annotated[list[Server], Field(min_length=1, max_length=MAX_SERVERS)]
    instances: list[RunningInstance] = Field(default_factory=list, max_length=MAX_INSTANCES)
    remote_store_bandwidth_bytes_per_s: Positive = Field(
        description="total rate of the remote checkpoint store, shared by all servers downloading at once"
    )
    reservations: list[Reservation] = Field(default_factory=list, max_length=MAX_RESERVATIONS)
    learned: Learned = Field(default_factory=Learned)
    _cache: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems = _consistency_problems(self)
        if problems:
            raise ValueError("; ".join(problems[:10]))
        return self

    def cached(self, key: str, build: Callable[[Cluster], T]) -> T:
        """A value derived from this (immutable) cluster, built once."""
        # model_copy(update=...) carries private attributes over: the cache is valid only for the very
        # field objects it was built from.
        fields = (self.servers, self.instances, self.reservations, self.learned)
        built_from = self._cache.get("__fields__")
        if built_from is None or any(a is not b for a, b in zip(built_from, fields, strict=True)):
            self._cache.clear()
            self._cache["__fields__"] = fields
        if key not in self._cache:
            self._cache[key] = build(self)
        value: T = self._cache[key]
        return value

    def server(self, name: str) -> Server:
        """A server by name."""
        servers: dict[str, Server] = self.cached("servers", lambda c: {s.name: s for s in c.servers})
        if name not in servers:
            raise ClusterError(f"unknown server {name!r}")
        return servers[name]


class HeldLoad(_Strict):
    """A load a hold queued on a server."""

    server: Name
    task: LoadingTask


class Hold(_Strict):
    """A reservation kept outside the cluster document, with the loads it queued."""

    reservation: Reservation
    loads: list[HeldLoad] = Field(default_factory=list, max_length=MAX_QUEUE_ENTRIES)


def _consistency_problems(cluster: Cluster) -> list[str]:
    problems: list[str] = []
    gpus_by_server: dict[str, dict[int, Gpu]] = {}
    for server in cluster.servers:
        if server.name in gpus_by_server:
            problems.append(f"server {server.name!r} is listed twice")
            continue
        ids: dict[int, Gpu] = {}
        for gpu in server.gpus:
            if gpu.id in ids:
                problems.append(f"server {server.name!r} lists GPU {gpu.id} twice")
            ids[gpu.id] = gpu
        gpus_by_server[server.name] = ids
        kinds = [t.kind for t in server.tiers]
        if TierKind.REMOTE in kinds:
            problems.append(f"server {server.name!r}: the remote store is cluster-wide, not a server tier")
        if len(set(kinds)) != len(kinds):
            problems.append(f"server {server.name!r} lists a tier kind twice")
    owner: dict[tuple[str, int], str] = {}
    for inst, gpus in _on_known_servers(cluster.instances, "instance", "runs on", gpus_by_server, problems):
        if len(set(inst.gpu_ids)) != len(inst.gpu_ids):
            problems.append(f"instance {inst.id!r} lists a GPU twice")
        if len(inst.gpu_ids) < inst.tp * inst.pp:
            problems.append(f"instance {inst.id!r} has {len(inst.gpu_ids)} GPUs but tp*pp = {inst.tp * inst.pp}")
        types = set()
        for gid in inst.gpu_ids:
            found = gpus.get(gid)
            if found is None:
                problems.append(f"instance {inst.id!r} uses GPU {gid} that server {inst.server!r} does not have")
                continue
            types.add(found.type)
            if not found.busy:
                problems.append(f"instance {inst.id!r} uses GPU {gid} on {inst.server!r}, which is not marked busy")
            other = owner.get((inst.server, gid))
            if other is not None:
                problems.append(f"GPU {gid} on {inst.server!r} is used by both {other!r} and {inst.id!r}")
            owner[(inst.server, gid)] = inst.id
        if len(types) > 1:
            problems.append(f"instance {inst.id!r} spans GPU types {sorted(types)}")
    for res, gpus in _on_known_servers(cluster.reservations, "reservation", "is on", gpus_by_server, problems):
        missing = [g for g in res.gpu_ids if g not in gpus]
        if missing:
            problems.append(f"reservation {res.id!r} holds GPUs {missing} that {res.server!r} does not have")
    for bw in cluster.learned.bandwidths:
        if bw.server not in gpus_by_server:
            problems.append(f"learned bandwidth refers to unknown server {bw.server!r}")
    return problems


# Cluster entries with an id that sit on one server.
_OnServer = TypeVar("_OnServer", RunningInstance, Reservation)


def _on_known_servers(
    items: Iterable[_OnServer],
    kind: str,
    on: str,
    gpus_by_server: Mapping[str, dict[int, Gpu]],
    problems: list[str],
) -> Iterator[tuple[_OnServer, dict[int, Gpu]]]:
    """Each item whose server exists, with that server's GPUs; duplicate ids and unknown servers go to
    ``problems`` (as the items are consumed, so the problems stay in item order)."""
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            problems.append(f"{kind} {item.id!r} is listed twice")
        seen.add(item.id)
        gpus = gpus_by_server.get(item.server)
        if gpus is None:
            problems.append(f"{kind} {item.id!r} {on} unknown server {item.server!r}")
            continue
        yield item, gpus


def validated(what: str, build: Callable[[], T]) -> T:
    """``build()``, with a validation error turned into a one-paragraph ClusterError that starts with ``what``."""
    try:
        return build()
    except ValidationError as exc:
        raise ClusterError(f"{what}: {validation_summary(exc)}") from None


def parse_cluster(data: Mapping[str, Any] | Cluster) -> Cluster:
    """A Cluster from plain data (a parsed YAML/JSON document), with a one-paragraph ClusterError when invalid."""
    if isinstance(data, Cluster):
        return data
    return validated("invalid cluster", lambda: Cluster.model_validate(data))


def validation_summary(exc: ValidationError, *, limit: int = 5) -> str:
    """The first few validation errors as 'where: what' joined by semicolons."""
    parts = []
    for err in exc.errors()[:limit]:
        where = ".".join(str(p) for p in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


# Events ---------------------------------------------------------------------------------------------


class InstanceStarted(_Strict):
    """An instance started on some GPUs (consumes the reservation that held them, if any)."""

    type: Literal["instance_started"]
    id: Name
    model: Name
    server: Name
    gpu_ids: GpuIds
    tp: Degree = 1
    pp: Degree = 1
    weight_dtype: DTypeField = DType.BF16
    engine: Name = "vllm"
    checkpoint: Name | None = None
    input_tokens: Tokens = 0
    generated_tokens: Tokens = 0
    expected_output_tokens: Tokens | None = None
    tokens_per_s: Positive | None = None
    reservation_id: Name | None = None


class InstanceStopped(_Strict):
    """An instance stopped and freed its GPUs."""

    type: Literal["instance_stopped"]
    id: Name


class _TierCheckpointEvent(_Strict):
    """A change to the checkpoints one server tier holds."""

    # Declared here so that it stays the first field; each subclass narrows it to its Literal tag.
    type: str
    server: Name
    tier: TierField
    model: Name


class CheckpointCached(_TierCheckpointEvent):
    """A server tier now holds a checkpoint."""

    type: Literal["checkpoint_cached"]


class CheckpointEvicted(_TierCheckpointEvent):
    """A server tier dropped a checkpoint."""

    type: Literal["checkpoint_evicted"]


class LoadFinished(_Strict):
    """A checkpoint load finished: teaches the tier's bandwidth and leaves the loading queue."""

    type: Literal["load_finished"]
    server: Name
    model: Name
    tier: TierField
    size_bytes: Positive
    duration_s: Positive
    gpus: Degree = Field(default=1, description="GPUs the checkpoint was loaded onto (DRAM loads run per GPU)")


class RequestProgress(_Strict):
    """Token counts of a running instance."""

    type: Literal["request_progress"]
    id: Name
    input_tokens: Tokens
    generated_tokens: Tokens
    tokens_per_s: Positive | None = None
    idle_since_s: float | None = Field(default=None, description="set when the instance has no request left")


class MigrationFinished(_Strict):
    """A live migration finished; refits a, b and, when the instance is named, moves it."""

    type: Literal["migration_finished"]
    model: Name
    gpu: Name
    tp: Degree = 1
    input_tokens: Tokens
    output_tokens: Tokens
    duration_s: NonNegative = Field(description="KV recomputation and handover, excluding the destination load")
    instance_id: Name | None = None
    to_server: Name | None = None
    to_gpu_ids: GpuIds | None = None


class ReservationConfirmed(_Strict):
    """The caller acts on a reservation: it holds until released or consumed by instance_started."""

    type: Literal["reservation_confirmed"]
    id: Name


class ReservationReleased(_Strict):
    """The caller gives a reservation back (and its queued load)."""

    type: Literal["reservation_released"]
    id: Name


ClusterEvent = Annotated[
    InstanceStarted
    | InstanceStopped
    | CheckpointCached
    | CheckpointEvicted
    | LoadFinished
    | RequestProgress
    | MigrationFinished
    | ReservationConfirmed
    | ReservationReleased,
    Field(discriminator="type"),
]
EVENTS_ADAPTER: TypeAdapter[list[ClusterEvent]] = TypeAdapter(
    Annotated[list[ClusterEvent], Field(max_length=MAX_EVENTS)]
)


def parse_events(data: Iterable[Mapping[str, Any]]) -> list[ClusterEvent]:
    """Events from plain data, with a ClusterError naming the first bad ones."""
    return validated("invalid events", lambda: EVENTS_ADAPTER.validate_python(list(data)))


class _Draft:
    """Mutable working copy of a cluster while events apply."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.servers: dict[str, Server] = {s.name: s for s in cluster.servers}
        self.gpus: dict[str, dict[int, Gpu]] = {s.name: {g.id: g for g in s.gpus} for s in cluster.servers}
        self.tiers: dict[str, dict[TierKind, StorageTier]] = {
            s.name: {t.kind: t for t in s.tiers} for s in cluster.servers
        }
        self.queues: dict[str, list[LoadingTask]] = {s.name: list(s.loading_queue) for s in cluster.servers}
        self.instances: dict[str, RunningInstance] = {i.id: i for i in cluster.instances}
        self.reservations: dict[str, Reservation] = {r.id: r for r in cluster.reservations}
        self.bandwidths: dict[tuple[str, TierKind], LearnedBandwidth] = {
            (b.server, b.tier): b for b in cluster.learned.bandwidths
        }
        self.migrations: dict[tuple[str, str, int], LearnedMigration] = {
            (m.model, m.gpu, m.tp): m for m in cluster.learned.migrations
        }

    def gpus_of(self, server: str) -> dict[int, Gpu]:
        if server not in self.gpus:
            raise ClusterError(f"unknown server {server!r}")
        return self.gpus[server]

    def set_busy(self, server: str, gpu_ids: Iterable[int], busy: bool, *, who: str) -> None:
        gpus = self.gpus_of(server)
        for gid in gpu_ids:
            gpu = gpus.get(gid)
            if gpu is None:
                raise ClusterError(f"server {server!r} has no GPU {gid}")
            if busy and gpu.busy:
                raise ClusterError(f"GPU {gid} on {server!r} is already busy; cannot start {who!r}")
            gpus[gid] = gpu.model_copy(update={"busy": busy})

    def drop_reservation(self, reservation_id: str) -> None:
        res = self.reservations.pop(reservation_id)
        queue = self.queues.get(res.server, [])
        self.queues[res.server] = [t for t in queue if t.reservation_id != reservation_id]

    def build(self) -> Cluster:
        servers = [
            s.model_copy(
                update={
                    "gpus": list(self.gpus[s.name].values()),
                    "tiers": list(self.tiers[s.name].values()),
                    "loading_queue": self.queues[s.name],
                }
            )
            for s in self.servers.values()
        ]
        learned = Learned(bandwidths=list(self.bandwidths.values()), migrations=list(self.migrations.values()))
        return validated(
            "events leave an inconsistent cluster",
            lambda: Cluster(
                servers=servers,
                instances=list(self.instances.values()),
                remote_store_bandwidth_bytes_per_s=self.cluster.remote_store_bandwidth_bytes_per_s,
                reservations=list(self.reservations.values()),
                learned=learned,
            ),
        )


def apply_events(cluster: Cluster, events: Iterable[ClusterEvent], *, now_s: float | None = None) -> Cluster:
    """A new Cluster with the events applied in order (the input is never changed).

    With ``now_s`` expired reservations are dropped first (with their queued loads).
    """
    draft = _Draft(cluster)
    if now_s is not None:
        for res in list(draft.reservations.values()):
            if not res.active(now_s):
                draft.drop_reservation(res.id)
    for index, event in enumerate(events):
        try:
            _apply(draft, event)
        except ClusterError as exc:
            raise ClusterError(f"event {index} ({event.type}): {exc}") from None
    return draft.build()


def _apply(draft: _Draft, event: ClusterEvent) -> None:
    match event:
        case InstanceStarted():
            _start_instance(draft, event)
        case InstanceStopped():
            inst = draft.instances.pop(event.id, None)
            if inst is None:
                raise ClusterError(f"unknown instance {event.id!r}")
            draft.set_busy(inst.server, inst.gpu_ids, False, who=inst.id)
        case CheckpointCached():
            tier = _local_tier(draft, event.server, event.tier)
            if event.model not in tier.checkpoints:
                if len(tier.checkpoints) >= MAX_CHECKPOINTS_PER_TIER:
                    raise ClusterError(f"{event.server!r} {event.tier} already lists {MAX_CHECKPOINTS_PER_TIER}")
                draft.tiers[event.server][tier.kind] = tier.model_copy(
                    update={"checkpoints": [*tier.checkpoints, event.model]}
                )
        case CheckpointEvicted():
            tier = _local_tier(draft, event.server, event.tier)
            if event.model not in tier.checkpoints:
                raise ClusterError(f"{event.server!r} {event.tier} does not hold {event.model!r}")
            kept = [c for c in tier.checkpoints if c != event.model]
            draft.tiers[event.server][tier.kind] = tier.model_copy(update={"checkpoints": kept})
        case LoadFinished():
            _finish_load(draft, event)
        case RequestProgress():
            inst = draft.instances.get(event.id)
            if inst is None:
                raise ClusterError(f"unknown instance {event.id!r}")
            update: dict[str, Any] = {
                "input_tokens": event.input_tokens,
                "generated_tokens": event.generated_tokens,
                "idle_since_s": event.idle_since_s,
            }
            if event.tokens_per_s is not None:
                update["tokens_per_s"] = event.tokens_per_s
            draft.instances[event.id] = inst.model_copy(update=update)
        case MigrationFinished():
            _finish_migration(draft, event)
        case ReservationConfirmed():
            res = draft.reservations.get(event.id)
            if res is None:
                raise ClusterError(f"unknown reservation {event.id!r} (expired or already used?)")
            draft.reservations[event.id] = res.model_copy(update={"confirmed": True})
        case ReservationReleased():
            if event.id not in draft.reservations:
                raise ClusterError(f"unknown reservation {event.id!r}")
            draft.drop_reservation(event.id)


def _local_tier(draft: _Draft, server: str, kind: TierKind) -> StorageTier:
    draft.gpus_of(server)
    tier = draft.tiers[server].get(kind)
    if tier is None:
        raise ClusterError(f"server {server!r} has no {kind} tier")
    return tier


def _consume_reservations(draft: _Draft, server: str, gpu_ids: list[int], model: str, explicit: str | None) -> None:
    """Drop the reservations the started work was placed with; refuse GPUs held for another model."""
    if explicit is not None:
        if explicit not in draft.reservations:
            raise ClusterError(f"unknown reservation {explicit!r}")
        draft.drop_reservation(explicit)
    wanted = set(gpu_ids)
    for res in list(draft.reservations.values()):
        if res.server != server or wanted.isdisjoint(res.gpu_ids):
            continue
        if res.model != model:
            raise ClusterError(f"GPUs {sorted(wanted & set(res.gpu_ids))} on {server!r} are reserved for {res.model!r}")
        draft.drop_reservation(res.id)


def _start_instance(draft: _Draft, event: InstanceStarted) -> None:
    if event.id in draft.instances:
        raise ClusterError(f"instance {event.id!r} is already running")
    checkpoint = event.checkpoint or event.model
    draft.gpus_of(event.server)
    _consume_reservations(draft, event.server, event.gpu_ids, checkpoint, event.reservation_id)
    draft.set_busy(event.server, event.gpu_ids, True, who=event.id)
    fields = event.model_dump(exclude={"type", "reservation_id"})
    draft.instances[event.id] = RunningInstance(**fields)


def _observed_stage_bandwidth(event: LoadFinished) -> float:
    """The rate of the tier's own stage: DRAM loads run one shard per GPU link, the others per server."""
    rate = event.size_bytes / event.duration_s
    return rate / event.gpus if event.tier is TierKind.DRAM else rate


def _prior_stage_bandwidth(draft: _Draft, server: Server, tier: TierKind) -> float:
    if tier is TierKind.DRAM:
        return server.pcie_bandwidth_bytes_per_s
    if tier is TierKind.SSD:
        local = draft.tiers[server.name].get(TierKind.SSD)
        return local.read_bandwidth_bytes_per_s if local is not None else server.network_bandwidth_bytes_per_s
    return min(server.network_bandwidth_bytes_per_s, draft.cluster.remote_store_bandwidth_bytes_per_s)


def _finish_load(draft: _Draft, event: LoadFinished) -> None:
    draft.gpus_of(event.server)
    server = draft.servers[event.server]
    if event.tier is not TierKind.REMOTE and event.tier not in draft.tiers[event.server]:
        raise ClusterError(f"server {event.server!r} has no {event.tier} tier to load from")
    key = (event.server, event.tier)
    previous = draft.bandwidths.get(key)
    prior = previous.bandwidth_bytes_per_s if previous else _prior_stage_bandwidth(draft, server, event.tier)
    observed = _observed_stage_bandwidth(event)
    samples = previous.samples if previous else 0
    # The first reports replace the datasheet prior (their running mean); later ones move an EWMA.
    weight = max(BANDWIDTH_EWMA_WEIGHT, 1.0 / (samples + 1))
    learned = prior + weight * (observed - prior)
    draft.bandwidths[key] = LearnedBandwidth(
        server=event.server,
        tier=event.tier,
        bandwidth_bytes_per_s=learned,
        samples=samples + 1,
    )
    # The finished load leaves the queue; a load the queue never listed still teaches the bandwidth.
    queue = draft.queues[event.server]
    for pos, task in enumerate(queue):
        if task.model == event.model:
            del queue[pos]
            break


def fit_migration(observations: list[MigrationObservation]) -> tuple[float | None, float | None]:
    """Least-squares a (s/token), b (s) over the observations; None where they cannot determine them."""
    if not observations:
        return None, None
    tokens = np.array([o.tokens for o in observations], dtype=np.float64)
    durations = np.array([o.duration_s for o in observations], dtype=np.float64)
    if len(np.unique(tokens)) < 2:
        # One token count fixes only the intercept; the estimator keeps its derived slope.
        return None, None
    a, b = np.polyfit(tokens, durations, 1)
    if a < 0:
        # Noise can tilt the line; a migration never gets cheaper with more tokens.
        return 0.0, float(max(0.0, durations.mean()))
    return float(a), float(max(0.0, b))


def _finish_migration(draft: _Draft, event: MigrationFinished) -> None:
    key = (event.model, event.gpu, event.tp)
    previous = draft.migrations.get(key)
    observations = [
        *(previous.observations if previous else []),
        MigrationObservation(tokens=event.input_tokens + event.output_tokens, duration_s=event.duration_s),
    ][-MIGRATION_HISTORY:]
    a, b = fit_migration(observations)
    draft.migrations[key] = LearnedMigration(
        model=event.model, gpu=event.gpu, tp=event.tp, observations=observations, a_s_per_token=a, b_s=b
    )
    if event.instance_id is None:
        return
    inst = draft.instances.get(event.instance_id)
    if inst is None:
        raise ClusterError(f"unknown instance {event.instance_id!r}")
    if event.to_server is None or event.to_gpu_ids is None:
        raise ClusterError("moving an instance needs to_server and to_gpu_ids")
    draft.set_busy(inst.server, inst.gpu_ids, False, who=inst.id)
    _consume_reservations(draft, event.to_server, event.to_gpu_ids, inst.checkpoint_name, None)
    draft.set_busy(event.to_server, event.to_gpu_ids, True, who=inst.id)
    draft.instances[inst.id] = inst.model_copy(
        update={
            "server": event.to_server,
            "gpu_ids": list(event.to_gpu_ids),
            "input_tokens": event.input_tokens,
            "generated_tokens": event.output_tokens,
        }
    )
