"""Fanned-out fleet searches: workers run parts of current attempts; the plan's own process searches the rest."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from service.db import plans as plan_store
from service.db.models import FleetCandidate
from service.db.session import SessionFactory, make_engine, make_session_factory
from service.fleet_jobs import FleetSearches, run_fleet_candidate
from service.placement.fleet_plan import parse_fleet_spec, plan_fleet
from service.planning.catalog import Catalog
from service.settings import Settings
from tests.test_fleet_plan import REAL


@pytest.fixture
def sessions(db_settings: Settings) -> Iterator[SessionFactory]:
    """Sessions on a migrated SQLite file and on a fresh schema of the real PostgreSQL."""
    engine = make_engine(db_settings)
    yield make_session_factory(engine)
    engine.dispose()


def _running_plan(sessions: SessionFactory) -> tuple[str, int]:
    """A stored fleet plan claimed by a worker: its id and attempt."""
    with sessions() as session:
        new = plan_store.NewPlan(REAL, "fleet", "llama-3.1-8b", "l40s", 1)
        plan, _ = plan_store.create_plan(session, new=new, idempotency_key=None)
        attempt = plan_store.claim_plan(session, plan_id=plan.id, worker="w1", lease_s=60, max_attempts=3)
    assert attempt == 1
    return plan.id, attempt


def test_the_plans_own_process_searches_what_no_worker_takes(catalog: Catalog, sessions: SessionFactory) -> None:
    plan_id, attempt = _running_plan(sessions)
    sent: list[tuple[str, int, list[str]]] = []
    outcomes: list[str] = []

    def fan_out(plan: str, plan_attempt: int, keys: list[str]) -> None:
        sent.append((plan, plan_attempt, keys))
        common: dict[str, Any] = {"session_factory": sessions, "catalog": catalog, "worker": "w2", "lease_s": 60}
        # A part of a plan that is gone, or of an attempt that was superseded, is dropped; the current one runs.
        outcomes.append(run_fleet_candidate("no-such-plan", plan_attempt, keys[0], **common))
        outcomes.append(run_fleet_candidate(plan, plan_attempt + 1, keys[0], **common))
        outcomes.append(run_fleet_candidate(plan, plan_attempt, keys[0], **common))
        # Searched already: nothing left to claim.
        outcomes.append(run_fleet_candidate(plan, plan_attempt, keys[0], **common))

    searches = FleetSearches(
        catalog=catalog, session_factory=sessions, fan_out=fan_out, plan_id=plan_id, attempt=attempt, worker="own"
    )
    fanned = plan_fleet(parse_fleet_spec(REAL), catalog=catalog, run_searches=searches, reused=searches.reused_count)
    alone = plan_fleet(parse_fleet_spec(REAL), catalog=catalog)
    assert fanned["deployments"] == alone["deployments"]
    assert outcomes == ["aborted", "aborted", "done", "not-claimed"]
    assert len(sent) == 1
    assert sent[0][:2] == (plan_id, attempt)
    keys = sent[0][2]
    assert fanned["candidate_searches"] == {"total": len(keys), "reused": 0}
    with sessions() as session:
        rows = {str(key): worker for key, worker in session.execute(select(FleetCandidate.key, FleetCandidate.worker))}
    # The worker searched the first part, the plan's own process every other one.
    assert rows == {key: "w2" if key == keys[0] else "own" for key in keys}
    # Asked again, every search is read from the cache and nothing is fanned out.
    again = plan_fleet(parse_fleet_spec(REAL), catalog=catalog, run_searches=searches, reused=searches.reused_count)
    assert again["candidate_searches"] == {"total": len(keys), "reused": len(keys)}
    assert len(sent) == 1
