"""The production setup for real: PostgreSQL, Redis, a Celery worker process and the API under uvicorn on loopback.

Also the embedded default (`splan serve` with no settings: SQLite file, in-process plans) as a real process.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REDIS_URL, REPO, TEST_QUEUE_PREFIX
from tests.helpers import SPLAN, free_port, start_quiet, stop, wait_final, wait_ready
from tests.test_jobs import SPEC


@pytest.fixture(scope="module")
def production(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """`splan db upgrade`, `splan worker` and `splan serve` on the real PostgreSQL and Redis."""
    workdir = tmp_path_factory.mktemp("production")
    env = {
        **os.environ,
        "DATABASE_URL": postgres_url,
        "BROKER_URL": REDIS_URL,
        # The production set with keys is tested in tests/test_auth.py; these tests are about execution.
        "SPLAN_REQUIRE_API_KEYS": "false",
        "SPLAN_QUEUE_NAME": f"{TEST_QUEUE_PREFIX}{uuid.uuid4().hex[:8]}",
        "SPLAN_SWEEP_INTERVAL_S": "2",
        "PYTHONPATH": str(REPO),
    }
    subprocess.run([*SPLAN, "db", "upgrade"], env=env, cwd=workdir, check=True, capture_output=True)
    port = free_port()
    worker_log = (workdir / "worker.log").open("wb")
    api_log = (workdir / "api.log").open("wb")
    worker = subprocess.Popen(
        [*SPLAN, "worker", "--concurrency", "2"], env=env, cwd=workdir, stdout=worker_log, stderr=subprocess.STDOUT
    )
    api = subprocess.Popen(
        [*SPLAN, "serve", "--port", str(port)], env=env, cwd=workdir, stdout=api_log, stderr=subprocess.STDOUT
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, api)
        yield base_url, env
    finally:
        stop(api)
        stop(worker)
        worker_log.close()
        api_log.close()


def test_plan_over_http_runs_on_the_celery_worker(production: tuple[str, dict[str, str]]) -> None:
    base_url, _ = production
    with httpx.Client(base_url=base_url, timeout=30) as client:
        ready = client.get("/readyz").json()
        assert ready["checks"] == {"database": "ok", "broker": "ok"}
        response = client.post("/v1/plans", json=SPEC, headers={"Idempotency-Key": uuid.uuid4().hex})
        assert response.status_code == 202
        plan = wait_final(client, response.json()["id"])
        assert plan["status"] == "succeeded", plan
        assert plan["attempt"] == 1
        assert plan["result"]["strategies"][0]["goodput_rps"] > 0
        listed = client.get("/v1/plans", params={"status": "succeeded", "model": "llama-3.1-8b"}).json()
        assert plan["id"] in [p["id"] for p in listed["items"]]
        metrics = client.get("/metrics").text
        assert "splan_queue_depth" in metrics
        assert 'splan_plans{status="succeeded"}' in metrics


def test_a_plan_on_a_warm_prefix_cache_runs_on_the_worker_and_a_bad_flag_is_refused_at_the_door(
    production: tuple[str, dict[str, str]],
) -> None:
    base_url, _ = production
    workload = {**SPEC["workload"], "isl": 2048, "shared_prefix_tokens": 1536, "prefix_cache_warm": True}
    spec = {**SPEC, "workload": workload}
    with httpx.Client(base_url=base_url, timeout=30) as client:
        bad = {**spec, "workload": {**workload, "prefix_cache_warm": "maybe"}}
        refused = client.post("/v1/plans", json=bad, headers={"Idempotency-Key": uuid.uuid4().hex})
        assert refused.status_code == 422
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert "prefix_cache_warm" in refused.text
        response = client.post("/v1/plans", json=spec, headers={"Idempotency-Key": uuid.uuid4().hex})
        assert response.status_code == 202
        plan = wait_final(client, response.json()["id"])
        assert plan["status"] == "succeeded", plan
        assert plan["result"]["strategies"][0]["goodput_rps"] > 0


def test_cli_submit_wait_and_status(production: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    base_url, env = production
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    done = subprocess.run(
        [*SPLAN, "submit", str(spec_file), "--server", base_url, "--wait", "--timeout", "120", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    plan = json.loads(done.stdout)
    assert plan["status"] == "succeeded"
    status = subprocess.run(
        [*SPLAN, "status", plan["id"], "--server", base_url, "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(status.stdout)["id"] == plan["id"]
    missing = subprocess.run([*SPLAN, "status", "nope", "--server", base_url], env=env, capture_output=True, text=True)
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1
    assert "404" in missing.stderr


def test_cancel_over_http(production: tuple[str, dict[str, str]]) -> None:
    base_url, _ = production
    with httpx.Client(base_url=base_url, timeout=30) as client:
        plan_id = client.post("/v1/plans", json={**SPEC, "max_gpus": 1}).json()["id"]
        cancel = client.post(f"/v1/plans/{plan_id}/cancel")
        # Either canceled before it finished, or already succeeded (409): never both, never lost.
        final = wait_final(client, plan_id)
        assert (cancel.status_code, final["status"]) in ((200, "canceled"), (409, "succeeded"))


def test_plan_queued_without_a_worker_runs_once_one_starts(
    production: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    _, env = production
    env = {**env, "SPLAN_QUEUE_NAME": f"{TEST_QUEUE_PREFIX}{uuid.uuid4().hex[:8]}"}
    api, base_url = start_quiet(["serve"], env, tmp_path)
    worker = None
    try:
        wait_ready(base_url, api)
        with httpx.Client(base_url=base_url, timeout=30) as client:
            plan_id = client.post("/v1/plans", json=SPEC).json()["id"]
            time.sleep(1.0)
            assert client.get(f"/v1/plans/{plan_id}").json()["status"] == "queued"
            worker, _ = start_quiet(["worker", "--concurrency", "1"], env, tmp_path)
            plan = wait_final(client, plan_id)
            assert plan["status"] == "succeeded"
            assert plan["attempt"] == 1
    finally:
        stop(api)
        if worker is not None:
            stop(worker)


def test_embedded_serve_needs_nothing_else(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL")}
    env["PYTHONPATH"] = str(REPO)
    api, base_url = start_quiet(["serve"], env, tmp_path)
    try:
        wait_ready(base_url, api)
        with httpx.Client(base_url=base_url, timeout=30) as client:
            assert client.get("/readyz").json()["checks"] == {"database": "ok"}
            plan_id = client.post("/v1/plans", json=SPEC).json()["id"]
            assert wait_final(client, plan_id)["status"] == "succeeded"
    finally:
        stop(api)
    assert (tmp_path / "splan.db").exists()


def test_worker_refuses_to_start_without_a_broker(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL")}
    done = subprocess.run([*SPLAN, "worker"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "BROKER_URL" in done.stderr
    assert "Traceback" not in done.stderr


def test_concurrent_placements_never_share_gpus(production: tuple[str, dict[str, str]]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from service.catalog.loader import read_structured_file

    base_url, _ = production
    name = f"race-{uuid.uuid4().hex[:6]}"
    cluster = read_structured_file(REPO / "examples" / "cluster.yaml")
    with httpx.Client(base_url=base_url, timeout=30) as client:
        assert client.put(f"/v1/clusters/{name}", json=cluster).status_code == 201

    def one(_: int) -> list[tuple[str, int]]:
        body = {"cluster": name, "model": "llama-3.1-8b", "tp": 1, "allow_migration": False}
        with httpx.Client(base_url=base_url, timeout=30) as c:
            out = c.post("/v1/placements", json=body).json()
        return [(p["server"], g) for p in out.get("placements", []) for g in p["gpu_ids"]]

    with ThreadPoolExecutor(max_workers=12) as pool:
        claims = [gpu for result in pool.map(one, range(24)) for gpu in result]
    assert claims, "no placement succeeded"
    assert len(claims) == len(set(claims)), "two placements got the same GPU"


def test_many_concurrent_replays_do_not_exhaust_the_pool(production: tuple[str, dict[str, str]]) -> None:
    import asyncio

    base_url, _ = production
    key = uuid.uuid4().hex
    with httpx.Client(base_url=base_url, timeout=30) as client:
        first = client.post("/v1/plans", json=SPEC, headers={"Idempotency-Key": key}).json()["id"]

    async def replay_all() -> list[tuple[int, str]]:
        limits = httpx.Limits(max_connections=250)
        async with httpx.AsyncClient(base_url=base_url, timeout=25, limits=limits) as c:
            responses = await asyncio.gather(
                *(c.post("/v1/plans", json=SPEC, headers={"Idempotency-Key": key}) for _ in range(200))
            )
        return [(r.status_code, r.json().get("id", "")) for r in responses]

    # Far more requests in flight than request threads plus pooled connections.
    assert asyncio.run(replay_all()) == [(200, first)] * 200


def test_a_burst_of_submissions_is_stored_together_and_each_plan_runs_once(
    production: tuple[str, dict[str, str]],
) -> None:
    """Concurrent POSTs share a group commit and reach the workers through one batch message; each runs once."""
    import asyncio

    base_url, _ = production
    specs = [{**SPEC, "search": {**SPEC["search"], "requests": 40 + i}} for i in range(6)]

    async def submit_all() -> list[tuple[int, str]]:
        async with httpx.AsyncClient(base_url=base_url, timeout=25) as c:
            responses = await asyncio.gather(
                *(c.post("/v1/plans", json=spec, headers={"Idempotency-Key": uuid.uuid4().hex}) for spec in specs)
            )
        return [(r.status_code, r.json()["id"]) for r in responses]

    answered = asyncio.run(submit_all())
    assert [status for status, _ in answered] == [202] * len(specs)
    with httpx.Client(base_url=base_url, timeout=30) as client:
        finals = [wait_final(client, plan_id) for _, plan_id in answered]
    assert [(p["status"], p["attempt"]) for p in finals] == [("succeeded", 1)] * len(specs)


MOE_SEARCH: dict[str, object] = {"modes": ["collocated"], "tp": [1, 2, 4, 8], "pp": [1], "attention_dp": [1, 2, 4, 8]}
MOE_SPEC = {
    "model": "qwen3-235b-a22b",
    "gpu": "h100-sxm",
    "max_gpus": 8,
    "engine": "sglang",
    "weight_dtype": "fp8",
    "workload": {"arrival": "poisson", "isl": 512, "osl": 64},
    "slo": {"ttft_ms": 2000, "tpot_ms": 100},
    "search": MOE_SEARCH,
}


def test_moe_plan_with_attention_dp_and_ep_runs_on_the_celery_worker(production: tuple[str, dict[str, str]]) -> None:
    base_url, _ = production
    with httpx.Client(base_url=base_url, timeout=30) as client:
        refused = client.post("/v1/plans", json={**MOE_SPEC, "search": {**MOE_SEARCH, "moe_ep": [3]}})
        assert refused.status_code == 422
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert "no parallel layout" in refused.json()["detail"]
        response = client.post("/v1/plans", json=MOE_SPEC)
        assert response.status_code == 202
        plan = wait_final(client, response.json()["id"])
        assert plan["status"] == "succeeded", plan
        layouts = [s["layout"] for s in plan["result"]["strategies"]]
        assert any(layout["attention_dp"] > 1 and layout["moe_ep"] > 1 for layout in layouts)
        for layout in layouts:
            assert layout["tp"] * layout["attention_dp"] == layout["moe_tp"] * layout["moe_ep"]


def test_fleet_candidate_searches_fan_out_over_the_workers_and_are_reused(
    production: tuple[str, dict[str, str]],
) -> None:
    import psycopg

    base_url, env = production
    fleet = {
        "kind": "fleet",
        "gpus": {"l40s": 16},
        "deployments": [
            {
                "name": f"d{ttft_ms}",
                "model": "llama-3.1-8b",
                "workload": {"isl": 512, "osl": 64, "rate": 2.0},
                "slo": {"ttft_ms": ttft_ms, "tpot_ms": 60},
                "search": {"tp": [1], "pp": [1], "requests": 40, "simulate_top": 1},
            }
            for ttft_ms in (700, 800, 900, 1000)
        ],
    }
    with httpx.Client(base_url=base_url, timeout=30) as client:
        first = wait_final(client, client.post("/v1/plans", json=fleet).json()["id"])
        assert first["status"] == "succeeded", first
        assert first["result"]["candidate_searches"] == {"total": 4, "reused": 0}
        assert first["result"]["all_slos_met"]
        with psycopg.connect(env["DATABASE_URL"]) as conn:
            rows = conn.execute("SELECT status, worker FROM fleet_candidates").fetchall()
        assert len(rows) == 4
        assert {status for status, _ in rows} == {"done"}
        # The plan's own process and at least one other worker process each searched a part.
        assert len({worker for _, worker in rows}) >= 2
        again = wait_final(client, client.post("/v1/plans", json=fleet).json()["id"])
        assert again["result"]["candidate_searches"] == {"total": 4, "reused": 4}
        assert again["result"]["deployments"] == first["result"]["deployments"]


def test_a_killed_workers_plan_is_rerun_within_fifteen_seconds(postgres_url: str, tmp_path: Path) -> None:
    import signal

    from tests.test_jobs import SLOW_SPEC

    # Default lease, heartbeat and sweep settings: the figure the README promises is the one tested.
    env = {
        **os.environ,
        "DATABASE_URL": postgres_url,
        "BROKER_URL": REDIS_URL,
        # The production set with keys is tested in tests/test_auth.py; these tests are about execution.
        "SPLAN_REQUIRE_API_KEYS": "false",
        "SPLAN_QUEUE_NAME": f"{TEST_QUEUE_PREFIX}{uuid.uuid4().hex[:8]}",
        "PYTHONPATH": str(REPO),
    }
    subprocess.run([*SPLAN, "db", "upgrade"], env=env, cwd=tmp_path, check=True, capture_output=True)

    def start_worker() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [*SPLAN, "worker", "--concurrency", "1"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: the kill takes the pool's children too
        )

    first = start_worker()
    api, base_url = start_quiet(["serve"], env, tmp_path)
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_ready(base_url, api)
        with httpx.Client(base_url=base_url, timeout=30) as client:
            plan_id = client.post("/v1/plans", json=SLOW_SPEC).json()["id"]
            deadline = time.monotonic() + 60
            while client.get(f"/v1/plans/{plan_id}").json()["status"] != "running":
                assert time.monotonic() < deadline, "the plan never started"
                time.sleep(0.1)
            os.killpg(first.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            second = start_worker()
            while True:
                plan = client.get(f"/v1/plans/{plan_id}").json()
                if plan["attempt"] >= 2:
                    break
                assert time.monotonic() - killed_at < 30, plan
                time.sleep(0.2)
            rerun_after_s = time.monotonic() - killed_at
            final = wait_final(client, plan_id)
        assert rerun_after_s <= 15.0
        assert final["status"] == "succeeded"
        assert final["attempt"] == 2
    finally:
        for process in (api, first, second):
            if process is not None and process.poll() is None:
                stop(process)
