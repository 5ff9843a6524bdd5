"""Plan use-cases shared by the API routers, the CLI and the worker: validate once, store, enqueue, read, cancel."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy.orm import Session

from service.auth import Principal, admit_plans, cluster_key
from service.catalog.loader import read_structured_file
from service.db import clusters as cluster_store
from service.db import plans as plan_store
from service.db import tenants as tenant_store
from service.db.models import Plan, PlanStatus
from service.placement.fleet_candidates import search_spec
from service.placement.fleet_plan import FleetSpec, parse_fleet_spec
from service.planning.catalog import Catalog
from service.planning.plan_spec import PlanSpec, SpecFieldError, parse_plan_spec
from service.planning.search import count_search_space
from service.planning.specs import PlanningError, spec_kind
from service.settings import Settings

if TYPE_CHECKING:
    # Celery loads only where plans are dispatched: the CLI reads specs through this module and must start fast.
    from service.dispatch import Dispatcher

log = structlog.get_logger("splan.plans")

# Matplotlib's style settings are process-global while a figure is drawn: one report renders at a time.
_REPORT_LOCK = threading.Lock()


class PlanNotReadyError(Exception):
    """The plan has no result yet (or failed): its report and launch files do not exist."""


class ClusterMissingError(SpecFieldError):
    """A fleet plan names a cluster the tenant has not stored."""


@dataclass(frozen=True)
class SubmittedPlan:
    """A stored plan and whether this request created it (False: an idempotent replay)."""

    plan: Plan
    created: bool


# ------------------------------------------------------------------------------------------------ the CLI's files


def _read_relative(value: str, base_dir: Path) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base_dir / path


def _inline_workload(workload: Any, base_dir: Path) -> Any:
    if isinstance(workload, dict) and isinstance(workload.get("trace"), str):
        from service.planning.trace import read_trace_records

        return {**workload, "trace": read_trace_records(_read_relative(workload["trace"], base_dir))}
    return workload


def inline_spec_files(raw: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """The spec with every path it names (trace, profile, model_config) read and inlined: what a server accepts.

    Only the CLI calls this, on its own machine; a server never reads a path from a request.
    """
    spec = dict(raw)
    if "workload" in spec:
        spec["workload"] = _inline_workload(spec["workload"], base_dir)
    if isinstance(spec.get("deployments"), list):
        spec["deployments"] = [
            {**d, "workload": _inline_workload(d.get("workload"), base_dir)} if isinstance(d, dict) else d
            for d in spec["deployments"]
        ]
    if isinstance(spec.get("profile"), str):
        spec["profile"] = read_profile(_read_relative(spec["profile"], base_dir))
    if isinstance(spec.get("model_config"), str):
        path = _read_relative(spec["model_config"], base_dir)
        target = path / "config.json" if path.is_dir() else path
        config = read_structured_file(target)
        if not isinstance(config, dict):
            raise SpecFieldError("model_config", f"{target} is not a config.json object")
        # The name the CLI has always shown for a config read from disk: its directory's (or file's) name.
        spec.setdefault("model", target.parent.name or target.stem)
        spec["model_config"] = config
    return spec


def read_profile(path: Path) -> dict[str, Any]:
    """A profile file, validated (one-line error otherwise)."""
    from service.planning.profile import parse_profile

    document = read_structured_file(path)
    try:
        parse_profile(document)
    except PlanningError as exc:
        raise PlanningError(f"{path}: {exc}") from None
    return dict(document)


# ------------------------------------------------------------------------------------------------ validation


@dataclass(frozen=True)
class ValidatedPlan:
    """A spec that passed the door: what is stored, with its summary columns."""

    spec: dict[str, Any]
    kind: str
    model: str
    gpu: str
    total: int


def _fleet_types(fleet: FleetSpec, catalog: Catalog) -> list[str]:
    """GPU types a fleet's candidate searches may run on, each checked against the catalog."""
    if fleet.gpus is not None:
        for name in fleet.gpus:
            _known_gpu(catalog, f"gpus.{name}", name)
        return sorted({name.lower() for name, count in fleet.gpus.items() if count > 0})
    # A stored cluster's GPU types are read by the worker; any catalog GPU may be among them.
    return sorted(catalog.gpus)


def _known_gpu(catalog: Catalog, field: str, name: str) -> None:
    try:
        catalog.gpu(name)
    except PlanningError as exc:
        raise SpecFieldError(field, str(exc)) from None


def validate_fleet(fleet: FleetSpec, catalog: Catalog) -> None:
    """Each deployment must be plannable on at least one of its GPU types, for the reason the worker would see."""
    for name in fleet.prices or {}:
        _known_gpu(catalog, f"prices.{name}", name)
    fleet_types = _fleet_types(fleet, catalog)
    checked: dict[str, str | None] = {}
    for i, deployment in enumerate(fleet.deployments):
        for j, name in enumerate(deployment.gpu_types or []):
            _known_gpu(catalog, f"deployments.{i}.gpu_types.{j}", name)
        types = [t.lower() for t in deployment.gpu_types] if deployment.gpu_types else fleet_types
        doc = deployment.model_dump(mode="json", exclude_none=True)
        first: SpecFieldError | None = None
        for gpu_type in types:
            spec = search_spec(doc, gpu_type)
            key = json.dumps(spec, sort_keys=True)
            if key not in checked:
                try:
                    parse_plan_spec(spec, catalog=catalog)
                    checked[key] = None
                except SpecFieldError as exc:
                    checked[key] = f"{exc.field}\n{exc.reason}"
            outcome = checked[key]
            if outcome is None:
                first = None
                break
            if first is None:
                field, _, reason = outcome.partition("\n")
                first = SpecFieldError(f"deployments.{i}.{field}", reason)
        if first is not None:
            raise first


def validate_plan(body: dict[str, Any] | PlanSpec | FleetSpec, catalog: Catalog) -> ValidatedPlan:
    """Check a plan or fleet spec fully, as the worker will run it; SpecFieldError names the field at fault.

    ``body`` is a parsed document (CLI) or the API's already validated body model (not validated twice).
    """
    if isinstance(body, dict) and spec_kind(body) == "fleet":
        try:
            body = parse_fleet_spec(body)
        except PlanningError as exc:
            raise SpecFieldError("spec", str(exc).removeprefix("invalid fleet spec at ")) from None
    if isinstance(body, FleetSpec):
        validate_fleet(body, catalog)
        stored = body.model_dump(mode="json", exclude_unset=True)
        stored["kind"] = "fleet"
        models = ",".join(sorted({d.model for d in body.deployments}))
        gpus = ",".join(sorted(body.gpus or {})) or f"cluster:{body.cluster}"
        return ValidatedPlan(stored, "fleet", models[:200], gpus[:100], len(body.deployments))
    if isinstance(body, PlanSpec):
        spec = body.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude={"kind"})
    else:
        spec = {k: v for k, v in body.items() if k != "kind"}
    request = parse_plan_spec(body if isinstance(body, PlanSpec) else spec, catalog=catalog)
    return ValidatedPlan(spec, "strategy", request.model.name, request.gpu, count_search_space(request))


# ------------------------------------------------------------------------------------------------ use-cases


@dataclass(frozen=True)
class PlanSubmission:
    """A validated plan to store for a caller, with the request's idempotency key."""

    plan: ValidatedPlan
    principal: Principal
    idempotency_key: str | None


def store_plans(
    session: Session, submissions: list[PlanSubmission], *, settings: Settings
) -> list[SubmittedPlan | Exception]:
    """Commit many plans at once within their tenants' quotas (one transaction, one quota check per tenant).

    Each submission gets its stored plan or the error it is answered with (QuotaExceededError,
    IdempotencyConflictError, ClusterMissingError); `dispatch_new` then hands the new ones to the executor.
    """
    defaults = tenant_store.Quotas(
        settings.quota_plans_in_flight, settings.quota_plans_per_hour, settings.quota_search_space
    )

    def admit(session: Session, tenant: str, items: list[plan_store.Submission]) -> list[Exception | None]:
        return list(
            admit_plans(
                session,
                tenant=tenant,
                search_spaces=[item.new.total if item.new.kind != "fleet" else 0 for item in items],
                defaults=defaults,
                in_flight_retry_s=settings.quota_in_flight_retry_after_s,
                search_space_retry_s=settings.quota_search_space_retry_after_s,
            )
        )

    outcomes: list[SubmittedPlan | Exception | None] = [None] * len(submissions)
    stored: list[int] = []
    for i, submission in enumerate(submissions):
        missing = _missing_cluster(session, submission)
        if missing is not None:
            outcomes[i] = missing
        else:
            stored.append(i)
    results = plan_store.create_plans(
        session,
        [
            plan_store.Submission(
                _new_plan(submissions[i].plan), submissions[i].idempotency_key, submissions[i].principal.tenant
            )
            for i in stored
        ],
        admit=admit,
    )
    for i, result in zip(stored, results, strict=True):
        outcomes[i] = result if isinstance(result, Exception) else SubmittedPlan(*result)
    return [outcome if outcome is not None else RuntimeError("unsettled submission") for outcome in outcomes]


def dispatch_new(dispatcher: Dispatcher, outcomes: list[SubmittedPlan | Exception]) -> None:
    """Hand the plans this batch created, or may have, to the executor (replays and refusals are not sent again)."""
    created = [o.plan.id for o in outcomes if isinstance(o, SubmittedPlan) and o.created]
    # A plan whose commit went unconfirmed is sent too: its request heard 503, but the client's retry with the same
    # Idempotency-Key replays the stored plan, and a replay is not sent. The executor runs only plans that exist.
    created += sorted({o.plan_id for o in outcomes if isinstance(o, plan_store.CommitUnconfirmedError)})
    if not created:
        return
    try:
        # No second write: the sweeper judges a never-marked plan by its creation time.
        dispatcher.submit_many(created)
    except Exception:
        # The plans are committed as queued; the sweeper enqueues them once the broker is back.
        log.warning("plan.enqueue_deferred", plans=len(created))


def submit_plans(
    session: Session, dispatcher: Dispatcher, submissions: list[PlanSubmission], *, settings: Settings
) -> list[SubmittedPlan | Exception]:
    """Commit many plans at once within their tenants' quotas, then hand the new ones to the executor."""
    outcomes = store_plans(session, submissions, settings=settings)
    dispatch_new(dispatcher, outcomes)
    return outcomes


def submit_plan(
    session: Session,
    dispatcher: Dispatcher,
    *,
    plan: ValidatedPlan,
    principal: Principal,
    settings: Settings,
    idempotency_key: str | None,
) -> SubmittedPlan:
    """Commit one plan within the tenant's quotas, then hand it to the executor; a replay gets the stored plan."""
    (outcome,) = submit_plans(
        session, dispatcher, [PlanSubmission(plan, principal, idempotency_key)], settings=settings
    )
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _new_plan(plan: ValidatedPlan) -> plan_store.NewPlan:
    return plan_store.NewPlan(plan.spec, plan.kind, plan.model, plan.gpu, plan.total)


def _missing_cluster(session: Session, submission: PlanSubmission) -> ClusterMissingError | None:
    """A fleet plan naming a cluster its tenant has not stored."""
    spec = submission.plan.spec
    if submission.plan.kind != "fleet" or spec.get("cluster") is None:
        return None
    name = str(spec["cluster"])
    if cluster_store.current_version(session, name=cluster_key(submission.principal.tenant, name)) is not None:
        return None
    return ClusterMissingError("cluster", f"no cluster named {name!r}; PUT /v1/clusters/{name} first")


def get_plan(session: Session, *, plan_id: str, tenant: str) -> Plan:
    """The tenant's plan (PlanNotFoundError otherwise)."""
    return plan_store.get_plan(session, plan_id=plan_id, tenant_id=tenant)


def list_plans(
    session: Session, *, tenant: str, status: str | None, model: str | None, before_seq: int | None, limit: int
) -> plan_store.PlanPage:
    """A page of the tenant's plans, newest first."""
    return plan_store.list_plans(
        session, status=status, model=model, before_seq=before_seq, limit=limit, tenant_id=tenant
    )


def cancel_plan(session: Session, *, plan_id: str, tenant: str) -> Plan:
    """Cancel the tenant's queued or running plan (PlanNotFoundError, PlanStateError)."""
    return plan_store.cancel_plan(session, plan_id=plan_id, tenant_id=tenant)


def succeeded_plan(session: Session, *, plan_id: str, tenant: str) -> Plan:
    """The tenant's plan once it has a result (PlanNotFoundError; PlanNotReadyError before it succeeded)."""
    plan = plan_store.get_plan(session, plan_id=plan_id, tenant_id=tenant)
    if plan.status != PlanStatus.SUCCEEDED.value or plan.result is None:
        raise PlanNotReadyError(f"plan {plan_id} is {plan.status}; its report and launch files exist once it succeeded")
    return plan


def plan_report(plan: Plan) -> str:
    """The HTML report of a succeeded plan (strategy or fleet)."""
    from service.reporting import render_fleet_report, render_plan_report

    render: Callable[..., str] = render_fleet_report if plan.kind == "fleet" else render_plan_report
    with _REPORT_LOCK:
        return render(dict(plan.spec), dict(plan.result or {}), title=f"splan plan {plan.id}")


def plan_launch(plan: Plan, *, catalog: Catalog, engine: str | None, strategy: int) -> tuple[str, dict[str, str]]:
    """(label, files) of the launch bundle of strategy rank ``strategy`` (PlanningError when there is none)."""
    from service.launch import launch_bundle

    if plan.kind == "fleet":
        raise PlanningError(
            "launch files are made for a strategy plan; a fleet plan's deployments are plans of their own"
        )
    result = dict(plan.result or {})
    files = launch_bundle(
        dict(plan.spec), result, strategy_rank=strategy, engines=[engine] if engine else None, catalog=catalog
    )
    return str(result["strategies"][strategy - 1]["label"]), files
