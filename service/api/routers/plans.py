"""Plans: submit (idempotent), read, list (cursor-paginated), cancel."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from service import plans_service
from service.api.deps import AdmissionDep, CatalogDep, PlansRead, PlansWrite, SessionDep
from service.api.errors import ProblemError, problem_responses
from service.api.schemas import LaunchFiles, PlanBody, PlanList, PlanResource
from service.auth import QuotaExceededError
from service.db import plans as plan_store
from service.db.models import Plan, PlanStatus
from service.placement.fleet_plan import FleetSpec
from service.planning.plan_spec import SearchSpaceTooLargeError
from service.planning.specs import PlanningError

router = APIRouter(prefix="/v1/plans", tags=["plans"])

PROBLEMS = problem_responses(
    (401, "No API key, or a malformed, unknown or revoked one"),
    (403, "The API key lacks the operation's scope"),
    (404, "No plan with that id (of the caller's tenant)"),
    (409, "The plan cannot change state"),
    (413, "Body too large"),
    (422, "Invalid spec, idempotency key reused with another body, or search space too large"),
    (429, "The tenant's plans-in-flight, plans-per-hour or search-space quota is exceeded; see Retry-After"),
)


def encode_cursor(seq: int) -> str:
    """An opaque cursor for the plan after which the next page starts."""
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The sequence number inside a cursor; 422 when it is not one of ours."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, value = text.partition(":")
        if prefix != "seq" or not value.isdigit():
            raise ValueError(text)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ProblemError(422, "invalid cursor; pass the next_cursor of a previous page") from None


@router.post(
    "",
    status_code=202,
    operation_id="createPlan",
    summary="Submit a plan",
    response_model=PlanResource,
    responses={
        **PROBLEMS,
        200: {"description": "Same Idempotency-Key and body: the existing plan", "model": PlanResource},
    },
)
async def create_plan(
    body: PlanBody,
    response: Response,
    catalog: CatalogDep,
    admission: AdmissionDep,
    principal: PlansWrite,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> PlanResource:
    """Validate the spec, store the plan as queued (with its idempotency key) and enqueue it after commit.

    `kind: fleet` plans many deployments at once onto a fleet (GPU counts by type, or a stored cluster).
    Concurrent submissions are stored together (one transaction, one quota check per tenant).
    """
    try:
        if isinstance(body, FleetSpec):
            # Up to a thousand deployments to check: off the event loop.
            plan = await run_in_threadpool(plans_service.validate_plan, body, catalog)
        else:
            plan = plans_service.validate_plan(body, catalog)
        submitted = await admission.submit(plans_service.PlanSubmission(plan, principal, idempotency_key))
    except SearchSpaceTooLargeError as exc:
        raise ProblemError(
            422, exc.reason, title="Search space too large", search_space=exc.space, limit=exc.extra["limit"]
        ) from None
    except plans_service.ClusterMissingError as exc:
        raise ProblemError(422, exc.reason) from None
    except QuotaExceededError as exc:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else {}
        title = "Search space over the tenant's quota" if exc.quota == "search_space" else "Quota exceeded"
        raise ProblemError(
            exc.status, exc.detail, title=title, headers=headers, quota=exc.quota, limit=exc.limit
        ) from None
    except plan_store.IdempotencyConflictError:
        raise ProblemError(
            422,
            "this Idempotency-Key was already used with a different request body",
            title="Idempotency key reused",
        ) from None
    response.headers["Location"] = f"/v1/plans/{submitted.plan.id}"
    if not submitted.created:
        response.status_code = 200
    return PlanResource.of(submitted.plan)


@router.get(
    "", operation_id="listPlans", summary="List plans, newest first", response_model=PlanList, responses=PROBLEMS
)
def list_plans(
    session: SessionDep,
    principal: PlansRead,
    status: PlanStatus | None = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> PlanList:
    """A page of plans; pass `next_cursor` back as `cursor` for the next one."""
    before = decode_cursor(cursor) if cursor else None
    page = plans_service.list_plans(
        session,
        tenant=principal.tenant,
        status=status.value if status else None,
        model=model,
        before_seq=before,
        limit=limit,
    )
    return PlanList(
        items=[PlanResource.of(p, with_result=False) for p in page.items],
        next_cursor=encode_cursor(page.next_cursor) if page.next_cursor is not None else None,
    )


@router.get(
    "/{plan_id}", operation_id="getPlan", summary="Read a plan", response_model=PlanResource, responses=PROBLEMS
)
def get_plan(plan_id: str, session: SessionDep, principal: PlansRead) -> PlanResource:
    """Status, progress, and the result once succeeded (or a problem detail once failed)."""
    try:
        return PlanResource.of(plans_service.get_plan(session, plan_id=plan_id, tenant=principal.tenant))
    except plan_store.PlanNotFoundError:
        raise ProblemError(404, f"no plan with id {plan_id}") from None


@router.post(
    "/{plan_id}/cancel",
    operation_id="cancelPlan",
    summary="Cancel a plan",
    response_model=PlanResource,
    responses=PROBLEMS,
)
def cancel_plan(plan_id: str, session: SessionDep, principal: PlansWrite) -> PlanResource:
    """Cancel a queued or running plan; finished plans answer 409."""
    try:
        return PlanResource.of(plans_service.cancel_plan(session, plan_id=plan_id, tenant=principal.tenant))
    except plan_store.PlanNotFoundError:
        raise ProblemError(404, f"no plan with id {plan_id}") from None
    except plan_store.PlanStateError as exc:
        raise ProblemError(409, str(exc)) from None


def _succeeded(session: SessionDep, plan_id: str, tenant: str) -> Plan:
    """The tenant's stored plan, once it has a result; 404 when unknown, 409 before it succeeded."""
    try:
        return plans_service.succeeded_plan(session, plan_id=plan_id, tenant=tenant)
    except plan_store.PlanNotFoundError:
        raise ProblemError(404, f"no plan with id {plan_id}") from None
    except plans_service.PlanNotReadyError as exc:
        raise ProblemError(409, str(exc)) from None


@router.get(
    "/{plan_id}/report",
    operation_id="getPlanReport",
    summary="The plan's self-contained HTML report",
    response_class=HTMLResponse,
    responses={**PROBLEMS, 200: {"description": "One HTML page, no external fetches", "content": {"text/html": {}}}},
)
def get_plan_report(plan_id: str, session: SessionDep, principal: PlansRead) -> HTMLResponse:
    """Spec, ranked strategies, frontier and latency plots, and why layouts were pruned (fleet plans: placement)."""
    return HTMLResponse(plans_service.plan_report(_succeeded(session, plan_id, principal.tenant)))


@router.get(
    "/{plan_id}/launch",
    operation_id="getPlanLaunch",
    summary="Launch commands and Kubernetes manifests for one of the plan's strategies",
    response_model=LaunchFiles,
    responses=PROBLEMS,
)
def get_plan_launch(
    plan_id: str,
    session: SessionDep,
    catalog: CatalogDep,
    principal: PlansRead,
    engine: Annotated[
        Literal["vllm", "sglang", "trtllm"] | None, Query(description="one engine (default: all)")
    ] = None,
    strategy: Annotated[int, Query(ge=1, le=1000, description="rank of the strategy to launch")] = 1,
) -> LaunchFiles:
    """Per engine the launch scripts (prefill, decode and router for disaggregated strategies), manifests, README."""
    plan = _succeeded(session, plan_id, principal.tenant)
    try:
        label, files = plans_service.plan_launch(plan, catalog=catalog, engine=engine, strategy=strategy)
    except PlanningError as exc:
        raise ProblemError(422, str(exc)) from None
    return LaunchFiles(plan_id=plan.id, strategy=label, files=files)
