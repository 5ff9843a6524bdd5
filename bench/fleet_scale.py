"""Fleet planning at fleet scale (issue 17): 200 deployments of mixed models and SLOs on H100 + B200.

Usage: python -m bench.fleet_scale [--mode embedded|celery|both] [--jobs 2] [--workers 4] [--deployments 200]

The fleet (seeded): 200 deployments drawn from 3 models (Llama-3.1-8B bf16, Qwen3-32B fp8, Llama-3.1-70B fp8) x 3
SLO tiers x 2 request shapes, each with its own rate (0.5-30 req/s), on H100 SXM + B200 at the catalog's prices.
Deployments of one (model, shape, SLO) class share their candidate search on each GPU type: 18 classes x 2 types
= 36 searches. Each search is `splan plan` of that class, collocated, over the class's tp list, simulating the best
2 layouts by analytic bound and bisecting each one's rate (about a dozen simulations of up to 2,000 requests: the
sample repeated until arrivals span 2.5 request lifetimes).

embedded: `splan plan FLEET.json --jobs N --json` as a subprocess with an empty SQLite cache (SPLAN_DATA_DIR in a
temporary directory), timed from start to exit. celery: a throw-away PostgreSQL database, Redis database 7 on
its own queue, `splan worker --concurrency W` and `splan serve`; POST /v1/plans, timed until succeeded. Both then
re-plan twice, timed the same way: after one deployment's rate changes (nothing to search), and after one
deployment's SLO changes to a class of its own (its 2 searches run). Last, five fleets are planned from the cache
(catalog prices; the same with `mix_instances: false`, one strategy per deployment; both types at one price; B200
scarce; H100 at $3.00/h) and each plan's $/hour is printed beside the greedy rule's. cpu_s (embedded only) is the
CPU time of `splan plan` and its pool processes; mixed counts the deployments served by instances of several
strategies or GPU types.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg

REPO = Path(__file__).resolve().parents[1]
SPLAN = [sys.executable, "-m", "service.cli"]
PG_ADMIN = os.environ.get("SPLAN_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("SPLAN_BENCH_REDIS", "redis://127.0.0.1:6379/7")

MODELS: tuple[dict[str, Any], ...] = (
    {"model": "llama-3.1-8b", "weight_dtype": "bf16", "tp": [1]},
    {"model": "qwen3-32b", "weight_dtype": "fp8", "tp": [1, 2]},
    {"model": "llama-3.1-70b", "weight_dtype": "fp8", "tp": [1, 2, 4]},
)
SLO_TIERS: tuple[dict[str, Any], ...] = (
    {"ttft_ms": 500, "tpot_ms": 30},
    {"ttft_ms": 1000, "tpot_ms": 50},
    {"ttft_ms": 3000, "tpot_ms": 100},
)
SHAPES: tuple[dict[str, Any], ...] = ({"isl": 1024, "osl": 256}, {"isl": 4096, "osl": 256})


def make_fleet(count: int, *, seed: int = 17) -> dict[str, Any]:
    """The benchmark fleet: ``count`` deployments over the model x SLO x shape classes, each with its own rate."""
    rng = random.Random(seed)
    deployments: list[dict[str, Any]] = []
    for i in range(count):
        model = MODELS[i % len(MODELS)]
        slo = SLO_TIERS[(i // len(MODELS)) % len(SLO_TIERS)]
        shape = SHAPES[(i // (len(MODELS) * len(SLO_TIERS))) % len(SHAPES)]
        deployments.append(
            {
                "name": f"svc-{i:03d}",
                "model": model["model"],
                "weight_dtype": model["weight_dtype"],
                "workload": {"arrival": "poisson", **shape, "rate": round(rng.uniform(0.5, 30.0), 2)},
                "slo": dict(slo),
                "search": {"tp": model["tp"], "pp": [1], "requests": 100, "simulate_top": 2},
            }
        )
    return {"kind": "fleet", "gpus": {"h100-sxm": 4000, "b200": 4000}, "deployments": deployments}


def changed_rate(fleet: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(fleet)
    out["deployments"][7]["workload"]["rate"] = round(out["deployments"][7]["workload"]["rate"] * 1.5, 2)
    return out


def changed_slo(fleet: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(fleet)
    # A 70B deployment gets a TTFT target no other deployment has: its class is searched on both types.
    out["deployments"][2]["slo"] = {"ttft_ms": 1500, "tpot_ms": 60}
    return out


def fleets_for_cost(fleet: dict[str, Any], plan: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The fleets whose cost is compared with the greedy rule's: catalog prices, one price, B200 scarce."""
    one_price = {**fleet, "prices": {"h100-sxm": 7.0, "b200": 7.0}}
    b200_used = plan["gpus_used_by_type"].get("b200", 0)
    scarce = {**fleet, "gpus": {"h100-sxm": 4000, "b200": max(1, b200_used // 3)}}
    # A price override as a neocloud's H100 list might give (the catalog notes they are often 40-60% lower).
    cheap_h100 = {**fleet, "prices": {"h100-sxm": 3.00, "b200": 8.60}}
    return [
        ("catalog prices", fleet),
        ("catalog prices, one strategy each", {**fleet, "mix_instances": False}),
        ("one price for both", one_price),
        ("B200 scarce (1/3)", scarce),
        ("H100 at $3.00/h", cheap_h100),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(spec: dict[str, Any], *, jobs: int, env: dict[str, str], workdir: Path) -> tuple[float, dict[str, Any]]:
    path = workdir / f"fleet-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(spec))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [*SPLAN, "plan", str(path), "--jobs", str(jobs), "--json"], env=env, cwd=workdir, capture_output=True, text=True
    )
    wall_s = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    result = json.loads(done.stdout)
    # CPU of the CLI and its pool processes: the work, whatever else shares the machine.
    result["_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall_s, result


def embedded(fleet: dict[str, Any], jobs: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="splan-fleet-bench-") as tmp:
        workdir = Path(tmp)
        env = {**os.environ, "SPLAN_DATA_DIR": tmp, "PYTHONPATH": str(REPO)}
        env.pop("DATABASE_URL", None)
        env.pop("BROKER_URL", None)
        for label, spec in (
            ("cold", fleet),
            ("re-plan: one rate", changed_rate(fleet)),
            ("re-plan: one SLO", changed_slo(fleet)),
        ):
            wall_s, result = run_cli(spec, jobs=jobs, env=env, workdir=workdir)
            rows.append(row(f"embedded --jobs {jobs}", label, wall_s, result))
        for label, spec in fleets_for_cost(fleet, result):
            wall_s, result = run_cli(spec, jobs=jobs, env=env, workdir=workdir)
            rows.append(row(f"embedded --jobs {jobs}", f"cost: {label}", wall_s, result))
    return rows


@contextlib.contextmanager
def production(workers: int) -> Iterator[tuple[str, str]]:
    """A throw-away database, a worker with ``workers`` processes and the API; yields (base URL, database URL)."""
    name = f"splan_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database_url = f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"
    workdir = Path(tempfile.mkdtemp(prefix="splan-fleet-bench-"))
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "BROKER_URL": REDIS,
        "SPLAN_QUEUE_NAME": f"splan-bench-{uuid.uuid4().hex[:8]}",
        "SPLAN_REQUIRE_API_KEYS": "false",
        "PYTHONPATH": str(REPO),
    }
    subprocess.run([*SPLAN, "db", "upgrade"], env=env, cwd=workdir, check=True, capture_output=True)
    port = free_port()
    log = (workdir / "service.log").open("wb")
    worker = subprocess.Popen(
        [*SPLAN, "worker", "--concurrency", str(workers), "--loglevel", "WARNING"],
        env=env,
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = subprocess.Popen(
        [*SPLAN, "serve", "--port", str(port)], env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the API did not become ready")
            time.sleep(0.2)
        # Let the worker's processes start before the clock runs.
        time.sleep(5)
        yield base_url, database_url
    finally:
        api.terminate()
        os.killpg(worker.pid, signal.SIGTERM)
        for process in (api, worker):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_http(client: httpx.Client, spec: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    response = client.post("/v1/plans", json=spec)
    if response.status_code != 202:
        raise RuntimeError(response.text)
    plan_id = response.json()["id"]
    while True:
        plan = client.get(f"/v1/plans/{plan_id}").json()
        if plan["status"] in ("succeeded", "failed", "canceled"):
            break
        time.sleep(0.1)
    wall_s = time.perf_counter() - started
    if plan["status"] != "succeeded":
        raise RuntimeError(json.dumps(plan.get("error")))
    return wall_s, plan["result"]


def celery(fleet: dict[str, Any], workers: int) -> list[dict[str, Any]]:
    rows = []
    where = f"celery, {workers} workers"
    with production(workers) as (base_url, _), httpx.Client(base_url=base_url, timeout=30) as client:
        for label, spec in (
            ("cold", fleet),
            ("re-plan: one rate", changed_rate(fleet)),
            ("re-plan: one SLO", changed_slo(fleet)),
        ):
            wall_s, result = run_http(client, spec)
            rows.append(row(where, label, wall_s, result))
        for label, spec in fleets_for_cost(fleet, result):
            wall_s, result = run_http(client, spec)
            rows.append(row(where, f"cost: {label}", wall_s, result))
    return rows


def row(where: str, label: str, wall_s: float, result: dict[str, Any]) -> dict[str, Any]:
    searches = result["candidate_searches"]
    greedy = result["greedy"]
    return {
        "setup": where,
        "run": label,
        "deployments": len(result["deployments"]) + len(result["unmet"]),
        "searched": searches["total"] - searches["reused"],
        "reused": searches["reused"],
        "wall_s": wall_s,
        "cpu_s": result.get("_cpu_s"),
        "cost_per_hour_usd": result["cost_per_hour_usd"],
        "greedy_cost_per_hour_usd": greedy["cost_per_hour_usd"],
        "greedy_unserved": len(greedy["unserved"]),
        "mip_gap": result["solver"]["mip_gap"],
        "solve_s": result["solver"]["solve_s"],
        "unmet": len(result["unmet"]),
        "mixed": sum(1 for d in result["deployments"] if d.get("mixed")),
        "gpus": ", ".join(f"{t} {n}" for t, n in result["gpus_used_by_type"].items()),
    }


COLUMNS = (
    ("setup", "{}"),
    ("run", "{}"),
    ("deployments", "{}"),
    ("searched", "{}"),
    ("reused", "{}"),
    ("wall_s", "{:.1f}"),
    ("cpu_s", "{:.1f}"),
    ("cost_per_hour_usd", "{:.2f}"),
    ("greedy_cost_per_hour_usd", "{:.2f}"),
    ("greedy_unserved", "{}"),
    ("mip_gap", "{:.2e}"),
    ("solve_s", "{:.2f}"),
    ("unmet", "{}"),
    ("mixed", "{}"),
    ("gpus", "{}"),
)


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| " + " | ".join(name for name, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join("-" if r[name] is None else fmt.format(r[name]) for name, fmt in COLUMNS) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("embedded", "celery", "both"), default="both")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--deployments", type=int, default=200)
    args = parser.parse_args()
    fleet = make_fleet(args.deployments)
    print(f"# {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    rows: list[dict[str, Any]] = []
    if args.mode in ("embedded", "both"):
        rows += embedded(fleet, args.jobs)
    if args.mode in ("celery", "both"):
        rows += celery(fleet, args.workers)
    print_table(rows)
    print(f"# load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
