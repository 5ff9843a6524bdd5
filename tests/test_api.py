"""The HTTP API in embedded mode (SQLite file, plans in-process): contract, errors, idempotency, paging."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from tests.conftest import migrated_settings
from tests.helpers import wait_final
from tests.test_jobs import SPEC

PROBLEM = "application/problem+json"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = migrated_settings(f"sqlite:///{tmp_path / 'api.db'}", tmp_path, max_body_bytes=4096)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    return body


def test_submit_then_read_the_result(client: TestClient) -> None:
    response = client.post("/v1/plans", json=SPEC)
    assert response.status_code == 202
    plan = response.json()
    assert response.headers["location"] == f"/v1/plans/{plan['id']}"
    assert plan["status"] in ("queued", "running", "succeeded")
    done = wait_final(client, plan["id"])
    assert done["status"] == "succeeded", done
    strategies = done["result"]["strategies"]
    assert strategies[0]["mode"] == "collocated"
    assert strategies[0]["goodput_rps"] > 0
    assert done["progress"]["done"] == done["progress"]["total"]
    assert done["started_at"]
    assert done["finished_at"]


def test_idempotency_key(client: TestClient) -> None:
    first = client.post("/v1/plans", json=SPEC, headers={"Idempotency-Key": "abc"})
    again = client.post("/v1/plans", json=SPEC, headers={"Idempotency-Key": "abc"})
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = client.post("/v1/plans", json={**SPEC, "max_gpus": 4}, headers={"Idempotency-Key": "abc"})
    assert "Idempotency-Key" in assert_problem(other, 422)["detail"]


def test_list_paginates_newest_first_and_filters(client: TestClient) -> None:
    ids = [client.post("/v1/plans", json=SPEC).json()["id"] for _ in range(3)]
    page = client.get("/v1/plans", params={"limit": 2}).json()
    assert [p["id"] for p in page["items"]] == ids[::-1][:2]
    rest = client.get("/v1/plans", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [p["id"] for p in rest["items"]] == ids[:1]
    assert rest["next_cursor"] is None
    assert client.get("/v1/plans", params={"model": "qwen3-32b"}).json()["items"] == []
    assert_problem(client.get("/v1/plans", params={"cursor": "garbage"}), 422)
    assert_problem(client.get("/v1/plans", params={"status": "sleeping"}), 422)


def test_cancel(client: TestClient) -> None:
    plan_id = client.post("/v1/plans", json=SPEC).json()["id"]
    done = wait_final(client, plan_id)
    assert done["status"] == "succeeded"
    assert "already succeeded" in assert_problem(client.post(f"/v1/plans/{plan_id}/cancel"), 409)["detail"]
    assert_problem(client.post("/v1/plans/not-a-plan/cancel"), 404)


def test_bad_input_is_a_problem_never_a_500(client: TestClient) -> None:
    assert_problem(client.get("/v1/plans/unknown"), 404)
    assert "gpu" in assert_problem(client.post("/v1/plans", json={"model": "llama-3.1-8b"}), 422)["detail"]
    assert (
        "JSON"
        in assert_problem(
            client.post("/v1/plans", content=b"{nope", headers={"content-type": "application/json"}), 422
        )["detail"]
    )
    unknown = assert_problem(client.post("/v1/plans", json={**SPEC, "model": "gpt-17"}), 422)
    assert "unknown model" in unknown["detail"]
    negative = {**SPEC, "workload": {**SPEC["workload"], "rate": -1}}
    assert_problem(client.post("/v1/plans", json=negative), 422)
    assert_problem(client.post("/v1/plans", json={**SPEC, "model_config": "/etc/passwd"}), 422)
    big = client.post("/v1/plans", content=b"{" + b" " * 5000 + b"}", headers={"content-type": "application/json"})
    assert "4096" in assert_problem(big, 413)["detail"]
    assert_problem(client.get("/v2/nothing"), 404)
    assert_problem(client.delete("/v1/plans"), 405)


def test_search_space_limit(client: TestClient) -> None:
    tokens = [512, 1024, 2048, 4096, 8192, 12288, 16384, 24576, 32768, 65536]
    search = {"tp": [1, 2, 4, 8], "pp": [1, 2, 4, 8, 16, 32], "max_batched_tokens": tokens, "requests": 40}
    huge = {**SPEC, "max_gpus": 4096, "search": search}
    body = assert_problem(client.post("/v1/plans", json=huge), 422)
    assert body["limit"] == 5000
    assert body["search_space"] > 5000
    assert str(body["search_space"]) in body["detail"]
    assert client.get("/v1/plans").json()["items"] == []


def test_estimate(client: TestClient) -> None:
    body = {"model": "llama-3.1-8b", "gpu": "h100-sxm", "isl": 1024, "osl": 128, "concurrency": 8}
    response = client.post("/v1/estimates", json=body)
    assert response.status_code == 200
    out = response.json()
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        assert set(out[key]) >= {"mean", "p50", "p90", "p99"}
    assert out["throughput"]["requests_per_s"] > 0
    assert_problem(client.post("/v1/estimates", json={**body, "requests": 10**6}), 422)
    assert "divide" in assert_problem(client.post("/v1/estimates", json={**body, "tp": 3}), 422)["detail"]


def test_catalog_and_health(client: TestClient) -> None:
    assert "llama-3.1-70b" in client.get("/v1/catalog/models").json()
    assert client.get("/v1/catalog/gpus").json()["h100-sxm"]["gpus_per_node"] == 8
    assert "vllm" in client.get("/v1/catalog/engines").json()
    assert client.get("/livez").json()["status"] == "ok"
    assert client.get("/readyz").json()["checks"] == {"database": "ok"}


def test_metrics(client: TestClient) -> None:
    wait_final(client, client.post("/v1/plans", json=SPEC).json()["id"])
    text = client.get("/metrics").text
    assert 'splan_plans{status="succeeded"} 1.0' in text
    assert "splan_http_request_duration_seconds_bucket" in text
    assert 'route="/v1/plans/{plan_id}"' in text
    assert "splan_plan_run_seconds_count 1.0" in text
    assert "splan_queue_depth" in text


def test_report_and_launch_files_of_a_finished_plan(client: TestClient) -> None:
    plan_id = client.post("/v1/plans", json=SPEC).json()["id"]
    done = wait_final(client, plan_id)
    assert done["status"] == "succeeded", done
    report = client.get(f"/v1/plans/{plan_id}/report")
    assert report.status_code == 200
    assert report.headers["content-type"].startswith("text/html")
    page = report.text
    assert done["result"]["strategies"][0]["label"] in page
    assert page.count("<svg") >= 4
    assert "https://" not in page
    assert "http://" not in page.replace("http://www.w3.org", "")
    launch = client.get(f"/v1/plans/{plan_id}/launch", params={"engine": "vllm"})
    assert launch.status_code == 200, launch.text
    body = launch.json()
    assert body["strategy"] == done["result"]["strategies"][0]["label"]
    assert any(path.startswith("vllm/") for path in body["files"])
    assert not any(path.startswith(("sglang/", "trtllm/")) for path in body["files"])
    assert "vllm serve" in "".join(body["files"].values())
    assert_problem(client.get(f"/v1/plans/{plan_id}/launch", params={"strategy": 999}), 422)
    assert_problem(client.get(f"/v1/plans/{plan_id}/launch", params={"engine": "tgi"}), 422)
    assert_problem(client.get("/v1/plans/nope/report"), 404)


def test_estimate_with_speculative_decoding(client: TestClient) -> None:
    body = {"model": "llama-3.1-8b", "gpu": "h100-sxm", "isl": 512, "osl": 64, "concurrency": 1, "requests": 8}
    plain = client.post("/v1/estimates", json=body).json()["tpot_ms"]["mean"]
    speculative = {"method": "eagle", "draft_tokens": 2, "acceptance_length": 2.5}
    drafted = client.post("/v1/estimates", json={**body, "speculative": speculative}).json()["tpot_ms"]["mean"]
    assert plain / 2.5 < drafted < plain
    too_long = {**speculative, "acceptance_length": 3.5}
    problem = assert_problem(client.post("/v1/estimates", json={**body, "speculative": too_long}), 422)
    assert "speculative" in json.dumps(problem)
    assert "draft_tokens + 1 = 3" in json.dumps(problem)
