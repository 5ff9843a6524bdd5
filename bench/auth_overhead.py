"""Issue 14: the cross-tenant matrix (operations x refused) and the per-request cost of an API key.

Usage: python -m bench.auth_overhead [--requests 400] [--backend sqlite|postgresql|both]

For each backend (a SQLite file in a temporary directory; a throw-away PostgreSQL database next to `postgres`
on $SPLAN_TEST_PG_ADMIN) it applies the migrations, issues admin keys for two tenants, stores tenant A's cluster
and a finished and a queued plan of A, then:

  (a) runs every operation that reaches a tenant's resource with tenant B's key and with A's key, and prints the
      status each got (refused = B got 404 and A's plan and cluster are unchanged afterwards);
  (b) times GET /v1/plans/{id} (one finished plan of the default tenant) in-process through one ASGI app in the
      keyless mode: without a key, and with a Bearer key of that tenant (checked as in production), alternating
      in blocks of 20 so that drift hits both;
      and times service.auth.authenticate (one indexed key lookup + SHA-256 + constant-time compare) alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.auth import authenticate
from service.db.session import make_engine, make_session_factory
from tests.conftest import PG_ADMIN_URL, migrated_settings
from tests.helpers import wait_final
from tests.test_jobs import SPEC
from tests.test_placement_api import CLUSTER
from tests.test_tenants import Tenants, cross_tenant_operations, issue, queued_plan


@contextmanager
def database(backend: str, workdir: Path) -> Iterator[str]:
    """A database URL for the backend, removed afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{workdir / 'bench.db'}"
        return
    name = f"splan_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def percentile_ms(samples_s: list[float], q: float) -> float:
    """The q-quantile (nearest rank) in milliseconds."""
    ordered = sorted(samples_s)
    return 1000 * ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def run_backend(backend: str, requests: int) -> None:
    """Print the matrix and the overhead for one backend."""
    with tempfile.TemporaryDirectory() as tmp, database(backend, Path(tmp)) as url:
        settings = migrated_settings(url, Path(tmp), require_api_keys=True)
        headers_a, headers_b = issue(settings, "acme"), issue(settings, "globex")
        with TestClient(create_app(settings)) as client:
            client.put("/v1/clusters/demo", json=CLUSTER, headers=headers_a).raise_for_status()
            plan_id = client.post("/v1/plans", json=SPEC, headers=headers_a).json()["id"]
            client.headers.update(headers_a)
            assert wait_final(client, plan_id)["status"] == "succeeded"
            client.headers.clear()
            t = Tenants(client, settings, headers_a, headers_b, plan_id, queued_plan(settings, "acme"))
            cluster_before = client.get("/v1/clusters/demo", headers=headers_a).json()
            rows = []
            for label, method, path, body in cross_tenant_operations(t):
                other = client.request(method, path, json=body, headers=headers_b).status_code
                rows.append((label, method, path, other))
            unchanged = (
                client.get("/v1/clusters/demo", headers=headers_a).json() == cluster_before
                and client.get(f"/v1/plans/{t.running_plan}", headers=headers_a).json()["status"] == "queued"
            )
            listed = client.get("/v1/plans", headers=headers_b).json()["items"]
            print(f"\n[{backend}] cross-tenant matrix (tenant B's admin key on tenant A's resources)")
            print("| operation | request | B's status | A's status | refused |")
            print("|---|---|---:|---:|---|")
            for label, method, path, other in rows:
                body = next(b for lab, _m, _p, b in cross_tenant_operations(t) if lab == label)
                owner = client.request(method, path, json=body, headers=headers_a).status_code
                print(f"| {label} | {method} {path} | {other} | {owner} | {'yes' if other == 404 else 'NO'} |")
            leaked = [p["id"] for p in listed if p["id"] in (plan_id, t.running_plan)]
            verdict = "yes" if not leaked else "NO"
            print(f"| list plans | GET /v1/plans | 200, {len(leaked)} of A's plans | 200 | {verdict} |")
            print(f"A's plan and cluster unchanged after B's requests: {unchanged}")
            refused = sum(1 for *_x, other in rows if other == 404) + (not leaked)
            print(f"refused: {refused} of {len(rows) + 1}")

            # One app, one plan: the only difference between the modes is the key check (a keyless-mode server
            # still checks a key that is sent, and acts as its tenant).
            keyless = settings.model_copy(update={"require_api_keys": False})
            headers_local = issue(settings, "local")
            with TestClient(create_app(keyless)) as app_client:
                local_plan = app_client.post("/v1/plans", json=SPEC).json()["id"]
                wait_final(app_client, local_plan)
                timings: dict[str, list[float]] = {"keyless": [], "bearer key": []}
                block_deltas: list[float] = []
                for block in range(requests // 20):
                    block_medians: dict[str, float] = {}
                    for mode in ("keyless", "bearer key") if block % 2 == 0 else ("bearer key", "keyless"):
                        headers = headers_local if mode == "bearer key" else {}
                        samples = []
                        for _ in range(20):
                            started = time.perf_counter()
                            response = app_client.get(f"/v1/plans/{local_plan}", headers=headers)
                            samples.append(time.perf_counter() - started)
                            assert response.status_code == 200
                        timings[mode] += samples
                        block_medians[mode] = statistics.median(samples)
                    block_deltas.append(block_medians["bearer key"] - block_medians["keyless"])
            token = headers_a["Authorization"].removeprefix("Bearer ")
            engine = make_engine(settings)
            lookups: list[float] = []
            with make_session_factory(engine)() as session:
                for _ in range(requests):
                    started = time.perf_counter()
                    assert authenticate(session, token) is not None
                    lookups.append(time.perf_counter() - started)
            engine.dispose()
            print(f"\n[{backend}] GET /v1/plans/{{id}} in-process, {requests} requests per mode")
            print("| mode | median (ms) | p95 (ms) | mean (ms) |")
            print("|---|---:|---:|---:|")
            for mode, samples in timings.items():
                print(
                    f"| {mode} | {percentile_ms(samples, 0.5):.2f} | {percentile_ms(samples, 0.95):.2f} | "
                    f"{1000 * statistics.fmean(samples):.2f} |"
                )
            print(
                f"| authenticate() alone | {percentile_ms(lookups, 0.5):.2f} | {percentile_ms(lookups, 0.95):.2f} | "
                f"{1000 * statistics.fmean(lookups):.2f} |"
            )
            delta = percentile_ms(timings["bearer key"], 0.5) - percentile_ms(timings["keyless"], 0.5)
            paired = 1000 * statistics.median(block_deltas)
            print(
                f"auth overhead per request: median bearer - median keyless {delta:.2f} ms; median over "
                f"{len(block_deltas)} adjacent block pairs {paired:.2f} ms"
            )


def main() -> None:
    """Parse the arguments and run the chosen backends."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="timed requests per mode")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    args = parser.parse_args()
    print(f"date {dt.datetime.now(dt.UTC).date()}  cpus {os.cpu_count()}")
    for backend in ("sqlite", "postgresql") if args.backend == "both" else (args.backend,):
        run_backend(backend, args.requests)


if __name__ == "__main__":
    main()
