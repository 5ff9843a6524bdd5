"""Plans: submit (idempotent), read, list (cursor-paginated), cancel."""

from __future__ import annotations

import base64
import binascii
import threading
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from service.api.deps import CatalogDep, DispatcherDep, SessionDep
from service.api.errors import ProblemError
from service.api.schemas import LaunchFiles, PlanBody, PlanList, PlanResource
from service.db import clusters as cluster_store
from service.db import plans as plan_store
from service.db.models import Plan, PlanStatus
from service.dispatch import Dispatcher
from service.placement.fleet_plan import FleetSpec
from service.planning.plan_spec import parse_plan_spec
from service.planning.search import MAX_SEARCH_SPACE, count_search_space
from service.planning.specs import PlanningError

router = APIRouter(prefix="/v1/plans", tags=["plans"])
log = structlog.get_logger("splan.api.plans")

PROBLEMS: dict[int | str, dict[str, Any]] = {
    status: {"description": description, "content": {"application/problem+json": {}}}
    for status, description in (
        (404, "No plan with that id"),
        (409, "The plan cannot change state"),
        (413, "Body too large"),
        (422, "Invalid spec, idempotency key reused with another body, or search space too large"),
    )
}


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
def create_plan(
    body: PlanBody,
    response: Response,
    session: SessionDep,
    catalog: CatalogDep,
    dispatcher: DispatcherDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> PlanResource:
    """Validate the spec, store the plan as queued (with its idempotency key) and enqueue it after commit.

    `kind: fleet` plans many deployments at once onto a fleet (GPU counts by type, or a stored cluster).
    """
    if isinstance(body, FleetSpec):
        fleet = body.model_dump(mode="json", exclude_unset=True)
        fleet["kind"] = "fleet"
        for deployment in body.deployments:
            catalog.model(deployment.model)
            catalog.engine(deployment.engine)
        if body.cluster is not None and cluster_store.current_version(session, name=body.cluster) is None:
            raise ProblemError(422, f"no cluster named {body.cluster!r}; PUT /v1/clusters/{body.cluster} first")
        models = ",".join(sorted({d.model for d in body.deployments}))
        gpus = ",".join(sorted(body.gpus or {})) or f"cluster:{body.cluster}"
        new = plan_store.NewPlan(fleet, "fleet", models[:200], gpus[:100], len(body.deployments))
        return _store_and_enqueue(session, dispatcher, response, new=new, idempotency_key=idempotency_key)
    spec = body.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude={"kind"})
    request = parse_plan_spec(spec, catalog=catalog)
    space = count_search_space(request)
    if space > MAX_SEARCH_SPACE:
        raise ProblemError(
            422,
            f"the search space has {space} strategies; the limit is {MAX_SEARCH_SPACE}: narrow search.tp, "
            "search.pp, search.modes or max_gpus",
            title="Search space too large",
            search_space=space,
            limit=MAX_SEARCH_SPACE,
        )
    new = plan_store.NewPlan(spec, body.kind, request.model.name, request.gpu, space)
    return _store_and_enqueue(session, dispatcher, response, new=new, idempotency_key=idempotency_key)


def _store_and_enqueue(
    session: Session,
    dispatcher: Dispatcher,
    response: Response,
    *,
    new: plan_store.NewPlan,
    idempotency_key: str | None,
) -> PlanResource:
    """Commit the plan, then hand it to the executor; a replayed idempotent request gets the stored plan."""
    try:
        plan, created = plan_store.create_plan(session, new=new, idempotency_key=idempotency_key)
    except plan_store.IdempotencyConflictError:
        raise ProblemError(
            422,
            "this Idempotency-Key was already used with a different request body",
            title="Idempotency key reused",
        ) from None
    response.headers["Location"] = f"/v1/plans/{plan.id}"
    if not created:
        response.status_code = 200
        return PlanResource.of(plan)
    try:
        # No second write: the sweeper judges a never-marked plan by its creation time.
        dispatcher.submit(plan.id)
    except Exception:
        # The plan is committed as queued; the sweeper enqueues it once the broker is back.
        log.warning("plan.enqueue_deferred", plan_id=plan.id)
    return PlanResource.of(plan)


@router.get(
    "", operation_id="listPlans", summary="List plans, newest first", response_model=PlanList, responses=PROBLEMS
)
def list_plans(
    session: SessionDep,
    status: PlanStatus | None = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> PlanList:
    """A page of plans; pass `next_cursor` back as `cursor` for the next one."""
    before = decode_cursor(cursor) if cursor else None
    page = plan_store.list_plans(
        session, status=status.value if status else None, model=model, before_seq=before, limit=limit
    )
    return PlanList(
        items=[PlanResource.of(p, with_result=False) for p in page.items],
        next_cursor=encode_cursor(page.next_cursor) if page.next_cursor is not None else None,
    )


@router.get(
    "/{plan_id}", operation_id="getPlan", summary="Read a plan", response_model=PlanResource, responses=PROBLEMS
)
def get_plan(plan_id: str, session: SessionDep) -> PlanResource:
    """Status, progress, and the result once succeeded (or a problem detail once failed)."""
    try:
        return PlanResource.of(plan_store.get_plan(session, plan_id=plan_id))
    except plan_store.PlanNotFoundError:
        raise ProblemError(404, f"no plan with id {plan_id}") from None


@router.post(
    "/{plan_id}/cancel",
    operation_id="cancelPlan",
    summary="Cancel a plan",
    response_model=PlanResource,
    responses=PROBLEMS,
)
def cancel_plan(plan_id: str, session: SessionDep) -> PlanResource:
    """Cancel a queued or running plan; finished plans answer 409."""
    try:
        return PlanResource.of(plan_store.cancel_plan(session, plan_id=plan_id))
    except plan_store.PlanNotFoundError:
        raise ProblemError(404, f"no plan with id {plan_id}") from None
    except plan_store.PlanStateError as exc:
        raise ProblemError(409, str(exc)) from None


# Matplotlib's style settings are process-global while a figure is drawn: one report renders at a time.
_REPORT_LOCK = threading.Lock()


def _succeeded(session: Session, plan_id: str) -> Plan:
    """The stored plan, once it has a result; 404 when unknown, 409 before it succeeded."""
    try:
        plan = plan_store.get_plan(session, plan_id=plan_id)
    except plan_store.PlanNotFoundError:
        raise ProblemError(404, f"no plan with id {plan_id}") from None
    if plan.status != PlanStatus.SUCCEEDED.value or plan.result is None:
        raise ProblemError(409, f"plan {plan_id} is {plan.status}; its report and launch files exist once it succeeded")
    return plan


@router.get(
    "/{plan_id}/report",
    operation_id="getPlanReport",
    summary="The plan's self-contained HTML report",
    response_class=HTMLResponse,
    responses={**PROBLEMS, 200: {"description": "One HTML page, no external fetches", "content": {"text/html": {}}}},
)
def get_plan_report(plan_id: str, session: SessionDep) -> HTMLResponse:
    """Spec, ranked strategies, frontier and latency plots, and why layouts were pruned (fleet plans: placement)."""
    from service.reporting import render_fleet_report, render_plan_report

    plan = _succeeded(session, plan_id)
    render = render_fleet_report if plan.kind == "fleet" else render_plan_report
    with _REPORT_LOCK:
        page = render(dict(plan.spec), dict(plan.result or {}), title=f"splan plan {plan.id}")
    return HTMLResponse(page)


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
    engine: Annotated[
        Literal["vllm", "sglang", "trtllm"] | None, Query(description="one engine (default: all)")
    ] = None,
    strategy: Annotated[int, Query(ge=1, le=1000, description="rank of the strategy to launch")] = 1,
) -> LaunchFiles:
    """Per engine the launch scripts (prefill, decode and router for disaggregated strategies), manifests, README."""
    from service.launch import launch_bundle

    plan = _succeeded(session, plan_id)
    if plan.kind == "fleet":
        raise ProblemError(
            422, "launch files are made for a strategy plan; a fleet plan's deployments are plans of their own"
        )
    result = dict(plan.result or {})
    try:
        files = launch_bundle(
            dict(plan.spec), result, strategy_rank=strategy, engines=[engine] if engine else None, catalog=catalog
        )
    except PlanningError as exc:
        raise ProblemError(422, str(exc)) from None
    return LaunchFiles(plan_id=plan.id, strategy=result["strategies"][strategy - 1]["label"], files=files)
