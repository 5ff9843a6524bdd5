"""Single-deployment estimate: resolve names against the catalog, build the deployment, simulate."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from service.planning.catalog import Catalog
from service.planning.deployment import Deployment, Estimate, KnobOverrides, Mode, simulate_deployment
from service.planning.moe_cost import MOE_BACKENDS, SERVED_ROUTINGS, expert_kernel
from service.planning.profile import profiled_catalog
from service.planning.simulator import ROUTERS
from service.planning.specs import (
    DTYPE_ALIASES,
    WEIGHT_DTYPES,
    DType,
    GpuSpec,
    ModelSpec,
    PlanningError,
    SpeculativeDecoding,
)
from service.planning.stepcost import make_layout, validate_layout
from service.planning.trace import Trace, trace_from_records
from service.planning.workload import (
    BENCHMARK_REQUESTS_PER_CLIENT,
    MAX_SEED,
    MIN_RATE_PER_S,
    ArrivalKind,
    ClientStart,
    LengthDistribution,
    LengthKind,
    Workload,
)

MAX_REQUESTS = 20_000
# Closed-loop rounds simulated for the benchmark protocol: the first wave plus enough steady rounds.
SIMULATED_BENCHMARK_ROUNDS = 6


def parse_dtype(value: str, *, allowed: tuple[DType, ...], what: str) -> DType:
    """A dtype by name (or alias such as nvfp4), refused with the allowed names when unknown."""
    key = value.strip().lower()
    try:
        dtype: DType | None = DTYPE_ALIASES.get(key) or DType(key)
    except ValueError:
        dtype = None
    if dtype is None or dtype not in allowed:
        names = ", ".join(d.value for d in allowed)
        raise PlanningError(f"unknown {what} {value!r}; use one of {names}")
    return dtype


def as_length(value: str | int | LengthDistribution) -> LengthDistribution:
    """A length distribution from an int, a text form, or itself."""
    if isinstance(value, LengthDistribution):
        return value
    if isinstance(value, int):
        return LengthDistribution.fixed(value)
    return LengthDistribution.parse(value)


def default_requests(arrival: ArrivalKind, concurrency: int) -> int:
    """Enough requests for stable means and tails, bounded for speed."""
    if arrival is ArrivalKind.CLOSED:
        return max(64, min(2000, 8 * concurrency))
    return 600


@dataclass(frozen=True, slots=True)
class EstimateRequest:
    """What `splan estimate` and POST /v1/estimates accept."""

    model: str
    gpu: str
    # Lengths of sampled requests (not needed with a trace).
    isl: str | int | LengthDistribution | None = None
    osl: str | int | LengthDistribution | None = None
    engine: str = "vllm"
    weight_dtype: str = "bf16"
    kv_dtype: str | None = None
    moe_weight_dtype: str | None = None
    mode: Mode = Mode.COLLOCATED
    tp: int = 1
    pp: int = 1
    attention_dp: int = 1
    moe_tp: int | None = None
    # Expert-parallel degree (moe_ep); `ep` is its older name.
    moe_ep: int | None = None
    ep: int = 1
    replicas: int = 1
    prefill_tp: int = 1
    prefill_pp: int = 1
    prefill_attention_dp: int = 1
    prefill_moe_tp: int | None = None
    prefill_moe_ep: int = 1
    prefill_workers: int = 1
    decode_tp: int = 1
    decode_pp: int = 1
    decode_attention_dp: int = 1
    decode_moe_tp: int | None = None
    decode_moe_ep: int | None = None
    decode_workers: int = 1
    concurrency: int | None = None
    rate: float | None = None
    arrival: str | None = None
    cv: float = 1.0
    client_start: str = "benchmark"
    # Closed loop, benchmark protocol: requests each client sends (aiperf sweeps 20, `vllm bench serve` sweeps
    # with --num-prompts 10 x concurrency 10).
    requests_per_client: int | None = None
    requests: int | None = None
    # Work budget in sequence-steps (one sequence in one engine step): the simulation stops there and says so.
    max_sequence_steps: int | None = None
    seed: int = 0
    max_batched_tokens: int | None = None
    max_sequences: int | None = None
    chunked_prefill: bool | None = None
    memory_fraction: float | None = None
    gpu_price_per_hour: float | None = None
    model_spec: ModelSpec | None = None
    # A calibration profile (the mapping `splan calibrate` writes), applied to this GPU and engine.
    profile: Mapping[str, Any] | None = None
    # Requests replayed as recorded (a read trace, or records as the API takes them); time_scale stretches
    # their time offsets (0.5: twice the recorded rate), or `rate` rescales them to that mean rate.
    trace: Trace | Sequence[Mapping[str, Any]] | None = None
    time_scale: float | None = None
    # Sampled requests: a shared prefix of this many tokens at the start of a prefix_hit_rate share of them.
    shared_prefix_tokens: int = 0
    prefix_hit_rate: float = 1.0
    # The prefix cache starts holding every shared prefix (the server served this traffic before).
    prefix_cache_warm: bool = False
    # Engine settings: longest request accepted, automatic prefix caching, tokens per KV block, replica router.
    max_model_len: int | None = None
    prefix_caching: bool | None = None
    kv_block_tokens: int | None = None
    router: str = "round_robin"
    # How the router spreads served tokens over the experts (moe_cost.SERVED_ROUTINGS; default random).
    moe_routing: str | None = None
    # MoE kernels the engine is told to run (moe_cost.MOE_BACKENDS; default: the engine's choice).
    moe_backend: str | None = None
    # Speculative decoding with a one-layer drafter (MTP, EAGLE): decode steps verify drafts.
    speculative: SpeculativeDecoding | None = None


def client_staggered(client_start: str) -> bool:
    """Whether closed-loop clients start staggered (`staggered`) or together (`burst`, `benchmark`)."""
    try:
        return ClientStart(client_start) is ClientStart.STAGGERED
    except ValueError:
        names = ", ".join(c.value for c in ClientStart)
        raise PlanningError(f"unknown client start {client_start!r}; use one of {names}") from None


def as_trace(value: Trace | Sequence[Mapping[str, Any]]) -> Trace:
    """A trace from itself or from its records (the API's inline form)."""
    return value if isinstance(value, Trace) else trace_from_records(list(value))


def trace_workload(
    trace: Trace,
    *,
    rate: float | None,
    time_scale: float | None,
    seed: int = 0,
    arrival: str | None = None,
    prefix_cache_warm: bool = False,
) -> Workload:
    """A workload replaying ``trace`` at its recorded times x ``time_scale``, or rescaled to mean ``rate``."""
    if rate is not None and time_scale is not None:
        raise PlanningError("give a trace either a rate or a time scale, not both")
    if arrival is not None and arrival != ArrivalKind.POISSON.value:
        raise PlanningError("a trace brings its own arrival times: leave the arrival law out")
    if time_scale is not None and not (math.isfinite(time_scale) and time_scale > 0):
        raise PlanningError(f"time scale must be positive (got {time_scale:g})")
    if rate is not None and not rate > 0:
        raise PlanningError(f"rate must be positive (got {rate:g})")
    workload = Workload(
        arrival=ArrivalKind.POISSON,
        input_length=LengthDistribution.from_samples(trace.input_tokens.tolist()),
        output_length=LengthDistribution.from_samples(trace.output_tokens.tolist()),
        rate_per_s=rate if rate is not None else trace.rate_per_s / (time_scale or 1.0),
        num_requests=trace.size,
        seed=seed,
        trace=trace,
        prefix_cache_warm=prefix_cache_warm,
    )
    workload.validate()
    return workload


def resolve_workload(request: EstimateRequest) -> Workload:
    """The workload an estimate request describes."""
    if request.trace is not None:
        if request.concurrency is not None:
            raise PlanningError("a trace is replayed open loop: give a rate or a time scale, not a concurrency")
        if request.requests is not None:
            raise PlanningError("a trace sets the requests: leave the request count out")
        if request.isl is not None or request.osl is not None:
            raise PlanningError("a trace sets the request lengths: leave isl and osl out")
        return trace_workload(
            as_trace(request.trace),
            rate=request.rate,
            time_scale=request.time_scale,
            seed=request.seed,
            arrival=request.arrival,
            prefix_cache_warm=request.prefix_cache_warm,
        )
    if request.time_scale is not None:
        raise PlanningError("a time scale applies to a trace only")
    if request.isl is None or request.osl is None:
        raise PlanningError("give the input and output lengths (isl and osl), or a trace")
    isl, osl = request.isl, request.osl
    if request.concurrency is not None and request.rate is not None:
        raise PlanningError("give either a concurrency (closed loop) or a rate, not both")
    if request.concurrency is None and request.rate is None:
        raise PlanningError("give a concurrency (closed loop) or a request rate")
    if request.arrival:
        try:
            arrival = ArrivalKind(request.arrival)
        except ValueError:
            names = ", ".join(a.value for a in ArrivalKind)
            raise PlanningError(f"unknown arrival {request.arrival!r}; use one of {names}") from None
    else:
        arrival = ArrivalKind.CLOSED if request.concurrency is not None else ArrivalKind.POISSON
    if not 0 <= request.seed <= MAX_SEED:
        raise PlanningError(f"seed must be between 0 and {MAX_SEED} (got {request.seed})")
    if request.rate is not None and request.rate <= 0:
        raise PlanningError(f"rate must be positive (got {request.rate:g})")
    if request.rate is not None and not request.rate >= MIN_RATE_PER_S:
        raise PlanningError(f"rate must be at least {MIN_RATE_PER_S:g} requests per second (got {request.rate:g})")
    if request.concurrency is not None and request.concurrency < 1:
        raise PlanningError(f"concurrency must be at least 1 (got {request.concurrency})")
    concurrency = request.concurrency or 0
    count = request.requests or default_requests(arrival, concurrency)
    profiled_rounds = 0
    if request.requests is None and arrival is ArrivalKind.CLOSED and request.client_start == ClientStart.BENCHMARK:
        # The benchmark client profiles a fixed number of rounds per client (see docs/ENGINES.md); the
        # simulation runs rounds until they settle and its last round stands for the rest.
        profiled_rounds = request.requests_per_client or BENCHMARK_REQUESTS_PER_CLIENT
        fixed = all(as_length(n).kind is LengthKind.FIXED for n in (isl, osl))
        # Fixed lengths settle into a steady pattern within a few rounds; drawn lengths are drawn for every round.
        simulated = min(profiled_rounds, SIMULATED_BENCHMARK_ROUNDS) if fixed else profiled_rounds
        count = min(MAX_REQUESTS, concurrency * simulated)
    if request.requests_per_client is not None and request.requests_per_client < 1:
        raise PlanningError(f"requests per client must be at least 1 (got {request.requests_per_client})")
    if not 1 <= count <= MAX_REQUESTS:
        raise PlanningError(f"requests must be between 1 and {MAX_REQUESTS} (got {count})")
    workload = Workload(
        arrival=arrival,
        input_length=as_length(isl),
        output_length=as_length(osl),
        rate_per_s=request.rate or 0.0,
        concurrency=concurrency,
        cv=request.cv,
        num_requests=count,
        seed=request.seed,
        closed_loop_staggered=client_staggered(request.client_start),
        profiled_rounds=profiled_rounds,
        shared_prefix_tokens=request.shared_prefix_tokens,
        prefix_hit_rate=request.prefix_hit_rate,
        prefix_cache_warm=request.prefix_cache_warm,
    )
    workload.validate()
    return workload


def resolve_deployment(request: EstimateRequest, catalog: Catalog) -> Deployment:
    """The deployment an estimate request describes, validated against the catalog."""
    model = request.model_spec or catalog.model(request.model)
    gpu = catalog.gpu(request.gpu)
    if request.gpu_price_per_hour is not None:
        gpu = replace(gpu, price_per_hour_usd=request.gpu_price_per_hour)
    engine = catalog.engine(request.engine)
    weight_dtype = parse_dtype(request.weight_dtype, allowed=WEIGHT_DTYPES, what="weight dtype")
    kv_dtype = (
        engine.kv_dtype_for(weight_dtype)
        if request.kv_dtype is None
        else parse_dtype(request.kv_dtype, allowed=(DType.BF16, DType.FP8), what="KV-cache dtype")
    )
    knobs = KnobOverrides(
        max_batched_tokens=request.max_batched_tokens,
        max_sequences=request.max_sequences,
        chunked_prefill=request.chunked_prefill,
        memory_fraction=request.memory_fraction,
        max_model_len=request.max_model_len,
        prefix_caching=request.prefix_caching,
        kv_block_tokens=request.kv_block_tokens,
        speculative=request.speculative,
        moe_routing=request.moe_routing,
        moe_backend=request.moe_backend,
    )
    validate_engine_settings(knobs, request.router)
    if request.memory_fraction is not None and not 0.1 <= request.memory_fraction <= 1.0:
        raise PlanningError("memory fraction must be between 0.1 and 1.0")
    for value, what in (
        (request.max_batched_tokens, "max batched tokens"),
        (request.max_sequences, "max sequences"),
    ):
        if value is not None and value < 1:
            raise PlanningError(f"{what} must be at least 1")
    moe_weight_dtype = (
        None
        if request.moe_weight_dtype is None
        else parse_dtype(request.moe_weight_dtype, allowed=WEIGHT_DTYPES, what="MoE weight dtype")
    )
    for dtype in {weight_dtype, moe_weight_dtype or weight_dtype}:
        require_supported(gpu, dtype)
    if model.is_moe and request.moe_backend is not None:
        expert_kernel(moe_weight_dtype or weight_dtype, gpu, request.moe_backend)
    base = Deployment(
        model=model,
        gpu=gpu,
        engine=engine,
        weight_dtype=weight_dtype,
        kv_dtype=kv_dtype,
        calibration=catalog.calibration_for(gpu),
        knobs=knobs,
        moe_weight_dtype=moe_weight_dtype if model.is_moe else None,
        moe_calibration=catalog.moe_calibration_for(gpu),
        router=request.router,
    )
    if request.mode is Mode.COLLOCATED:
        layout = make_layout(
            tp=request.tp,
            pp=request.pp,
            attention_dp=request.attention_dp,
            moe_tp=request.moe_tp,
            moe_ep=request.moe_ep or request.ep,
        )
        validate_layout(model, layout)
        if request.replicas < 1:
            raise PlanningError("replicas must be at least 1")
        return replace(base, mode=Mode.COLLOCATED, layout=layout, replicas=request.replicas)
    prefill = make_layout(
        tp=request.prefill_tp,
        pp=request.prefill_pp,
        attention_dp=request.prefill_attention_dp,
        moe_tp=request.prefill_moe_tp,
        moe_ep=request.prefill_moe_ep,
    )
    decode_ep = request.decode_moe_ep or (request.ep if request.ep <= request.decode_tp else 1)
    decode = make_layout(
        tp=request.decode_tp,
        pp=request.decode_pp,
        attention_dp=request.decode_attention_dp,
        moe_tp=request.decode_moe_tp,
        moe_ep=decode_ep,
    )
    validate_layout(model, prefill)
    validate_layout(model, decode)
    if request.prefill_workers < 1 or request.decode_workers < 1:
        raise PlanningError("disaggregated serving needs at least one prefill and one decode worker")
    return replace(
        base,
        mode=Mode.DISAGGREGATED,
        prefill_layout=prefill,
        prefill_workers=request.prefill_workers,
        decode_layout=decode,
        decode_workers=request.decode_workers,
    )


def validate_engine_settings(knobs: KnobOverrides, router: str) -> None:
    """Refuse engine settings no engine accepts (one line naming the setting)."""
    if knobs.max_model_len is not None and knobs.max_model_len < 2:
        raise PlanningError(f"max model length must be at least 2 tokens (got {knobs.max_model_len})")
    if knobs.kv_block_tokens is not None and not 1 <= knobs.kv_block_tokens <= 1024:
        raise PlanningError(f"KV block size must be between 1 and 1024 tokens (got {knobs.kv_block_tokens})")
    if knobs.moe_backend is not None and knobs.moe_backend not in MOE_BACKENDS:
        raise PlanningError(f"unknown MoE backend {knobs.moe_backend!r}; use one of {', '.join(MOE_BACKENDS)}")
    if knobs.moe_routing is not None and knobs.moe_routing not in SERVED_ROUTINGS:
        raise PlanningError(f"unknown MoE routing {knobs.moe_routing!r}; use one of {', '.join(SERVED_ROUTINGS)}")
    if router not in ROUTERS:
        raise PlanningError(f"unknown router {router!r}; use one of {', '.join(ROUTERS)}")
    if knobs.speculative is not None:
        knobs.speculative.validate()


def require_supported(gpu: GpuSpec, dtype: DType) -> None:
    """Refuse weights in a format the GPU can neither run nor dequantise."""
    if not gpu.supports_weights(dtype):
        native = ", ".join(d.value for d in gpu.peak_flops_per_s)
        dequantised = ", ".join(d.value for d in gpu.weight_only_dtypes) or "none"
        raise PlanningError(
            f"{gpu.name} cannot serve {dtype.value} weights: its tensor cores run {native}, "
            f"its kernels dequantise {dequantised}"
        )


@dataclass(frozen=True, slots=True)
class ProfiledEstimate(Estimate):
    """An estimate with the warnings its calibration profile raised (use outside the profile's scope)."""

    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary with a `warnings` list."""
        out = Estimate.as_dict(self)
        out["warnings"] = list(self.warnings)
        return out


def check_work_budget(deployment: Deployment, workload: Workload) -> None:
    """Refuse, before simulating, a workload whose prompts alone need more sequence-steps than its work budget."""
    budget_tokens = deployment.knobs.knobs_for(deployment.engine).max_batched_tokens
    prompt_tokens = workload.num_requests * workload.input_length.mean_tokens()
    # Every step carries at most the token budget of prompt tokens: a lower bound on the steps (each one
    # sequence-step at least) the run needs.
    steps = math.ceil(prompt_tokens / max(1, budget_tokens))
    if steps > workload.max_sequence_steps:
        raise PlanningError(
            f"this estimate needs at least {steps} engine steps ({workload.num_requests} requests x "
            f"{workload.input_length.mean_tokens():.0f} prompt tokens / a token budget of {budget_tokens}), over the "
            f"work budget of {workload.max_sequence_steps} sequence-steps: simulate fewer requests or raise "
            "max_batched_tokens"
        )


def run_estimate(request: EstimateRequest, *, catalog: Catalog) -> ProfiledEstimate:
    """Estimate latency and throughput of one deployment under one workload."""
    workload = resolve_workload(request)
    if request.max_sequence_steps is not None:
        workload = replace(workload, max_sequence_steps=request.max_sequence_steps)
    model = request.model_spec.name if request.model_spec else request.model
    catalog, warnings = profiled_catalog(catalog, request.profile, gpu=request.gpu, engine=request.engine, model=model)
    deployment = resolve_deployment(request, catalog)
    check_work_budget(deployment, workload)
    estimate = simulate_deployment(deployment, workload)
    if estimate.result.budget_cut and estimate.result.completed == 0:
        raise PlanningError(
            f"the work budget of {workload.max_sequence_steps} sequence-steps ran out before any request finished: "
            "simulate fewer requests, shorter ones or a lighter load"
        )
    values = {f.name: getattr(estimate, f.name) for f in fields(Estimate)}
    return ProfiledEstimate(**values, warnings=tuple(warnings))
