"""Validate a plan spec (the YAML/JSON of `splan plan` and POST /v1/plans) into a PlanRequest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.planning.catalog import Catalog
from service.planning.deployment import KnobOverrides, Mode, admitted, min_request_tokens
from service.planning.estimate import EstimateRequest, parse_dtype, require_supported, trace_workload
from service.planning.hf_config import model_from_hf_config
from service.planning.moe_cost import MOE_BACKEND_HELP, MOE_ROUTING_HELP, expert_kernel
from service.planning.profile import parse_profile, profiled_catalog
from service.planning.search import (
    MAX_SEARCH_SPACE,
    PlanRequest,
    SearchLimits,
    Slo,
    count_search_space,
    searchable_layouts,
)
from service.planning.specs import (
    KV_DTYPES,
    MAX_DRAFT_TOKENS,
    WEIGHT_DTYPES,
    ModelSpec,
    PlanningError,
    SpeculativeDecoding,
)
from service.planning.trace import MAX_TRACE_REQUESTS, read_trace, trace_from_records
from service.planning.workload import (
    MAX_SEED,
    MIN_RATE_PER_S,
    ArrivalKind,
    LengthDistribution,
    Workload,
    sample_requests,
)

# One bound per field, shared by plan specs (CLI, API, worker) and estimate requests (CLI, API).
MAX_SIMULATED_REQUESTS = MAX_TRACE_REQUESTS
MAX_RATE_PER_S = 100_000.0
MAX_CONCURRENCY = 4096
MAX_CV = 100.0
MAX_TIME_SCALE = 1000.0
MAX_GPUS = 4096
MAX_BATCHED_TOKENS = 1_048_576
MAX_SEQUENCES = 65_536
MAX_MODEL_LEN = 10_000_000
MAX_KV_BLOCK_TOKENS = 1024
MAX_SHARED_PREFIX_TOKENS = 1_048_576
MAX_GPU_PRICE_PER_HOUR = 10_000.0
# How the router spreads served tokens over a MoE model's experts (service/planning/moe_cost.py SERVED_ROUTINGS).
MoeRouting = Literal["random", "balanced", "power_law_1.01", "power_law_1.2"]
# MoE kernels a deployment may force (service/planning/moe_cost.py MOE_BACKENDS).
MoeBackend = Literal["auto", "marlin", "flashinfer_cutlass"]


T = TypeVar("T")


# Workload fields that plan specs and estimate specs share, with one rule each.
TimeScale = Annotated[
    float | None,
    Field(gt=0, le=MAX_TIME_SCALE, description="factor on the trace's time offsets (0.5: twice the recorded rate)"),
]
SharedPrefixTokens = Annotated[
    int,
    Field(ge=0, le=MAX_SHARED_PREFIX_TOKENS, description="leading prompt tokens shared by requests (a system prompt)"),
]
PrefixHitRate = Annotated[
    float, Field(ge=0, le=1, description="share of the requests that start with the shared prefix")
]
PrefixCacheWarm = Annotated[
    bool,
    Field(
        description="the prefix cache starts holding every shared prefix, as on a server that served this traffic "
        "before (a benchmark's later stage, a long-running deployment); default: a fresh server"
    ),
]


class SpecFieldError(PlanningError):
    """A spec the door refuses, with the dotted path of the field at fault."""

    def __init__(self, field: str, message: str, **extra: object) -> None:
        super().__init__(f"invalid plan spec at {field}: {message}")
        self.field = field
        self.reason = message
        self.extra = extra


class SearchSpaceTooLargeError(SpecFieldError):
    """The spec enumerates more strategies than one plan may search."""

    def __init__(self, space: int) -> None:
        super().__init__(
            "search",
            f"the search space has {space} strategies; the limit is {MAX_SEARCH_SPACE}: narrow search.tp, "
            "search.pp, search.modes or max_gpus",
            search_space=space,
            limit=MAX_SEARCH_SPACE,
        )
        self.space = space


class WorkloadSpec(BaseModel):
    """Traffic: arrival process, lengths, and rate or concurrency."""

    model_config = ConfigDict(extra="forbid")
    arrival: Literal["poisson", "gamma", "constant", "closed"] = "poisson"
    isl: int | str | None = None
    osl: int | str | None = None
    rate: float | None = Field(default=None, ge=MIN_RATE_PER_S, le=MAX_RATE_PER_S)
    concurrency: int | None = Field(default=None, ge=1, le=MAX_CONCURRENCY)
    cv: float = Field(default=1.0, gt=0, le=MAX_CV)
    client_start: Literal["benchmark", "burst", "staggered"] = "benchmark"
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    trace: list[dict[str, Any]] | str | None = Field(
        default=None,
        max_length=MAX_TRACE_REQUESTS,
        description="requests replayed as recorded: records with arrival_s, input_tokens, output_tokens and an "
        "optional prefix_id or session_id (other common names accepted); a CSV/JSONL path only in spec files",
    )
    time_scale: TimeScale = None
    shared_prefix_tokens: SharedPrefixTokens = 0
    prefix_hit_rate: PrefixHitRate = 1.0
    prefix_cache_warm: PrefixCacheWarm = False

    @field_validator("isl", "osl")
    @classmethod
    def _valid_length(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int):
            if value < 1:
                raise ValueError("must be at least 1 token")
        elif value is not None:
            LengthDistribution.parse(value)
        return value

    @model_validator(mode="after")
    def _lengths_or_trace(self) -> WorkloadSpec:
        if self.trace is None:
            if self.isl is None or self.osl is None:
                raise ValueError("give isl and osl, or a trace")
            if self.time_scale is not None:
                raise ValueError("time_scale applies to a trace only")
        elif self.isl is not None or self.osl is not None or self.arrival == "closed":
            raise ValueError("a trace brings its own lengths and arrivals: leave isl, osl and closed arrivals out")
        return self


class SpeculativeSpec(BaseModel):
    """Speculative decoding with a one-layer drafter, as the engine was started with it."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["mtp", "eagle", "eagle3"] = Field(description="the model's MTP module, EAGLE or EAGLE-3 heads")
    draft_tokens: int = Field(
        ge=1, le=MAX_DRAFT_TOKENS, description="tokens drafted per step (SGLang speculative_num_steps)"
    )
    acceptance_length: float = Field(
        ge=1.0, le=MAX_DRAFT_TOKENS + 1, description="mean tokens gained per step, bonus token included (engine logs)"
    )

    @model_validator(mode="after")
    def _within_drafts(self) -> SpeculativeSpec:
        if self.acceptance_length > self.draft_tokens + 1:
            raise ValueError(
                f"acceptance_length can be at most draft_tokens + 1 = {self.draft_tokens + 1} "
                f"(got {self.acceptance_length})"
            )
        return self

    def domain(self) -> SpeculativeDecoding:
        """The planning-side setting."""
        return SpeculativeDecoding(self.method, self.draft_tokens, self.acceptance_length)


class EngineSettingsSpec(BaseModel):
    """Engine settings users change (they replace the engine's defaults in every strategy)."""

    model_config = ConfigDict(extra="forbid")
    gpu_memory_utilization: float | None = Field(default=None, ge=0.1, le=1.0)
    max_model_len: int | None = Field(default=None, ge=2, le=MAX_MODEL_LEN)
    max_num_seqs: int | None = Field(default=None, ge=1, le=MAX_SEQUENCES)
    enable_prefix_caching: bool | None = Field(default=None, description="default: the engine's (on for all)")
    kv_block_size: int | None = Field(
        default=None, ge=1, le=MAX_KV_BLOCK_TOKENS, description="tokens per KV block (16)"
    )
    router: Literal["round_robin", "random", "least_loaded"] = "round_robin"
    moe_routing: MoeRouting | None = Field(default=None, description=MOE_ROUTING_HELP)
    moe_backend: MoeBackend | None = Field(default=None, description=MOE_BACKEND_HELP)
    speculative: SpeculativeSpec | None = None


class SloSpec(BaseModel):
    """Latency objectives."""

    model_config = ConfigDict(extra="forbid")
    ttft_ms: float = Field(gt=0, le=86_400_000)
    tpot_ms: float = Field(gt=0, le=86_400_000)
    attainment: float = Field(default=0.9, gt=0, le=1)
    percentile: float | None = Field(default=None, gt=0, le=100)


# A parallel degree in the search lists.
Degree = Annotated[int, Field(ge=1, le=4096)]


# Work budget of one plan: simulated strategies x requests per simulation (the search bisects each strategy's
# rate over about a dozen simulations, each cut at its own work budget).
PLAN_MAX_SIMULATED_REQUESTS = 100_000


class SearchSpec(BaseModel):
    """Optional limits on the strategy search."""

    model_config = ConfigDict(extra="forbid")
    modes: list[Literal["collocated", "disaggregated"]] = Field(
        default=["collocated", "disaggregated"], min_length=1, max_length=2
    )
    tp: list[Degree] = Field(default=[1, 2, 4, 8], min_length=1, max_length=64)
    pp: list[Degree] = Field(default=[1, 2], min_length=1, max_length=64)
    # Attention data-parallel ranks per replica; default: [1, 2, 4, ..., 64] up to max_gpus for MoE, [1] dense.
    attention_dp: list[Degree] | None = Field(default=None, min_length=1, max_length=64)
    # MoE expert-parallel degrees: "auto" tries pure EP (tp x attention_dp) and pure MoE-TP (1).
    moe_ep: Literal["auto"] | Annotated[list[Degree], Field(min_length=1, max_length=64)] = "auto"
    max_batched_tokens: list[Annotated[int, Field(ge=1, le=MAX_BATCHED_TOKENS)]] | None = Field(
        default=None, min_length=1, max_length=16
    )
    simulate_top: int = Field(default=5, ge=1, le=50)
    requests: int = Field(default=200, ge=20, le=MAX_SIMULATED_REQUESTS)

    @model_validator(mode="after")
    def _within_work_budget(self) -> SearchSpec:
        # Each simulated strategy bisects its rate over about a dozen simulations of `requests` requests.
        work = self.simulate_top * len(self.modes) * self.requests
        if work > PLAN_MAX_SIMULATED_REQUESTS:
            raise ValueError(
                f"simulate_top x modes x requests is {work}, over the work budget of {PLAN_MAX_SIMULATED_REQUESTS} "
                "simulated requests per bisection step: lower simulate_top or requests"
            )
        return self


class PlanSpec(BaseModel):
    """The whole plan spec."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(default=None, max_length=200)
    model_config_path: str | dict[str, Any] | None = Field(
        default=None,
        alias="model_config",
        description="a Hugging Face config.json: the mapping itself (a path only in spec files read by the CLI)",
    )
    gpu: str = Field(max_length=100)
    max_gpus: int = Field(ge=1, le=MAX_GPUS)
    engine: str = Field(default="vllm", max_length=100)
    weight_dtype: str = Field(default="bf16", max_length=20)
    kv_dtype: str | None = Field(default=None, max_length=20)
    gpu_price_per_hour: float | None = Field(default=None, gt=0, le=MAX_GPU_PRICE_PER_HOUR)
    workload: WorkloadSpec
    slo: SloSpec
    search: SearchSpec = SearchSpec()
    engine_settings: EngineSettingsSpec = EngineSettingsSpec()
    # A calibration profile from `splan calibrate`: inline (the API), or a path that `splan plan` reads and inlines.
    profile: dict[str, Any] | str | None = Field(
        default=None,
        description="calibration profile written by `splan calibrate` (a mapping; a path only in spec files)",
    )


class EstimateSpec(BaseModel):
    """One deployment to estimate: the options of `splan estimate` and the body of POST /v1/estimates."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=200)
    gpu: str = Field(max_length=100)
    engine: str = "vllm"
    weight_dtype: str = "bf16"
    kv_dtype: str | None = None
    mode: Literal["collocated", "disaggregated"] = "collocated"
    moe_weight_dtype: str | None = None
    tp: int = Field(default=1, ge=1, le=64, description="attention tensor parallelism per data-parallel rank")
    pp: int = Field(default=1, ge=1, le=64)
    attention_dp: int = Field(default=1, ge=1, le=256, description="attention data-parallel ranks per replica")
    moe_tp: int | None = Field(default=None, ge=1, le=256, description="slices per expert (default tp*dp/moe_ep)")
    moe_ep: int | None = Field(default=None, ge=1, le=1024, description="expert-parallel groups (default 1)")
    ep: int = Field(default=1, ge=1, le=1024, description="older name of moe_ep")
    replicas: int = Field(default=1, ge=1, le=256)
    prefill_tp: int = Field(default=1, ge=1, le=64)
    prefill_pp: int = Field(default=1, ge=1, le=64)
    prefill_attention_dp: int = Field(default=1, ge=1, le=256)
    prefill_moe_tp: int | None = Field(default=None, ge=1, le=256)
    prefill_moe_ep: int = Field(default=1, ge=1, le=1024)
    prefill_workers: int = Field(default=1, ge=1, le=256)
    decode_tp: int = Field(default=1, ge=1, le=64)
    decode_pp: int = Field(default=1, ge=1, le=64)
    decode_attention_dp: int = Field(default=1, ge=1, le=256)
    decode_moe_tp: int | None = Field(default=None, ge=1, le=256)
    decode_moe_ep: int | None = Field(default=None, ge=1, le=1024)
    decode_workers: int = Field(default=1, ge=1, le=256)
    isl: int | str | None = Field(
        default=None, description="N, uniform:LO:HI, normal:MEAN:STD or lognormal:MEAN:STD (not with a trace)"
    )
    osl: int | str | None = Field(default=None, description="same forms as isl")
    concurrency: int | None = Field(default=None, ge=1, le=MAX_CONCURRENCY)
    rate: float | None = Field(default=None, ge=MIN_RATE_PER_S, le=MAX_RATE_PER_S)
    arrival: Literal["poisson", "gamma", "constant"] | None = None
    cv: float = Field(default=1.0, gt=0, le=MAX_CV)
    client_start: Literal["benchmark", "burst", "staggered"] = "benchmark"
    requests_per_client: int | None = Field(
        default=None, ge=1, le=100, description="closed loop, benchmark protocol: requests each client sends (20)"
    )
    requests: int | None = Field(default=None, ge=1, le=MAX_SIMULATED_REQUESTS)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    max_batched_tokens: int | None = Field(default=None, ge=1, le=MAX_BATCHED_TOKENS)
    max_sequences: int | None = Field(default=None, ge=1, le=MAX_SEQUENCES)
    gpu_price_per_hour: float | None = Field(default=None, gt=0, le=MAX_GPU_PRICE_PER_HOUR)
    # Engine settings users change, under the engines' own names.
    memory_fraction: float | None = Field(
        default=None, ge=0.1, le=1.0, alias="gpu_memory_utilization", description="share of GPU memory the engine uses"
    )
    max_model_len: int | None = Field(
        default=None,
        ge=2,
        le=MAX_MODEL_LEN,
        description="longest request (prompt + output) accepted; longer are refused",
    )
    prefix_caching: bool | None = Field(
        default=None, alias="enable_prefix_caching", description="automatic prefix caching (default: the engine's)"
    )
    kv_block_tokens: int | None = Field(
        default=None, ge=1, le=MAX_KV_BLOCK_TOKENS, alias="kv_block_size", description="tokens per KV block"
    )
    router: Literal["round_robin", "random", "least_loaded"] = Field(
        default="round_robin", description="how replicas (and attention-DP ranks) share the requests"
    )
    moe_routing: MoeRouting | None = Field(default=None, description=MOE_ROUTING_HELP)
    moe_backend: MoeBackend | None = Field(default=None, description=MOE_BACKEND_HELP)
    # Requests replayed as recorded, inline: the server reads no files.
    trace: list[dict[str, int | float | str | None]] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_SIMULATED_REQUESTS,
        description="records with arrival_s, input_tokens, output_tokens and an optional prefix_id or session_id "
        "(also timestamp, prompt_tokens/isl, completion_tokens/osl); replaces isl, osl and the load",
    )
    time_scale: TimeScale = None
    shared_prefix_tokens: SharedPrefixTokens = 0
    prefix_hit_rate: PrefixHitRate = 1.0
    prefix_cache_warm: PrefixCacheWarm = False
    profile: dict[str, Any] | None = Field(
        default=None,
        description="calibration profile written by `splan calibrate` (the mapping itself; the server reads no files)",
    )
    speculative: SpeculativeSpec | None = None

    @field_validator("isl", "osl")
    @classmethod
    def _valid_length(cls, value: int | str | None) -> int | str | None:
        return WorkloadSpec._valid_length(value)

    def to_request(self, **resolved: Any) -> EstimateRequest:
        """The domain request, with what the caller resolved itself (a model config, lengths read from files)."""
        fields = self.model_dump()
        fields["mode"] = Mode.COLLOCATED if self.mode == "collocated" else Mode.DISAGGREGATED
        fields["speculative"] = None if self.speculative is None else self.speculative.domain()
        fields.update(resolved)
        return EstimateRequest(**fields)


def _workload(wl: WorkloadSpec, requests: int, base_dir: Path | None) -> Workload:
    """The workload of a spec: sampled lengths and arrivals, or a trace (a path read only from spec files)."""
    if wl.trace is not None:
        if isinstance(wl.trace, str):
            if base_dir is None:
                raise SpecFieldError(
                    "workload.trace",
                    "a path is read only by `splan plan` and `splan submit` (the CLI); give the requests inline "
                    "(a list of records)",
                )
            path = Path(wl.trace)
            trace = read_trace(path if path.is_absolute() else base_dir / path)
        else:
            trace = trace_from_records(wl.trace, source="workload.trace")
        return trace_workload(
            trace, rate=wl.rate, time_scale=wl.time_scale, seed=wl.seed, prefix_cache_warm=wl.prefix_cache_warm
        )
    arrival = ArrivalKind(wl.arrival)
    # WorkloadSpec checked that sampled workloads have both lengths.
    assert wl.isl is not None
    assert wl.osl is not None
    return Workload(
        arrival=arrival,
        input_length=LengthDistribution.fixed(wl.isl) if isinstance(wl.isl, int) else LengthDistribution.parse(wl.isl),
        output_length=LengthDistribution.fixed(wl.osl) if isinstance(wl.osl, int) else LengthDistribution.parse(wl.osl),
        rate_per_s=wl.rate or 1.0,
        concurrency=wl.concurrency or 0,
        cv=wl.cv,
        num_requests=requests,
        seed=wl.seed,
        closed_loop_staggered=wl.client_start == "staggered",
        shared_prefix_tokens=wl.shared_prefix_tokens,
        prefix_hit_rate=wl.prefix_hit_rate,
        prefix_cache_warm=wl.prefix_cache_warm,
    )


def _field_error(exc: ValidationError) -> SpecFieldError:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "spec"
    return SpecFieldError(where, str(err["msg"]))


def _at(field: str, check: Callable[[], T]) -> T:
    """Run one check; its one-line refusal names ``field``."""
    try:
        return check()
    except SpecFieldError:
        raise
    except PlanningError as exc:
        raise SpecFieldError(field, str(exc)) from None


def _model(
    spec: PlanSpec, catalog: Catalog, base_dir: Path | None, model_loader: Callable[[Path], ModelSpec] | None
) -> ModelSpec:
    """The model a spec names: a catalog name, an inline config.json mapping, or (CLI only) a config path."""
    config = spec.model_config_path
    if isinstance(config, dict):
        return _at("model_config", lambda: model_from_hf_config(config, name=spec.model or "custom"))
    if config:
        if model_loader is None:
            raise SpecFieldError(
                "model_config",
                "a path is read only by `splan plan` and `splan submit` (the CLI); give the config.json mapping inline",
            )
        path = Path(config)
        return _at(
            "model_config", lambda: model_loader(path if path.is_absolute() or base_dir is None else base_dir / path)
        )
    if spec.model:
        name = spec.model
        return _at("model", lambda: catalog.model(name))
    raise SpecFieldError("model", "a plan spec needs a model (catalog name) or model_config (a config.json)")


def _check_lengths(model: ModelSpec, workload: Workload, spec: PlanSpec) -> None:
    """Requests must fit the model's context, and the engine must accept some of them (max_model_len)."""
    field = "workload.trace" if spec.workload.trace is not None else "workload.isl"
    context = model.max_position_embeddings
    longest = min_request_tokens(workload)
    if longest > context:
        raise SpecFieldError(
            field,
            f"the longest request needs {longest} tokens (input + output), over the {context}-token context of "
            f"{model.name} (max_position_embeddings)",
        )
    max_model_len = spec.engine_settings.max_model_len
    if max_model_len is None:
        return
    if max_model_len > context:
        raise SpecFieldError(
            "engine_settings.max_model_len",
            f"{max_model_len} is over the {context}-token context of {model.name} (max_position_embeddings)",
        )
    # The worker draws the same sample from the same seed: refuse here what it would refuse there.
    _at("engine_settings.max_model_len", lambda: admitted(sample_requests(workload), max_model_len))


def _search(spec: PlanSpec, model: ModelSpec) -> SearchLimits:
    search = spec.search
    if model.moe is None and search.moe_ep != "auto" and any(ep > 1 for ep in search.moe_ep):
        raise SpecFieldError("search.moe_ep", f"{model.name} is dense (no experts to split)")
    return SearchLimits(
        modes=tuple(Mode(m) for m in search.modes),
        tp=tuple(search.tp),
        pp=tuple(search.pp),
        attention_dp=tuple(search.attention_dp) if search.attention_dp is not None else None,
        moe_ep=None if search.moe_ep == "auto" else tuple(search.moe_ep),
        max_batched_tokens=tuple(search.max_batched_tokens) if search.max_batched_tokens else (None,),
        simulate_top=search.simulate_top,
        requests=search.requests,
    )


def parse_plan_spec(
    raw: Any,
    *,
    catalog: Catalog,
    base_dir: Path | None = None,
    model_loader: Callable[[Path], ModelSpec] | None = None,
) -> PlanRequest:
    """Turn a parsed spec document into a validated PlanRequest, checked as fully as the worker will use it.

    The API door, the CLI and the worker all call this: whatever would fail the plan before its first
    simulation fails here, as a SpecFieldError naming the field.
    """
    if isinstance(raw, PlanSpec):
        spec = raw  # validated by the caller (the API's body model): no second pass
    elif not isinstance(raw, dict):
        raise SpecFieldError("spec", "a plan spec must be a mapping with model, gpu, max_gpus, workload and slo")
    else:
        try:
            spec = PlanSpec.model_validate(raw)
        except ValidationError as exc:
            raise _field_error(exc) from None
    model = _model(spec, catalog, base_dir, model_loader)
    gpu = _at("gpu", lambda: catalog.gpu(spec.gpu))
    engine = _at("engine", lambda: catalog.engine(spec.engine))
    weight = _at("weight_dtype", lambda: parse_dtype(spec.weight_dtype, allowed=WEIGHT_DTYPES, what="weight dtype"))
    _at("weight_dtype", lambda: require_supported(gpu, weight))
    backend = spec.engine_settings.moe_backend
    if model.is_moe and backend is not None:
        _at("engine_settings.moe_backend", lambda: expert_kernel(weight, gpu, backend))
    if spec.kv_dtype is not None:
        kv = spec.kv_dtype
        _at("kv_dtype", lambda: parse_dtype(kv, allowed=KV_DTYPES, what="KV-cache dtype"))
    if isinstance(spec.profile, str):
        raise SpecFieldError(
            "profile",
            "a path is read only by `splan plan` and `splan submit` (the CLI); give the profile inline (the mapping "
            "`splan calibrate` writes)",
        )
    if spec.profile is not None:
        profile = spec.profile
        _at("profile", lambda: parse_profile(profile))
        _at("profile", lambda: profiled_catalog(catalog, profile, gpu=gpu.name, engine=engine.name, model=model.name))
    wl = spec.workload
    if ArrivalKind(wl.arrival) is ArrivalKind.CLOSED and wl.concurrency is None:
        wl = wl.model_copy(update={"concurrency": 1})
    field = "workload.trace" if wl.trace is not None else "workload"
    workload = _at(field, lambda: _workload(wl, spec.search.requests, base_dir))
    _at(field, workload.validate)
    _check_lengths(model, workload, spec)
    attainment = spec.slo.percentile / 100 if spec.slo.percentile is not None else spec.slo.attainment
    request = PlanRequest(
        model=model,
        gpu=spec.gpu,
        max_gpus=spec.max_gpus,
        workload=workload,
        slo=Slo(spec.slo.ttft_ms, spec.slo.tpot_ms, attainment),
        engine=spec.engine,
        weight_dtype=spec.weight_dtype,
        kv_dtype=spec.kv_dtype,
        limits=_search(spec, model),
        gpu_price_per_hour=spec.gpu_price_per_hour,
        knobs=KnobOverrides(
            max_sequences=spec.engine_settings.max_num_seqs,
            memory_fraction=spec.engine_settings.gpu_memory_utilization,
            max_model_len=spec.engine_settings.max_model_len,
            prefix_caching=spec.engine_settings.enable_prefix_caching,
            kv_block_tokens=spec.engine_settings.kv_block_size,
            moe_routing=spec.engine_settings.moe_routing,
            moe_backend=spec.engine_settings.moe_backend,
            speculative=None if spec.engine_settings.speculative is None else spec.engine_settings.speculative.domain(),
        ),
        router=spec.engine_settings.router,
    )
    _at("search", lambda: searchable_layouts(request))
    space = count_search_space(request)
    if space > MAX_SEARCH_SPACE:
        raise SearchSpaceTooLargeError(space)
    return request
