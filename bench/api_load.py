"""Load benchmark of the API in production mode: real PostgreSQL, Redis, `splan worker` and `splan serve`.

Usage: python bench/api_load.py [--clients 50] [--per-client 20] [--plans 200] [--client raw|httpx]

It creates a throw-away database (splan_bench_<random>) next to `postgres` on --pg-admin, applies the schema
with `splan db upgrade`, starts `splan worker` on its own queue (SPLAN_QUEUE_NAME=splan-bench-<random>) and
`splan serve` on a free port, waits for /readyz, then measures:

  (a) POST /v1/plans latency: --clients concurrent closed-loop clients, each sending --per-client POSTs one
      after the other (or with random pauses of --think-ms on average), no Idempotency-Key. The plans then
      run on the worker; only the POST is timed. Also reported: the server's own view of the same requests (the
      splan_http_request_duration_seconds histogram of /metrics) and the CPU used by the API process and by
      this client, to tell server time from client overhead.
  (b) --plans plans submitted at once, each with its own Idempotency-Key; waits until all are final and counts
      from the plans table: succeeded, failed, lost (id answered but no row), run twice (attempt > 1). Then
      the same --plans requests are replayed with the same keys: each must answer the existing plan.

Plans left queued by the warm-up and by (a) are canceled in the database before (b), so (b) does not queue
behind them. The default client speaks HTTP/1.1 over one keep-alive asyncio connection per client (`raw`):
on a small machine httpx.AsyncClient (`--client httpx`) costs about a core at 50 clients and its own
scheduling delay shows up as latency. Everything is cleaned up at the end: the subprocesses are terminated,
the database is dropped and the bench queue's Redis keys are deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import psycopg
import redis

REPO = Path(__file__).resolve().parents[1]
FINAL = ("succeeded", "failed", "canceled")
P99_TARGET_MS = 50.0
# Issue 14: every one of 200 plans submitted at once answered within this (99th percentile), production set.
BURST_P99_TARGET_MS = 300.0
REQUEST_TIMEOUT_S = 60.0

SPEC: dict[str, Any] = {
    "model": "llama-3.1-8b",
    "gpu": "h100-sxm",
    "max_gpus": 2,
    "workload": {"arrival": "poisson", "isl": 512, "osl": 128, "rate": 2},
    "slo": {"ttft_ms": 500, "tpot_ms": 50},
    "search": {"tp": [1], "pp": [1], "modes": ["collocated"], "requests": 40},
}
SPEC_BODY = json.dumps(SPEC, separators=(",", ":")).encode()
# The production set requires API keys: run() issues one for a bench tenant and every POST sends it.
AUTH: dict[str, str] = {}


class BenchError(Exception):
    """Something the person running the benchmark must fix: printed as one line, exit code 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients in (a)")
    parser.add_argument("--per-client", type=int, default=20, help="POSTs per client in (a)")
    parser.add_argument(
        "--think-ms",
        type=float,
        default=0.0,
        help="mean pause between a client's POSTs in (a) (exponential; 0 = back to back)",
    )
    parser.add_argument("--plans", type=int, default=200, help="plans submitted at once in (b)")
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw", help="HTTP client of the load")
    parser.add_argument("--warmup", type=int, default=20, help="untimed POSTs before the baseline")
    parser.add_argument("--baseline", type=int, default=50, help="POSTs from a single client before (a)")
    parser.add_argument("--api-workers", type=int, default=1, help="`splan serve --workers`")
    parser.add_argument("--worker-concurrency", type=int, default=2, help="SPLAN_WORKER_CONCURRENCY")
    parser.add_argument(
        "--pg-admin",
        default=os.environ.get("SPLAN_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a PostgreSQL URL allowed to CREATE/DROP DATABASE",
    )
    parser.add_argument("--broker", default=os.environ.get("SPLAN_BENCH_BROKER", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--final-timeout", type=float, default=900.0, help="seconds to wait for (b) to finish")
    parser.add_argument("--keep-logs", action="store_true", help="keep the serve/worker logs and print their path")
    args = parser.parse_args(argv)
    for name in ("clients", "per_client", "plans", "api_workers", "worker_concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.baseline < 0 or args.think_ms < 0:
        parser.error("--warmup, --baseline and --think-ms cannot be negative")
    return args


# ----------------------------------------------------------------------------------------------- environment


def splan_executable() -> str:
    """The `splan` console script of the running interpreter's environment."""
    candidate = Path(sys.executable).with_name("splan")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("splan")
    if found is None:
        raise BenchError("cannot find the `splan` command; install the package (pip install -e .)")
    return found


def check_services(pg_admin: str, broker: str) -> str:
    """Fail early, with a clear message, when PostgreSQL or Redis is not reachable; the server version."""
    try:
        with psycopg.connect(pg_admin, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
    except psycopg.Error as exc:
        raise BenchError(f"PostgreSQL unreachable at {pg_admin}: {str(exc).strip().splitlines()[0]}") from None
    try:
        client = redis.Redis.from_url(broker, socket_timeout=5, socket_connect_timeout=5)
        client.ping()
        client.close()
    except redis.RedisError as exc:
        raise BenchError(f"Redis unreachable at {broker}: {exc}") from None
    return str(row[0]).split(" ")[0] if row else "?"


@contextlib.contextmanager
def fresh_database(pg_admin: str) -> Iterator[str]:
    """A new empty database, dropped (even with connections left) on exit; yields its URL."""
    name = f"splan_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{pg_admin.rsplit('/', 1)[0]}/{name}"
    finally:
        try:
            with psycopg.connect(pg_admin, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.Error as exc:
            print(f"warning: could not drop database {name}: {exc}", file=sys.stderr)


def bench_key(splan: str, env: dict[str, str], token: str) -> str:
    """A plans key for this run's own tenant, whose quotas do not limit the load (the door is measured, not them)."""
    tenant = f"bench-{token}"
    commands = (
        ["tenants", "quota", tenant, "--plans-in-flight", "1000000", "--plans-per-hour", "10000000"],
        ["keys", "create", "--tenant", tenant, "--scopes", "plans:read,plans:write", "--json"],
    )
    out = ""
    for command in commands:
        done = subprocess.run([splan, *command], env=env, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise BenchError(f"`splan {' '.join(command)}` failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        out = done.stdout
    return str(json.loads(out)["key"])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    """A subprocess in its own process group, logging to a file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    stopped: bool = False

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise BenchError(
                f"{self.name} exited with {self.popen.returncode}; last lines of {self.log}:\n{self.tail()}"
            )

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Celery: warm shutdown), then SIGKILL to the process group this script started; once."""
        if self.stopped:
            return
        self.stopped = True
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"warning: {self.name} ignored SIGTERM for {timeout:g} s; killing it", file=sys.stderr)
        # Also reaps children the parent left behind (same process group, started by this script).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)


def stop_all(procs: list[Proc]) -> None:
    """Stop the started processes, newest first."""
    for proc in reversed(procs):
        proc.stop()


def start(name: str, argv: list[str], env: dict[str, str], logdir: Path) -> Proc:
    log = logdir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    return Proc(name, popen, log)


def wait_ready(base_url: str, server: Proc, worker: Proc, timeout: float = 90.0) -> None:
    """Until /readyz answers 200 and the Celery worker logged `ready.`."""
    deadline = time.monotonic() + timeout
    api_ready = worker_ready = False
    last = "no answer yet"
    with httpx.Client(base_url=base_url, timeout=5.0) as client:
        while not (api_ready and worker_ready):
            server.check_alive()
            worker.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(
                    f"not ready after {timeout:g} s (api: {last}; worker ready: {worker_ready})\n"
                    f"serve log:\n{server.tail()}\nworker log:\n{worker.tail()}"
                )
            if not api_ready:
                try:
                    response = client.get("/readyz")
                    api_ready = response.status_code == 200
                    last = f"{response.status_code} {response.text[:200]}"
                except httpx.HTTPError as exc:
                    last = type(exc).__name__
            worker_ready = worker_ready or " ready." in worker.tail(200)
            time.sleep(0.2)


def process_tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of a process and its children (Linux /proc; 0 where unavailable)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = (entry / "stat").read_text()
            fields = text[text.rindex(")") + 2 :].split()
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    tree = {root}
    tree |= {pid for pid, (ppid, _) in stats.items() if ppid == root}
    return sum(stats[pid][1] for pid in tree if pid in stats)


# ----------------------------------------------------------------------------------------------- HTTP clients


class Poster(Protocol):
    """One client's way to POST a plan: (status, body); raises OSError or TimeoutError on transport errors."""

    async def post(self, headers: dict[str, str]) -> tuple[int, bytes]: ...

    async def aclose(self) -> None: ...


class RawPoster:
    """HTTP/1.1 POST /v1/plans over one keep-alive asyncio connection: next to no client-side CPU."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            return await asyncio.wait_for(self._roundtrip(headers), REQUEST_TIMEOUT_S)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            await self.aclose()
            raise

    async def _roundtrip(self, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.reader is None or self.writer is None:
            raise OSError("not connected")
        extra = "".join(f"{name}: {value}\r\n" for name, value in {**AUTH, **headers}.items())
        head = (
            f"POST /v1/plans HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(SPEC_BODY)}\r\n{extra}\r\n"
        )
        self.writer.write(head.encode() + SPEC_BODY)
        response = await self.reader.readuntil(b"\r\n\r\n")
        lines = response.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if "content-length" not in fields:
            raise ValueError("response without Content-Length")
        body = await self.reader.readexactly(int(fields["content-length"]))
        if fields.get("connection", "").lower() == "close":
            await self.aclose()
        return status, body

    async def aclose(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


class HttpxPoster:
    """POST through a shared httpx.AsyncClient."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def post(self, headers: dict[str, str]) -> tuple[int, bytes]:
        try:
            headers = {"Content-Type": "application/json", **AUTH, **headers}
            response = await self.client.post("/v1/plans", content=SPEC_BODY, headers=headers)
        except httpx.TimeoutException as exc:
            raise TimeoutError(str(exc)) from None
        except httpx.HTTPError as exc:
            raise OSError(f"{type(exc).__name__}: {exc}") from None
        return response.status_code, response.content

    async def aclose(self) -> None:
        return None


@contextlib.asynccontextmanager
async def posters(kind: str, base_url: str, connections: int) -> AsyncIterator[Callable[[], Poster]]:
    """A factory of Posters: a new connection per poster (raw) or one pooled httpx client."""
    if kind == "raw":
        url = urlsplit(base_url)
        yield lambda: RawPoster(url.hostname or "127.0.0.1", url.port or 80)
        return
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        yield lambda: HttpxPoster(client)


# ----------------------------------------------------------------------------------------------- measurements


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Latency:
    """POSTs of one phase: latencies, answers, plan ids, and the CPU the client used."""

    ms: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    ids: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    client_cpu_s: float = 0.0

    def summary(self) -> dict[str, float]:
        values = sorted(self.ms)
        return {
            "n": len(values),
            "p50": percentile(values, 50),
            "p90": percentile(values, 90),
            "p99": percentile(values, 99),
            "max": values[-1] if values else math.nan,
            "rps": len(values) / self.wall_s if self.wall_s else math.nan,
        }

    async def post(self, poster: Poster, headers: dict[str, str] | None = None) -> str | None:
        """One timed POST; the plan id when the server answered with one."""
        started = time.perf_counter()
        try:
            status, body = await poster.post(headers or {})
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            self.statuses[type(exc).__name__] += 1
            return None
        self.ms.append((time.perf_counter() - started) * 1000)
        self.statuses[str(status)] += 1
        if status in (200, 202):
            plan_id = str(json.loads(body)["id"])
            self.ids.append(plan_id)
            return plan_id
        return None


async def post_latency(kind: str, base_url: str, clients: int, per_client: int, think_s: float = 0.0) -> Latency:
    """`clients` closed-loop clients, each sending `per_client` POSTs one after the other."""
    result = Latency()
    async with posters(kind, base_url, clients) as new_poster:

        async def one_client(seed: int) -> None:
            # Random pauses (exponential, mean think_s) after a random start: clients that all pause exactly
            # think_s stay in lock-step and hit the server in waves of `clients` requests.
            rng = random.Random(seed)
            poster = new_poster()
            try:
                if think_s:
                    await asyncio.sleep(rng.uniform(0, think_s))
                for i in range(per_client):
                    if think_s and i:
                        await asyncio.sleep(rng.expovariate(1 / think_s))
                    await result.post(poster)
            finally:
                await poster.aclose()

        cpu, started = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one_client(seed) for seed in range(clients)))
        result.wall_s = time.perf_counter() - started
        result.client_cpu_s = time.process_time() - cpu
    return result


async def submit_all(kind: str, base_url: str, keys: list[str]) -> tuple[Latency, dict[str, str]]:
    """One POST per key, all at once; the answers and the plan id answered for each key."""
    result = Latency()
    answered: dict[str, str] = {}
    async with posters(kind, base_url, len(keys)) as new_poster:

        async def one(key: str) -> None:
            poster = new_poster()
            try:
                plan_id = await result.post(poster, {"Idempotency-Key": key})
                if plan_id is not None:
                    answered[key] = plan_id
            finally:
                await poster.aclose()

        started = time.perf_counter()
        await asyncio.gather(*(one(key) for key in keys))
        result.wall_s = time.perf_counter() - started
    return result, answered


BUCKET = re.compile(r"^splan_http_request_duration_seconds_bucket\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


def post_histogram(base_url: str) -> dict[float, float]:
    """Cumulative bucket counts of POST /v1/plans answered 202, from the server's /metrics."""
    text = httpx.get(f"{base_url}/metrics", timeout=10.0).text
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        match = BUCKET.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        if labels.get("method") == "POST" and labels.get("route") == "/v1/plans" and labels.get("status") == "202":
            buckets[float(labels["le"])] = float(match["value"])
    return buckets


@dataclass
class ServerView:
    """The server's own latency histogram over one phase (one uvicorn process only)."""

    count: float
    within_target: float
    p99_bound_ms: float

    @classmethod
    def between(cls, before: dict[float, float], after: dict[float, float]) -> ServerView | None:
        diff = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
        count = diff.get(math.inf, 0.0)
        if not count:
            return None
        within = diff.get(P99_TARGET_MS / 1000, math.nan) / count
        bound = next((le for le, n in diff.items() if n >= 0.99 * count), math.inf)
        return cls(count, within, bound * 1000)


def cancel_queued(db_url: str) -> int:
    """Cancel the plans still queued so the next phase does not queue behind them."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        cur = conn.execute(
            "UPDATE plans SET status = 'canceled', finished_at = now(), updated_at = now(), lease_expires_at = NULL "
            "WHERE status = 'queued'"
        )
        return cur.rowcount


def wait_idle(db_url: str, broker: str, queue: str, check: Callable[[], None], timeout: float = 300.0) -> None:
    """Until no plan is queued or running and the worker's Redis queue is empty."""
    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(broker, socket_timeout=5)
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                check()
                row = conn.execute("SELECT count(*) FROM plans WHERE status IN ('queued', 'running')").fetchone()
                if (row[0] if row else 0) == 0 and client.llen(queue) == 0:
                    return
                time.sleep(0.25)
    finally:
        client.close()
    raise BenchError(f"the worker did not drain the queue within {timeout:g} s")


@dataclass
class Outcome:
    """What the database says about the plans of the burst phase."""

    submitted: int
    answered: int
    statuses: Counter[str]
    lost: int
    run_twice: int
    not_final: int
    rows_for_keys: int
    wall_s: float
    latency: dict[str, float] = field(default_factory=dict)
    replay_same: int = 0
    replay_answers: Counter[str] = field(default_factory=Counter)


def wait_final(
    db_url: str, answered: dict[str, str], submitted: int, started: float, timeout: float, check: Callable[[], None]
) -> Outcome:
    """Poll the plans table until every answered plan is final (or the timeout), then count."""
    ids = sorted(set(answered.values()))
    deadline = time.monotonic() + timeout
    with psycopg.connect(db_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            check()
            row = conn.execute(
                "SELECT count(*) FROM plans WHERE id = ANY(%s) AND status = ANY(%s)", (ids, list(FINAL))
            ).fetchone()
            if (row[0] if row else 0) >= len(ids):
                break
            time.sleep(0.2)
        wall_s = time.perf_counter() - started
        rows = conn.execute("SELECT id, status, attempt FROM plans WHERE id = ANY(%s)", (ids,)).fetchall()
    present = {plan_id for plan_id, _, _ in rows}
    return Outcome(
        submitted=submitted,
        answered=len(answered),
        statuses=Counter(str(status) for _, status, _ in rows),
        lost=len(set(ids) - present),
        run_twice=sum(1 for _, _, attempt in rows if attempt > 1),
        not_final=sum(1 for _, status, _ in rows if status not in FINAL),
        rows_for_keys=count_rows_for_keys(db_url, list(answered)),
        wall_s=wall_s,
    )


def count_rows_for_keys(db_url: str, keys: list[str]) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM plans WHERE idempotency_key = ANY(%s)", (keys,)).fetchone()
    return int(row[0]) if row else 0


# ----------------------------------------------------------------------------------------------- report


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def invoked_python() -> str:
    """The interpreter as the person would type it: relative to the working directory when under it."""
    path = Path(sys.executable)
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def fmt(value: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def answers(statuses: Counter[str]) -> str:
    return ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items())) or "none"


@dataclass
class Results:
    """Everything the report shows."""

    pg_version: str
    baseline: Latency | None
    load: Latency
    server_view: ServerView | None
    server_cpu_s: float
    canceled: int
    burst: Outcome
    load_before: float


def report(args: argparse.Namespace, results: Results) -> str:
    command = " ".join(shlex.quote(a) for a in [invoked_python(), *sys.argv])
    load, burst = results.load, results.burst
    s = load.summary()
    lines = [
        f"## API load in production mode ({dt.date.today().isoformat()})",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}, "
        f"PostgreSQL {results.pg_version}, Redis; `splan serve --workers {args.api_workers}`, "
        f"`splan worker` (concurrency {args.worker_concurrency}), the load client ({args.client}) and both "
        f"databases all on this machine; 1-minute load average before the run: {results.load_before:.2f} "
        "(anything else running shares the same cores).",
        "",
        "| measurement | value |",
        "|---|---:|",
    ]
    if results.baseline is not None:
        b = results.baseline.summary()
        lines.append(f"| POST /v1/plans, 1 client × {b['n']:.0f}: p50 / p99 ms | {fmt(b['p50'])} / {fmt(b['p99'])} |")
    think = f", random pauses of {args.think_ms:g} ms on average" if args.think_ms else ""
    verdict = "met" if s["p99"] < P99_TARGET_MS else "**missed**"
    lines += [
        f"| (a) POST /v1/plans, {args.clients} clients × {args.per_client}{think}: requests | {s['n']:.0f} |",
        f"| (a) p50 ms | {fmt(s['p50'])} |",
        f"| (a) p90 ms | {fmt(s['p90'])} |",
        f"| (a) p99 ms (target < {P99_TARGET_MS:g}) | {fmt(s['p99'])} ({verdict}) |",
        f"| (a) max ms | {fmt(s['max'])} |",
        f"| (a) throughput, requests/s | {fmt(s['rps'])} |",
        f"| (a) answers | {answers(load.statuses)} |",
    ]
    view = results.server_view
    if view is not None:
        lines += [
            f"| (a) server-side (/metrics): share ≤ {P99_TARGET_MS:g} ms | {fmt(100 * view.within_target)}% |",
            f"| (a) server-side (/metrics): p99 ≤ bucket bound, ms | {fmt(view.p99_bound_ms, 0)} |",
        ]
    lines += [
        f"| (a) CPU: API process / load client, % of one core | {fmt(100 * results.server_cpu_s / load.wall_s, 0)} / "
        f"{fmt(100 * load.client_cpu_s / load.wall_s, 0)} |",
        f"| plans left queued by warm-up, baseline and (a), canceled before (b) | {results.canceled} |",
        f"| (b) {burst.submitted} plans at once, own Idempotency-Key each: ids answered | {burst.answered} |",
        f"| (b) succeeded | {burst.statuses.get('succeeded', 0)} |",
        f"| (b) failed | {burst.statuses.get('failed', 0)} |",
        f"| (b) lost (id answered, no row) | {burst.lost} |",
        f"| (b) run twice (attempt > 1) | {burst.run_twice} |",
        f"| (b) not final at the timeout | {burst.not_final} |",
        f"| (b) POST p50 / p90 / p99 / max ms (p99 target ≤ {BURST_P99_TARGET_MS:g}) | {fmt(burst.latency['p50'])} / "
        f"{fmt(burst.latency['p90'])} / {fmt(burst.latency['p99'])} / {fmt(burst.latency['max'])} "
        f"({'met' if burst.latency['p99'] <= BURST_P99_TARGET_MS else '**missed**'}) |",
        f"| (b) wall time, first POST to all final, s | {burst.wall_s:.1f} |",
        f"| (b) replayed with the same keys: answered the same plan | {burst.replay_same} of {burst.answered} "
        f"({answers(burst.replay_answers)}) |",
        f"| (b) rows holding the {burst.answered} keys after the replay | {burst.rows_for_keys} |",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> str:
    splan = splan_executable()
    pg_version = check_services(args.pg_admin, args.broker)
    load_before = os.getloadavg()[0]
    token = uuid.uuid4().hex[:10]
    queue = f"splan-bench-{token}"
    logdir = Path(tempfile.mkdtemp(prefix="splan-bench-"))
    procs: list[Proc] = []
    try:
        with contextlib.ExitStack() as stack:
            db_url = stack.enter_context(fresh_database(args.pg_admin))
            # Registered after the database, so it runs first: serve and worker stop before the database is dropped.
            stack.callback(stop_all, procs)
            env = {
                **os.environ,
                "DATABASE_URL": db_url,
                "BROKER_URL": args.broker,
                "SPLAN_QUEUE_NAME": queue,
                "SPLAN_DATA_DIR": str(logdir),
                "SPLAN_WORKER_CONCURRENCY": str(args.worker_concurrency),
                "PYTHONUNBUFFERED": "1",
                # This checkout's service/ and workers/, even if the environment's install predates workers/.
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
            }
            upgrade = subprocess.run(
                [splan, "db", "upgrade"], env=env, capture_output=True, text=True, timeout=120, check=False
            )
            if upgrade.returncode != 0:
                raise BenchError(f"`splan db upgrade` failed ({upgrade.returncode}):\n{upgrade.stderr[-2000:]}")
            AUTH["Authorization"] = f"Bearer {bench_key(splan, env, token)}"
            port = free_port()
            base_url = f"http://127.0.0.1:{port}"
            worker = start("worker", [splan, "worker", "--loglevel", "INFO"], env, logdir)
            procs.append(worker)
            serve_argv = [
                splan,
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(args.api_workers),
            ]
            server = start("serve", serve_argv, env, logdir)
            procs.append(server)
            wait_ready(base_url, server, worker)

            def check() -> None:
                server.check_alive()
                worker.check_alive()

            print(f"ready: {base_url}, queue {queue}, logs in {logdir}", file=sys.stderr)
            if args.warmup:
                asyncio.run(post_latency(args.client, base_url, 1, args.warmup))
            baseline = asyncio.run(post_latency(args.client, base_url, 1, args.baseline)) if args.baseline else None
            canceled = cancel_queued(db_url)
            wait_idle(db_url, args.broker, queue, check)

            print(f"(a) {args.clients} clients × {args.per_client} POSTs ...", file=sys.stderr)
            histogram = post_histogram(base_url)
            server_cpu = process_tree_cpu_s(server.popen.pid)
            load = asyncio.run(post_latency(args.client, base_url, args.clients, args.per_client, args.think_ms / 1000))
            server_cpu = process_tree_cpu_s(server.popen.pid) - server_cpu
            # Each uvicorn worker process has its own registry: one scrape sees one process.
            view = ServerView.between(histogram, post_histogram(base_url)) if args.api_workers == 1 else None
            check()
            canceled += cancel_queued(db_url)
            wait_idle(db_url, args.broker, queue, check)

            print(f"(b) {args.plans} plans at once ...", file=sys.stderr)
            keys = [f"bench-{token}-{i}" for i in range(args.plans)]
            started = time.perf_counter()
            burst, answered = asyncio.run(submit_all(args.client, base_url, keys))
            outcome = wait_final(db_url, answered, args.plans, started, args.final_timeout, check)
            outcome.latency = burst.summary()
            replay, replayed = asyncio.run(submit_all(args.client, base_url, list(answered)))
            outcome.replay_same = sum(1 for key, plan_id in replayed.items() if answered[key] == plan_id)
            outcome.replay_answers = replay.statuses
            outcome.rows_for_keys = count_rows_for_keys(db_url, keys)
            if burst.statuses.keys() - {"202"}:
                print(f"warning: (b) answers {answers(burst.statuses)}", file=sys.stderr)
            check()
            results = Results(pg_version, baseline, load, view, server_cpu, canceled, outcome, load_before)
            return report(args, results)
    finally:
        stop_all(procs)
        with contextlib.suppress(redis.RedisError):
            client = redis.Redis.from_url(args.broker, socket_timeout=5)
            # The queue list and kombu's binding keys (_kombu.binding[_permanent].<queue>): only this run's names.
            client.delete(queue, *client.scan_iter(match=f"_kombu.binding*.{queue}"))
            client.close()
        for beat_file in Path(tempfile.gettempdir()).glob(f"splan-beat-{queue}*"):
            beat_file.unlink(missing_ok=True)
        if args.keep_logs:
            print(f"logs kept in {logdir}", file=sys.stderr)
        else:
            shutil.rmtree(logdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print(run(args))
    except BenchError as exc:
        print(f"api_load: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
