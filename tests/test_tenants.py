"""Tenants: another tenant's plans, clusters and placements are a 404; per-tenant quotas (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from service.api.app import create_app
from service.auth import ALL_SCOPES, DEFAULT_TENANT, Principal, QuotaExceededError, cluster_key, create_key
from service.db import plans as plan_store
from service.db import tenants as tenant_store
from service.db.session import make_engine, make_session_factory
from service.plans_service import PlanSubmission, SubmittedPlan, ValidatedPlan, submit_plans
from service.settings import Settings
from tests.helpers import wait_final
from tests.test_api import assert_problem
from tests.test_jobs import SPEC
from tests.test_placement_api import CLUSTER

ADMIN = ",".join(sorted(ALL_SCOPES))


@dataclass
class Tenants:
    """One app, two tenants with admin keys, and tenant A's finished plan, queued plan and cluster."""

    client: TestClient
    settings: Settings
    headers_a: dict[str, str]
    headers_b: dict[str, str]
    finished_plan: str
    running_plan: str


def issue(settings: Settings, tenant: str, scopes: str = ADMIN) -> dict[str, str]:
    """Authorization headers with a new key of the tenant."""
    engine = make_engine(settings)
    with make_session_factory(engine)() as session:
        token = create_key(session, tenant=tenant, scopes=tuple(scopes.split(","))).token
    engine.dispose()
    return {"Authorization": f"Bearer {token}"}


def queued_plan(settings: Settings, tenant: str) -> str:
    """A plan stored as queued and never handed to an executor, so that it stays in flight."""
    engine = make_engine(settings)
    with make_session_factory(engine)() as session:
        new = plan_store.NewPlan(SPEC, "strategy", "llama-3.1-8b", "h100-sxm", 1)
        plan, _ = plan_store.create_plan(session, new=new, idempotency_key=None, tenant_id=tenant)
    engine.dispose()
    return plan.id


@pytest.fixture
def tenants(db_settings: Settings) -> Iterator[Tenants]:
    settings = db_settings.model_copy(update={"require_api_keys": True})
    headers_a, headers_b = issue(settings, "acme"), issue(settings, "globex")
    with TestClient(create_app(settings)) as client:
        assert client.put("/v1/clusters/demo", json=CLUSTER, headers=headers_a).status_code == 201
        plan_id = client.post("/v1/plans", json=SPEC, headers=headers_a).json()["id"]
        client.headers.update(headers_a)
        assert wait_final(client, plan_id)["status"] == "succeeded"
        client.headers.clear()
        yield Tenants(client, settings, headers_a, headers_b, plan_id, queued_plan(settings, "acme"))


def cross_tenant_operations(t: Tenants) -> list[tuple[str, str, str, dict[str, Any] | None]]:
    """Every operation that reaches a tenant's resource by id or name: (label, method, path, body)."""
    placement = {"cluster": "demo", "model": "llama-3.1-8b", "tp": 1}
    prewarm = {"cluster": "demo", "models": [{"model": "llama-3.1-8b", "tp": 1, "rate_per_s": 0.1}]}
    events = {"events": [{"type": "instance_stopped", "id": "nothing"}]}
    return [
        ("read plan", "GET", f"/v1/plans/{t.finished_plan}", None),
        ("read plan report", "GET", f"/v1/plans/{t.finished_plan}/report", None),
        ("read plan launch files", "GET", f"/v1/plans/{t.finished_plan}/launch", None),
        ("cancel plan", "POST", f"/v1/plans/{t.running_plan}/cancel", None),
        ("read cluster", "GET", "/v1/clusters/demo", None),
        ("cluster events", "POST", "/v1/clusters/demo/events", events),
        ("placement", "POST", "/v1/placements", placement),
        ("placement dry run", "POST", "/v1/placements", {**placement, "dry_run": True}),
        ("prewarm advice", "POST", "/v1/placements/prewarm", prewarm),
    ]


def test_every_cross_tenant_operation_is_a_404(tenants: Tenants) -> None:
    t = tenants
    cluster_before = t.client.get("/v1/clusters/demo", headers=t.headers_a).json()
    for _label, method, path, body in cross_tenant_operations(t):
        assert_problem(t.client.request(method, path, json=body, headers=t.headers_b), 404)
    # Nothing of tenant A's changed: its plan is still queued, its cluster at the same version, unreserved.
    assert t.client.get(f"/v1/plans/{t.running_plan}", headers=t.headers_a).json()["status"] == "queued"
    assert t.client.get("/v1/clusters/demo", headers=t.headers_a).json() == cluster_before
    # The owner is answered: the 404 is the tenant boundary, not a missing resource.
    for label, method, path, body in cross_tenant_operations(t):
        owner = t.client.request(method, path, json=body, headers=t.headers_a)
        assert owner.status_code in (200, 422), (label, owner.text)
    assert t.client.get(f"/v1/plans/{t.running_plan}", headers=t.headers_a).json()["status"] == "canceled"


def test_lists_hold_only_the_callers_plans(tenants: Tenants) -> None:
    t = tenants
    listed_a = {p["id"] for p in t.client.get("/v1/plans", headers=t.headers_a).json()["items"]}
    assert listed_a == {t.finished_plan, t.running_plan}
    assert t.client.get("/v1/plans", headers=t.headers_b).json()["items"] == []
    own = t.client.post("/v1/plans", json=SPEC, headers=t.headers_b).json()["id"]
    assert [p["id"] for p in t.client.get("/v1/plans", headers=t.headers_b).json()["items"]] == [own]
    assert own not in {p["id"] for p in t.client.get("/v1/plans", headers=t.headers_a).json()["items"]}


def test_a_cluster_write_never_reaches_another_tenants_cluster(tenants: Tenants) -> None:
    t = tenants
    before = t.client.get("/v1/clusters/demo", headers=t.headers_a).json()
    # The same name is tenant B's own cluster: created at version 1, tenant A's left as it was.
    created = t.client.put("/v1/clusters/demo", json=CLUSTER, headers=t.headers_b)
    assert (created.status_code, created.json()["version"]) == (201, 1), created.text
    replaced = t.client.put("/v1/clusters/demo", json=CLUSTER, headers=t.headers_b)
    assert (replaced.status_code, replaced.json()["version"]) == (200, 2), replaced.text
    stopped = {"events": [{"type": "instance_stopped", "id": CLUSTER["instances"][0]["id"]}]}
    assert t.client.post("/v1/clusters/demo/events", json=stopped, headers=t.headers_b).json()["version"] == 3
    assert before["version"] == 1
    assert t.client.get("/v1/clusters/demo", headers=t.headers_a).json() == before
    # If-Match against tenant A's version is judged on tenant B's cluster.
    stale = t.client.put("/v1/clusters/demo", json=CLUSTER, headers={**t.headers_b, "If-Match": '"7"'})
    assert_problem(stale, 409)


def test_a_fleet_plan_cannot_name_another_tenants_cluster(tenants: Tenants) -> None:
    fleet = {
        "kind": "fleet",
        "cluster": "demo",
        "deployments": [
            {
                "name": "chat",
                "model": "llama-3.1-8b",
                "workload": {"arrival": "poisson", "isl": 512, "osl": 64, "rate": 2},
                "slo": {"ttft_ms": 500, "tpot_ms": 50},
                "search": {"tp": [1], "pp": [1], "requests": 40},
            }
        ],
    }
    t = tenants
    assert_problem(t.client.post("/v1/plans", json=fleet, headers=t.headers_b), 422)
    own = t.client.post("/v1/plans", json=fleet, headers=t.headers_a)
    assert own.status_code == 202, own.text
    t.client.headers.update(t.headers_a)
    assert wait_final(t.client, own.json()["id"])["status"] == "succeeded"


def test_idempotency_keys_are_per_tenant(tenants: Tenants) -> None:
    t = tenants
    key = {"Idempotency-Key": "same-key"}
    first = t.client.post("/v1/plans", json=SPEC, headers={**t.headers_a, **key})
    other = t.client.post("/v1/plans", json={**SPEC, "max_gpus": 1}, headers={**t.headers_b, **key})
    assert (first.status_code, other.status_code) == (202, 202)
    assert first.json()["id"] != other.json()["id"]


def set_quota(settings: Settings, tenant: str, **quotas: int) -> None:
    engine = make_engine(settings)
    with make_session_factory(engine)() as session:
        tenant_store.set_quotas(
            session,
            tenant=tenant,
            plans_in_flight=quotas.get("plans_in_flight"),
            plans_per_hour=quotas.get("plans_per_hour"),
            search_space=quotas.get("search_space"),
        )
    engine.dispose()


def test_plans_in_flight_quota_is_a_429_with_retry_after(tenants: Tenants) -> None:
    t = tenants
    set_quota(t.settings, "acme", plans_in_flight=1)
    refused = t.client.post("/v1/plans", json=SPEC, headers=t.headers_a)
    body = assert_problem(refused, 429)
    assert refused.headers["Retry-After"] == str(t.settings.quota_in_flight_retry_after_s)
    assert (body["quota"], body["limit"]) == ("plans_in_flight", 1)
    # Another tenant is not held back by acme's plans; a replay of a stored plan is never refused.
    assert t.client.post("/v1/plans", json=SPEC, headers=t.headers_b).status_code == 202
    assert t.client.post(f"/v1/plans/{t.running_plan}/cancel", headers=t.headers_a).status_code == 200
    assert t.client.post("/v1/plans", json=SPEC, headers={**t.headers_a, "Idempotency-Key": "k"}).status_code == 202
    replay = t.client.post("/v1/plans", json=SPEC, headers={**t.headers_a, "Idempotency-Key": "k"})
    assert replay.status_code == 200


def test_plans_per_hour_quota_retries_when_the_oldest_leaves_the_window(tenants: Tenants) -> None:
    t = tenants
    set_quota(t.settings, "acme", plans_per_hour=2)  # the fixture submitted two already
    refused = t.client.post("/v1/plans", json=SPEC, headers=t.headers_a)
    body = assert_problem(refused, 429)
    assert (body["quota"], body["limit"]) == ("plans_per_hour", 2)
    # The oldest plan was made seconds ago: a slot frees in just under an hour.
    assert 3500 <= int(refused.headers["Retry-After"]) <= 3600


def test_search_space_quota_is_per_tenant(tenants: Tenants) -> None:
    t = tenants
    set_quota(t.settings, "acme", search_space=1)
    wide = {**SPEC, "search": {**SPEC["search"], "tp": [1, 2]}}
    refused = t.client.post("/v1/plans", json=wide, headers=t.headers_a)
    body = assert_problem(refused, 429)
    assert (body["quota"], body["limit"]) == ("search_space", 1)
    assert refused.headers["Retry-After"] == str(t.settings.quota_search_space_retry_after_s)
    assert t.client.post("/v1/plans", json=wide, headers=t.headers_b).status_code == 202


def test_default_quotas_come_from_the_settings(db_settings: Settings) -> None:
    engine = make_engine(db_settings)
    defaults = tenant_store.Quotas(3, 4, 5)
    with make_session_factory(engine)() as session:
        assert tenant_store.quotas(session, tenant="nobody", defaults=defaults) == defaults
        tenant_store.set_quotas(session, tenant="acme", plans_in_flight=None, plans_per_hour=9, search_space=None)
        assert tenant_store.quotas(session, tenant="acme", defaults=defaults) == tenant_store.Quotas(3, 9, 5)
        # Migration 0003 made the default tenant, to which rows from before tenants belong.
        assert DEFAULT_TENANT in {row.id for row in tenant_store.list_tenants(session)}
    engine.dispose()


TENANT_IDS = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True)
CLUSTER_NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)


@given(TENANT_IDS, CLUSTER_NAMES, TENANT_IDS, CLUSTER_NAMES)
def test_cluster_keys_of_different_tenants_or_names_never_collide(
    tenant_a: str, name_a: str, tenant_b: str, name_b: str
) -> None:
    same = (tenant_a, name_a) == (tenant_b, name_b)
    assert (cluster_key(tenant_a, name_a) == cluster_key(tenant_b, name_b)) == same


def test_migration_0003_gives_existing_rows_the_default_tenant(db_settings: Settings) -> None:
    from alembic import command
    from sqlalchemy import text

    from service.db.migrate import alembic_config

    command.downgrade(alembic_config(db_settings), "0002")
    engine = make_engine(db_settings)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO plans (id, kind, status, model, gpu, spec, spec_hash, idempotency_key, created_at, "
                "updated_at, attempt, progress_done, progress_total) VALUES ('old-plan', 'strategy', 'succeeded', "
                "'llama-3.1-8b', 'h100-sxm', '{}', 'x', 'old-key', :now, :now, 1, 1, 1)"
            ),
            {"now": "2026-11-30 12:00:00+00:00"},
        )
        conn.execute(
            text("INSERT INTO clusters (name, version, state, updated_at) VALUES ('old', 3, '{}', :now)"),
            {"now": "2026-11-30 12:00:00+00:00"},
        )
    command.upgrade(alembic_config(db_settings), "head")
    with make_session_factory(engine)() as session:
        plan = plan_store.get_plan(session, plan_id="old-plan", tenant_id=DEFAULT_TENANT)
        assert (plan.tenant_id, plan.idempotency_key) == (DEFAULT_TENANT, "old-key")
        with pytest.raises(plan_store.PlanNotFoundError):
            plan_store.get_plan(session, plan_id="old-plan", tenant_id="acme")
        # The default tenant's cluster keys are the bare names the rows already have.
        assert (
            session.execute(
                text("SELECT version FROM clusters WHERE name = :k"), {"k": cluster_key(DEFAULT_TENANT, "old")}
            ).scalar()
            == 3
        )
    engine.dispose()


class _NoExecutor:
    """A dispatcher that keeps plans queued (they stay in flight) and counts what it was handed."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def submit(self, plan_id: str) -> None:
        self.sent.append(plan_id)

    def submit_many(self, plan_ids: list[str]) -> None:
        self.sent.extend(plan_ids)

    def close(self) -> None:
        return None

    def queue_depth(self) -> int | None:
        return None


def _submission(tenant: str, key: str | None = None, spec: dict[str, Any] | None = None) -> PlanSubmission:
    plan = ValidatedPlan(spec or SPEC, "strategy", "llama-3.1-8b", "h100-sxm", 1)
    return PlanSubmission(plan, Principal(tenant, None, ALL_SCOPES), key)


def test_racing_submissions_never_pass_the_in_flight_quota(db_settings: Settings) -> None:
    """Eight threads, each with its own connection, submit three plans apiece at a limit of 5: exactly 5 pass."""
    set_quota(db_settings, "acme", plans_in_flight=5)
    engine = make_engine(db_settings)
    factory = make_session_factory(engine)
    dispatcher = _NoExecutor()
    start = threading.Barrier(8)

    def submit_three(_: int) -> list[SubmittedPlan | Exception]:
        start.wait()
        with factory() as session:
            return submit_plans(session, dispatcher, [_submission("acme") for _ in range(3)], settings=db_settings)

    with ThreadPoolExecutor(8) as pool:
        outcomes = [o for batch in pool.map(submit_three, range(8)) for o in batch]
    admitted = [o for o in outcomes if isinstance(o, SubmittedPlan)]
    refused = [o for o in outcomes if isinstance(o, QuotaExceededError)]
    assert (len(admitted), len(refused)) == (5, 19)
    assert {r.quota for r in refused} == {"plans_in_flight"}
    assert sorted(dispatcher.sent) == sorted(o.plan.id for o in admitted)
    with factory() as session:
        usage = tenant_store.quota_usage(session, tenant="acme", since=datetime.now(UTC) - timedelta(hours=1))
    assert (usage.in_flight, usage.since_count) == (5, 5)
    engine.dispose()


def test_one_batch_settles_replays_repeats_conflicts_and_quotas_in_order(db_settings: Settings) -> None:
    set_quota(db_settings, "acme", plans_in_flight=2)
    engine = make_engine(db_settings)
    factory = make_session_factory(engine)
    dispatcher = _NoExecutor()
    with factory() as session:
        (first,) = submit_plans(session, dispatcher, [_submission("acme", "k1")], settings=db_settings)
        assert isinstance(first, SubmittedPlan)
        assert first.created
        batch = [
            _submission("acme", "k1"),  # a replay of the stored plan
            _submission("acme", "k1", {**SPEC, "max_gpus": 1}),  # the same key with another body
            _submission("acme", "k2"),  # the last slot
            _submission("acme", "k2"),  # the same key again within the batch: a replay of the one above
            _submission("acme"),  # over the quota
            _submission("globex"),  # another tenant's quota
        ]
        outcomes = submit_plans(session, dispatcher, batch, settings=db_settings)
    assert isinstance(first, SubmittedPlan)
    replay, conflict, last, repeat, over, other = outcomes
    assert isinstance(replay, SubmittedPlan)
    assert (replay.plan.id, replay.created) == (first.plan.id, False)
    assert isinstance(conflict, plan_store.IdempotencyConflictError)
    assert isinstance(last, SubmittedPlan)
    assert last.created
    assert isinstance(repeat, SubmittedPlan)
    assert (repeat.plan.id, repeat.created) == (last.plan.id, False)
    assert isinstance(over, QuotaExceededError)
    assert over.quota == "plans_in_flight"
    assert isinstance(other, SubmittedPlan)
    assert other.created
    assert other.plan.tenant_id == "globex"
    assert dispatcher.sent == [first.plan.id, last.plan.id, other.plan.id]
    engine.dispose()
