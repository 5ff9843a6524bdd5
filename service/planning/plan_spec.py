"""Validate a plan spec (the YAML/JSON of `splan plan` and POST /v1/plans) into a PlanRequest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.planning.catalog import Catalog
from service.planning.deployment import Mode
from service.planning.search import PlanRequest, SearchLimits, Slo, searchable_layouts
from service.planning.specs import ModelSpec, PlanningError
from service.planning.workload import ArrivalKind, LengthDistribution, Workload


class WorkloadSpec(BaseModel):
    """Traffic: arrival process, lengths, and rate or concurrency."""

    model_config = ConfigDict(extra="forbid")
    arrival: Literal["poisson", "gamma", "constant", "closed"] = "poisson"
    isl: int | str
    osl: int | str
    rate: float | None = Field(default=None, gt=0)
    concurrency: int | None = Field(default=None, ge=1)
    cv: float = Field(default=1.0, gt=0)
    client_start: Literal["benchmark", "burst", "staggered"] = "benchmark"
    seed: int = 0

    @field_validator("isl", "osl")
    @classmethod
    def _valid_length(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            if value < 1:
                raise ValueError("must be at least 1 token")
        else:
            LengthDistribution.parse(value)
        return value


class SloSpec(BaseModel):
    """Latency objectives."""

    model_config = ConfigDict(extra="forbid")
    ttft_ms: float = Field(gt=0)
    tpot_ms: float = Field(gt=0)
    attainment: float = Field(default=0.9, gt=0, le=1)
    percentile: float | None = Field(default=None, gt=0, le=100)


# A parallel degree in the search lists.
Degree = Annotated[int, Field(ge=1, le=4096)]


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
    wl = spec.workload
    arrival = ArrivalKind(wl.arrival)
    if arrival is ArrivalKind.CLOSED and wl.concurrency is None:
        wl = wl.model_copy(update={"concurrency": 1})
    attainment = spec.slo.percentile / 100 if spec.slo.percentile is not None else spec.slo.attainment
    workload = Workload(
        arrival=arrival,
        input_length=LengthDistribution.fixed(wl.isl) if isinstance(wl.isl, int) else LengthDistribution.parse(wl.isl),
        output_length=LengthDistribution.fixed(wl.osl) if isinstance(wl.osl, int) else LengthDistribution.parse(wl.osl),
        rate_per_s=wl.rate or 1.0,
        concurrency=wl.concurrency or 0,
        cv=wl.cv,
        num_requests=spec.search.requests,
        seed=wl.seed,
        closed_loop_staggered=wl.client_start == "staggered",
    )
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
    )
    # At the door: a spec whose search keys leave no valid layout would only fail on the worker.
    searchable_layouts(request)
    return request
