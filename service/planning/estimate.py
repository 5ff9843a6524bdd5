"""Single-deployment estimate: resolve names against the catalog, build the deployment, simulate."""

from __future__ import annotations

from dataclasses import dataclass, replace

from service.planning.catalog import Catalog
from service.planning.deployment import Deployment, Estimate, KnobOverrides, Mode, simulate_deployment
from service.planning.specs import DTYPE_ALIASES, WEIGHT_DTYPES, DType, GpuSpec, ModelSpec, PlanningError
from service.planning.stepcost import make_layout, validate_layout
from service.planning.workload import (
    BENCHMARK_REQUESTS_PER_CLIENT,
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
    isl: str | int | LengthDistribution
    osl: str | int | LengthDistribution
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
    seed: int = 0
    max_batched_tokens: int | None = None
    max_sequences: int | None = None
    chunked_prefill: bool | None = None
    memory_fraction: float | None = None
    gpu_price_per_hour: float | None = None
    model_spec: ModelSpec | None = None


def client_staggered(client_start: str) -> bool:
    """Whether closed-loop clients start staggered (`staggered`) or together (`burst`, `benchmark`)."""
    try:
        return ClientStart(client_start) is ClientStart.STAGGERED
    except ValueError:
        names = ", ".join(c.value for c in ClientStart)
        raise PlanningError(f"unknown client start {client_start!r}; use one of {names}") from None


def resolve_workload(request: EstimateRequest) -> Workload:
    """The workload an estimate request describes."""
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
    if request.rate is not None and request.rate <= 0:
        raise PlanningError(f"rate must be positive (got {request.rate:g})")
    if request.concurrency is not None and request.concurrency < 1:
        raise PlanningError(f"concurrency must be at least 1 (got {request.concurrency})")
    concurrency = request.concurrency or 0
    count = request.requests or default_requests(arrival, concurrency)
    profiled_rounds = 0
    if request.requests is None and arrival is ArrivalKind.CLOSED and request.client_start == ClientStart.BENCHMARK:
        # The benchmark client profiles a fixed number of rounds per client (see docs/ENGINES.md); the
        # simulation runs rounds until they settle and its last round stands for the rest.
        profiled_rounds = request.requests_per_client or BENCHMARK_REQUESTS_PER_CLIENT
        fixed = all(as_length(n).kind is LengthKind.FIXED for n in (request.isl, request.osl))
        # Fixed lengths settle into a steady pattern within a few rounds; drawn lengths are drawn for every round.
        simulated = min(profiled_rounds, SIMULATED_BENCHMARK_ROUNDS) if fixed else profiled_rounds
        count = min(MAX_REQUESTS, concurrency * simulated)
    if request.requests_per_client is not None and request.requests_per_client < 1:
        raise PlanningError(f"requests per client must be at least 1 (got {request.requests_per_client})")
    if not 1 <= count <= MAX_REQUESTS:
        raise PlanningError(f"requests must be between 1 and {MAX_REQUESTS} (got {count})")
    workload = Workload(
        arrival=arrival,
        input_length=as_length(request.isl),
        output_length=as_length(request.osl),
        rate_per_s=request.rate or 0.0,
        concurrency=concurrency,
        cv=request.cv,
        num_requests=count,
        seed=request.seed,
        closed_loop_staggered=client_staggered(request.client_start),
        profiled_rounds=profiled_rounds,
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
    )
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


def require_supported(gpu: GpuSpec, dtype: DType) -> None:
    """Refuse weights in a format the GPU can neither run nor dequantise."""
    if not gpu.supports_weights(dtype):
        native = ", ".join(d.value for d in gpu.peak_flops_per_s)
        dequantised = ", ".join(d.value for d in gpu.weight_only_dtypes) or "none"
        raise PlanningError(
            f"{gpu.name} cannot serve {dtype.value} weights: its tensor cores run {native}, "
            f"its kernels dequantise {dequantised}"
        )


def run_estimate(request: EstimateRequest, *, catalog: Catalog) -> Estimate:
    """Estimate latency and throughput of one deployment under one workload."""
    workload = resolve_workload(request)
    deployment = resolve_deployment(request, catalog)
    return simulate_deployment(deployment, workload)
