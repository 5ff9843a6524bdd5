"""A concrete deployment (collocated replicas or disaggregated pools) and its simulated estimate."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import numpy as np

from service.planning.kernels import KernelCalibration
from service.planning.memory import KV_BLOCK_TOKENS, MemoryPlan, plan_memory, require_fit
from service.planning.moe_cost import AUTO_BACKEND, RANDOM, MoeCalibration, expert_kernel
from service.planning.simulator import (
    ROUTERS,
    InstanceConfig,
    KvTransfer,
    Role,
    SchedulerKnobs,
    SimulationResult,
    simulate,
)
from service.planning.specs import DType, EngineSpec, GpuSpec, ModelSpec, PlanningError, SpeculativeDecoding
from service.planning.stepcost import ParallelLayout, ReplicaStepCost, kv_bytes_per_token_per_gpu
from service.planning.workload import ArrivalKind, RequestSample, Workload, sample_requests


class Mode(StrEnum):
    """Serving architecture."""

    COLLOCATED = "collocated"
    DISAGGREGATED = "disaggregated"


@dataclass(frozen=True, slots=True)
class KnobOverrides:
    """Scheduler settings that replace the engine's defaults when set."""

    max_batched_tokens: int | None = None
    max_sequences: int | None = None
    chunked_prefill: bool | None = None
    memory_fraction: float | None = None
    # Longest request (prompt + output) the engine accepts; it also needs KV for one such request to start.
    max_model_len: int | None = None
    prefix_caching: bool | None = None
    kv_block_tokens: int | None = None
    speculative: SpeculativeDecoding | None = None
    # How the router spreads served tokens over the experts (moe_cost.SERVED_ROUTINGS); None: random.
    moe_routing: str | None = None
    # MoE kernels the engine is told to run (moe_cost.MOE_BACKENDS); None: the engine's choice.
    moe_backend: str | None = None

    def knobs_for(self, engine: EngineSpec) -> SchedulerKnobs:
        """The effective scheduler knobs on ``engine``."""
        return SchedulerKnobs.from_engine(
            engine,
            max_batched_tokens=self.max_batched_tokens or engine.max_num_batched_tokens,
            max_sequences=self.max_sequences or engine.max_num_seqs,
            chunked_prefill=engine.chunked_prefill if self.chunked_prefill is None else self.chunked_prefill,
            # An explicit token budget is what the user set on the engine: no sizing to the prompt then.
            prompt_sized_token_budget=engine.prompt_sized_token_budget and self.max_batched_tokens is None,
            prefix_caching=engine.prefix_caching if self.prefix_caching is None else self.prefix_caching,
            kv_block_tokens=self.kv_block_tokens or KV_BLOCK_TOKENS,
            # SGLang drops its overlap scheduler with EAGLE-family drafting (the step model does the same).
            overlap_scheduling=engine.overlaps(speculative=self.speculative is not None),
        )


@dataclass(frozen=True, slots=True)
class Deployment:
    """Everything needed to cost one serving strategy."""

    model: ModelSpec
    gpu: GpuSpec
    engine: EngineSpec
    weight_dtype: DType
    kv_dtype: DType
    calibration: KernelCalibration
    mode: Mode = Mode.COLLOCATED
    layout: ParallelLayout = ParallelLayout()
    replicas: int = 1
    prefill_layout: ParallelLayout = ParallelLayout()
    prefill_workers: int = 0
    decode_layout: ParallelLayout = ParallelLayout()
    decode_workers: int = 0
    knobs: KnobOverrides = KnobOverrides()
    # Expert weights may be stored differently from the rest (gpt-oss: mxfp4 experts, bf16 attention).
    moe_weight_dtype: DType | None = None
    moe_calibration: MoeCalibration = MoeCalibration()
    # How requests are shared among replicas (and attention-DP ranks): round_robin, random or least_loaded.
    router: str = "round_robin"

    @property
    def expert_dtype(self) -> DType:
        """Storage dtype of the routed experts' weights."""
        return self.moe_weight_dtype or self.weight_dtype

    @property
    def gpus(self) -> int:
        """GPUs the whole deployment uses."""
        if self.mode is Mode.COLLOCATED:
            return self.layout.gpus * self.replicas
        return self.prefill_layout.gpus * self.prefill_workers + self.decode_layout.gpus * self.decode_workers

    def describe_moe(self) -> dict[str, str | None]:
        """How the experts are priced: weight dtype, kernel and served routing (all None for a dense model)."""
        if not self.model.is_moe:
            return {"moe_weight_dtype": None, "moe_kernel": None, "moe_routing": None}
        return {
            "moe_weight_dtype": self.expert_dtype.value,
            "moe_kernel": expert_kernel(self.expert_dtype, self.gpu, self.knobs.moe_backend or AUTO_BACKEND),
            "moe_routing": self.knobs.moe_routing or RANDOM,
        }

    def describe_layout(self) -> dict[str, Any]:
        """The parallel layout as a plain mapping."""
        if self.mode is Mode.COLLOCATED:
            return {**self.layout.describe(), "replicas": self.replicas}
        return {
            "prefill": {**self.prefill_layout.describe(), "workers": self.prefill_workers},
            "decode": {**self.decode_layout.describe(), "workers": self.decode_workers},
        }

    def label(self) -> str:
        """Short human label of the strategy."""
        if self.mode is Mode.COLLOCATED:
            return f"{self.layout.label()} x{self.replicas}"
        return (
            f"P {self.prefill_layout.label()} x{self.prefill_workers} + "
            f"D {self.decode_layout.label()} x{self.decode_workers}"
        )


@dataclass(frozen=True, slots=True)
class BuiltInstance:
    """An instance config plus the memory plan behind its KV capacity."""

    config: InstanceConfig
    memory: MemoryPlan


def build_instance(deployment: Deployment, layout: ParallelLayout, role: Role, *, min_tokens: int) -> BuiltInstance:
    """Cost model and KV capacity of one instance; refuses layouts that do not fit."""
    engine = deployment.engine
    knobs = deployment.knobs.knobs_for(engine)
    if role is Role.DECODE:
        # A decode instance never prefills, so its activation peak is set by the batch of sequences.
        knobs = replace(knobs, max_batched_tokens=min(knobs.max_batched_tokens, knobs.max_sequences))
    memory = plan_memory(
        model=deployment.model,
        gpu=deployment.gpu,
        engine=engine,
        layout=layout,
        weight_dtype=deployment.weight_dtype,
        kv_dtype=deployment.kv_dtype,
        max_batched_tokens=knobs.max_batched_tokens,
        memory_fraction=deployment.knobs.memory_fraction,
        moe_weight_dtype=deployment.moe_weight_dtype,
        kv_block_tokens=knobs.kv_block_tokens,
    )
    label = f"{deployment.model.name} {layout.label()} on {deployment.gpu.name} ({deployment.weight_dtype.value})"
    max_model_len = deployment.knobs.max_model_len
    if max_model_len is not None:
        # vLLM and SGLang refuse to start when the KV cache cannot hold one request of max_model_len tokens.
        min_tokens = max_model_len
        label += f" with max_model_len {max_model_len}"
    require_fit(memory, min_tokens=min_tokens, label=label)
    # A prefill pool hands each request over after its first token: it never verifies drafts.
    speculative = None if role is Role.PREFILL else deployment.knobs.speculative
    # A verify pass runs draft_tokens + 1 tokens per sequence: the step tables must reach that many rows.
    verify_tokens = knobs.max_sequences * (1 + (speculative.draft_tokens if speculative is not None else 0))
    cost = ReplicaStepCost(
        model=deployment.model,
        gpu=deployment.gpu,
        engine=engine,
        layout=layout,
        weight_dtype=deployment.weight_dtype,
        kv_dtype=deployment.kv_dtype,
        calibration=deployment.calibration,
        max_tokens=max(knobs.max_batched_tokens, verify_tokens) + 1,
        moe_calibration=deployment.moe_calibration,
        moe_weight_dtype=deployment.moe_weight_dtype,
        speculative=speculative,
        moe_routing=deployment.knobs.moe_routing or RANDOM,
        moe_backend=deployment.knobs.moe_backend or AUTO_BACKEND,
    )
    return BuiltInstance(InstanceConfig(role, cost, memory.kv_capacity_tokens, knobs), memory)


def transfer_model(deployment: Deployment) -> KvTransfer:
    """KV transfer between pools: intra-node when both pools fit in one node, else over the NIC."""
    gpu = deployment.gpu
    same_node = deployment.gpus <= gpu.scale_up_domain_gpus
    bandwidth = gpu.intra_node_bandwidth_bytes_per_s if same_node else gpu.inter_node_bandwidth_bytes_per_s
    # Each GPU of the prefill instance sends its own shard over its own link, in parallel.
    per_token = kv_bytes_per_token_per_gpu(deployment.model, deployment.prefill_layout, deployment.kv_dtype)
    return KvTransfer(kv_bytes_per_token=per_token, bandwidth_bytes_per_s=bandwidth * 0.8)


@dataclass(frozen=True, slots=True)
class Estimate:
    """Simulated latency and throughput of a deployment under a workload."""

    deployment: Deployment
    workload: Workload
    result: SimulationResult
    memory: dict[str, MemoryPlan]
    # Identical instances each simulated one stands for (replicas and attention-DP ranks not simulated).
    scale: float = 1.0
    # Requests the engine refused (longer than max_model_len); they count as offered but never complete.
    refused: int = 0

    @property
    def requests_per_s(self) -> float:
        """Completed requests per second of the whole deployment."""
        return self.result.requests_per_s * self.scale

    @property
    def output_tokens_per_s(self) -> float:
        """Generated tokens per second of the whole deployment."""
        return self.result.output_tokens_per_s * self.scale

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        r = self.result
        return {
            "model": self.deployment.model.name,
            "gpu": self.deployment.gpu.name,
            "engine": self.deployment.engine.name,
            "mode": self.deployment.mode.value,
            "weight_dtype": self.deployment.weight_dtype.value,
            **self.deployment.describe_moe(),
            "kv_dtype": self.deployment.kv_dtype.value,
            "layout": self.deployment.describe_layout(),
            "gpus": self.deployment.gpus,
            "requests": r.offered,
            "completed": r.completed,
            "truncated": r.budget_cut,
            "truncated_reason": (
                f"stopped at the work budget of {self.workload.max_sequence_steps} sequence-steps (one sequence in one "
                f"engine step) with "
                f"{r.completed} of {r.offered} requests completed: the figures cover those; simulate fewer requests "
                "or a lighter load"
                if r.budget_cut
                else None
            ),
            "ttft_ms": r.ttft.as_dict(),
            "tpot_ms": r.tpot.as_dict(),
            "e2e_ms": r.e2e.as_dict(),
            "throughput": {
                "requests_per_s": self.requests_per_s,
                "output_tokens_per_s": self.output_tokens_per_s,
                "output_tokens_per_s_per_gpu": self.output_tokens_per_s / max(1, self.deployment.gpus),
            },
            "bottleneck": r.bottleneck(),
            "preemptions": r.preemptions,
            "peak_kv_fraction": r.peak_kv_fraction,
            "refused_requests": self.refused,
            "router": self.deployment.router,
            "prefix_cache": {
                "enabled": self.deployment.knobs.knobs_for(self.deployment.engine).prefix_caching,
                "hit_tokens": r.prefix_hit_tokens,
                # Share of the looked-up prompt tokens (requests with a shared prefix) whose prefill was skipped.
                "hit_rate": r.prefix_hit_tokens / r.prefix_looked_up_tokens if r.prefix_looked_up_tokens else 0.0,
            },
            "trace": None
            if self.workload.trace is None
            else {**self.workload.trace.describe(), "time_scale": self.workload.time_scale},
            "memory": {
                role: {
                    "weights_gib": m.weight_bytes / 1024**3,
                    "reserve_gib": m.reserve_bytes / 1024**3,
                    "kv_cache_gib": m.kv_cache_bytes / 1024**3,
                    "kv_capacity_tokens": m.kv_capacity_tokens,
                }
                for role, m in self.memory.items()
            },
        }


def min_request_tokens(workload: Workload) -> int:
    """KV tokens the longest request of the workload needs."""
    return workload.input_length.max_tokens() + workload.output_length.max_tokens()


def unit_fold(deployment: Deployment, workload: Workload) -> int:
    """How many identical units share an open-loop stream; one is simulated and stands for all (1: no folding).

    Collocated: every replica and attention-DP rank. Disaggregated: the largest group count that divides both
    pools. A least-loaded router couples the instances, so they are all simulated; closed loops are folded by
    simulate_deployment itself (attention-DP ranks when the clients divide evenly).
    """
    if workload.arrival is ArrivalKind.CLOSED or deployment.router == "least_loaded":
        return 1
    if deployment.mode is Mode.COLLOCATED:
        return deployment.replicas * deployment.layout.attention_dp
    entry = deployment.prefill_workers * deployment.prefill_layout.attention_dp
    decode = deployment.decode_workers * deployment.decode_layout.attention_dp
    return math.gcd(entry, decode)


def routed_share(sample: RequestSample, units: int, router: str, seed: int, *, exact: bool) -> RequestSample:
    """The requests one of ``units`` identical targets receives from the router, in stream time.

    ``exact`` (a trace): the very requests round-robin (every units-th) or a seeded random router sends it.
    Otherwise every request with the gaps the router makes: round-robin joins ``units`` consecutive gaps of the
    stream, a random router a geometric number of them (exactly thinned Poisson arrivals for a Poisson stream),
    so the unit sees as many distinct requests as a lone replica would.
    """
    if units <= 1:
        return sample
    if exact:
        return sample.strided(units) if router == "round_robin" else sample.thinned(units, seed)
    gaps = np.diff(sample.unit_arrival_s)
    if gaps.size == 0:
        return sample
    if router == "round_robin":
        counts = np.full(sample.size - 1, units, dtype=np.int64)
    else:
        counts = np.random.default_rng([seed, units, 0x70]).geometric(1.0 / units, sample.size - 1)
    # Gap k of the unit spans the stream's next counts[k] gaps, cycling through the sample's own gaps.
    cumulative = np.concatenate(([0.0], np.cumsum(np.tile(gaps, -(-int(counts.sum()) // gaps.size)))))
    ends = np.cumsum(counts)
    unit = np.concatenate(([0.0], cumulative[ends])) + float(sample.unit_arrival_s[0])
    return RequestSample(sample.input_tokens, sample.output_tokens, unit, sample.prefixes)


def admitted(sample: RequestSample, max_model_len: int | None) -> tuple[RequestSample, int]:
    """The requests an engine with ``max_model_len`` accepts (prompt + output within it), and how many it refused."""
    if max_model_len is None:
        return sample, 0
    ok = sample.input_tokens + sample.output_tokens <= max_model_len
    refused = int(sample.size - np.count_nonzero(ok))
    if refused == sample.size:
        longest = int((sample.input_tokens + sample.output_tokens).min())
        raise PlanningError(
            f"every request is longer than max_model_len {max_model_len} (the shortest needs {longest} tokens)"
        )
    return (sample.take(np.flatnonzero(ok).astype(np.int64)) if refused else sample), refused


BuildInstance = Callable[[Deployment, ParallelLayout, Role, int], BuiltInstance]


def _build(deployment: Deployment, layout: ParallelLayout, role: Role, min_tokens: int) -> BuiltInstance:
    return build_instance(deployment, layout, role, min_tokens=min_tokens)


def simulate_deployment(
    deployment: Deployment,
    workload: Workload,
    *,
    sample: RequestSample | None = None,
    rate_per_s: float | None = None,
    build: BuildInstance = _build,
    checkpoint: Callable[[], None] | None = None,
) -> Estimate:
    """Simulate a deployment under a workload: what `splan estimate` reports and what the plan search ranks.

    ``sample`` is the stream offered to the whole deployment (default: the workload's) and ``rate_per_s`` its
    total rate; the router shares it among replicas and attention-DP ranks. Open loops fold identical units
    (unit_fold); closed loops simulate every replica and fold the attention-DP ranks when the clients divide.
    """
    if deployment.router not in ROUTERS:
        raise PlanningError(f"unknown router {deployment.router!r}; use one of {', '.join(ROUTERS)}")
    sample = sample if sample is not None else sample_requests(workload)
    sample, refused = admitted(sample, deployment.knobs.max_model_len)
    need = min_request_tokens(workload)
    if deployment.knobs.max_model_len is not None:
        need = min(need, deployment.knobs.max_model_len)
    rate = workload.rate_per_s if rate_per_s is None else rate_per_s
    closed = workload.arrival is ArrivalKind.CLOSED
    units = unit_fold(deployment, workload)
    exact = workload.trace is not None
    router_seed = workload.seed
    if deployment.mode is Mode.COLLOCATED:
        if deployment.replicas < 1:
            raise PlanningError("replicas must be at least 1")
        built = build(deployment, deployment.layout, Role.COLLOCATED, need)
        dp = deployment.layout.attention_dp
        if closed:
            # Each attention-DP rank schedules its own batch and KV cache; the step cost already charges the
            # lock-step MoE layers for all ranks' tokens. Ranks that see the same share of the load behave
            # alike, so one stands for all when the clients split evenly (the run is dp times shorter).
            ranks = 1 if _ranks_symmetric(workload, deployment.replicas, dp) else dp
            concurrency = workload.concurrency // (dp // ranks)
            unit_sample = sample.strided(dp // ranks)
            count = deployment.replicas * ranks
            scale = deployment.replicas * dp / count
        else:
            concurrency = 0
            unit_sample = routed_share(sample, units, deployment.router, router_seed, exact=exact)
            count = deployment.replicas * dp // units
            scale = float(units)
        result = _simulate_rounds(
            lambda rounds_sample: simulate(
                instances=[built.config] * count,
                sample=rounds_sample,
                arrival=workload.arrival,
                # Unit samples keep stream time: their arrivals are already thinned to one unit's share.
                rate_per_s=rate,
                concurrency=concurrency,
                closed_loop_ramp_s=_closed_loop_ramp_s(
                    built.config.cost, rounds_sample, workload, deployment.replicas * dp
                ),
                profiled_rounds=workload.profiled_rounds,
                router=deployment.router,
                router_seed=router_seed,
                max_sequence_steps=workload.max_sequence_steps,
                checkpoint=checkpoint,
            ),
            unit_sample,
            workload,
            concurrency,
        )
        return Estimate(deployment, workload, result, {"replica": built.memory}, scale, refused)
    if deployment.prefill_workers < 1 or deployment.decode_workers < 1:
        raise PlanningError("disaggregated serving needs at least one prefill and one decode worker")
    prefill_need = workload.input_length.max_tokens() + 1
    if deployment.knobs.max_model_len is not None:
        prefill_need = min(prefill_need, deployment.knobs.max_model_len)
    prefill = build(deployment, deployment.prefill_layout, Role.PREFILL, prefill_need)
    decode = build(deployment, deployment.decode_layout, Role.DECODE, need)
    entry = deployment.prefill_workers * deployment.prefill_layout.attention_dp // units
    decoders = deployment.decode_workers * deployment.decode_layout.attention_dp // units
    unit_sample = routed_share(sample, units, deployment.router, router_seed, exact=exact)
    result = _simulate_rounds(
        lambda rounds_sample: simulate(
            instances=[prefill.config] * entry,
            decode_instances=[decode.config] * decoders,
            # KV moves over the links of the whole deployment (intra-node only when it all fits in one domain).
            transfer=transfer_model(deployment),
            sample=rounds_sample,
            arrival=workload.arrival,
            rate_per_s=rate,
            concurrency=workload.concurrency,
            closed_loop_ramp_s=_closed_loop_ramp_s(
                decode.config.cost,
                rounds_sample,
                workload,
                deployment.decode_workers * deployment.decode_layout.attention_dp,
            ),
            profiled_rounds=workload.profiled_rounds,
            router=deployment.router,
            router_seed=router_seed,
            max_sequence_steps=workload.max_sequence_steps,
            checkpoint=checkpoint,
        ),
        unit_sample,
        workload,
        workload.concurrency,
    )
    memory = {"prefill": prefill.memory, "decode": decode.memory}
    return Estimate(deployment, workload, result, memory, float(units), refused)


# Consecutive closed-loop rounds whose mean TTFT and TPOT agree within this share count as settled.
ROUNDS_SETTLED_RELATIVE = 0.03


def _simulate_rounds(
    run: Callable[[RequestSample], SimulationResult], sample: RequestSample, workload: Workload, concurrency: int
) -> SimulationResult:
    """Run the simulation; for a profiled closed loop, add rounds until the last two agree (or all ran)."""
    result = run(sample)
    if workload.arrival is not ArrivalKind.CLOSED or workload.profiled_rounds <= 0 or concurrency <= 0:
        return result
    rounds = -(-sample.input_tokens.size // concurrency)
    if rounds >= workload.profiled_rounds:
        return result
    # The two rounds before the draining last one must agree.
    last = result.round_means_s(3)
    settled = len(last) == 3 and all(
        abs(a - b) <= ROUNDS_SETTLED_RELATIVE * max(abs(b), 1e-9) for a, b in zip(last[0], last[1], strict=True)
    )
    # Not settled yet: run every profiled round (one rerun costs less than growing step by step).
    return result if settled else run(sample.head(workload.profiled_rounds * concurrency))


def _ranks_symmetric(workload: Workload, replicas: int, dp: int) -> bool:
    """Whether every attention-DP rank gets the same share: open loops, or clients that divide evenly."""
    if dp <= 1:
        return False
    if workload.arrival is not ArrivalKind.CLOSED:
        return True
    return workload.concurrency % (replicas * dp) == 0


def _closed_loop_ramp_s(cost: ReplicaStepCost, sample: RequestSample, workload: Workload, instances: int) -> float:
    """Steady-state spread of closed-loop clients: one request lifetime at the per-instance concurrency."""
    if workload.arrival is not ArrivalKind.CLOSED or not workload.closed_loop_staggered:
        return 0.0
    # Real clients drift apart within a few requests (jitter, chunking, preemption); starting them one
    # lifetime apart simulates that steady state instead of a synchronized burst that never dissolves.
    input_tokens = float(sample.input_tokens.mean())
    output_tokens = float(sample.output_tokens.mean())
    batch = max(1, min(cost.max_tokens - 1, math.ceil(workload.concurrency / instances)))
    prefill_s = cost.step(prefill_tokens=int(input_tokens), prefill_sequences=1).total_s
    context_tokens = batch * (input_tokens + output_tokens / 2)
    decode_s = cost.step(decode_sequences=batch, decode_context_tokens=context_tokens).total_s
    return prefill_s + max(0.0, output_tokens - 1) * decode_s


def closed_loop(workload: Workload) -> bool:
    """Whether the workload is a closed loop at fixed concurrency."""
    return workload.arrival is ArrivalKind.CLOSED
