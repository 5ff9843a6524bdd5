"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag

from service.db.models import Plan
from service.placement.fleet_plan import FleetSpec
from service.planning.plan_spec import EstimateSpec, PlanSpec
from service.planning.specs import SPEC_KINDS, spec_kind


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


class EstimateBody(EstimateSpec):
    """`POST /v1/estimates` body: the options of `splan estimate`."""


class HealthStatus(BaseModel):
    """Liveness or readiness."""

    status: Literal["ok"]
    checks: dict[str, str] = Field(default_factory=dict)
