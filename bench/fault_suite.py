"""Fault suite: the production set (API + Celery worker + PostgreSQL + Redis) through a database outage, a broker
outage and a worker SIGKILL mid-plan, with its own PostgreSQL cluster and Redis server on other ports.

Usage: .venv/bin/python -m bench.fault_suite [--outage-s 5] [--fault postgresql ...] [--rounds N] [--keep DIR] [--json]

It creates a PostgreSQL cluster with initdb in a temporary directory and a Redis server (append-only file) on free
ports, applies the schema, issues an API key with every scope, starts `splan worker` (its own process group) and
`splan serve` with that key required, then for each fault:

- while the service is away and after it returns, a prober sends every kind of request the API takes (plans:
  submit, read, list, cancel, report; clusters: put, get, events; placements; estimates; catalog; readyz) one
  after another, and a submitter posts a plan every second with its own Idempotency-Key, retrying a refused one
  with the same key every 0.5 s (a client that waits Retry-After would retry later, not differently);
- figures: requests during the outage and how many failed (any status >= 500 or no answer), how many of them
  were 500 (a 503 is the answer the API owes; a 500 never), requests after the service returned that failed, the
  time from its return to the last failed request (recovery), plans accepted, lost (accepted, never final) and
  duplicated (two plans for one key, or one plan finished twice by the workers: their `plan.finished` lines).
  The broker outage also gives the time from the broker's return until the last plan accepted meanwhile started.
- the worker SIGKILL: a plan is killed with its worker's process group mid-search, another worker starts; the
  time until attempt 2 runs, its final status and attempt count.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import httpx
import yaml

from service.auth import ALL_SCOPES
from tests.helpers import (
    REPO,
    SPLAN,
    ThrowawayPostgres,
    ThrowawayRedis,
    free_port,
    kill_group,
    stop,
    wait_final,
    wait_for,
    wait_ready,
)

# A plan of about a second on one core, and one of several seconds for the SIGKILL (as tests/test_jobs.py).
QUICK_SPEC: dict[str, Any] = {
    "model": "llama-3.1-8b",
    "gpu": "h100-sxm",
    "max_gpus": 2,
    "workload": {"arrival": "poisson", "isl": 512, "osl": 64, "rate": 2},
    "slo": {"ttft_ms": 500, "tpot_ms": 50},
    "search": {"tp": [1], "pp": [1], "modes": ["collocated"], "requests": 40},
}
TINY_SPEC: dict[str, Any] = {**QUICK_SPEC, "max_gpus": 1, "search": {**QUICK_SPEC["search"], "requests": 20}}
SLOW_SPEC: dict[str, Any] = {
    **QUICK_SPEC,
    "model": "llama-3.1-70b",
    "max_gpus": 8,
    "search": {"tp": [2, 4, 8], "pp": [1], "modes": ["collocated"], "requests": 3000, "simulate_top": 3},
}
ESTIMATE = {"model": "llama-3.1-8b", "gpu": "h100-sxm", "tp": 1, "isl": 256, "osl": 32, "rate": 1, "requests": 50}
SUBMIT_EVERY_S = 1.0
FLAT_JSON = re.compile(r"\{[^{}\n]*\}")
CONNECTED = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): INFO/MainProcess\] Connected to redis://")
RETRY_REFUSED_S = 0.5


@dataclass
class FaultFigures:
    """What one fault did to the clients and to the plans."""

    fault: str
    outage_s: float
    requests_during: int = 0
    failed_during: int = 0
    status_500_during: int = 0
    # 503s without Retry-After or not problem+json, during and after the outage.
    improper_503: int = 0
    requests_after: int = 0
    failed_after: int = 0
    recovery_s: float = 0.0
    plans_accepted: int = 0
    plans_lost: int = 0
    plans_duplicated: int = 0
    # Broker outage: from the broker's return until the API's outbox was empty, and until the first and the last
    # plan accepted during the outage started running (the last one waits behind the others for a worker slot).
    outbox_drained_after_s: float | None = None
    worker_reconnected_after_s: float | None = None
    outage_plans_first_started_s: float | None = None
    outage_plans_last_started_s: float | None = None
    # Worker SIGKILL: until attempt 2 ran, and the plan's final status and attempt.
    rerun_after_s: float | None = None
    final: str | None = None
    statuses_during: dict[str, int] = field(default_factory=dict)


class ProductionSet:
    """PostgreSQL, Redis, a worker and the API, each of which can be stopped and started."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.postgres = ThrowawayPostgres(free_port())
        self.redis = ThrowawayRedis(workdir / "redis", free_port())
        self.queue = f"splan-fault-{uuid.uuid4().hex[:8]}"
        self.env = {
            **os.environ,
            "DATABASE_URL": self.postgres.url,
            "BROKER_URL": self.redis.url,
            "SPLAN_QUEUE_NAME": self.queue,
            "SPLAN_REQUIRE_API_KEYS": "true",
            "PYTHONPATH": str(REPO),
        }
        self.worker: subprocess.Popen[bytes] | None = None
        self.api: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self.key = ""
        self.worker_logs: list[Path] = []
        self.open_logs: list[IO[bytes]] = []

    def start(self) -> None:
        """Start both services, apply the schema, issue a key, start a worker and the API."""
        self.postgres.start()
        self.redis.start()
        self._splan("db", "upgrade")
        created = self._splan("keys", "create", "--tenant", "fault", "--scopes", ",".join(sorted(ALL_SCOPES)), "--json")
        self.key = json.loads(created)["key"]
        # The suite submits several plans a second: quotas are tested elsewhere (tests/test_auth.py).
        self._splan("tenants", "quota", "fault", "--plans-in-flight", "100000", "--plans-per-hour", "1000000")
        self.start_worker()
        port = free_port()
        log = (self.workdir / "api.log").open("wb")
        self.open_logs.append(log)
        self.api = subprocess.Popen(
            [*SPLAN, "serve", "--port", str(port)], env=self.env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT
        )
        self.base_url = f"http://127.0.0.1:{port}"
        wait_ready(self.base_url, self.api)

    def _splan(self, *argv: str) -> str:
        done = subprocess.run([*SPLAN, *argv], env=self.env, cwd=self.workdir, check=True, capture_output=True)
        return done.stdout.decode()

    def start_worker(self) -> None:
        """A worker in its own process group (a SIGKILL takes its pool's children too), logging to its own file."""
        path = self.workdir / f"worker-{len(self.worker_logs)}.log"
        self.worker_logs.append(path)
        log = path.open("wb")
        self.open_logs.append(log)
        self.worker = subprocess.Popen(
            [*SPLAN, "worker", "--concurrency", "2"],
            env=self.env,
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def client(self) -> httpx.Client:
        """An HTTP client carrying the key."""
        return httpx.Client(base_url=self.base_url, timeout=15, headers={"Authorization": f"Bearer {self.key}"})

    def finished_twice(self) -> list[str]:
        """Plan ids whose outcome the workers wrote more than once (from their `plan.finished` log lines)."""
        written: Counter[str] = Counter()
        for path in self.worker_logs:
            # The pool's processes share the file and their lines can interleave: take every flat JSON object.
            for found in FLAT_JSON.finditer(path.read_text(errors="replace")):
                try:
                    event = json.loads(found.group())
                except json.JSONDecodeError:
                    continue
                if event.get("event") == "plan.finished" and event.get("outcome") in ("succeeded", "failed"):
                    written[event["plan_id"]] += 1
        return [plan_id for plan_id, count in written.items() if count > 1]

    def worker_connected_at(self) -> list[float]:
        """When the workers (re)connected to the broker: Celery's `Connected to redis://` lines (local time)."""
        times = []
        for path in self.worker_logs:
            for match in CONNECTED.finditer(path.read_text(errors="replace")):
                stamp = time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
                times.append(time.mktime(stamp) + int(match.group(2)) / 1000)
        return times

    def api_events(self, name: str) -> list[dict[str, Any]]:
        """The API's log events of one kind."""
        found = []
        for match in FLAT_JSON.finditer((self.workdir / "api.log").read_text(errors="replace")):
            try:
                event = json.loads(match.group())
            except json.JSONDecodeError:
                continue
            if event.get("event") == name:
                found.append(event)
        return found

    def close(self) -> None:
        """Stop everything and delete the cluster and the Redis files."""
        for process in (self.api, self.worker):
            if process is not None and process.poll() is None:
                stop(process)
        self.redis.stop()
        self.postgres.destroy()
        for log in self.open_logs:
            log.close()


@dataclass
class Sample:
    """One request: when it started and ended (monotonic seconds), what it was and its status (0: no answer)."""

    started_s: float
    ended_s: float
    operation: str
    status: int
    # A 503 that is problem+json and says when to retry (Retry-After).
    proper_503: bool = False


class Prober:
    """Sends every kind of request the API takes, one after another, until stopped."""

    def __init__(self, production: ProductionSet) -> None:
        self.production = production
        self.samples: list[Sample] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.key = uuid.uuid4().hex
        with production.client() as client:
            self.cluster = yaml.safe_load((REPO / "examples" / "cluster.yaml").read_text())
            assert client.put("/v1/clusters/fault", json=self.cluster).status_code in (200, 201)
            created = client.post("/v1/plans", json=QUICK_SPEC)
            assert created.status_code == 202, created.text
            self.plan_id = created.json()["id"]
            wait_final(client, self.plan_id, timeout_s=60)

    def operations(self) -> list[tuple[str, Callable[[httpx.Client], httpx.Response]]]:
        """Every operation that needs the database (with keys: all but /livez and /metrics)."""
        plan = self.plan_id
        event = {"events": [{"type": "checkpoint_cached", "server": "node-b", "tier": "dram", "model": "qwen3-32b"}]}
        return [
            # One key: the first submit makes a plan, the rest replay it (new plans come from the Submitter).
            ("POST /v1/plans", lambda c: c.post("/v1/plans", json=TINY_SPEC, headers={"Idempotency-Key": self.key})),
            ("GET /v1/plans/{id}", lambda c: c.get(f"/v1/plans/{plan}")),
            ("GET /v1/plans", lambda c: c.get("/v1/plans", params={"limit": 5})),
            ("POST /v1/plans/{id}/cancel", lambda c: c.post(f"/v1/plans/{plan}/cancel")),
            ("GET /v1/plans/{id}/launch", lambda c: c.get(f"/v1/plans/{plan}/launch", params={"engine": "vllm"})),
            ("PUT /v1/clusters/{name}", lambda c: c.put("/v1/clusters/fault-put", json=self.cluster)),
            ("GET /v1/clusters/{name}", lambda c: c.get("/v1/clusters/fault")),
            ("POST /v1/clusters/{name}/events", lambda c: c.post("/v1/clusters/fault/events", json=event)),
            (
                "POST /v1/placements",
                lambda c: c.post("/v1/placements", json={"cluster": "fault", "model": "llama-3.1-8b", "tp": 1}),
            ),
            ("POST /v1/estimates", lambda c: c.post("/v1/estimates", json=ESTIMATE)),
            ("GET /v1/catalog/models", lambda c: c.get("/v1/catalog/models")),
            ("GET /readyz", lambda c: c.get("/readyz")),
        ]

    def _run(self) -> None:
        with self.production.client() as client:
            for name, call in itertools.cycle(self.operations()):
                if self.stopping.is_set():
                    return
                started = time.monotonic()
                try:
                    response = call(client)
                except httpx.HTTPError:
                    self.samples.append(Sample(started, time.monotonic(), name, 0))
                    continue
                proper = response.status_code == 503 and "Retry-After" in response.headers
                proper = proper and response.headers["content-type"].startswith("application/problem+json")
                self.samples.append(Sample(started, time.monotonic(), name, response.status_code, proper))

    def __enter__(self) -> Prober:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.thread.join()


class Submitter:
    """Posts a plan every SUBMIT_EVERY_S with its own Idempotency-Key; a refused one is retried with the same key."""

    def __init__(self, production: ProductionSet) -> None:
        self.production = production
        self.accepted: dict[str, set[str]] = {}
        self.pending: list[str] = []
        self.accepted_at: dict[str, float] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _try(self, client: httpx.Client, key: str) -> bool:
        try:
            response = client.post("/v1/plans", json=TINY_SPEC, headers={"Idempotency-Key": key})
        except httpx.HTTPError:
            return False
        if response.status_code not in (200, 202):
            return False
        self.accepted.setdefault(key, set()).add(response.json()["id"])
        self.accepted_at.setdefault(key, time.time())
        return True

    def _run(self) -> None:
        last_retry = 0.0
        with self.production.client() as client:
            while not self.stopping.is_set():
                key = uuid.uuid4().hex
                if not self._try(client, key):
                    self.pending.append(key)
                if self.pending and time.monotonic() - last_retry >= RETRY_REFUSED_S:
                    last_retry = time.monotonic()
                    self.pending = [k for k in self.pending if not self._try(client, k)]
                self.stopping.wait(SUBMIT_EVERY_S)

    def drain(self, timeout_s: float = 60.0) -> None:
        """Stop submitting and retry the refused ones until accepted."""
        self.stopping.set()
        self.thread.join()
        with self.production.client() as client:
            wait_for(
                lambda: not [k for k in list(self.pending) if not self._try(client, k)] or self._clear(client),
                timeout_s=timeout_s,
                interval_s=RETRY_REFUSED_S,
                what="refused plans to be accepted",
            )

    def _clear(self, client: httpx.Client) -> bool:
        self.pending = [k for k in self.pending if not self._try(client, k)]
        return not self.pending

    def __enter__(self) -> Submitter:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.thread.join()


def _count(figures: FaultFigures, samples: list[Sample], down_s: float, back_s: float) -> None:
    during = [s for s in samples if s.started_s >= down_s and s.ended_s <= back_s]
    after = [s for s in samples if s.started_s >= back_s]
    failed = [s for s in samples if s.status == 0 or s.status >= 500]
    figures.requests_during = len(during)
    figures.failed_during = sum(1 for s in during if s.status == 0 or s.status >= 500)
    figures.status_500_during = sum(1 for s in during if s.status == 500)
    figures.improper_503 = sum(1 for s in samples if s.status == 503 and not s.proper_503)
    figures.statuses_during = dict(sorted(Counter(f"{s.operation} {s.status}" for s in during).items()))
    figures.requests_after = len(after)
    figures.failed_after = sum(1 for s in after if s.status == 0 or s.status >= 500)
    late = [s.ended_s - back_s for s in failed if s.ended_s > back_s]
    figures.recovery_s = round(max(late, default=0.0), 2)


def _settle_plans(production: ProductionSet, figures: FaultFigures, submitter: Submitter) -> dict[str, dict[str, Any]]:
    """Wait for every accepted plan to be final; count lost and duplicated plans; the final plans by key."""
    finals: dict[str, dict[str, Any]] = {}
    with production.client() as client:
        for key, ids in submitter.accepted.items():
            for plan_id in ids:
                try:
                    finals[key] = wait_final(client, plan_id, timeout_s=90)
                except AssertionError:
                    figures.plans_lost += 1
    figures.plans_accepted = len(submitter.accepted)
    figures.plans_duplicated = sum(len(ids) - 1 for ids in submitter.accepted.values())
    figures.plans_duplicated += len(production.finished_twice())
    return finals


@contextmanager
def _fault(
    production: ProductionSet, fault: str, outage_s: float
) -> Iterator[tuple[FaultFigures, Submitter, float, float]]:
    figures = FaultFigures(fault=fault, outage_s=outage_s)
    service = production.postgres if fault == "postgresql" else production.redis
    prober = Prober(production)
    with prober, Submitter(production) as submitter:
        time.sleep(1.0)
        down_s, down_wall_s = time.monotonic(), time.time()
        service.stop()
        time.sleep(outage_s)
        service.start()
        back_s, back_wall_s = time.monotonic(), time.time()
        figures.outage_s = round(back_s - down_s, 2)
        # Until the API and the worker have caught up: the prober keeps measuring.
        time.sleep(6.0)
    submitter.drain()
    _count(figures, prober.samples, down_s, back_s)
    yield figures, submitter, down_wall_s, back_wall_s


def database_outage(production: ProductionSet, outage_s: float) -> FaultFigures:
    """PostgreSQL stopped for `outage_s`: every request needing it must be a 503 with Retry-After, never a 500."""
    with _fault(production, "postgresql", outage_s) as (figures, submitter, _, _):
        _settle_plans(production, figures, submitter)
    return figures


def broker_outage(production: ProductionSet, outage_s: float) -> FaultFigures:
    """Redis stopped for `outage_s`: submits are accepted into the outbox and run within seconds of its return."""
    with _fault(production, "redis", outage_s) as (figures, submitter, down_wall_s, back_wall_s):
        finals = _settle_plans(production, figures, submitter)
        waits = []
        for key, plan in finals.items():
            accepted = submitter.accepted_at[key]
            if down_wall_s <= accepted <= back_wall_s and plan.get("started_at"):
                started = datetime.fromisoformat(plan["started_at"]).timestamp()
                waits.append(started - back_wall_s)
        figures.outage_plans_first_started_s = round(min(waits, default=0.0), 2)
        figures.outage_plans_last_started_s = round(max(waits, default=0.0), 2)
        drained = [
            datetime.fromisoformat(event["timestamp"]).timestamp() - back_wall_s
            for event in production.api_events("plan.outbox_drained")
        ]
        figures.outbox_drained_after_s = round(max(drained, default=0.0), 2)
        reconnected = [at - back_wall_s for at in production.worker_connected_at() if at >= back_wall_s]
        figures.worker_reconnected_after_s = round(min(reconnected), 2) if reconnected else None
    return figures


def worker_sigkill(production: ProductionSet) -> FaultFigures:
    """SIGKILL the worker's process group mid-plan, start another: the plan re-runs once and succeeds."""
    figures = FaultFigures(fault="worker SIGKILL", outage_s=0.0)
    with production.client() as client:
        plan_id = client.post("/v1/plans", json=SLOW_SPEC).json()["id"]
        wait_for(lambda: client.get(f"/v1/plans/{plan_id}").json()["status"] == "running", timeout_s=60)
        time.sleep(0.5)
        assert production.worker is not None
        kill_group(production.worker)
        killed = time.monotonic()
        production.start_worker()
        wait_for(lambda: client.get(f"/v1/plans/{plan_id}").json()["attempt"] >= 2, timeout_s=60)
        figures.rerun_after_s = round(time.monotonic() - killed, 2)
        final = wait_final(client, plan_id, timeout_s=120)
    figures.final = f"{final['status']}, attempt {final['attempt']}"
    figures.plans_accepted = 1
    figures.plans_lost = 0 if final["status"] in ("succeeded", "failed") else 1
    figures.plans_duplicated = len(production.finished_twice())
    return figures


FAULTS = ("postgresql", "redis", "worker SIGKILL")


def run_suite(
    outage_s: float, keep: Path | None = None, only: tuple[str, ...] = FAULTS, rounds: int = 1
) -> list[FaultFigures]:
    """The faults (all three, or `only` these), `rounds` times each in turn, on one production set (logs kept in
    `keep` when given)."""
    with tempfile.TemporaryDirectory(prefix="splan-faults-") as workdir:
        production = ProductionSet(keep or Path(workdir))
        try:
            production.start()
            results = []
            faults: list[tuple[str, Callable[[], FaultFigures]]] = [
                ("postgresql", lambda: database_outage(production, outage_s)),
                ("redis", lambda: broker_outage(production, outage_s)),
                ("worker SIGKILL", lambda: worker_sigkill(production)),
            ]
            for name, fault in [(n, f) for _ in range(rounds) for n, f in faults if n in only]:
                started = time.monotonic()
                results.append(fault())
                print(f"fault_suite: {name} done in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
            return results
        finally:
            production.close()


COLUMNS = (
    ("fault", "fault"),
    ("outage_s", "outage (s)"),
    ("requests_during", "requests during"),
    ("failed_during", "failed during (5xx/none)"),
    ("status_500_during", "500s during"),
    ("improper_503", "503s without Retry-After"),
    ("requests_after", "requests after"),
    ("failed_after", "failed after"),
    ("recovery_s", "recovery (s)"),
    ("plans_accepted", "plans accepted"),
    ("plans_lost", "lost"),
    ("plans_duplicated", "duplicated"),
    ("outbox_drained_after_s", "outbox drained (s after return)"),
    ("worker_reconnected_after_s", "worker reconnected (s after return)"),
    ("outage_plans_first_started_s", "first outage plan started (s after return)"),
    ("outage_plans_last_started_s", "last outage plan started (s after return)"),
    ("rerun_after_s", "re-run after kill (s)"),
    ("final", "final"),
)


def main() -> None:
    """Run the suite and print a table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage-s", type=float, default=5.0, help="how long each service stays down")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--keep", type=Path, default=None, help="a directory to keep the API and worker logs in")
    parser.add_argument(
        "--fault", action="append", choices=FAULTS, help="run only this fault (repeatable; default: all three)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="run the chosen faults this many times in turn")
    args = parser.parse_args()
    results = run_suite(args.outage_s, args.keep, tuple(args.fault or FAULTS), args.rounds)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
        return
    print("| " + " | ".join(title for _, title in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for result in results:
        row = asdict(result)
        print("| " + " | ".join("-" if row[name] is None else str(row[name]) for name, _ in COLUMNS) + " |")
    for result in results:
        if result.statuses_during:
            print(f"{result.fault}, answers during the outage: {result.statuses_during}")


if __name__ == "__main__":
    main()
