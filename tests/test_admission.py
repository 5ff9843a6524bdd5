"""Group commit of submitted plans: batches form under a burst, and every request hears its own outcome."""

from __future__ import annotations

import asyncio
import threading
import time

from service.api.admission import PlanAdmission
from service.auth import ALL_SCOPES, Principal
from service.db.models import Plan
from service.plans_service import PlanSubmission, SubmittedPlan, ValidatedPlan


def _submission(n: int) -> PlanSubmission:
    plan = ValidatedPlan({"n": n}, "strategy", "m", "g", 1)
    return PlanSubmission(plan, Principal("acme", None, ALL_SCOPES), None)


class _Store:
    """Stores a batch in 20 ms; a spec with n divisible by 7 is refused."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.dispatched: list[SubmittedPlan | Exception] = []

    def __call__(self, submissions: list[PlanSubmission]) -> list[SubmittedPlan | Exception]:
        self.threads.add(threading.current_thread().name)
        self.batches.append([int(s.plan.spec["n"]) for s in submissions])
        time.sleep(0.02)
        return [
            ValueError(f"refused {s.plan.spec['n']}")
            if s.plan.spec["n"] % 7 == 0
            else SubmittedPlan(Plan(id=str(s.plan.spec["n"])), True)
            for s in submissions
        ]


def test_a_burst_is_stored_in_a_few_batches_and_each_request_gets_its_own_answer() -> None:
    store = _Store()
    admission = PlanAdmission(store, store.dispatched.extend, max_batch=64)

    async def burst() -> list[SubmittedPlan | BaseException]:
        answers = await asyncio.gather(
            *(admission.submit(_submission(n)) for n in range(1, 101)), return_exceptions=True
        )
        await admission.idle()
        return answers

    outcomes = asyncio.run(burst())
    # All 100 were waiting when the first batch started: batches of at most 64, in arrival order.
    assert [len(b) for b in store.batches] == [64, 36]
    assert sorted(n for b in store.batches for n in b) == list(range(1, 101))
    for n, outcome in zip(range(1, 101), outcomes, strict=True):
        if n % 7 == 0:
            assert isinstance(outcome, ValueError)
            assert str(outcome) == f"refused {n}"
        else:
            assert isinstance(outcome, SubmittedPlan)
            assert outcome.plan.id == str(n)
    # Every outcome went on to dispatch, after the answers; stored off the event loop's thread.
    assert len(store.dispatched) == 100
    assert threading.current_thread().name not in store.threads


def test_a_failed_batch_fails_each_of_its_requests_and_the_next_batch_still_runs() -> None:
    calls: list[int] = []

    def store(submissions: list[PlanSubmission]) -> list[SubmittedPlan | Exception]:
        calls.append(len(submissions))
        if len(calls) == 1:
            raise ConnectionError("database away")
        return [SubmittedPlan(Plan(id="ok"), True) for _ in submissions]

    admission = PlanAdmission(store, lambda outcomes: None, max_batch=10)

    async def run() -> tuple[tuple[SubmittedPlan | BaseException], SubmittedPlan]:
        first = await asyncio.gather(admission.submit(_submission(1)), return_exceptions=True)
        return first, await admission.submit(_submission(2))

    first, later = asyncio.run(run())
    assert isinstance(first[0], ConnectionError)
    assert str(first[0]) == "database away"
    assert later.plan.id == "ok"
    assert calls == [1, 1]
