"""Group commit of submitted plans: batches form under a burst, and every request hears its own outcome."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import make_url, text

from service.api.admission import PlanAdmission, plan_admission
from service.api.errors import database_unavailable
from service.auth import ALL_SCOPES, Principal
from service.db import plans as plan_store
from service.db.models import Plan
from service.db.session import make_engine, make_session_factory
from service.dispatch import CeleryDispatcher
from service.plans_service import PlanSubmission, SubmittedPlan, ValidatedPlan
from service.settings import Settings
from tests.conftest import REDIS_URL, TEST_QUEUE_PREFIX, fresh_postgres_settings


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


# ------------------------------------------------------------------------------------------------ an ambiguous commit

# The simple-protocol COMMIT the driver sends, and the server's CommandComplete answering it.
COMMIT_QUERY = b"Q\x00\x00\x00\x0bCOMMIT\x00"
COMMIT_DONE = b"C\x00\x00\x00\x0bCOMMIT\x00"


class CommitCutter:
    """A TCP proxy to PostgreSQL that, once armed, cuts the connection after the server committed the next COMMIT."""

    # The client never hears the answer: a commit whose outcome it cannot know, as when PostgreSQL stops between
    # COMMIT sent and acknowledged.

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.armed = threading.Event()
        self.cut = threading.Event()
        # While set, new connections are closed at once, as by a database that is away.
        self.refusing = threading.Event()
        self.refuse_after_cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            if self.refusing.is_set():
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            cutting = threading.Event()
            threading.Thread(target=self._up, args=(client, upstream, cutting), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, cutting), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, cutting: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if COMMIT_QUERY in data and self.armed.is_set():
                    self.armed.clear()
                    if self.refuse_after_cut:
                        self.refusing.set()
                    cutting.set()
                upstream.sendall(data)
        _close(client, upstream)

    def _down(self, upstream: socket.socket, client: socket.socket, cutting: threading.Event) -> None:
        with contextlib.suppress(OSError):
            answer = b""
            while data := upstream.recv(65536):
                if not cutting.is_set():
                    client.sendall(data)
                    continue
                answer += data
                if COMMIT_DONE in answer:  # committed on the server: the client never hears it
                    self.cut.set()
                    break
        _close(client, upstream)

    def close(self) -> None:
        """Stop accepting connections."""
        self.listener.close()


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


@pytest.fixture
def cutter(postgres_url: str, tmp_path: Path) -> Iterator[tuple[CommitCutter, Settings]]:
    """A proxy in front of a fresh schema on the real PostgreSQL, and settings that reach it through the proxy."""
    fresh_postgres_settings(postgres_url, tmp_path)
    url = make_url(postgres_url)
    proxy = CommitCutter(url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    yield proxy, Settings(database_url=proxied, broker_url=REDIS_URL, data_dir=tmp_path, queue_name=_queue())
    proxy.close()


def _queue() -> str:
    return f"{TEST_QUEUE_PREFIX}admission-{uuid.uuid4().hex[:8]}"


def _sent_plan_ids(queue: str) -> list[str]:
    """The plan ids in the queue's run_plan and dispatch_plans messages, oldest first."""
    client = redis.Redis.from_url(REDIS_URL)
    ids: list[str] = []
    for raw in reversed(client.lrange(queue, 0, -1)):
        message = json.loads(raw)
        (argument,) = json.loads(base64.b64decode(message["body"]))[0]
        ids += argument if isinstance(argument, list) else [argument]
    client.delete(queue)
    return ids


def _keyed(n: int, key: str) -> PlanSubmission:
    plan = ValidatedPlan({"n": n}, "strategy", "m", "g", 1)
    return PlanSubmission(plan, Principal("acme", None, ALL_SCOPES), key)


def _admit(settings: Settings, submissions: list[PlanSubmission]) -> list[SubmittedPlan | BaseException]:
    """Submit a burst through the API's admission (one batch) and wait until it was handed to the broker."""
    engine = make_engine(settings)
    dispatcher = CeleryDispatcher(settings)
    admission = plan_admission(settings, make_session_factory(engine), dispatcher)

    async def burst() -> list[SubmittedPlan | BaseException]:
        answers = await asyncio.gather(*(admission.submit(s) for s in submissions), return_exceptions=True)
        await admission.idle()
        return answers

    try:
        return asyncio.run(burst())
    finally:
        dispatcher.close()
        engine.dispose()


def _stored(settings: Settings) -> dict[str, str]:
    """Idempotency key -> plan id of every stored plan."""
    engine = make_engine(settings)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT idempotency_key, id FROM plans")).all()
    engine.dispose()
    return {str(key): str(plan_id) for key, plan_id in rows}


def test_a_commit_cut_before_its_answer_is_confirmed_by_reading_back_and_answered_stored(
    cutter: tuple[CommitCutter, Settings],
) -> None:
    proxy, settings = cutter
    proxy.armed.set()
    answers = _admit(settings, [_keyed(n, f"k{n}") for n in range(3)])
    assert proxy.cut.is_set()
    stored = _stored(settings)
    assert sorted(stored) == ["k0", "k1", "k2"]
    # The batch was stored: each request hears so (a 202 with its plan), and each plan goes to the executor.
    for n, answer in enumerate(answers):
        assert isinstance(answer, SubmittedPlan), answer
        assert answer.created
        assert answer.plan.id == stored[f"k{n}"]
    assert sorted(_sent_plan_ids(settings.queue_name)) == sorted(stored.values())


def test_a_commit_cut_while_the_database_stays_away_is_a_503_and_the_retry_finds_the_plan_already_sent(
    cutter: tuple[CommitCutter, Settings],
) -> None:
    proxy, settings = cutter
    proxy.refuse_after_cut = True
    proxy.armed.set()
    (first,) = _admit(settings, [_keyed(1, "k1")])
    assert proxy.cut.is_set()
    # Unconfirmed: a 503 (the client retries) and not a 202 for a plan that may not exist...
    assert isinstance(first, plan_store.CommitUnconfirmedError)
    assert database_unavailable(first)
    # ...but the plan may exist, so it went to the executor, which runs only plans that do.
    sent = _sent_plan_ids(settings.queue_name)
    assert sent == [first.plan_id]
    proxy.refusing.clear()
    assert _stored(settings) == {"k1": first.plan_id}
    # The client's retry with its key replays the stored plan (200), which is not sent twice.
    (retry,) = _admit(settings, [_keyed(1, "k1")])
    assert isinstance(retry, SubmittedPlan)
    assert not retry.created
    assert retry.plan.id == first.plan_id
    assert _sent_plan_ids(settings.queue_name) == []
