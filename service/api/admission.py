"""Group commit of submitted plans: the POSTs that arrive while one batch is stored are stored together next."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from service import plans_service
from service.db.session import SessionFactory
from service.dispatch import Dispatcher
from service.plans_service import PlanSubmission, SubmittedPlan
from service.settings import Settings


@dataclass
class _Waiting:
    submission: PlanSubmission
    answer: asyncio.Future[SubmittedPlan]


class PlanAdmission:
    """Stores plans in batches: one transaction, one quota check per tenant and one commit for all that wait.

    A lone request is stored at once (a batch of one); under a burst, each batch takes everything that arrived
    while the previous one was being stored, so the database work per plan falls as the load rises.
    """

    def __init__(
        self,
        store: Callable[[list[PlanSubmission]], list[SubmittedPlan | Exception]],
        dispatch: Callable[[list[SubmittedPlan | Exception]], None],
        max_batch: int,
    ):
        self.store = store
        self.dispatch = dispatch
        self.max_batch = max_batch
        self.waiting: list[_Waiting] = []
        self.drainer: asyncio.Task[None] | None = None

    async def submit(self, submission: PlanSubmission) -> SubmittedPlan:
        """Store the plan with the next batch; its stored plan, or the error it is answered with."""
        answer: asyncio.Future[SubmittedPlan] = asyncio.get_running_loop().create_future()
        self.waiting.append(_Waiting(submission, answer))
        if self.drainer is None or self.drainer.done():
            self.drainer = asyncio.create_task(self._drain())
        return await answer

    async def idle(self) -> None:
        """Wait until every waiting plan is stored and handed to the executor (at shutdown)."""
        while self.drainer is not None and not self.drainer.done():
            await asyncio.shield(self.drainer)

    async def _drain(self) -> None:
        while self.waiting:
            # Requests woken together (a burst that waited on one key check) join this batch rather than the next.
            for _ in range(3):
                await asyncio.sleep(0)
            batch, self.waiting = self.waiting[: self.max_batch], self.waiting[self.max_batch :]
            try:
                outcomes = await run_in_threadpool(self.store, [w.submission for w in batch])
            except Exception as exc:  # the database or the pool failed the whole batch: each request hears why
                for waiting in batch:
                    if not waiting.answer.done():
                        waiting.answer.set_exception(exc)
                continue
            for waiting, outcome in zip(batch, outcomes, strict=True):
                if waiting.answer.done():  # the client went away
                    continue
                if isinstance(outcome, Exception):
                    waiting.answer.set_exception(outcome)
                else:
                    waiting.answer.set_result(outcome)
            # The plans are committed: answer first, then hand them to the executor (a send that fails or never
            # happens is the sweeper's, as when the broker is away).
            await run_in_threadpool(self.dispatch, outcomes)


def plan_admission(settings: Settings, session_factory: SessionFactory, dispatcher: Dispatcher) -> PlanAdmission:
    """The API process's admission of plans: plans_service.store_plans, then dispatch_new."""

    def store(submissions: list[PlanSubmission]) -> list[SubmittedPlan | Exception]:
        with session_factory() as session:
            return plans_service.store_plans(session, submissions, settings=settings)

    def dispatch(outcomes: list[SubmittedPlan | Exception]) -> None:
        plans_service.dispatch_new(dispatcher, outcomes)

    return PlanAdmission(store, dispatch, settings.admission_max_batch)
