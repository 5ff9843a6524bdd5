"""Validate a plan spec (the YAML/JSON of `splan plan` and POST /v1/plans) into a PlanRequest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.planning.catalog import Catalog
from service.planning.deployment import KnobOverrides, Mode
from service.planning.estimate import trace_workload
from service.planning.profile import parse_profile
from service.planning.search import PlanRequest, SearchLimits, Slo, searchable_layouts
from service.planning.specs import ModelSpec, PlanningError
from service.planning.trace import MAX_TRACE_REQUESTS, read_trace, trace_from_records
from service.planning.workload import MAX_SEED, MIN_RATE_PER_S, ArrivalKind, LengthDistribution, Workload


class WorkloadSpec(BaseModel):
    """Traffic: arrival process, lengths, and rate or concurrency."""

    model_config = ConfigDict(extra="forbid")
    arrival: Literal["poisson", "gamma", "constant", "closed"] = "poisson"
    isl: int | str | None = None
    osl: int | str | None = None
    rate: float | None = Field(default=None, ge=MIN_RATE_PER_S, le=100_000)
    concurrency: int | None = Field(default=None, ge=1)
    cv: float = Field(default=1.0, gt=0)
    client_start: Literal["benchmark", "burst", "staggered"] = "benchmark"
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    trace: list[dict[str, Any]] | str | None = Field(
        default=None,
        max_length=MAX_TRACE_REQUESTS,
        description="requests replayed as recorded: records with arrival_s, input_tokens, output_tokens and an "
        "optional prefix_id or session_id (other common names accepted); a CSV/JSONL path only in spec files",
    )
    time_scale: float | None = Field(
        default=None, gt=0, description="factor on the trace's time offsets (0.5: twice the recorded rate)"
    )
    shared_prefix_tokens: int = Field(
        default=0, ge=0, le=1_048_576, description="leading prompt tokens shared by requests (a system prompt)"
    )
    prefix_hit_rate: float = Field(
        default=1.0, ge=0, le=1, description="share of the requests that start with the shared prefix"
    )

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


class EngineSettingsSpec(BaseModel):
    """Engine settings users change (they replace the engine's defaults in every strategy)."""

    model_config = ConfigDict(extra="forbid")
    gpu_memory_utilization: float | None = Field(default=None, ge=0.1, le=1.0)
    max_model_len: int | None = Field(default=None, ge=2, le=10_000_000)
    max_num_seqs: int | None = Field(default=None, ge=1, le=65_536)
    enable_prefix_caching: bool | None = Field(default=None, description="default: the engine's (on for all)")
    kv_block_size: int | None = Field(default=None, ge=1, le=1024, description="tokens per KV block (16)")
    router: Literal["round_robin", "random", "least_loaded"] = "round_robin"


class SloSpec(BaseModel):
    """Latency objectives."""

    model_config = ConfigDict(extra="forbid")
    ttft_ms: float = Field(gt=0)
    tpot_ms: float = Field(gt=0)
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
    modes: list[Literal["collocated", "disaggregated"]] = ["collocated", "disaggregated"]
    tp: list[Degree] = Field(default=[1, 2, 4, 8], min_length=1)
    pp: list[Degree] = Field(default=[1, 2], min_length=1)
    # Attention data-parallel ranks per replica; default: [1, 2, 4, ..., 64] up to max_gpus for MoE, [1] dense.
    attention_dp: list[Degree] | None = Field(default=None, min_length=1)
    # MoE expert-parallel degrees: "auto" tries pure EP (tp x attention_dp) and pure MoE-TP (1).
    moe_ep: Literal["auto"] | list[Degree] = "auto"
    max_batched_tokens: list[int] | None = None
    simulate_top: int = Field(default=5, ge=1, le=50)
    requests: int = Field(default=200, ge=20, le=5000)

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
    model: str | None = None
    model_config_path: str | None = Field(default=None, alias="model_config")
    gpu: str
    max_gpus: int = Field(ge=1, le=4096)
    engine: str = "vllm"
    weight_dtype: str = "bf16"
    kv_dtype: str | None = None
    gpu_price_per_hour: float | None = Field(default=None, gt=0)
    workload: WorkloadSpec
    slo: SloSpec
    search: SearchSpec = SearchSpec()
    engine_settings: EngineSettingsSpec = EngineSettingsSpec()
    # A calibration profile from `splan calibrate`: inline (the API), or a path that `splan plan` reads and inlines.
    profile: dict[str, Any] | str | None = Field(
        default=None,
        description="calibration profile written by `splan calibrate` (a mapping; a path only in spec files)",
    )


def _workload(wl: WorkloadSpec, requests: int, base_dir: Path | None) -> Workload:
    """The workload of a spec: sampled lengths and arrivals, or a trace (a path read only from spec files)."""
    if wl.trace is not None:
        if isinstance(wl.trace, str):
            if base_dir is None:
                raise PlanningError(
                    "invalid plan spec at workload.trace: a path is read only by `splan plan`; give the requests "
                    "inline (a list of records)"
                )
            path = Path(wl.trace)
            trace = read_trace(path if path.is_absolute() else base_dir / path)
        else:
            trace = trace_from_records(wl.trace, source="workload.trace")
        return trace_workload(trace, rate=wl.rate, time_scale=wl.time_scale, seed=wl.seed)
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
    )


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "spec"
    return f"invalid plan spec at {where}: {err['msg']}"


def parse_plan_spec(
    raw: Any,
    *,
    catalog: Catalog,
    base_dir: Path | None = None,
    model_loader: Callable[[Path], ModelSpec] | None = None,
) -> PlanRequest:
    """Turn a parsed spec document into a validated PlanRequest (one-line PlanningError otherwise)."""
    if not isinstance(raw, dict):
        raise PlanningError("a plan spec must be a mapping with model, gpu, max_gpus, workload and slo")
    try:
        spec = PlanSpec.model_validate(raw)
    except ValidationError as exc:
        raise PlanningError(_first_error(exc)) from None
    if spec.model_config_path:
        if model_loader is None:
            raise PlanningError("model_config paths are only accepted from the command line")
        path = Path(spec.model_config_path)
        model = model_loader(path if path.is_absolute() or base_dir is None else base_dir / path)
    elif spec.model:
        model = catalog.model(spec.model)
    else:
        raise PlanningError("a plan spec needs a model (catalog name) or model_config (path)")
    catalog.gpu(spec.gpu)
    catalog.engine(spec.engine)
    if isinstance(spec.profile, str):
        raise PlanningError(
            "invalid plan spec at profile: a path is read only by `splan plan`; give the profile inline "
            "(the mapping `splan calibrate` writes)"
        )
    if spec.profile is not None:
        parse_profile(spec.profile)
    wl = spec.workload
    arrival = ArrivalKind(wl.arrival)
    if arrival is ArrivalKind.CLOSED and wl.concurrency is None:
        wl = wl.model_copy(update={"concurrency": 1})
    attainment = spec.slo.percentile / 100 if spec.slo.percentile is not None else spec.slo.attainment
    workload = _workload(wl, spec.search.requests, base_dir)
    search = spec.search
    if search.moe_ep != "auto" and not search.moe_ep:
        raise PlanningError('invalid plan spec at search.moe_ep: give "auto" or a non-empty list of degrees')
    if model.moe is None and search.moe_ep != "auto" and any(ep > 1 for ep in search.moe_ep):
        raise PlanningError(f"invalid plan spec at search.moe_ep: {model.name} is dense (no experts to split)")
    limits = SearchLimits(
        modes=tuple(Mode(m) for m in spec.search.modes),
        tp=tuple(spec.search.tp),
        pp=tuple(spec.search.pp),
        attention_dp=tuple(search.attention_dp) if search.attention_dp is not None else None,
        moe_ep=None if search.moe_ep == "auto" else tuple(search.moe_ep),
        max_batched_tokens=tuple(spec.search.max_batched_tokens) if spec.search.max_batched_tokens else (None,),
        simulate_top=spec.search.simulate_top,
        requests=spec.search.requests,
    )
    request = PlanRequest(
        model=model,
        gpu=spec.gpu,
        max_gpus=spec.max_gpus,
        workload=workload,
        slo=Slo(spec.slo.ttft_ms, spec.slo.tpot_ms, attainment),
        engine=spec.engine,
        weight_dtype=spec.weight_dtype,
        kv_dtype=spec.kv_dtype,
        limits=limits,
        gpu_price_per_hour=spec.gpu_price_per_hour,
        knobs=KnobOverrides(
            max_sequences=spec.engine_settings.max_num_seqs,
            memory_fraction=spec.engine_settings.gpu_memory_utilization,
            max_model_len=spec.engine_settings.max_model_len,
            prefix_caching=spec.engine_settings.enable_prefix_caching,
            kv_block_tokens=spec.engine_settings.kv_block_size,
        ),
        router=spec.engine_settings.router,
    )
    # At the door: a spec whose search keys leave no valid layout would only fail on the worker.
    searchable_layouts(request)
    return request
