"""Startup-cost estimators: checkpoint size, load time per server and tier, and live-migration cost.

Load time of a checkpoint on server s is ``q_s + transfer``: ``q_s`` is the time until the loads already
queued on s finish (a server loads one checkpoint at a time, as in ServerlessLLM's loading queue), and the
transfer runs as a pipeline from the fastest tier holding the checkpoint to the GPUs, so it takes as long
as its slowest stage:

- dram: host-to-GPU copy, one shard per GPU over that GPU's own PCIe link (DRAM itself reads far faster);
- ssd: max(checkpoint / SSD read, shard / PCIe);
- remote: max(checkpoint / download rate, shard / PCIe), the download rate being the smaller of the
  server's network link and its share of the remote store, which all servers downloading at once split
  evenly. Writing the downloaded checkpoint to the local SSD runs beside the pipeline, off its critical path.

A load that needs GPUs still held by running work (a migration freeing them, a request finishing) starts only
once they are free: ``max(queue, GPUs free) + transfer``. Only a plan that explicitly stages the checkpoint into
host memory overlaps the two: ``max(queue + staging, GPUs free) + host-to-GPU copy``, and it needs DRAM room.

A live migration runs as ServerlessLLM's two rounds: the destination loads the instance's checkpoint (its
own queue and tier), recomputes the KV cache of every token so far (``a * (t_in + t_out) + b``, ``t_out``
counted when the recompute starts, the source generating meanwhile), then the source stops and the
destination recomputes the tokens generated during the first round (the pause the running request sees)
before the source GPUs are handed over. An instance whose remaining tokens run out first simply finishes.

The remote store is assumed to hold every checkpoint. Learned bandwidths (from reported loads) replace
the stage they measure: dram the per-GPU host-to-GPU link (also the last stage of the other tiers),
ssd the SSD read, remote the server's download link.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from service.placement.cluster import Cluster, Hold, LearnedMigration, LoadingTask, RunningInstance, TierKind
from service.planning.kernels import KernelCalibration
from service.planning.memory import weight_bytes_per_gpu
from service.planning.specs import DType, EngineSpec, GpuSpec, ModelSpec
from service.planning.stepcost import ParallelLayout, ReplicaStepCost

# Token counts the derived migration cost is fitted over (typical context lengths of running requests).
RECOMPUTE_FIT_TOKENS = (256, 1024, 4096, 16384)
_RECOMPUTE_CACHE_LIMIT = 256


@lru_cache(maxsize=1024)
def checkpoint_bytes(model: ModelSpec, *, weight_dtype: DType) -> float:
    """Bytes of the whole checkpoint in ``weight_dtype`` (embeddings stay bf16, as in quantized checkpoints)."""
    return weight_bytes_per_gpu(model, ParallelLayout(), weight_dtype)


@lru_cache(maxsize=1024)
def shard_bytes(model: ModelSpec, *, weight_dtype: DType, tp: int = 1, pp: int = 1) -> float:
    """Bytes of the largest shard one GPU of a tp x pp instance loads."""
    return weight_bytes_per_gpu(model, ParallelLayout(tp, pp), weight_dtype)


@dataclass(frozen=True, slots=True)
class EstimatorOptions:
    """Which refinements the load estimator uses (all on for this optimizer; off to mimic simpler schedulers)."""

    use_learned: bool = True
    share_remote_link: bool = True
    # None: as many migrations as freeing the GPUs needs; ServerlessLLM moves at most one instance.
    max_migrations: int | None = None
    allow_staging: bool = True
    # Rank on startup plus the pause migrated requests see; off: on startup alone (ServerlessLLM).
    harm_aware: bool = True


@dataclass(frozen=True, slots=True)
class LoadEstimate:
    """Breakdown of one checkpoint load on one server."""

    tier: TierKind
    queue_wait_s: float
    transfer_s: float
    bandwidth_bytes_per_s: float
    checkpoint_bytes: float

    @property
    def total_s(self) -> float:
        """Queue wait plus transfer."""
        return self.queue_wait_s + self.transfer_s


@dataclass(slots=True)
class ServerStatic:
    """What a placement needs of one server, independent of time and reservations."""

    name: str
    gpu_ids_by_type: dict[str, list[int]]
    idle_by_type: dict[str, list[int]]
    type_of_gpu: dict[int, str]
    dram: frozenset[str]
    ssd: frozenset[str]
    dram_capacity_bytes: float
    dram_write_bytes_per_s: float
    ssd_read_bytes_per_s: float
    pcie_bytes_per_s: float
    network_bytes_per_s: float
    learned_pcie_bytes_per_s: float | None
    learned_ssd_bytes_per_s: float | None
    learned_network_bytes_per_s: float | None
    instances: list[RunningInstance] = field(default_factory=list)


@dataclass(slots=True)
class ClusterStatic:
    """Per-cluster index, built once per Cluster object."""

    servers: list[ServerStatic]
    by_name: dict[str, ServerStatic]
    learned_migrations: dict[tuple[str, str, int], LearnedMigration]
    gpu_type_of_instance: dict[str, str]
    instance_by_id: dict[str, RunningInstance]
    _rates: dict[bool, tuple[dict[str, float], dict[str, float], dict[str, float]]] = field(default_factory=dict)

    def rates(self, use_learned: bool) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """PCIe, SSD and network rates per server (read-only): learned ones when allowed and known, else nominal."""
        if use_learned not in self._rates:
            pcie: dict[str, float] = {}
            ssd: dict[str, float] = {}
            net: dict[str, float] = {}
            for st in self.servers:
                learned = (st.learned_pcie_bytes_per_s, st.learned_ssd_bytes_per_s, st.learned_network_bytes_per_s)
                pcie[st.name] = learned[0] if use_learned and learned[0] is not None else st.pcie_bytes_per_s
                ssd[st.name] = learned[1] if use_learned and learned[1] is not None else st.ssd_read_bytes_per_s
                net[st.name] = learned[2] if use_learned and learned[2] is not None else st.network_bytes_per_s
            self._rates[use_learned] = (pcie, ssd, net)
        return self._rates[use_learned]


def _build_static(cluster: Cluster) -> ClusterStatic:
    learned = {(b.server, b.tier): b.bandwidth_bytes_per_s for b in cluster.learned.bandwidths}
    servers: list[ServerStatic] = []
    empty: frozenset[str] = frozenset()
    for s in cluster.servers:
        ids: dict[str, list[int]] = {}
        idle: dict[str, list[int]] = {}
        type_of: dict[int, str] = {}
        for gpu in s.gpus:
            gpu_type, gid = gpu.type, gpu.id
            type_of[gid] = gpu_type
            if gpu_type not in ids:
                ids[gpu_type] = []
                idle[gpu_type] = []
            ids[gpu_type].append(gid)
            if not gpu.busy:
                idle[gpu_type].append(gid)
        for lst in (*ids.values(), *idle.values()):
            lst.sort()
        dram = ssd = None
        for tier in s.tiers:
            if tier.kind is TierKind.DRAM:
                dram = tier
            elif tier.kind is TierKind.SSD:
                ssd = tier
        servers.append(
            ServerStatic(
                name=s.name,
                gpu_ids_by_type=ids,
                idle_by_type=idle,
                type_of_gpu=type_of,
                dram=frozenset(dram.checkpoints) if dram else empty,
                ssd=frozenset(ssd.checkpoints) if ssd else empty,
                dram_capacity_bytes=dram.capacity_bytes if dram else 0.0,
                dram_write_bytes_per_s=dram.read_bandwidth_bytes_per_s if dram else 0.0,
                ssd_read_bytes_per_s=ssd.read_bandwidth_bytes_per_s if ssd else 0.0,
                pcie_bytes_per_s=s.pcie_bandwidth_bytes_per_s,
                network_bytes_per_s=s.network_bandwidth_bytes_per_s,
                learned_pcie_bytes_per_s=learned.get((s.name, TierKind.DRAM)),
                learned_ssd_bytes_per_s=learned.get((s.name, TierKind.SSD)),
                learned_network_bytes_per_s=learned.get((s.name, TierKind.REMOTE)),
            )
        )
    by_name = {s.name: s for s in servers}
    instance_gpu_type: dict[str, str] = {}
    for inst in cluster.instances:
        static = by_name[inst.server]
        static.instances.append(inst)
        instance_gpu_type[inst.id] = static.type_of_gpu[inst.gpu_ids[0]]
    migrations = {(m.model, m.gpu, m.tp): m for m in cluster.learned.migrations}
    return ClusterStatic(servers, by_name, migrations, instance_gpu_type, {i.id: i for i in cluster.instances})


def cluster_static(cluster: Cluster) -> ClusterStatic:
    """The cached per-cluster index."""
    return cluster.cached("placement.static", _build_static)


@dataclass(slots=True)
class ViewState:
    """Saved mutable state of a ClusterView."""

    free: dict[str, dict[str, list[int]]]
    queue_wait_s: dict[str, float]
    downloading: set[str]
    moved: set[str]


class ClusterView:
    """A cluster at one instant, as a mutable working copy: free GPUs, queue waits, remote downloads.

    The optimizer commits its choices here (GPUs taken, loads queued) so later choices see them.
    """

    def __init__(
        self,
        cluster: Cluster,
        *,
        now_s: float,
        options: EstimatorOptions | None = None,
        holds: Sequence[Hold] = (),
    ) -> None:
        self.cluster = cluster
        self.now_s = now_s
        self.options = options or EstimatorOptions()
        self.static = cluster_static(cluster)
        self.remote_total_bytes_per_s = cluster.remote_store_bandwidth_bytes_per_s
        held_reservations = [h.reservation for h in holds]
        reservations = [*cluster.reservations, *held_reservations]
        active = {r.id for r in reservations if r.active(now_s)}
        self.reserved: dict[str, set[int]] = {}
        for res in reservations:
            if res.id in active:
                self.reserved.setdefault(res.server, set()).update(res.gpu_ids)
        # The free GPU lists are replaced when GPUs are taken, never changed in place: a server without held GPUs
        # shares the cluster's own lists.
        self.free: dict[str, dict[str, list[int]]] = {}
        for st in self.static.servers:
            held = self.reserved.get(st.name)
            if held:
                self.free[st.name] = {t: [g for g in ids if g not in held] for t, ids in st.idle_by_type.items()}
            else:
                self.free[st.name] = dict(st.idle_by_type)
        # Effective stage rates per server: the learned value when there is one (and allowed), else the nominal.
        self.pcie_rate, self.ssd_rate, self.network_rate = self.static.rates(self.options.use_learned)
        self.queue_wait_s: dict[str, float] = {}
        self.downloading: set[str] = set()
        held_loads: dict[str, list[LoadingTask]] = {}
        for hold in holds:
            for load in hold.loads:
                held_loads.setdefault(load.server, []).append(load.task)
        for s in cluster.servers:
            wait = 0.0
            for task in (*s.loading_queue, *held_loads.get(s.name, ())):
                if task.remaining_bytes <= 0 or (task.reservation_id is not None and task.reservation_id not in active):
                    continue
                # A load waiting for its GPUs holds the loader until they are free (the replay does the same).
                wait = max(wait, task.starts_in_s) + task.finish_in_s
                if task.tier is TierKind.REMOTE:
                    self.downloading.add(s.name)
            self.queue_wait_s[s.name] = wait
        # Share of servers whose loader is busy now: the chance that a cold start landing on a server meets its
        # loader occupied, i.e. what one second of extra loading costs the cold starts to come (a migration's load
        # is such extra work; in a congested cluster it feeds the congestion).
        busy_loaders = sum(1 for wait_s in self.queue_wait_s.values() if wait_s > 0)
        self.loader_pressure = busy_loaders / len(self.queue_wait_s) if self.queue_wait_s else 0.0
        # Instances already moved by the decision being built; they are not moved twice.
        self.moved: set[str] = set()

    def download_bytes_per_s(self, server: str) -> float:
        """Rate a new remote download on that server would get now."""
        share = self.remote_total_bytes_per_s
        if self.options.share_remote_link:
            others = len(self.downloading) - (1 if server in self.downloading else 0)
            share /= others + 1
        return min(self.network_rate[server], share)

    def transfer(
        self, server: str, *, checkpoint: str, checkpoint_bytes: float, shard_bytes: float
    ) -> tuple[float, TierKind]:
        """Transfer time (no queue) from the fastest tier holding the checkpoint, and that tier."""
        st = self.static.by_name[server]
        gpu_stage_s = shard_bytes / self.pcie_rate[server]
        if checkpoint in st.dram:
            return gpu_stage_s, TierKind.DRAM
        remote_s = max(checkpoint_bytes / self.download_bytes_per_s(server), gpu_stage_s)
        if checkpoint in st.ssd:
            ssd_s = max(checkpoint_bytes / self.ssd_rate[server], gpu_stage_s)
            if ssd_s <= remote_s:
                return ssd_s, TierKind.SSD
        return remote_s, TierKind.REMOTE

    def estimate(self, server: str, *, tier: TierKind, transfer_s: float, checkpoint_bytes: float) -> LoadEstimate:
        """The load breakdown of a transfer behind the server's current queue."""
        return LoadEstimate(
            tier=tier,
            queue_wait_s=self.queue_wait_s[server],
            transfer_s=transfer_s,
            bandwidth_bytes_per_s=checkpoint_bytes / transfer_s if transfer_s > 0 else float("inf"),
            checkpoint_bytes=checkpoint_bytes,
        )

    def load(self, server: str, *, checkpoint: str, checkpoint_bytes: float, shard_bytes: float) -> LoadEstimate:
        """Time to load a checkpoint on a server from its fastest tier, behind the server's loading queue."""
        transfer_s, tier = self.transfer(
            server, checkpoint=checkpoint, checkpoint_bytes=checkpoint_bytes, shard_bytes=shard_bytes
        )
        return self.estimate(server, tier=tier, transfer_s=transfer_s, checkpoint_bytes=checkpoint_bytes)

    def staging(self, server: str, *, checkpoint: str, checkpoint_bytes: float) -> tuple[float, TierKind] | None:
        """Time to read the checkpoint into host memory (no GPUs needed) and the tier it comes from; None when
        it is already there or the server's DRAM cannot hold it."""
        st = self.static.by_name[server]
        if checkpoint in st.dram or st.dram_capacity_bytes < checkpoint_bytes:
            return None
        remote_bytes_per_s = self.download_bytes_per_s(server)
        if checkpoint in st.ssd and self.ssd_rate[server] >= remote_bytes_per_s:
            rate, tier = self.ssd_rate[server], TierKind.SSD
        else:
            rate, tier = remote_bytes_per_s, TierKind.REMOTE
        return checkpoint_bytes / min(rate, st.dram_write_bytes_per_s), tier

    def gpu_stage_s(self, server: str, *, shard_bytes: float) -> float:
        """Time of the last stage (host to GPU) of a load on that server."""
        return shard_bytes / self.pcie_rate[server]

    def snapshot(self) -> ViewState:
        """The mutable part of the view, to restore after a tentative change."""
        return ViewState(
            free={s: {t: list(ids) for t, ids in by_type.items()} for s, by_type in self.free.items()},
            queue_wait_s=dict(self.queue_wait_s),
            downloading=set(self.downloading),
            moved=set(self.moved),
        )

    def restore(self, state: ViewState) -> None:
        """Undo changes made since ``snapshot``."""
        self.free = state.free
        self.queue_wait_s = state.queue_wait_s
        self.downloading = state.downloading
        self.moved = state.moved

    def take(self, server: str, *, gpu_ids: list[int]) -> None:
        """Mark GPUs as used by the decision being built."""
        taken = set(gpu_ids)
        for gpu_type, ids in self.free[server].items():
            self.free[server][gpu_type] = [g for g in ids if g not in taken]

    def enqueue(self, server: str, *, load: LoadEstimate, loader_busy_s: float | None = None) -> None:
        """Append a load to the server's queue (``loader_busy_s``: when the loader is free again, when the load
        waits for GPUs or only stages)."""
        if loader_busy_s is None:
            loader_busy_s = self.queue_wait_s[server] + load.transfer_s
        self.queue_wait_s[server] = max(self.queue_wait_s[server], loader_busy_s)
        if load.tier is TierKind.REMOTE:
            self.downloading.add(server)


def estimate_load(
    cluster: Cluster,
    *,
    server: str,
    model: ModelSpec,
    weight_dtype: DType,
    tp: int = 1,
    pp: int = 1,
    checkpoint: str | None = None,
    now_s: float,
    options: EstimatorOptions | None = None,
) -> LoadEstimate:
    """Load time of a model on one server right now (queue wait + transfer from its fastest tier)."""
    cluster.server(server)
    view = ClusterView(cluster, now_s=now_s, options=options)
    return view.load(
        server,
        checkpoint=checkpoint or model.name,
        checkpoint_bytes=checkpoint_bytes(model, weight_dtype=weight_dtype),
        shard_bytes=shard_bytes(model, weight_dtype=weight_dtype, tp=tp, pp=pp),
    )


# Migration --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecomputeCost:
    """Time the destination takes to rebuild a migrated request's KV cache: a * tokens + b."""

    a_s_per_token: float
    b_s: float
    source: str

    def time_s(self, tokens: float) -> float:
        """Recompute time for ``tokens`` tokens of context."""
        return self.a_s_per_token * tokens + self.b_s


# Keyed by the identity of the (immutable) specs; the entry keeps them alive so their ids stay theirs.
_recompute_cache: dict[tuple[object, ...], tuple[object, RecomputeCost]] = {}


def _prefill_time_s(cost: ReplicaStepCost, tokens: int, chunk: int) -> float:
    """One sequence of ``tokens`` prefilled in chunks of ``chunk`` (the engine's token budget)."""
    total = 0.0
    done = 0
    while done < tokens:
        c = min(chunk, tokens - done)
        total += cost.step(
            prefill_tokens=c,
            prefill_key_pairs=c * (done + (c + 1) / 2.0),
            prefill_kv_tokens=done + c,
            prefill_sequences=1 if done + c >= tokens else 0,
        ).total_s
        done += c
    return total


def derived_recompute_cost(
    model: ModelSpec,
    *,
    gpu: GpuSpec,
    engine: EngineSpec,
    calibration: KernelCalibration,
    weight_dtype: DType,
    tp: int = 1,
    pp: int = 1,
) -> RecomputeCost:
    """a, b from the planning core: time prefills of a few lengths with ReplicaStepCost and fit a line."""
    key = (model, id(gpu), id(engine), id(calibration), weight_dtype, tp, pp)
    cached = _recompute_cache.get(key)
    if cached is not None:
        return cached[1]
    chunk = max(1, engine.max_num_batched_tokens)
    cost = ReplicaStepCost(
        model=model,
        gpu=gpu,
        engine=engine,
        layout=ParallelLayout(tp, pp),
        weight_dtype=weight_dtype,
        kv_dtype=engine.kv_dtype_for(weight_dtype),
        calibration=calibration,
        max_tokens=chunk + 1,
    )
    tokens = np.array(RECOMPUTE_FIT_TOKENS, dtype=np.float64)
    times = np.array([_prefill_time_s(cost, int(n), chunk) for n in RECOMPUTE_FIT_TOKENS])
    a, b = np.polyfit(tokens, times, 1)
    result = RecomputeCost(float(max(a, 0.0)), float(max(b, 0.0)), "derived")
    if len(_recompute_cache) >= _RECOMPUTE_CACHE_LIMIT:
        _recompute_cache.clear()
    _recompute_cache[key] = ((gpu, engine, calibration), result)
    return result


def recompute_cost(
    learned: LearnedMigration | None,
    *,
    derived: RecomputeCost,
) -> RecomputeCost:
    """Fitted a, b when the cluster has them; the derived slope with an observed intercept when only one
    token count was reported; else the derived values."""
    if learned is None or not learned.observations:
        return derived
    if learned.a_s_per_token is not None and learned.b_s is not None:
        return RecomputeCost(learned.a_s_per_token, learned.b_s, "fitted")
    residuals = [o.duration_s - derived.a_s_per_token * o.tokens for o in learned.observations]
    return RecomputeCost(derived.a_s_per_token, max(0.0, sum(residuals) / len(residuals)), "derived+observed")


@dataclass(frozen=True, slots=True)
class MigrationTimeline:
    """A live migration as it runs, in seconds from the decision."""

    dest_ready_s: float
    tokens: int
    recompute_s: float
    pause_s: float
    gpus_free_s: float
    finishes_first: bool


def remaining_s(inst: RunningInstance) -> float | None:
    """Seconds until the instance's request finishes on its own; None when its output length or rate is unknown."""
    if inst.expected_output_tokens is None or inst.tokens_per_s is None:
        return None
    return max(0, inst.expected_output_tokens - inst.generated_tokens) / inst.tokens_per_s


def migration_timeline(inst: RunningInstance, *, dest_load_s: float, recompute: RecomputeCost) -> MigrationTimeline:
    """Destination load, first-round recompute of every token so far, second-round recompute of the tokens
    generated meanwhile (the pause), handover; or the request finishing first when its remaining tokens run out."""
    rate = inst.tokens_per_s or 0.0
    cap = inst.expected_output_tokens
    generated = inst.generated_tokens + rate * dest_load_s
    if cap is not None:
        generated = min(generated, float(max(cap, inst.generated_tokens)))
    tokens = int(inst.input_tokens + generated)
    first_s = recompute.time_s(tokens)
    pause_s = recompute.time_s(rate * first_s)
    handover_s = dest_load_s + first_s + pause_s
    left_s = remaining_s(inst)
    if left_s is not None and left_s <= handover_s:
        return MigrationTimeline(dest_load_s, tokens, first_s, 0.0, left_s, True)
    return MigrationTimeline(dest_load_s, tokens, first_s, pause_s, handover_s, False)


@dataclass(frozen=True, slots=True)
class MigrationEstimate:
    """Cost of moving one running instance to other GPUs: destination load, then two rounds of KV recomputation."""

    instance_id: str
    checkpoint: str
    from_server: str
    to_server: str
    to_gpu_ids: tuple[int, ...]
    load: LoadEstimate
    tokens: int
    recompute_s: float
    recompute_source: str
    pause_s: float = 0.0
    gpus_free_s: float | None = None

    @property
    def finish_s(self) -> float:
        """When the source GPUs are free (the timeline's handover; destination load + recompute without one)."""
        return self.gpus_free_s if self.gpus_free_s is not None else self.load.total_s + self.recompute_s
