"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from service.db.models import Plan
from service.placement.fleet_plan import FleetSpec
from service.planning.plan_spec import PlanSpec
from service.planning.specs import SPEC_KINDS, spec_kind
from service.planning.workload import MAX_SEED, MIN_RATE_PER_S

MAX_ESTIMATE_REQUESTS = 1000


class StrategyPlanBody(PlanSpec):
    """`POST /v1/plans` body: the `splan plan` spec as JSON."""

    kind: Literal["strategy"] = "strategy"


def _plan_kind(value: Any) -> str:
    if isinstance(value, dict):
        # An unknown kind goes through as its own tag, which pydantic refuses with the allowed ones.
        kind = value.get("kind")
        return str(kind) if kind is not None and kind not in SPEC_KINDS else spec_kind(value)
    return str(getattr(value, "kind", "strategy"))


PlanBody = Annotated[
    Annotated[StrategyPlanBody, Tag("strategy")] | Annotated[FleetSpec, Tag("fleet")],
    Discriminator(_plan_kind),
]


class Progress(BaseModel):
    """Strategies evaluated so far of the total to evaluate."""

    done: int
    total: int


class LaunchFiles(BaseModel):
    """Ready-to-run launch files for one strategy of a plan: relative path -> content."""

    plan_id: str
    strategy: str
    files: dict[str, str]


class PlanResource(BaseModel):
    """A plan as the API shows it."""

    id: str
    kind: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    model: str
    gpu: str
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempt: int
    progress: Progress
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    @classmethod
    def of(cls, plan: Plan, *, with_result: bool = True) -> PlanResource:
        """The resource view of a stored plan."""
        return cls(
            id=plan.id,
            kind=plan.kind,
            status=plan.status,  # type: ignore[arg-type]
            model=plan.model,
            gpu=plan.gpu,
            created_at=plan.created_at,
            updated_at=plan.updated_at,
            started_at=plan.started_at,
            finished_at=plan.finished_at,
            attempt=plan.attempt,
            progress=Progress(done=plan.progress_done, total=plan.progress_total),
            result=plan.result if with_result else None,
            error=plan.error,
        )


class PlanList(BaseModel):
    """A page of plans, newest first."""

    items: list[PlanResource]
    next_cursor: str | None


class EstimateBody(BaseModel):
    """`POST /v1/estimates` body: the options of `splan estimate`."""

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
    concurrency: int | None = Field(default=None, ge=1, le=4096)
    rate: float | None = Field(default=None, ge=MIN_RATE_PER_S, le=100_000)
    arrival: Literal["poisson", "gamma", "constant"] | None = None
    cv: float = Field(default=1.0, gt=0, le=100)
    client_start: Literal["benchmark", "burst", "staggered"] = "benchmark"
    requests_per_client: int | None = Field(
        default=None, ge=1, le=100, description="closed loop, benchmark protocol: requests each client sends (20)"
    )
    requests: int | None = Field(default=None, ge=1, le=MAX_ESTIMATE_REQUESTS)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    max_batched_tokens: int | None = Field(default=None, ge=1, le=1_048_576)
    max_sequences: int | None = Field(default=None, ge=1, le=65_536)
    gpu_price_per_hour: float | None = Field(default=None, gt=0)
    # Engine settings users change, under the engines' own names.
    memory_fraction: float | None = Field(
        default=None, ge=0.1, le=1.0, alias="gpu_memory_utilization", description="share of GPU memory the engine uses"
    )
    max_model_len: int | None = Field(
        default=None, ge=2, le=10_000_000, description="longest request (prompt + output) accepted; longer are refused"
    )
    prefix_caching: bool | None = Field(
        default=None, alias="enable_prefix_caching", description="automatic prefix caching (default: the engine's)"
    )
    kv_block_tokens: int | None = Field(
        default=None, ge=1, le=1024, alias="kv_block_size", description="tokens per KV block"
    )
    router: Literal["round_robin", "random", "least_loaded"] = Field(
        default="round_robin", description="how replicas (and attention-DP ranks) share the requests"
    )
    # Requests replayed as recorded, inline: the server reads no files.
    trace: list[dict[str, int | float | str | None]] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_ESTIMATE_REQUESTS,
        description="records with arrival_s, input_tokens, output_tokens and an optional prefix_id or session_id "
        "(also timestamp, prompt_tokens/isl, completion_tokens/osl); replaces isl, osl and the load",
    )
    time_scale: float | None = Field(
        default=None, gt=0, le=1000, description="factor on the trace's time offsets (0.5: twice the recorded rate)"
    )
    shared_prefix_tokens: int = Field(
        default=0, ge=0, le=1_048_576, description="leading prompt tokens shared by requests (a system prompt)"
    )
    prefix_hit_rate: float = Field(
        default=1.0, ge=0, le=1, description="share of the requests that start with the shared prefix"
    )
    profile: dict[str, Any] | None = Field(
        default=None,
        description="calibration profile written by `splan calibrate` (the mapping itself; the server reads no files)",
    )


class HealthStatus(BaseModel):
    """Liveness or readiness."""

    status: Literal["ok"]
    checks: dict[str, str] = Field(default_factory=dict)
