"""Trace replay: a simulated GPU cluster serving requests with cold starts, the same seeded trace under several
placement policies, each seeing exactly the same cluster state.

Requests for checkpoints (Zipf popularity) arrive as a Poisson process. A request goes to a warm instance of
its checkpoint with room (up to ``max_requests_per_instance`` at once), or joins one that is loading; otherwise
it is a cold start and the policy places a new instance. An instance that has served its last request stays
alive, idle, for its keep-alive, and a policy may stop an idle instance to use its GPUs.

The simulated truth runs on the same timeline the estimators use (``estimators``): each server loads one
checkpoint at a time from the fastest tier holding it when the load starts; a load whose GPUs are still in use
(freed by a migration) starts once they are free, unless the plan staged the checkpoint into DRAM first; a live
migration loads the instance on its destination, recomputes its KV cache in two rounds
(``estimators.migration_timeline``) and hands its GPUs over, or frees them when its requests finish first.
Loads cache the checkpoint in DRAM (and on SSD after a download), evicting the least recently used.
Scenarios: ``stated``, the bandwidths the cluster file states are the true ones and every server has its own
link to the remote store; ``degraded``, PCIe and network run below line rate, a quarter of the SSDs read at a
quarter to half their rate, and all downloads share the store. Every policy learns bandwidths from the same
reported loads; estimate and outcome differ only by what no policy knows (future arrivals, when requests end).

Policies:

- any-free: a random server with enough free GPUs (else the least-loaded one, stopping idle instances);
- locality-blind: the server with the shortest loading queue, ignoring where checkpoints are cached;
- serverlessllm: ServerlessLLM's scheduler: loading queue and fastest tier per server, at most one live
  migration, no staging, ranked on startup latency alone;
- ours: the optimizer (any number of migrations, staging, link sharing, ranked on startup plus harm);
- ours+prewarm, serverlessllm+prewarm: those placers with prewarming advice applied every ``prewarm_interval_s``
  and its keep-alive per checkpoint. A copy runs on its server's loader at the true rates (a download takes its
  share of the store) when no cold start needs the loader, pauses (keeping its progress) when one does, and
  caches the checkpoint only when done; the start-of-trace forecast comes from how many SSDs hold each
  checkpoint, then from the requests seen so far.

GPU-seconds count every GPU from the moment a policy takes it (for a load, a migration or a warm instance) to
the moment it is released, idle keep-alive included.
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
    RunningInstance,
    Server,
    StorageTier,
    TierKind,
    apply_events,
)
from service.placement.estimators import (
    EstimatorOptions,
    RecomputeCost,
    checkpoint_bytes,
    derived_recompute_cost,
    migration_timeline,
    shard_bytes,
)
from service.placement.optimizer import Candidate, PlacementRequest, place
from service.placement.prewarm import ModelDemand, PrewarmAdvice, PrewarmRequest, advise_prewarm
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
    LOCALITY_BLIND = "locality-blind"
    SERVERLESSLLM = "serverlessllm"
    OURS = "ours"
    OURS_PREWARM = "ours+prewarm"
    SERVERLESSLLM_PREWARM = "serverlessllm+prewarm"


class Scenario(StrEnum):
    """How the true bandwidths relate to the stated ones."""

    STATED = "stated"
    DEGRADED = "degraded"


PREWARMED = (Policy.OURS_PREWARM, Policy.SERVERLESSLLM_PREWARM)
SERVERLESSLLM_OPTIONS = EstimatorOptions(
    use_learned=True, share_remote_link=False, max_migrations=1, allow_staging=False, harm_aware=False
)


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """The simulated cluster and trace."""

    seed: int = 0
    scenario: Scenario = Scenario.STATED
    servers: int = 16
    gpus_per_server: int = 8
    gpu_type: str = "h100-sxm"
    dram_bytes: float = 512e9
    ssd_bytes: float = 4e12
    dram_read_bytes_per_s: float = 100e9
    pcie_bytes_per_s: float = 25e9
    ssd_read_bytes_per_s: float = 6e9
    network_gbit_per_s: tuple[float, ...] = (10.0, 25.0)
    # The shared store of the degraded scenario; in the stated one it serves every link at full rate.
    remote_store_bytes_per_s: float = 12.5e9
    checkpoints: int = 64
    zipf_exponent: float = 1.1
    # Share of each SSD filled with (popularity-weighted) checkpoints before the trace starts.
    initial_ssd_fill: float = 0.5
    rate_per_s: float = 2.0
    duration_s: float = 3600.0
    median_input_tokens: float = 1000.0
    median_output_tokens: float = 300.0
    generated_tokens_per_s: float = 30.0
    max_requests_per_instance: int = 4
    keep_alive_s: float = 60.0
    prewarm_interval_s: float = 300.0
    prewarm_copy_s_per_server: float = 120.0
    prewarm_min_keep_alive_s: float = 60.0
    prewarm_max_keep_alive_s: float = 60.0
    # The advice's idle budget, as the idle GPU-seconds of a uniform keep-alive of this many seconds (None: the
    # keep-alive itself).
    prewarm_budget_keep_alive_s: float | None = None
    # Copies into free room only (see PrewarmRequest.evict).
    prewarm_evict: bool = False
    # Share of servers whose SSD reads well below its datasheet rate in the degraded scenario.
    degraded_ssd_share: float = 0.25
    # Idle instances state their request rate and keep-alive, so that the optimizer prices stopping them.
    state_idle_rates: bool = False


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """Startup latencies (every request; 0 for a warm one) and costs of one policy over the trace."""

    policy: Policy
    startup_s: tuple[float, ...]
    cold_starts: int
    tiers: dict[str, int]
    migrations: int
    staged: int
    stopped_idle: int
    gpu_seconds: float
    estimate_error_s: float
    # Startup seconds summed over the requests served by instances loaded from each tier, and by option kind.
    startup_s_by_tier: dict[str, float] = field(default_factory=dict)
    startup_s_by_option: dict[str, float] = field(default_factory=dict)
    options: dict[str, int] = field(default_factory=dict)
    # Bytes the prewarming copies moved (0 without prewarming).
    copied_bytes: float = 0.0

    @property
    def mean_s(self) -> float:
        """Mean startup latency."""
        return float(np.mean(self.startup_s)) if self.startup_s else 0.0

    def percentile_s(self, q: float) -> float:
        """Startup latency percentile (0-100)."""
        return float(np.percentile(self.startup_s, q)) if self.startup_s else 0.0


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
            "| policy | requests | cold starts | mean startup (s) | p50 (s) | p99 (s) | GPU-hours | "
            "dram / ssd / remote loads | migrations | staged | idle stopped | mean abs. estimate error (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        for r in self.results:
            tiers = " / ".join(str(r.tiers.get(t.value, 0)) for t in TierKind)
            lines.append(
                f"| {r.policy.value} | {len(r.startup_s)} | {r.cold_starts} | {r.mean_s:.2f} | "
                f"{r.percentile_s(50):.2f} | {r.percentile_s(99):.2f} | {r.gpu_seconds / 3600:.1f} | {tiers} | "
                f"{r.migrations} | {r.staged} | {r.stopped_idle} | {r.estimate_error_s:.2f} |"
            )
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class _Checkpoint:
    name: str
    model: ModelSpec
    tp: int
    size_bytes: float
    shard_bytes: float


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
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    remote_store_bytes_per_s: float


def _server(
    config: ReplayConfig,
    truth: _ServerTruth,
    *,
    busy: Container[int],
    dram: list[str],
    ssd: list[str],
    queue: list[LoadingTask],
) -> Server:
    """A simulated server as the cluster lists it: stated bandwidths, the given busy GPUs, cache and queue."""
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
    for i in range(config.checkpoints):
        name, tp = REPLAY_MODELS[i % len(REPLAY_MODELS)]
        model = catalog.model(name)
        size = checkpoint_bytes(model, weight_dtype=DType.BF16)
        shard = shard_bytes(model, weight_dtype=DType.BF16, tp=tp)
        out.append(_Checkpoint(f"{name}@ft{i // len(REPLAY_MODELS)}", model, tp, size, shard))
    return tuple(out)


def make_trace(config: ReplayConfig, *, catalog: Catalog) -> _Trace:
    """Draw the servers' true bandwidths, initial caches and the requests for a seed."""
    rng = np.random.default_rng(config.seed)
    checkpoints = _checkpoints(config, catalog)
    ranks = rng.permutation(len(checkpoints)) + 1
    popularity = 1.0 / ranks.astype(np.float64) ** config.zipf_exponent
    popularity /= popularity.sum()
    degraded = config.scenario is Scenario.DEGRADED
    servers = []
    for i in range(config.servers):
        network = float(rng.choice(config.network_gbit_per_s)) * GBIT
        slow_ssd = rng.random() < config.degraded_ssd_share
        ssd_factor = rng.uniform(0.25, 0.5) if slow_ssd else rng.uniform(0.85, 1.0)
        pcie_factor = rng.uniform(0.8, 0.95)
        net_factor = rng.uniform(0.6, 0.95)
        servers.append(
            _ServerTruth(
                name=f"node-{i:02d}",
                network_bytes_per_s=network,
                true_pcie_bytes_per_s=config.pcie_bytes_per_s * (pcie_factor if degraded else 1.0),
                true_ssd_bytes_per_s=config.ssd_read_bytes_per_s * (ssd_factor if degraded else 1.0),
                true_network_bytes_per_s=network * (net_factor if degraded else 1.0),
            )
        )
    initial: list[tuple[int, ...]] = []
    for _ in range(config.servers):
        order = rng.choice(len(checkpoints), size=len(checkpoints), replace=False, p=popularity)
        held, used = [], 0.0
        for idx in order:
            size = checkpoints[int(idx)].size_bytes
            if used + size > config.initial_ssd_fill * config.ssd_bytes:
                continue
            held.append(int(idx))
            used += size
        initial.append(tuple(held))
    count = int(rng.poisson(config.rate_per_s * config.duration_s))
    arrivals = np.sort(rng.uniform(0.0, config.duration_s, size=count))
    chosen = rng.choice(len(checkpoints), size=count, p=popularity)
    inputs = np.clip(rng.lognormal(math.log(config.median_input_tokens), 0.8, size=count), 16, 16000)
    outputs = np.clip(rng.lognormal(math.log(config.median_output_tokens), 0.8, size=count), 16, 4000)
    store = config.remote_store_bytes_per_s if degraded else sum(s.network_bytes_per_s for s in servers)
    return _Trace(
        checkpoints=checkpoints,
        popularity=popularity,
        servers=tuple(servers),
        initial_ssd=tuple(initial),
        arrival_s=arrivals,
        checkpoint_index=chosen,
        input_tokens=inputs.astype(np.int64),
        output_tokens=outputs.astype(np.int64),
        remote_store_bytes_per_s=store,
    )


# Event kinds, in the order simultaneous events are handled.
_LOAD_DONE, _COPY_DONE, _FREE, _HANDOVER, _READY, _REQUEST_END, _IDLE_END, _PREWARM, _COPY_KICK, _ARRIVAL = range(10)


@dataclass(slots=True)
class _Load:
    server: int
    checkpoint: int
    tier: TierKind
    start_s: float
    end_s: float
    gpus: int
    staged: bool = False
    to_ssd: bool = False


@dataclass(slots=True)
class _Copy:
    """A prewarming copy on a server's loader: it runs only while no cold start loads there, and pauses (keeping
    its progress) when one starts."""

    server: int
    checkpoint: int
    to_ssd: bool
    tier: TierKind | None = None
    left_s: float = -1.0
    started_s: float = 0.0
    epoch: int = 0


@dataclass(slots=True)
class _Instance:
    id: int
    checkpoint: int
    server: int
    gpu_ids: list[int]
    ready_s: float
    keep_alive_s: float
    tier: str = "warm"
    option: str = "free"
    # Request -> (start, end) of its generation on this instance.
    requests: dict[int, tuple[float, float, int]] = field(default_factory=dict)
    state: str = "loading"
    idle_since_s: float | None = None
    epoch: int = 0


@dataclass(slots=True)
class _Stats:
    startup_s: dict[int, float] = field(default_factory=dict)
    tiers: dict[str, int] = field(default_factory=dict)
    cold_starts: int = 0
    migrations: int = 0
    staged: int = 0
    stopped_idle: int = 0
    estimate_error_s: list[float] = field(default_factory=list)
    startup_s_by_tier: dict[str, float] = field(default_factory=dict)
    startup_s_by_option: dict[str, float] = field(default_factory=dict)
    options: dict[str, int] = field(default_factory=dict)


class _Simulation:
    """One policy on one trace."""

    def __init__(self, config: ReplayConfig, trace: _Trace, policy: Policy, catalog: Catalog) -> None:
        self.config = config
        self.trace = trace
        self.policy = policy
        self.catalog = catalog
        self.rng = np.random.default_rng([config.seed, list(Policy).index(policy)])
        gpu = catalog.gpu(config.gpu_type)
        engine = catalog.engine("vllm")
        self.recompute: list[RecomputeCost] = [
            derived_recompute_cost(
                c.model,
                gpu=gpu,
                engine=engine,
                calibration=catalog.calibration_for(gpu),
                weight_dtype=DType.BF16,
                tp=c.tp,
            )
            for c in trace.checkpoints
        ]
        self.names = [c.name for c in trace.checkpoints]
        n = config.servers
        self.free: list[set[int]] = [set(range(config.gpus_per_server)) for _ in range(n)]
        self.busy_gpus = 0
        self.busy_since_s = 0.0
        self.gpu_seconds = 0.0
        self.dram: list[OrderedDict[int, float]] = [OrderedDict() for _ in range(n)]
        self.ssd: list[OrderedDict[int, float]] = [
            OrderedDict((i, trace.checkpoints[i].size_bytes) for i in held) for held in trace.initial_ssd
        ]
        self.loader_free_at_s = [0.0] * n
        self.loads: list[list[_Load]] = [[] for _ in range(n)]
        self.copies: list[list[_Copy]] = [[] for _ in range(n)]
        self.copying: list[_Copy | None] = [None] * n
        self.copied_bytes = 0.0
        self.now_s = 0.0
        self.instances: dict[int, _Instance] = {}
        self.by_checkpoint: dict[int, set[int]] = {}
        self.next_instance = 0
        self.events: list[tuple[float, int, int, object]] = []
        self.seq = 0
        self.pending: list[int] = []
        self.stats = _Stats()
        self.view: Cluster | None = None
        self.view_key: tuple[float, int] = (-1.0, -1)
        self.version = 0
        self.feedback: list[ClusterEvent] = []
        self.learning = self._cluster(0.0, learned=Learned(), with_state=False)
        self.keep_alive_s: dict[int, float] = {}
        # Requests seen so far per checkpoint, and the start-of-trace forecast (as past demand left the SSDs).
        self.arrived = np.zeros(len(trace.checkpoints), dtype=np.int64)
        holders = np.bincount([c for held in trace.initial_ssd for c in held], minlength=len(trace.checkpoints))
        # Every checkpoint may be asked for: one holder's worth for those no SSD holds.
        self.forecast_per_s = (holders + 1.0) / float((holders + 1.0).sum()) * config.rate_per_s
        sllm = policy in (Policy.SERVERLESSLLM, Policy.SERVERLESSLLM_PREWARM)
        self.options = SERVERLESSLLM_OPTIONS if sllm else EstimatorOptions()

    # Event loop ----------------------------------------------------------------------------------

    def push(self, time_s: float, kind: int, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (time_s, kind, self.seq, payload))

    def run(self) -> PolicyResult:
        for r, t in enumerate(self.trace.arrival_s):
            self.push(float(t), _ARRIVAL, r)
        if self.policy in PREWARMED:
            self.push(0.0, _PREWARM, None)
        while self.events:
            t, kind, _, payload = heapq.heappop(self.events)
            self.now_s = t
            retry = True
            if kind == _ARRIVAL:
                assert isinstance(payload, int)
                self.arrive(payload, t)
                retry = False
            elif kind == _LOAD_DONE:
                assert isinstance(payload, _Load)
                self.load_done(payload)
                retry = False
            elif kind == _FREE:
                assert isinstance(payload, tuple)
                self.release(payload[0], payload[1], t)
            elif kind == _HANDOVER:
                assert isinstance(payload, tuple)
                self.handover(payload[0], payload[1], payload[2], t)
            elif kind == _READY:
                assert isinstance(payload, _Instance)
                self.ready(payload, t)
            elif kind == _REQUEST_END:
                assert isinstance(payload, tuple)
                self.request_end(payload[0], payload[1], t)
            elif kind == _IDLE_END:
                assert isinstance(payload, tuple)
                self.idle_end(payload[0], payload[1], t)
            elif kind == _PREWARM:
                self.prewarm(t)
                retry = False
            elif kind == _COPY_DONE:
                assert isinstance(payload, tuple)
                self.copy_done(payload[0], payload[1], t)
                retry = False
            elif kind == _COPY_KICK:
                assert isinstance(payload, int)
                self.kick(payload, t)
                retry = False
            if retry and self.pending:
                waiting, self.pending = self.pending, []
                for r in waiting:
                    if not self.serve(r, t):
                        self.pending.append(r)
        self.account(self.busy_since_s)
        if self.pending:
            raise PlanningError(f"{len(self.pending)} requests were never served")
        startup = tuple(self.stats.startup_s[r] for r in range(len(self.trace.arrival_s)))
        errors = self.stats.estimate_error_s
        return PolicyResult(
            policy=self.policy,
            startup_s=startup,
            cold_starts=self.stats.cold_starts,
            tiers=dict(self.stats.tiers),
            migrations=self.stats.migrations,
            staged=self.stats.staged,
            stopped_idle=self.stats.stopped_idle,
            gpu_seconds=self.gpu_seconds,
            estimate_error_s=float(np.mean(errors)) if errors else 0.0,
            startup_s_by_tier=dict(self.stats.startup_s_by_tier),
            startup_s_by_option=dict(self.stats.startup_s_by_option),
            options=dict(self.stats.options),
            copied_bytes=self.copied_bytes,
        )

    # GPUs and instances ----------------------------------------------------------------------------

    def account(self, time_s: float) -> None:
        self.gpu_seconds += self.busy_gpus * max(0.0, time_s - self.busy_since_s)
        self.busy_since_s = max(self.busy_since_s, time_s)

    def take(self, server: int, gpu_ids: list[int], time_s: float) -> None:
        self.account(time_s)
        taken = self.free[server] & set(gpu_ids)
        self.free[server] -= taken
        self.busy_gpus += len(taken)
        self.version += 1

    def release(self, server: int, gpu_ids: list[int], time_s: float) -> None:
        self.account(time_s)
        back = set(gpu_ids) - self.free[server]
        self.free[server] |= back
        self.busy_gpus -= len(back)
        self.version += 1

    def remove(self, inst: _Instance, time_s: float) -> None:
        self.release(inst.server, inst.gpu_ids, time_s)
        inst.state = "gone"
        self.instances.pop(inst.id, None)
        self.by_checkpoint.get(inst.checkpoint, set()).discard(inst.id)

    def go_idle(self, inst: _Instance, time_s: float) -> None:
        inst.idle_since_s = time_s
        inst.epoch += 1
        self.push(time_s + inst.keep_alive_s, _IDLE_END, (inst, inst.epoch))
        self.version += 1

    def ready(self, inst: _Instance, time_s: float) -> None:
        if inst.state != "loading":
            return
        inst.state = "warm"
        if not inst.requests:
            self.go_idle(inst, time_s)
        self.version += 1

    def request_end(self, inst: _Instance, request: int, time_s: float) -> None:
        inst.requests.pop(request, None)
        if not inst.requests and inst.state == "warm":
            self.go_idle(inst, time_s)
        self.version += 1

    def idle_end(self, inst: _Instance, epoch: int, time_s: float) -> None:
        if inst.state == "warm" and not inst.requests and inst.epoch == epoch:
            self.remove(inst, time_s)

    def handover(self, inst: _Instance, dest: int, gpu_ids: list[int], time_s: float) -> None:
        if inst.state != "migrating":
            return
        inst.server, inst.gpu_ids, inst.state = dest, gpu_ids, "warm"
        if not inst.requests:
            self.go_idle(inst, time_s)
        self.version += 1

    def attach(self, inst: _Instance, request: int, time_s: float) -> None:
        start_s = max(time_s, inst.ready_s)
        out = int(self.trace.output_tokens[request])
        end_s = start_s + out / self.config.generated_tokens_per_s
        inst.requests[request] = (start_s, end_s, int(self.trace.input_tokens[request]))
        if inst.idle_since_s is not None:
            inst.idle_since_s = None
            inst.epoch += 1
        self.push(end_s, _REQUEST_END, (inst, request))
        wait_s = start_s - float(self.trace.arrival_s[request])
        self.stats.startup_s[request] = wait_s
        if wait_s > 0:
            by_tier, by_option = self.stats.startup_s_by_tier, self.stats.startup_s_by_option
            by_tier[inst.tier] = by_tier.get(inst.tier, 0.0) + wait_s
            by_option[inst.option] = by_option.get(inst.option, 0.0) + wait_s
        self.version += 1

    # Requests ---------------------------------------------------------------------------------------

    def arrive(self, request: int, time_s: float) -> None:
        self.arrived[int(self.trace.checkpoint_index[request])] += 1
        if not self.serve(request, time_s):
            self.pending.append(request)

    def serve(self, request: int, time_s: float) -> bool:
        checkpoint = int(self.trace.checkpoint_index[request])
        best: _Instance | None = None
        for iid in self.by_checkpoint.get(checkpoint, ()):
            inst = self.instances[iid]
            if inst.state not in ("warm", "loading") or len(inst.requests) >= self.config.max_requests_per_instance:
                continue
            if best is None or (inst.ready_s, inst.id) < (best.ready_s, best.id):
                best = inst
        if best is not None:
            self.attach(best, request, time_s)
            return True
        return self.cold_start(request, time_s)

    # Truth ----------------------------------------------------------------------------------------

    def start_load(
        self, server: int, checkpoint: int, time_s: float, *, staged: bool = False, to_ssd: bool = False
    ) -> _Load:
        """Queue a load on the server's loader at its true rates, from the fastest tier holding the checkpoint;
        ``staged`` reads it into DRAM only, ``to_ssd`` downloads it onto the SSD only."""
        ckpt = self.trace.checkpoints[checkpoint]
        truth = self.trace.servers[server]
        self.pause_copy(server, self.now_s)
        start_s = max(time_s, self.loader_free_at_s[server])
        gpu_stage_s = ckpt.shard_bytes / truth.true_pcie_bytes_per_s
        dram_s = ckpt.size_bytes / self.config.dram_read_bytes_per_s
        if checkpoint in self.dram[server] and not to_ssd:
            tier = TierKind.DRAM
            transfer_s = 0.0 if staged else gpu_stage_s
            self.dram[server].move_to_end(checkpoint)
        elif checkpoint in self.ssd[server] and not to_ssd:
            tier = TierKind.SSD
            read_s = ckpt.size_bytes / truth.true_ssd_bytes_per_s
            transfer_s = max(read_s, dram_s) if staged else max(read_s, gpu_stage_s)
            self.ssd[server].move_to_end(checkpoint)
        else:
            tier = TierKind.REMOTE
            read_s = ckpt.size_bytes / self.download_bytes_per_s(server, start_s)
            transfer_s = read_s if to_ssd else max(read_s, dram_s) if staged else max(read_s, gpu_stage_s)
        load = _Load(server, checkpoint, tier, start_s, start_s + transfer_s, ckpt.tp, staged, to_ssd)
        self.loader_free_at_s[server] = load.end_s
        self.loads[server].append(load)
        self.push(load.end_s, _LOAD_DONE, load)
        if self.copies[server]:
            self.push(load.end_s, _COPY_KICK, server)
        self.version += 1
        return load

    def download_bytes_per_s(self, server: int, start_s: float) -> float:
        """True rate of a download starting then: the server's link, or its share of the store."""
        downloads = sum(
            1 for loads in self.loads for ld in loads if ld.tier is TierKind.REMOTE and ld.start_s <= start_s < ld.end_s
        )
        downloads += sum(1 for c in self.copying if c is not None and c.tier is TierKind.REMOTE)
        share = self.trace.remote_store_bytes_per_s / (downloads + 1)
        return min(self.trace.servers[server].true_network_bytes_per_s, share)

    # Prewarming copies (the loader's spare time) ----------------------------------------------------

    def pause_copy(self, server: int, time_s: float) -> None:
        """A cold start needs the loader: the running copy stops, keeping what it has read."""
        copy = self.copying[server]
        if copy is None:
            return
        copy.left_s = max(0.0, copy.left_s - (time_s - copy.started_s))
        copy.epoch += 1
        self.copying[server] = None
        self.copies[server].insert(0, copy)

    def kick(self, server: int, time_s: float) -> None:
        """Run the next copy when the loader has nothing else to do."""
        if self.copying[server] is not None or self.loader_free_at_s[server] > time_s:
            return
        while self.copies[server]:
            copy = self.copies[server].pop(0)
            if copy.left_s < 0:
                ckpt = self.trace.checkpoints[copy.checkpoint]
                truth = self.trace.servers[server]
                if copy.to_ssd:
                    if copy.checkpoint in self.ssd[server]:
                        continue
                    copy.tier, copy.left_s = (
                        TierKind.REMOTE,
                        ckpt.size_bytes / self.download_bytes_per_s(server, time_s),
                    )
                elif copy.checkpoint in self.dram[server]:
                    continue
                elif copy.checkpoint in self.ssd[server]:
                    read_s = ckpt.size_bytes / truth.true_ssd_bytes_per_s
                    copy.tier, copy.left_s = (
                        TierKind.SSD,
                        max(read_s, ckpt.size_bytes / self.config.dram_read_bytes_per_s),
                    )
                else:
                    copy.tier, copy.left_s = (
                        TierKind.REMOTE,
                        ckpt.size_bytes / self.download_bytes_per_s(server, time_s),
                    )
            copy.started_s = time_s
            copy.epoch += 1
            self.copying[server] = copy
            self.push(time_s + copy.left_s, _COPY_DONE, (copy, copy.epoch))
            return

    def copy_done(self, copy: _Copy, epoch: int, time_s: float) -> None:
        if copy.epoch != epoch or self.copying[copy.server] is not copy:
            return
        self.copying[copy.server] = None
        size = self.trace.checkpoints[copy.checkpoint].size_bytes
        self.copied_bytes += size
        if not copy.to_ssd:
            self.cache(self.dram[copy.server], copy.checkpoint, self.config.dram_bytes)
        if copy.tier is TierKind.REMOTE:
            self.cache(self.ssd[copy.server], copy.checkpoint, self.config.ssd_bytes)
        self.version += 1
        self.kick(copy.server, time_s)

    def cache(self, tier: OrderedDict[int, float], checkpoint: int, capacity_bytes: float) -> None:
        tier[checkpoint] = self.trace.checkpoints[checkpoint].size_bytes
        tier.move_to_end(checkpoint)
        while sum(tier.values()) > capacity_bytes and len(tier) > 1:
            tier.popitem(last=False)

    def load_done(self, load: _Load) -> None:
        self.loads[load.server].remove(load)
        if not load.to_ssd:
            self.cache(self.dram[load.server], load.checkpoint, self.config.dram_bytes)
        if load.tier is TierKind.REMOTE:
            self.cache(self.ssd[load.server], load.checkpoint, self.config.ssd_bytes)
        ckpt = self.trace.checkpoints[load.checkpoint]
        duration_s = load.end_s - load.start_s
        if duration_s > 0 and not (load.staged and load.tier is TierKind.DRAM):
            staged = load.staged or load.to_ssd
            self.feedback.append(
                LoadFinished(
                    type="load_finished",
                    server=self.trace.servers[load.server].name,
                    model=ckpt.name,
                    tier=load.tier,
                    size_bytes=ckpt.size_bytes,
                    duration_s=duration_s,
                    gpus=1 if staged else load.gpus,
                )
            )
        self.version += 1

    def tokens(self, inst: _Instance, time_s: float) -> tuple[int, int, int]:
        """Input tokens, tokens generated so far and requests generating, over the instance's requests."""
        t_in = generated = active = 0
        for start_s, end_s, inputs in inst.requests.values():
            t_in += inputs
            generated += int(max(0.0, min(time_s, end_s) - start_s) * self.config.generated_tokens_per_s)
            active += 1 if start_s <= time_s < end_s else 0
        return t_in, generated, active

    def running(self, inst: _Instance, time_s: float, rates_per_s: np.ndarray | None = None) -> RunningInstance:
        """The instance as the placer sees it; with the checkpoints' request rates, an idle one states its share
        of its checkpoint's requests and its keep-alive."""
        ckpt = self.trace.checkpoints[inst.checkpoint]
        t_in, generated, active = self.tokens(inst, time_s)
        rate_per_s = None
        if rates_per_s is not None and inst.idle_since_s is not None:
            rate_per_s = float(rates_per_s[inst.checkpoint]) / max(1, len(self.by_checkpoint[inst.checkpoint]))
        return RunningInstance(
            id=str(inst.id),
            model=ckpt.model.name,
            checkpoint=ckpt.name,
            server=self.trace.servers[inst.server].name,
            gpu_ids=sorted(inst.gpu_ids),
            tp=ckpt.tp,
            input_tokens=t_in,
            generated_tokens=generated,
            tokens_per_s=self.config.generated_tokens_per_s * active if active else None,
            idle_since_s=inst.idle_since_s,
            keep_alive_s=inst.keep_alive_s if rate_per_s is not None else None,
            requests_per_s=rate_per_s,
        )

    # What the placer sees ---------------------------------------------------------------------------

    def _cluster(self, time_s: float, *, learned: Learned, with_state: bool = True, blind: bool = False) -> Cluster:
        config = self.config
        servers = []
        for i, truth in enumerate(self.trace.servers):
            queue = []
            if with_state:
                for ld in self.loads[i]:
                    if ld.end_s <= time_s or ld.end_s <= ld.start_s:
                        continue
                    size = self.trace.checkpoints[ld.checkpoint].size_bytes
                    left = (ld.end_s - max(time_s, ld.start_s)) / (ld.end_s - ld.start_s)
                    queue.append(
                        LoadingTask(
                            model=self.names[ld.checkpoint],
                            tier=ld.tier,
                            remaining_bytes=size * left,
                            bandwidth_bytes_per_s=size / (ld.end_s - ld.start_s),
                            starts_in_s=max(0.0, ld.start_s - time_s),
                            staged=ld.staged or ld.to_ssd,
                        )
                    )
            cached = with_state and not blind
            servers.append(
                _server(
                    config,
                    truth,
                    busy=set(range(config.gpus_per_server)) - self.free[i] if with_state else (),
                    dram=[self.names[c] for c in self.dram[i]] if cached else [],
                    ssd=[self.names[c] for c in self.ssd[i]] if cached else [],
                    queue=queue,
                )
            )
        instances = []
        if with_state:
            rates = self.rates_per_s(time_s) if config.state_idle_rates else None
            instances = [self.running(inst, time_s, rates) for inst in self.instances.values() if inst.state == "warm"]
        return Cluster(
            servers=servers,
            instances=instances,
            remote_store_bandwidth_bytes_per_s=self.trace.remote_store_bytes_per_s,
            learned=learned,
        )

    def current_view(self, time_s: float, *, blind: bool = False) -> Cluster:
        if self.feedback:
            self.learning = apply_events(self.learning, self.feedback)
            self.feedback = []
            self.version += 1
        key = (time_s, self.version + (1 << 40 if blind else 0))
        if self.view is None or key != self.view_key:
            self.view = self._cluster(time_s, learned=self.learning.learned, blind=blind)
            self.view_key = key
        return self.view

    # Decisions ------------------------------------------------------------------------------------

    def choose(self, checkpoint: int, time_s: float) -> Candidate | None:
        ckpt = self.trace.checkpoints[checkpoint]
        request = PlacementRequest(model=ckpt.model.name, tp=ckpt.tp, checkpoint=ckpt.name, max_candidates=1)
        if self.policy is Policy.ANY_FREE:
            hosts = [s for s in range(self.config.servers) if len(self.free[s]) >= ckpt.tp]
            if hosts:
                server = hosts[int(self.rng.integers(len(hosts)))]
                view = self.current_view(time_s)
                only = view.model_copy(update={"servers": [view.servers[server]], "instances": [], "reservations": []})
                decision = place(
                    only, request.model_copy(update={"allow_migration": False}), now_s=time_s, catalog=self.catalog
                )
                return decision.placements[0] if decision.placements else None
        if self.policy in (Policy.ANY_FREE, Policy.LOCALITY_BLIND):
            view = self.current_view(time_s, blind=True)
            request = request.model_copy(update={"allow_migration": False})
            decision = place(view, request, now_s=time_s, catalog=self.catalog)
        else:
            view = self.current_view(time_s)
            decision = place(view, request, now_s=time_s, catalog=self.catalog, options=self.options)
        return decision.placements[0] if decision.placements else None

    def cold_start(self, request: int, time_s: float) -> bool:
        checkpoint = int(self.trace.checkpoint_index[request])
        choice = self.choose(checkpoint, time_s)
        if choice is None:
            return False
        server = int(choice.server.split("-")[1])
        ckpt = self.trace.checkpoints[checkpoint]
        for iid in choice.stopped_instances:
            inst = self.instances[int(iid)]
            if inst.state != "warm" or inst.requests or inst.server != server:
                raise PlanningError(f"the placer stopped instance {iid}, which is not idle on {choice.server}")
            self.remove(inst, time_s)
            self.stats.stopped_idle += 1
        gpus_free_s = time_s
        handed: set[int] = set()
        for m in choice.migrations:
            inst = self.instances[int(m.instance_id)]
            dest = int(m.to_server.split("-")[1])
            if inst.state != "warm" or inst.server != server or not set(m.to_gpu_ids) <= self.free[dest]:
                raise PlanningError(f"the placer moved instance {m.instance_id} to GPUs that are not free")
            snapshot = self.running(inst, time_s)
            self.take(dest, list(m.to_gpu_ids), time_s)
            load = self.start_load(dest, inst.checkpoint, time_s)
            timeline = migration_timeline(
                snapshot, dest_load_s=load.end_s - time_s, recompute=self.recompute[inst.checkpoint]
            )
            handover_s = time_s + timeline.gpus_free_s
            last_end_s = max((end for _, end, _ in inst.requests.values()), default=time_s)
            free_s = min(handover_s, max(last_end_s, time_s))
            inst.state = "migrating"
            self.push(handover_s, _HANDOVER, (inst, dest, list(m.to_gpu_ids)))
            leftover = sorted(set(inst.gpu_ids) - set(choice.gpu_ids))
            if leftover:
                self.push(free_s, _FREE, (server, leftover))
            handed |= set(inst.gpu_ids)
            gpus_free_s = max(gpus_free_s, free_s)
            self.stats.migrations += 1
        if not set(choice.gpu_ids) <= self.free[server] | handed:
            raise PlanningError(f"the placer handed out busy GPUs on {choice.server}")
        # Handed-over GPUs stay busy throughout: the migrating instance's, then the new one's.
        self.take(server, choice.gpu_ids, time_s)
        if choice.staged_from is not None:
            load = self.start_load(server, checkpoint, time_s, staged=True)
            truth = self.trace.servers[server]
            ready_s = max(load.end_s, gpus_free_s) + ckpt.shard_bytes / truth.true_pcie_bytes_per_s
            self.stats.staged += 1
        else:
            load = self.start_load(server, checkpoint, gpus_free_s)
            ready_s = load.end_s
        inst = _Instance(
            id=self.next_instance,
            checkpoint=checkpoint,
            server=server,
            gpu_ids=list(choice.gpu_ids),
            ready_s=ready_s,
            keep_alive_s=self.keep_alive_s.get(checkpoint, self.config.keep_alive_s),
            tier=load.tier.value,
            option=choice.option,
        )
        self.stats.options[choice.option] = self.stats.options.get(choice.option, 0) + 1
        self.next_instance += 1
        self.instances[inst.id] = inst
        self.by_checkpoint.setdefault(checkpoint, set()).add(inst.id)
        self.push(ready_s, _READY, inst)
        self.attach(inst, request, time_s)
        self.stats.cold_starts += 1
        self.stats.tiers[load.tier.value] = self.stats.tiers.get(load.tier.value, 0) + 1
        self.stats.estimate_error_s.append(abs(choice.startup_latency_s - (ready_s - time_s)))
        return True

    # Prewarming -------------------------------------------------------------------------------------

    def rates_per_s(self, time_s: float) -> np.ndarray:
        """Request rates per checkpoint: a forecast from the cluster's state at the start (how many SSDs hold each
        checkpoint, as past demand left them; the same for every policy), then blended with what arrived so far
        (so that an hour-old trace does not forget rare checkpoints)."""
        return (self.arrived + self.forecast_per_s * 60.0) / (max(time_s, 0.0) + 60.0)

    def demand(self, time_s: float) -> list[ModelDemand]:
        """Request rates per checkpoint as the prewarming advice gets them."""
        rates = self.rates_per_s(time_s)
        return [
            ModelDemand(model=c.model.name, checkpoint=c.name, tp=c.tp, rate_per_s=float(rate))
            for c, rate in zip(self.trace.checkpoints, rates, strict=True)
        ]

    def prewarm(self, time_s: float) -> None:
        view = self.current_view(time_s)
        advice = advise_prewarm(
            view,
            PrewarmRequest(
                models=self.demand(time_s),
                max_copy_s_per_server=self.config.prewarm_copy_s_per_server,
                # The advice spends the idle GPU-seconds the default keep-alive (or the stated budget) would.
                default_keep_alive_s=(
                    self.config.keep_alive_s
                    if self.config.prewarm_budget_keep_alive_s is None
                    else self.config.prewarm_budget_keep_alive_s
                ),
                max_keep_alive_s=self.config.prewarm_max_keep_alive_s,
                min_keep_alive_s=min(self.config.keep_alive_s, self.config.prewarm_min_keep_alive_s),
                evict=self.config.prewarm_evict,
            ),
            catalog=self.catalog,
            now_s=time_s,
        )
        self.apply_advice(advice, time_s)
        if time_s + self.config.prewarm_interval_s < self.config.duration_s:
            self.push(time_s + self.config.prewarm_interval_s, _PREWARM, None)

    def apply_advice(self, advice: PrewarmAdvice, time_s: float) -> None:
        index = {name: i for i, name in enumerate(self.names)}
        for ev in advice.evictions:
            server = int(ev.server.split("-")[1])
            tier = self.dram[server] if ev.tier is TierKind.DRAM else self.ssd[server]
            tier.pop(index[ev.checkpoint], None)
        # New advice replaces the copies not yet started; a running one finishes.
        self.copies = [[c for c in queue if c.left_s >= 0] for queue in self.copies]
        for copy in advice.copies:
            server = int(copy.server.split("-")[1])
            self.copies[server].append(_Copy(server, index[copy.checkpoint], to_ssd=copy.to_tier is TierKind.SSD))
        for server in range(self.config.servers):
            self.kick(server, time_s)
        for keep in advice.keep_alive:
            self.keep_alive_s[index[keep.checkpoint]] = keep.keep_alive_s
        self.version += 1


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
            RunningInstance(
                id=f"inst-{n}",
                model=ckpt.model.name,
                checkpoint=ckpt.name,
                server=trace.servers[s].name,
                gpu_ids=gpu_ids,
                tp=ckpt.tp,
                input_tokens=int(rng.integers(64, 8000)),
                generated_tokens=int(rng.integers(0, 2000)),
                tokens_per_s=30.0,
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
