"""run_plan and the plan store on SQLite and the real PostgreSQL: claims, leases, attempts, cancel, idempotency."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from service.db import plans as plan_store
from service.db.models import Plan, PlanStatus, utcnow
from service.db.session import SessionFactory, make_engine, make_session_factory
from service.jobs import requeue_stale, run_plan
from service.planning.catalog import Catalog
from service.settings import Settings

SPEC: dict[str, Any] = {
    "model": "llama-3.1-8b",
    "gpu": "h100-sxm",
    "max_gpus": 2,
    "workload": {"arrival": "poisson", "isl": 512, "osl": 64, "rate": 2},
    "slo": {"ttft_ms": 500, "tpot_ms": 50},
    "search": {"tp": [1], "pp": [1], "modes": ["collocated"], "requests": 40},
}


@pytest.fixture
def sessions(db_settings: Settings) -> Iterator[SessionFactory]:
    engine = make_engine(db_settings)
    yield make_session_factory(engine)
    engine.dispose()


def _create(sessions: SessionFactory, key: str | None = None, spec: dict[str, Any] | None = None) -> str:
    with sessions() as session:
        new = plan_store.NewPlan(spec or SPEC, "strategy", "llama-3.1-8b", "h100-sxm", 2)
        plan, _ = plan_store.create_plan(session, new=new, idempotency_key=key)
        return plan.id


def _get(sessions: SessionFactory, plan_id: str) -> Plan:
    with sessions() as session:
        return plan_store.get_plan(session, plan_id=plan_id)


def test_run_plan_succeeds_and_stores_the_result(
    sessions: SessionFactory, db_settings: Settings, catalog: Catalog
) -> None:
    plan_id = _create(sessions)
    assert run_plan(plan_id, session_factory=sessions, settings=db_settings, catalog=catalog) == "succeeded"
    plan = _get(sessions, plan_id)
    assert plan.status == PlanStatus.SUCCEEDED
    assert plan.attempt == 1
    assert plan.result is not None
    assert plan.result["strategies"]
    assert plan.best_goodput_rps is not None
    assert plan.best_goodput_rps > 0
    assert plan.progress_done == plan.progress_total > 0


def test_second_delivery_does_not_run_again(sessions: SessionFactory, db_settings: Settings, catalog: Catalog) -> None:
    plan_id = _create(sessions)
    run_plan(plan_id, session_factory=sessions, settings=db_settings, catalog=catalog)
    assert run_plan(plan_id, session_factory=sessions, settings=db_settings, catalog=catalog) == "not-claimed"
    assert _get(sessions, plan_id).attempt == 1


def test_expired_lease_is_reclaimed_and_the_old_attempt_cannot_write(sessions: SessionFactory) -> None:
    plan_id = _create(sessions)
    with sessions() as session:
        first = plan_store.claim_plan(session, plan_id=plan_id, worker="a", lease_s=60, max_attempts=3)
        assert first == 1
        assert plan_store.claim_plan(session, plan_id=plan_id, worker="b", lease_s=60, max_attempts=3) is None
        session.execute(update(Plan).where(Plan.id == plan_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()
        second = plan_store.claim_plan(session, plan_id=plan_id, worker="b", lease_s=60, max_attempts=3)
        assert second == 2
        assert not plan_store.finish_plan(session, plan_id=plan_id, attempt=1, result={"x": 1}, error=None)
        assert plan_store.finish_plan(session, plan_id=plan_id, attempt=2, result={"x": 2}, error=None)
    plan = _get(sessions, plan_id)
    assert plan.result == {"x": 2}
    assert plan.worker == "b"


def test_attempts_are_bounded(sessions: SessionFactory) -> None:
    plan_id = _create(sessions)
    with sessions() as session:
        assert plan_store.claim_plan(session, plan_id=plan_id, worker="a", lease_s=60, max_attempts=1) == 1
        session.execute(update(Plan).where(Plan.id == plan_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()
        assert plan_store.claim_plan(session, plan_id=plan_id, worker="b", lease_s=60, max_attempts=1) is None
    plan = _get(sessions, plan_id)
    assert plan.status == PlanStatus.FAILED
    assert plan.error is not None
    assert "attempts" in plan.error["detail"]


def test_cancel_stops_a_running_plan(sessions: SessionFactory) -> None:
    plan_id = _create(sessions)
    with sessions() as session:
        attempt = plan_store.claim_plan(session, plan_id=plan_id, worker="a", lease_s=60, max_attempts=3)
        assert attempt == 1
        assert plan_store.cancel_plan(session, plan_id=plan_id).status == PlanStatus.CANCELED
        assert not plan_store.record_progress(session, plan_id=plan_id, attempt=1, done=1, total=2, lease_s=60)
        assert not plan_store.finish_plan(session, plan_id=plan_id, attempt=1, result={}, error=None)
        with pytest.raises(plan_store.PlanStateError):
            # Canceling twice is fine; a finished plan cannot be canceled.
            plan_store.cancel_plan(session, plan_id=_finished(sessions))
    assert _get(sessions, plan_id).status == PlanStatus.CANCELED


def _finished(sessions: SessionFactory) -> str:
    plan_id = _create(sessions)
    with sessions() as session:
        plan_store.claim_plan(session, plan_id=plan_id, worker="a", lease_s=60, max_attempts=3)
        plan_store.finish_plan(session, plan_id=plan_id, attempt=1, result={}, error=None)
    return plan_id


def test_idempotency_key_same_body_same_plan_other_body_conflict(sessions: SessionFactory) -> None:
    first = _create(sessions, key="k-1")
    assert _create(sessions, key="k-1") == first
    with pytest.raises(plan_store.IdempotencyConflictError):
        _create(sessions, key="k-1", spec={**SPEC, "max_gpus": 4})


def test_list_is_newest_first_with_a_cursor_and_filters(sessions: SessionFactory) -> None:
    ids = [_create(sessions) for _ in range(5)]
    finished = _finished(sessions)
    with sessions() as session:
        page = plan_store.list_plans(session, before_seq=None, limit=4)
        assert [p.id for p in page.items] == [finished, *reversed(ids)][:4]
        assert page.next_cursor is not None
        rest = plan_store.list_plans(session, before_seq=page.next_cursor, limit=4)
        assert [p.id for p in rest.items] == list(reversed(ids))[3:]
        assert rest.next_cursor is None
        done = plan_store.list_plans(session, status="succeeded", before_seq=None, limit=10)
        assert [p.id for p in done.items] == [finished]
        assert plan_store.list_plans(session, model="qwen3-32b", before_seq=None, limit=10).items == []


def test_sweeper_requeues_lost_and_expired_plans(sessions: SessionFactory, db_settings: Settings) -> None:
    never_sent = _create(sessions)
    fresh = _create(sessions)
    expired = _create(sessions)
    with sessions() as session:
        long_ago = utcnow() - timedelta(seconds=db_settings.requeue_queued_after_s + 1)
        session.execute(update(Plan).where(Plan.id == never_sent).values(created_at=long_ago))
        plan_store.claim_plan(session, plan_id=expired, worker="gone", lease_s=60, max_attempts=3)
        session.execute(update(Plan).where(Plan.id == expired).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()
    sent: list[str] = []
    assert requeue_stale(session_factory=sessions, settings=db_settings, dispatch=sent.append) == 2
    assert sorted(sent) == sorted([never_sent, expired])
    # Just re-sent: not again until the requeue delay has passed; a fresh plan only on a restart sweep.
    assert requeue_stale(session_factory=sessions, settings=db_settings, dispatch=sent.append) == 1
    assert fresh not in sent
    requeue_stale(session_factory=sessions, settings=db_settings, dispatch=sent.append, every_queued=True)
    assert fresh in sent


def test_a_bad_stored_spec_fails_with_a_problem(
    sessions: SessionFactory, db_settings: Settings, catalog: Catalog
) -> None:
    plan_id = _create(sessions, spec={**SPEC, "model": "no-such-model"})
    assert run_plan(plan_id, session_factory=sessions, settings=db_settings, catalog=catalog) == "failed"
    plan = _get(sessions, plan_id)
    assert plan.status == PlanStatus.FAILED
    assert plan.error is not None
    assert plan.error["status"] == 422
    assert "no-such-model" in plan.error["detail"]


SLOW_SPEC: dict[str, Any] = {
    **SPEC,
    "model": "llama-3.1-70b",
    "max_gpus": 8,
    "search": {"tp": [2, 4, 8], "pp": [1], "modes": ["collocated"], "requests": 3000, "simulate_top": 3},
}


def test_cancel_reaches_a_running_search_within_a_second(
    sessions: SessionFactory, db_settings: Settings, catalog: Catalog
) -> None:
    import threading
    import time

    plan_id = _create(sessions, spec=SLOW_SPEC)
    outcome: list[str] = []
    runner = threading.Thread(
        target=lambda: outcome.append(
            run_plan(plan_id, session_factory=sessions, settings=db_settings, catalog=catalog)
        )
    )
    runner.start()
    deadline = time.monotonic() + 30
    while _get(sessions, plan_id).progress_done < 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # the search is between its first and last simulated strategy now
    with sessions() as session:
        plan_store.cancel_plan(session, plan_id=plan_id)
    canceled_at = time.monotonic()
    runner.join(timeout=30)
    stopped_after_s = time.monotonic() - canceled_at
    assert outcome == ["aborted"]
    # One heartbeat (0.5 s) to notice, then the simulation stops at its next checkpoint (every 256 steps).
    assert db_settings.plan_heartbeat_s == 0.5
    assert stopped_after_s < 1.0
    assert _get(sessions, plan_id).status == PlanStatus.CANCELED


def test_renew_lease_extends_only_the_running_attempt(sessions: SessionFactory) -> None:
    plan_id = _create(sessions)
    with sessions() as session:
        plan_store.claim_plan(session, plan_id=plan_id, worker="a", lease_s=1, max_attempts=3)
        assert plan_store.renew_lease(session, plan_id=plan_id, attempt=1, lease_s=60)
        assert not plan_store.renew_lease(session, plan_id=plan_id, attempt=2, lease_s=60)
    lease = _get(sessions, plan_id).lease_expires_at
    assert lease is not None
    assert lease.replace(tzinfo=None) > utcnow().replace(tzinfo=None) + timedelta(seconds=50)
    with sessions() as session:
        plan_store.cancel_plan(session, plan_id=plan_id)
        assert not plan_store.renew_lease(session, plan_id=plan_id, attempt=1, lease_s=60)
