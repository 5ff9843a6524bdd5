"""Trace replay: a simulated GPU cluster serving cold starts, the same seeded trace under several placement policies.

The simulated truth: each server loads one checkpoint at a time (its loading queue), from the tier the placer
chose (or, when that copy is gone, the fastest local one), as a pipeline whose slowest stage sets the pace
(host-to-GPU per GPU; SSD read; download = the smaller of the server's link and an even share of the remote
store among the downloads running when it starts). True bandwidths differ from the
nominal ones the cluster file states (PCIe and network run below line rate, some SSDs are degraded). Loads
cache the checkpoint in DRAM (and on SSD after a download), evicting least recently used checkpoints. A live
migration loads the instance on its destination, then recomputes its KV cache (a * tokens + b from the
planning core's prefill cost) and hands its GPUs over.

The placer sees the cluster as of its last sync (every ``sync_interval_s``): a decision made on a stale view
can pick GPUs that are already gone, and the request then waits for the next sync. Policies:

- any-free: a random server with enough free GPUs, its first free GPUs;
- serverlessllm: locality- and queue-aware choice with migration, nominal bandwidths, no link sharing, no
  reservation (ServerlessLLM's estimator);
- ours: the optimizer with learned bandwidths (from reported loads), remote-link sharing, and a reservation
  after every decision so that decisions between syncs do not collide.

Every policy replays the same arrivals, models, lifetimes and server bandwidths (common random numbers).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from service.placement.cluster import (
    Cluster,
    ClusterEvent,
    Gpu,
    Learned,
    LoadFinished,
    LoadingTask,
    MigrationFinished,
    RunningInstance,
    Server,
    StorageTier,
    TierKind,
    apply_events,
)
from service.placement.estimators import (
    ClusterView,
    EstimatorOptions,
    RecomputeCost,
    checkpoint_bytes,
    derived_recompute_cost,
    shard_bytes,
)
from service.placement.optimizer import Candidate, PlacementOption, PlacementRequest, place, reserve
from service.planning.catalog import Catalog
from service.planning.specs import DType, ModelSpec, PlanningError

# Catalog models served in the replay and the tensor-parallel degree each runs at on an 80 GB GPU.
REPLAY_MODELS: tuple[tuple[str, int], ...] = (
    ("llama-3.1-8b", 1),
    ("qwen2.5-7b", 1),
    ("mistral-7b-v0.1", 1),
    ("llama-2-13b", 1),
    ("mistral-nemo-12b", 1),
    ("qwen3-14b", 1),
    ("qwen3-32b", 2),
    ("codellama-34b", 2),
    ("yi-34b", 2),
    ("mixtral-8x7b", 2),
    ("llama-3.1-70b", 4),
    ("qwen2.5-72b", 4),
)
GBIT = 1e9 / 8


class Policy(StrEnum):
    """Placement policies the replay compares."""

    ANY_FREE = "any-free"
    SERVERLESSLLM = "serverlessllm"
    OURS = "ours"


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """The simulated cluster and trace."""

    seed: int = 0
    servers: int = 16
    gpus_per_server: int = 8
    gpu_type: str = "h100-sxm"
    dram_bytes: float = 512e9
    ssd_bytes: float = 4e12
    dram_read_bytes_per_s: float = 100e9
    pcie_bytes_per_s: float = 25e9
    ssd_read_bytes_per_s: float = 6e9
    network_gbit_per_s: tuple[float, ...] = (10.0, 25.0)
    remote_store_bytes_per_s: float = 12.5e9
    # Fine-tuned variants per catalog model: each is its own checkpoint with the base model's size.
    variants_per_model: int = 16
    zipf_exponent: float = 1.1
    # Share of each SSD filled with (popularity-weighted) checkpoints before the trace starts.
    initial_ssd_fill: float = 0.5
    cold_starts: int = 1000
    mean_lifetime_s: float = 300.0
    # Target share of GPUs busy; sets the Poisson arrival rate.
    utilization: float = 0.7
    median_input_tokens: float = 1000.0
    generated_tokens_per_s: float = 30.0
    sync_interval_s: float = 1.0
    reservation_ttl_s: float = 60.0
    # Share of servers whose SSD reads well below its datasheet rate (worn or shared disks).
    degraded_ssd_share: float = 0.25


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """Startup latencies of one policy over the trace."""

    policy: Policy
    startup_s: tuple[float, ...]
    tiers: dict[str, int]
    migrations: int
    conflicts: int
    waited: int

    @property
    def mean_s(self) -> float:
        """Mean startup latency."""
        return float(np.mean(self.startup_s))

    def percentile_s(self, q: float) -> float:
        """Startup latency percentile (0-100)."""
        return float(np.percentile(self.startup_s, q))


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """All policies on one trace."""

    config: ReplayConfig
    results: tuple[PolicyResult, ...]

    def result(self, policy: Policy) -> PolicyResult:
        """The result of one policy."""
        return next(r for r in self.results if r.policy is policy)

    def markdown(self) -> str:
        """A markdown table of the policies side by side."""
        lines = [
            "| policy | mean startup (s) | p50 (s) | p99 (s) | dram / ssd / remote loads | migrations | stale-view "
            "conflicts | waited for GPUs |",
            "|---|---:|---:|---:|---|---:|---:|---:|",
        ]
        for r in self.results:
            tiers = " / ".join(str(r.tiers.get(t.value, 0)) for t in TierKind)
            lines.append(
                f"| {r.policy.value} | {r.mean_s:.2f} | {r.percentile_s(50):.2f} | {r.percentile_s(99):.2f} | "
                f"{tiers} | {r.migrations} | {r.conflicts} | {r.waited} |"
            )
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class _Checkpoint:
    name: str
    model: ModelSpec
    tp: int
    size_bytes: float
    shard_bytes: float

    def running(
        self, instance_id: str, *, server: str, gpu_ids: list[int], input_tokens: int, generated_tokens: int
    ) -> RunningInstance:
        """An instance of this checkpoint as the cluster lists it."""
        return RunningInstance(
            id=instance_id,
            model=self.model.name,
            checkpoint=self.name,
            server=server,
            gpu_ids=gpu_ids,
            tp=self.tp,
            input_tokens=input_tokens,
            generated_tokens=generated_tokens,
        )


@dataclass(frozen=True, slots=True)
class _ServerTruth:
    name: str
    network_bytes_per_s: float
    true_pcie_bytes_per_s: float
    true_ssd_bytes_per_s: float
    true_network_bytes_per_s: float


@dataclass(frozen=True, slots=True)
class _Trace:
    """Everything random about a replay, drawn once so every policy sees the same."""

    checkpoints: tuple[_Checkpoint, ...]
    popularity: np.ndarray
    servers: tuple[_ServerTruth, ...]
    initial_ssd: tuple[tuple[int, ...], ...]
    arrival_s: np.ndarray
    checkpoint_index: np.ndarray
    lifetime_s: np.ndarray
    input_tokens: np.ndarray


def _server(
    config: ReplayConfig,
    truth: _ServerTruth,
    *,
    busy: Container[int],
    dram: list[str],
    ssd: list[str],
    queue: list[LoadingTask],
) -> Server:
    """A simulated server as the cluster lists it: nominal bandwidths, the given busy GPUs, cache and queue."""
    return Server(
        name=truth.name,
        gpus=[Gpu(id=g, type=config.gpu_type, busy=g in busy) for g in range(config.gpus_per_server)],
        tiers=[
            StorageTier(
                kind=TierKind.DRAM,
                capacity_bytes=config.dram_bytes,
                read_bandwidth_bytes_per_s=config.dram_read_bytes_per_s,
                checkpoints=dram,
            ),
            StorageTier(
                kind=TierKind.SSD,
                capacity_bytes=config.ssd_bytes,
                read_bandwidth_bytes_per_s=config.ssd_read_bytes_per_s,
                checkpoints=ssd,
            ),
        ],
        network_bandwidth_bytes_per_s=truth.network_bytes_per_s,
        pcie_bandwidth_bytes_per_s=config.pcie_bytes_per_s,
        loading_queue=queue,
    )


def _checkpoints(config: ReplayConfig, catalog: Catalog) -> tuple[_Checkpoint, ...]:
    out = []
    for name, tp in REPLAY_MODELS:
        model = catalog.model(name)
        size = checkpoint_bytes(model, weight_dtype=DType.BF16)
        shard = shard_bytes(model, weight_dtype=DType.BF16, tp=tp)
        for v in range(config.variants_per_model):
            out.append(_Checkpoint(f"{name}@ft{v}", model, tp, size, shard))
    return tuple(out)


def make_trace(config: ReplayConfig, *, catalog: Catalog) -> _Trace:
    """Draw the servers' true bandwidths, initial caches and the cold-start arrivals for a seed."""
    rng = np.random.default_rng(config.seed)
    checkpoints = _checkpoints(config, catalog)
    ranks = rng.permutation(len(checkpoints)) + 1
    popularity = 1.0 / ranks.astype(np.float64) ** config.zipf_exponent
    popularity /= popularity.sum()
    servers = []
    for i in range(config.servers):
        network = float(rng.choice(config.network_gbit_per_s)) * GBIT
        degraded = rng.random() < config.degraded_ssd_share
        ssd_factor = rng.uniform(0.25, 0.5) if degraded else rng.uniform(0.85, 1.0)
        servers.append(
            _ServerTruth(
                name=f"node-{i:02d}",
                network_bytes_per_s=network,
                true_pcie_bytes_per_s=config.pcie_bytes_per_s * rng.uniform(0.8, 0.95),
                true_ssd_bytes_per_s=config.ssd_read_bytes_per_s * ssd_factor,
                true_network_bytes_per_s=network * rng.uniform(0.6, 0.95),
            )
        )
    initial: list[tuple[int, ...]] = []
    for _ in range(config.servers):
        order = rng.choice(len(checkpoints), size=len(checkpoints), replace=False, p=popularity)
        held, used = [], 0.0
        for idx in order:
            size = checkpoints[int(idx)].size_bytes
            if used + size > config.initial_ssd_fill * config.ssd_bytes:
                break
            held.append(int(idx))
            used += size
        initial.append(tuple(held))
    mean_gpus = float(sum(p * c.tp for p, c in zip(popularity, checkpoints, strict=True)))
    total_gpus = config.servers * config.gpus_per_server
    rate_per_s = config.utilization * total_gpus / (mean_gpus * config.mean_lifetime_s)
    gaps = rng.exponential(1.0 / rate_per_s, size=config.cold_starts)
    chosen = rng.choice(len(checkpoints), size=config.cold_starts, p=popularity)
    lifetimes = rng.exponential(config.mean_lifetime_s, size=config.cold_starts)
    inputs = np.clip(rng.lognormal(math.log(config.median_input_tokens), 0.8, size=config.cold_starts), 16, 16000)
    return _Trace(
        checkpoints=checkpoints,
        popularity=popularity,
        servers=tuple(servers),
        initial_ssd=tuple(initial),
        arrival_s=np.cumsum(gaps),
        checkpoint_index=chosen,
        lifetime_s=lifetimes,
        input_tokens=inputs.astype(np.int64),
    )


# Event kinds, in the order simultaneous events are handled.
_LOAD_DONE, _MIGRATION_DONE, _READY, _END, _RETRY, _ARRIVAL = range(6)


@dataclass(slots=True)
class _Load:
    server: int
    checkpoint: int
    tier: TierKind
    start_s: float
    end_s: float
    gpus: int


@dataclass(slots=True)
class _Instance:
    request: int
    checkpoint: int
    server: int
    gpu_ids: list[int]
    ready_s: float = math.inf
    end_s: float = math.inf
    state: str = "loading"
    input_tokens: int = 0
    migrate_to: tuple[int, list[int]] | None = None
    # Source GPUs a migration frees that the displacing instance does not need.
    leftover: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Stats:
    startup_s: dict[int, float] = field(default_factory=dict)
    tiers: dict[str, int] = field(default_factory=dict)
    migrations: int = 0
    conflicts: int = 0
    waited: set[int] = field(default_factory=set)


class _Simulation:
    """One policy on one trace."""

    def __init__(self, config: ReplayConfig, trace: _Trace, policy: Policy, catalog: Catalog) -> None:
        self.config = config
        self.trace = trace
        self.policy = policy
        self.catalog = catalog
        self.rng = np.random.default_rng([config.seed, list(Policy).index(policy)])
        self.gpu = catalog.gpu(config.gpu_type)
        engine = catalog.engine("vllm")
        self.recompute: list[RecomputeCost] = [
            derived_recompute_cost(
                c.model,
                gpu=self.gpu,
                engine=engine,
                calibration=catalog.calibration_for(self.gpu),
                weight_dtype=DType.BF16,
                tp=c.tp,
            )
            for c in trace.checkpoints
        ]
        self.index = {c.name: i for i, c in enumerate(trace.checkpoints)}
        n = config.servers
        self.free: list[set[int]] = [set(range(config.gpus_per_server)) for _ in range(n)]
        self.dram: list[OrderedDict[int, float]] = [OrderedDict() for _ in range(n)]
        self.ssd: list[OrderedDict[int, float]] = [
            OrderedDict((i, trace.checkpoints[i].size_bytes) for i in held) for held in trace.initial_ssd
        ]
        self.loader_free_at_s = [0.0] * n
        self.loads: list[list[_Load]] = [[] for _ in range(n)]
        self.instances: dict[int, _Instance] = {}
        self.events: list[tuple[float, int, int, object]] = []
        self.seq = 0
        self.pending: list[int] = []
        self.retry_scheduled = False
        self.stats = _Stats()
        self.view: Cluster | None = None
        self.view_built_s = -math.inf
        self.dirty = True
        self.feedback: list[ClusterEvent] = []
        self.learning = self._cluster(0.0, learned=Learned(), with_state=False)
        self.options = (
            EstimatorOptions(use_learned=False, share_remote_link=False)
            if policy is Policy.SERVERLESSLLM
            else EstimatorOptions()
        )

    # Event loop ----------------------------------------------------------------------------------

    def push(self, time_s: float, kind: int, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (time_s, kind, self.seq, payload))

    def run(self) -> PolicyResult:
        for r, t in enumerate(self.trace.arrival_s):
            self.push(float(t), _ARRIVAL, r)
        while self.events:
            t, kind, _, payload = heapq.heappop(self.events)
            if kind == _ARRIVAL:
                assert isinstance(payload, int)
                if not self.try_place(payload, t):
                    self.wait(payload, t)
            elif kind == _RETRY:
                self.retry_scheduled = False
                waiting, self.pending = self.pending, []
                for r in waiting:
                    if not self.try_place(r, t):
                        self.pending.append(r)
                if self.pending:
                    self.schedule_retry(t)
            elif kind == _LOAD_DONE:
                assert isinstance(payload, _Load)
                self.load_done(payload)
            elif kind == _MIGRATION_DONE:
                assert isinstance(payload, tuple)
                self.migration_done(*payload)
            elif kind == _READY:
                assert isinstance(payload, _Instance)
                payload.state = "running"
                self.dirty = True
            elif kind == _END:
                assert isinstance(payload, _Instance)
                self.end(payload)
        if self.pending:
            raise PlanningError(f"{len(self.pending)} cold starts were never placed")
        startup = tuple(self.stats.startup_s[r] for r in range(len(self.trace.arrival_s)))
        return PolicyResult(
            policy=self.policy,
            startup_s=startup,
            tiers=dict(self.stats.tiers),
            migrations=self.stats.migrations,
            conflicts=self.stats.conflicts,
            waited=len(self.stats.waited),
        )

    def wait(self, request: int, time_s: float) -> None:
        self.stats.waited.add(request)
        self.pending.append(request)
        self.schedule_retry(time_s)

    def schedule_retry(self, time_s: float) -> None:
        if not self.retry_scheduled:
            self.retry_scheduled = True
            self.push(time_s + max(self.config.sync_interval_s, 0.5), _RETRY, None)

    # Truth ----------------------------------------------------------------------------------------

    def start_load(self, server: int, checkpoint: int, time_s: float, tier: TierKind) -> _Load:
        """Queue a load on the server's loader at its true rates, from the tier the placer chose when the
        checkpoint is still there (else the fastest local copy, else the remote store)."""
        ckpt = self.trace.checkpoints[checkpoint]
        truth = self.trace.servers[server]
        start_s = max(time_s, self.loader_free_at_s[server])
        gpu_stage_s = ckpt.shard_bytes / truth.true_pcie_bytes_per_s
        downloads = sum(
            1 for loads in self.loads for ld in loads if ld.tier is TierKind.REMOTE and ld.start_s <= start_s < ld.end_s
        )
        share = self.config.remote_store_bytes_per_s / (downloads + 1)
        in_dram, in_ssd = checkpoint in self.dram[server], checkpoint in self.ssd[server]
        if (tier is TierKind.DRAM and not in_dram) or (tier is TierKind.SSD and not in_ssd):
            tier = TierKind.DRAM if in_dram else TierKind.SSD if in_ssd else TierKind.REMOTE
        if tier is TierKind.DRAM:
            transfer_s = gpu_stage_s
            self.dram[server].move_to_end(checkpoint)
        elif tier is TierKind.SSD:
            transfer_s = max(ckpt.size_bytes / truth.true_ssd_bytes_per_s, gpu_stage_s)
            self.ssd[server].move_to_end(checkpoint)
        else:
            transfer_s = max(ckpt.size_bytes / min(truth.true_network_bytes_per_s, share), gpu_stage_s)
        load = _Load(server, checkpoint, tier, start_s, start_s + transfer_s, ckpt.tp)
        self.loader_free_at_s[server] = load.end_s
        self.loads[server].append(load)
        self.push(load.end_s, _LOAD_DONE, load)
        self.dirty = True
        return load

    def cache(self, tier: OrderedDict[int, float], checkpoint: int, capacity_bytes: float) -> None:
        tier[checkpoint] = self.trace.checkpoints[checkpoint].size_bytes
        tier.move_to_end(checkpoint)
        while sum(tier.values()) > capacity_bytes and len(tier) > 1:
            tier.popitem(last=False)

    def load_done(self, load: _Load) -> None:
        self.loads[load.server].remove(load)
        self.cache(self.dram[load.server], load.checkpoint, self.config.dram_bytes)
        if load.tier is TierKind.REMOTE:
            self.cache(self.ssd[load.server], load.checkpoint, self.config.ssd_bytes)
        ckpt = self.trace.checkpoints[load.checkpoint]
        if self.policy is Policy.OURS:
            self.feedback.append(
                LoadFinished(
                    type="load_finished",
                    server=self.trace.servers[load.server].name,
                    model=ckpt.name,
                    tier=load.tier,
                    size_bytes=ckpt.size_bytes,
                    duration_s=load.end_s - load.start_s,
                    gpus=load.gpus,
                )
            )
        self.dirty = True

    def tokens_at(self, inst: _Instance, time_s: float) -> tuple[int, int]:
        generated = max(0.0, time_s - inst.ready_s) * self.config.generated_tokens_per_s
        return inst.input_tokens, int(generated)

    def migration_done(self, inst: _Instance, dest: int, gpu_ids: list[int], tokens: int, recompute_s: float) -> None:
        if inst.state == "ended":
            return
        self.free[inst.server].update(inst.leftover)
        inst.server, inst.gpu_ids, inst.state, inst.migrate_to, inst.leftover = dest, gpu_ids, "running", None, []
        if self.policy is Policy.OURS:
            ckpt = self.trace.checkpoints[inst.checkpoint]
            self.feedback.append(
                MigrationFinished(
                    type="migration_finished",
                    model=ckpt.model.name,
                    gpu=self.config.gpu_type,
                    tp=ckpt.tp,
                    input_tokens=inst.input_tokens,
                    output_tokens=max(0, tokens - inst.input_tokens),
                    duration_s=recompute_s,
                )
            )
        self.dirty = True

    def end(self, inst: _Instance) -> None:
        if inst.state == "migrating" and inst.migrate_to is not None:
            # Its source GPUs already belong to the instance that displaced it; free the destination.
            dest, gpu_ids = inst.migrate_to
            self.free[dest].update(gpu_ids)
            self.free[inst.server].update(inst.leftover)
        else:
            self.free[inst.server].update(inst.gpu_ids)
        inst.state = "ended"
        self.instances.pop(inst.request, None)
        self.dirty = True

    # What the placer sees ---------------------------------------------------------------------------

    def _cluster(self, time_s: float, *, learned: Learned, with_state: bool = True) -> Cluster:
        config = self.config
        servers = []
        for i, truth in enumerate(self.trace.servers):
            queue = []
            if with_state:
                for ld in self.loads[i]:
                    if ld.end_s <= time_s:
                        continue
                    size = self.trace.checkpoints[ld.checkpoint].size_bytes
                    left = (ld.end_s - max(time_s, ld.start_s)) / (ld.end_s - ld.start_s)
                    queue.append(
                        LoadingTask(
                            model=self.trace.checkpoints[ld.checkpoint].name,
                            tier=ld.tier,
                            remaining_bytes=size * left,
                            bandwidth_bytes_per_s=size / (ld.end_s - ld.start_s),
                        )
                    )
            names = [c.name for c in self.trace.checkpoints]
            servers.append(
                _server(
                    config,
                    truth,
                    busy=set(range(config.gpus_per_server)) - self.free[i] if with_state else (),
                    dram=[names[c] for c in self.dram[i]] if with_state else [],
                    ssd=[names[c] for c in self.ssd[i]] if with_state else [],
                    queue=queue,
                )
            )
        instances = []
        if with_state:
            for inst in self.instances.values():
                if inst.state != "running":
                    continue
                ckpt = self.trace.checkpoints[inst.checkpoint]
                t_in, t_out = self.tokens_at(inst, time_s)
                instances.append(
                    ckpt.running(
                        str(inst.request),
                        server=self.trace.servers[inst.server].name,
                        gpu_ids=sorted(inst.gpu_ids),
                        input_tokens=t_in,
                        generated_tokens=t_out,
                    )
                )
        return Cluster(
            servers=servers,
            instances=instances,
            remote_store_bandwidth_bytes_per_s=config.remote_store_bytes_per_s,
            learned=learned,
        )

    def current_view(self, time_s: float) -> Cluster:
        interval = self.config.sync_interval_s
        stale = self.dirty if interval <= 0 else time_s - self.view_built_s >= interval
        if self.view is None or stale:
            if self.feedback:
                self.learning = apply_events(self.learning, self.feedback)
                self.feedback = []
            learned = self.learning.learned if self.policy is Policy.OURS else Learned()
            self.view = self._cluster(time_s, learned=learned)
            self.view_built_s = time_s
            self.dirty = False
        return self.view

    # Decisions ------------------------------------------------------------------------------------

    def choose(self, request: int, time_s: float) -> Candidate | None:
        ckpt = self.trace.checkpoints[int(self.trace.checkpoint_index[request])]
        view = self.current_view(time_s)
        if self.policy is Policy.ANY_FREE:
            hosts = [
                (s.name, free) for s in view.servers if len(free := [g.id for g in s.gpus if not g.busy]) >= ckpt.tp
            ]
            if not hosts:
                return None
            name, free = hosts[int(self.rng.integers(len(hosts)))]
            load = ClusterView(view, now_s=time_s).load(
                name, checkpoint=ckpt.name, checkpoint_bytes=ckpt.size_bytes, shard_bytes=ckpt.shard_bytes
            )
            return PlacementOption(load.total_s, name, self.config.gpu_type, free[: ckpt.tp], load).to_candidate()
        request_model = PlacementRequest(model=ckpt.model.name, tp=ckpt.tp, checkpoint=ckpt.name, max_candidates=1)
        decision = place(view, request_model, now_s=time_s, catalog=self.catalog, options=self.options)
        if not decision.placements:
            return None
        if self.policy is Policy.OURS:
            self.view = reserve(view, decision, now_s=time_s, ttl_s=self.config.reservation_ttl_s)
        return decision.placements[0]

    def try_place(self, request: int, time_s: float) -> bool:
        choice = self.choose(request, time_s)
        if choice is None:
            return False
        server = int(choice.server.split("-")[1])
        moving: list[tuple[_Instance, int, list[int], TierKind]] = []
        for m in choice.migrations:
            inst = self.instances.get(int(m.instance_id))
            dest = int(m.to_server.split("-")[1])
            if inst is None or inst.state != "running" or inst.server != server:
                break
            if not set(m.to_gpu_ids) <= self.free[dest]:
                break
            moving.append((inst, dest, list(m.to_gpu_ids), m.load.tier))
        else:
            handed_over = {g for inst, _, _, _ in moving for g in inst.gpu_ids}
            if set(choice.gpu_ids) <= self.free[server] | handed_over:
                self.execute(request, time_s, server, choice.gpu_ids, moving, choice.tier)
                return True
        # The view was stale: the GPUs or the instances it counted on are gone.
        self.stats.conflicts += 1
        return False

    def execute(
        self,
        request: int,
        time_s: float,
        server: int,
        gpu_ids: list[int],
        moving: list[tuple[_Instance, int, list[int], TierKind]],
        tier: TierKind,
    ) -> None:
        checkpoint = int(self.trace.checkpoint_index[request])
        ckpt = self.trace.checkpoints[checkpoint]
        migrations_done_s = 0.0
        for inst, dest, dest_gpus, dest_tier in moving:
            self.free[dest] -= set(dest_gpus)
            load = self.start_load(dest, inst.checkpoint, time_s, dest_tier)
            tokens = sum(self.tokens_at(inst, load.end_s))
            recompute_s = self.recompute[inst.checkpoint].time_s(tokens)
            inst.state, inst.migrate_to = "migrating", (dest, dest_gpus)
            inst.leftover = sorted(set(inst.gpu_ids) - set(gpu_ids))
            done_s = load.end_s + recompute_s
            migrations_done_s = max(migrations_done_s, done_s)
            self.push(done_s, _MIGRATION_DONE, (inst, dest, dest_gpus, tokens, recompute_s))
            self.stats.migrations += 1
        self.free[server] -= set(gpu_ids)
        load = self.start_load(server, checkpoint, time_s, tier)
        ready_s = load.end_s
        if moving:
            gpu_stage_s = ckpt.shard_bytes / self.trace.servers[server].true_pcie_bytes_per_s
            ready_s = max(ready_s, migrations_done_s + gpu_stage_s)
        inst = _Instance(
            request=request,
            checkpoint=checkpoint,
            server=server,
            gpu_ids=list(gpu_ids),
            ready_s=ready_s,
            end_s=ready_s + float(self.trace.lifetime_s[request]),
            input_tokens=int(self.trace.input_tokens[request]),
        )
        self.instances[request] = inst
        self.push(ready_s, _READY, inst)
        self.push(inst.end_s, _END, inst)
        self.stats.startup_s[request] = ready_s - float(self.trace.arrival_s[request])
        self.stats.tiers[load.tier.value] = self.stats.tiers.get(load.tier.value, 0) + 1


def run_replay(config: ReplayConfig, *, catalog: Catalog, policies: tuple[Policy, ...] = tuple(Policy)) -> ReplayResult:
    """Replay the seeded trace under each policy."""
    trace = make_trace(config, catalog=catalog)
    results = tuple(_Simulation(config, trace, policy, catalog).run() for policy in policies)
    return ReplayResult(config=config, results=results)


def synthetic_cluster(
    *, catalog: Catalog, servers: int = 64, gpus_per_server: int = 8, instances: int = 200, seed: int = 0
) -> Cluster:
    """A busy cluster snapshot for latency benchmarks: cached checkpoints, running instances, queued loads."""
    config = ReplayConfig(seed=seed, servers=servers, gpus_per_server=gpus_per_server)
    trace = make_trace(config, catalog=catalog)
    rng = np.random.default_rng(seed + 1)
    names = [c.name for c in trace.checkpoints]
    busy: list[set[int]] = [set() for _ in range(servers)]
    running: list[RunningInstance] = []
    for n in range(instances * 4):
        if len(running) >= instances:
            break
        c = int(rng.choice(len(names), p=trace.popularity))
        ckpt = trace.checkpoints[c]
        s = int(rng.integers(servers))
        free = [g for g in range(gpus_per_server) if g not in busy[s]]
        if len(free) < ckpt.tp:
            continue
        gpu_ids = free[: ckpt.tp]
        busy[s].update(gpu_ids)
        running.append(
            ckpt.running(
                f"inst-{n}",
                server=trace.servers[s].name,
                gpu_ids=gpu_ids,
                input_tokens=int(rng.integers(64, 8000)),
                generated_tokens=int(rng.integers(0, 2000)),
            )
        )
    server_models = []
    for i, truth in enumerate(trace.servers):
        dram = [names[c] for c in rng.choice(len(names), size=6, replace=False, p=trace.popularity)]
        queue = []
        if rng.random() < 0.25:
            c = int(rng.integers(len(names)))
            queue.append(
                LoadingTask(
                    model=names[c],
                    tier=TierKind.REMOTE if rng.random() < 0.5 else TierKind.SSD,
                    remaining_bytes=trace.checkpoints[c].size_bytes * rng.random(),
                    bandwidth_bytes_per_s=2e9,
                )
            )
        server_models.append(
            _server(config, truth, busy=busy[i], dram=dram, ssd=[names[c] for c in trace.initial_ssd[i]], queue=queue)
        )
    return Cluster(
        servers=server_models,
        instances=running,
        remote_store_bandwidth_bytes_per_s=config.remote_store_bytes_per_s,
    )
