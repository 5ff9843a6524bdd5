"""Clusters, placements and fleet plans over HTTP (embedded mode): versions, conflicts, reservations, errors."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.catalog.loader import read_structured_file
from tests.conftest import REPO, migrated_settings
from tests.helpers import wait_final
from tests.test_api import assert_problem

CLUSTER: dict[str, Any] = read_structured_file(REPO / "examples" / "cluster.yaml")


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = migrated_settings(f"sqlite:///{tmp_path / 'api.db'}", tmp_path)
    with TestClient(create_app(settings)) as test_client:
        assert test_client.put("/v1/clusters/demo", json=CLUSTER).status_code == 201
        yield test_client


def place(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/placements", json={"cluster": "demo", **body})
    assert response.status_code == 200, response.text
    out: dict[str, Any] = response.json()
    return out


def test_put_get_and_stale_writes(client: TestClient) -> None:
    got = client.get("/v1/clusters/demo")
    assert got.headers["etag"] == '"1"'
    assert got.json()["version"] == 1
    again = client.put("/v1/clusters/demo", json=CLUSTER, headers={"If-Match": '"1"'})
    assert again.status_code == 200
    assert again.json()["version"] == 2
    stale = assert_problem(client.put("/v1/clusters/demo", json=CLUSTER, headers={"If-Match": '"1"'}), 409)
    assert stale["current_version"] == 2
    assert_problem(client.get("/v1/clusters/missing"), 404)
    broken = copy.deepcopy(CLUSTER)
    broken["servers"][0]["gpus"][0]["id"] = 1
    assert_problem(client.put("/v1/clusters/demo", json=broken), 422)
    assert client.get("/v1/clusters/demo").json()["version"] == 2


def test_events_apply_in_order_or_not_at_all(client: TestClient) -> None:
    events = [
        {"type": "checkpoint_cached", "server": "node-c", "tier": "dram", "model": "qwen3-32b"},
        {"type": "instance_stopped", "id": "nope"},
    ]
    bad = assert_problem(client.post("/v1/clusters/demo/events", json={"events": events}), 422)
    assert "event 1" in bad["detail"]
    assert "nope" in bad["detail"]
    assert client.get("/v1/clusters/demo").json()["version"] == 1
    ok = client.post("/v1/clusters/demo/events", json={"events": events[:1]}, headers={"If-Match": '"1"'})
    assert ok.status_code == 200
    state = client.get("/v1/clusters/demo").json()["state"]
    node_c = next(s for s in state["servers"] if s["name"] == "node-c")
    assert "qwen3-32b" in next(t for t in node_c["tiers"] if t["kind"] == "dram")["checkpoints"]
    assert_problem(client.post("/v1/clusters/demo/events", json={"events": events[:1]}, headers={"If-Match": "1"}), 409)
    assert_problem(client.post("/v1/clusters/missing/events", json={"events": events[:1]}), 404)


def test_dry_run_ranks_and_reserves_nothing(client: TestClient) -> None:
    out = place(client, model="llama-3.1-70b", tp=4, dry_run=True)
    assert out["dry_run"]
    assert out["reservation_ids"] == []
    candidates = out["candidates"]
    latencies = [c["startup_latency_s"] for c in candidates]
    assert latencies == sorted(latencies)
    best = candidates[0]
    assert best["tier"] == "dram"
    assert set(best["load"]) >= {"queue_wait_s", "transfer_s", "tier"}
    assert client.get("/v1/clusters/demo").json()["version"] == 1


def test_reservations_never_hand_out_the_same_gpus(client: TestClient) -> None:
    taken: set[tuple[str, int]] = set()
    for _ in range(6):
        out = place(client, model="llama-3.1-8b", tp=1, allow_migration=False)
        if not out["placements"]:
            assert out["unplaced_reason"]
            break
        chosen = out["placements"][0]
        gpus = {(chosen["server"], g) for g in chosen["gpu_ids"]}
        assert not gpus & taken
        taken |= gpus
        assert out["reservation_ids"]
    state = client.get("/v1/clusters/demo").json()["state"]
    assert len(state["reservations"]) == len(taken)


def test_placement_errors(client: TestClient) -> None:
    assert_problem(client.post("/v1/placements", json={"cluster": "missing", "model": "llama-3.1-8b"}), 404)
    assert (
        "unknown model"
        in assert_problem(client.post("/v1/placements", json={"cluster": "demo", "model": "x"}), 422)["detail"]
    )
    assert_problem(client.post("/v1/placements", json={"cluster": "demo", "model": "llama-3.1-8b", "tp": 0}), 422)
    huge = place(client, model="llama-3.1-405b", tp=8, gpu_type="h100-sxm", dry_run=True)
    assert huge["placements"] == []
    assert huge["unplaced_reason"]
    assert huge["excluded"]


def test_fleet_plan_sizes_and_places_every_deployment(client: TestClient) -> None:
    fleet = {
        "kind": "fleet",
        "cluster": "demo",
        "deployments": [
            {
                "name": "chat",
                "model": "llama-3.1-8b",
                "workload": {"arrival": "poisson", "isl": 1024, "osl": 256, "rate": 20},
                "slo": {"ttft_ms": 500, "tpot_ms": 40},
                "search": {"tp": [1, 2], "pp": [1], "requests": 60},
            },
            {
                "name": "impossible",
                "model": "llama-3.1-70b",
                "workload": {"arrival": "poisson", "isl": 2048, "osl": 256, "rate": 3},
                "slo": {"ttft_ms": 5, "tpot_ms": 1},
                "search": {"tp": [4], "pp": [1], "requests": 40},
            },
        ],
    }
    response = client.post("/v1/plans", json=fleet)
    assert response.status_code == 202, response.text
    plan = wait_final(client, response.json()["id"], timeout_s=120)
    assert plan["status"] == "succeeded", plan
    result = plan["result"]
    chat = result["deployments"][0]
    assert chat["name"] == "chat"
    assert chat["placed"]
    assert chat["capacity_rps"] == pytest.approx(
        sum(o["instances"] * o["goodput_per_instance_rps"] for o in chat["options"])
    )
    assert chat["capacity_rps"] >= 20
    assert all(i["server"] for i in chat["instances_placed"])
    assert [u["name"] for u in result["unmet"]] == ["impossible"]
    assert not result["all_slos_met"]
    assert_problem(client.post("/v1/plans", json={**fleet, "cluster": "nope"}), 422)
    assert_problem(client.post("/v1/plans", json={**fleet, "gpus": {"h100-sxm": 8}}), 422)


def test_placement_metrics(client: TestClient) -> None:
    place(client, model="llama-3.1-8b", tp=1)
    text = client.get("/metrics").text
    assert "splan_placement_duration_seconds_count 1.0" in text
    assert "splan_placement_decisions_total{tier=" in text


def test_instance_started_confirms_a_held_placement(client: TestClient) -> None:
    out = place(client, model="llama-3.1-8b", tp=1, allow_migration=False)
    chosen = out["placements"][0]
    started = {
        "type": "instance_started",
        "id": "new-8b",
        "model": "llama-3.1-8b",
        "server": chosen["server"],
        "gpu_ids": chosen["gpu_ids"],
    }
    response = client.post("/v1/clusters/demo/events", json={"events": [started]})
    assert response.status_code == 200, response.text
    state = client.get("/v1/clusters/demo").json()["state"]
    assert "new-8b" in {i["id"] for i in state["instances"]}
    assert out["reservation_ids"][0] not in {r["id"] for r in state["reservations"]}
    # A GPU held for another checkpoint cannot be started with a different model.
    held = place(client, model="qwen3-32b", tp=1, allow_migration=False)["placements"][0]
    other = {**started, "id": "intruder", "server": held["server"], "gpu_ids": held["gpu_ids"]}
    assert_problem(client.post("/v1/clusters/demo/events", json={"events": [other]}), 422)


def test_prewarm_advice_over_http(client: TestClient) -> None:
    models = [
        {"model": "qwen3-32b", "tp": 2, "rate_per_s": 0.05},
        {"model": "mixtral-8x7b", "tp": 2, "rate_per_s": 0.01},
    ]
    response = client.post("/v1/placements/prewarm", json={"cluster": "demo", "models": models})
    assert response.status_code == 200, response.text
    advice = response.json()
    assert advice["cluster_version"] == 1
    assert advice["copies"]
    assert {k["checkpoint"] for k in advice["keep_alive"]} == {"qwen3-32b", "mixtral-8x7b"}
    assert advice["expected_cold_start_s_after"] <= advice["expected_cold_start_s_before"]
    assert_problem(client.post("/v1/placements/prewarm", json={"cluster": "nope", "models": models}), 404)
    bad = [{"model": "no-such-model", "rate_per_s": 1.0}]
    assert_problem(client.post("/v1/placements/prewarm", json={"cluster": "demo", "models": bad}), 422)


def test_fleet_plan_respects_live_reservations(client: TestClient) -> None:
    held = place(client, model="llama-3.1-8b", tp=8, instances=2, allow_migration=False, ttl_s=600)
    assert len(held["placements"]) == 2
    reserved = {(p["server"], g) for p in held["placements"] for g in p["gpu_ids"]}
    fleet = {
        "kind": "fleet",
        "cluster": "demo",
        "deployments": [
            {
                "name": "wide",
                "model": "llama-3.1-8b",
                "workload": {"arrival": "poisson", "isl": 512, "osl": 64, "rate": 0.5},
                "slo": {"ttft_ms": 2000, "tpot_ms": 200},
                "search": {"tp": [8], "pp": [1], "requests": 20},
            }
        ],
    }
    response = client.post("/v1/plans", json=fleet)
    assert response.status_code == 202, response.text
    plan = wait_final(client, response.json()["id"], timeout_s=120)
    assert plan["status"] == "succeeded", plan
    used = {
        (i["server"], g) for d in plan["result"]["deployments"] for i in d["instances_placed"] for g in i["gpu_ids"]
    }
    assert not used & reserved
    # Only the two emptied servers had 8 free GPUs: the solve sees no whole server left for an 8-GPU instance,
    # serves nothing and says what is short.
    assert plan["result"]["deployments"] == []
    (short,) = plan["result"]["shortfall"]
    assert (short["gpus_needed"], short["gpus_free"], short["gpus_short"]) == (8, 0, 8)
    assert plan["result"]["unmet"][0]["reason"].startswith("short of 8 h100-sxm GPUs: needs 8 (1 x 8-GPU tp8)")


def test_an_idle_instance_states_its_rate_and_keep_alive(client: TestClient) -> None:
    idle = {"id": "idle-8b", "model": "llama-3.1-8b", "server": "node-b", "gpu_ids": [7], "idle_since_s": 0.0}
    base = copy.deepcopy(CLUSTER)
    node_b = next(s for s in base["servers"] if s["name"] == "node-b")
    next(g for g in node_b["gpus"] if g["id"] == 7)["busy"] = True
    stated = copy.deepcopy(base)
    stated["instances"].append({**idle, "requests_per_s": 0.2, "keep_alive_s": 60.0})
    assert client.put("/v1/clusters/demo", json=stated).status_code == 200
    stored = client.get("/v1/clusters/demo").json()["state"]["instances"]
    kept = next(i for i in stored if i["id"] == "idle-8b")
    assert (kept["requests_per_s"], kept["keep_alive_s"]) == (0.2, 60.0)
    for field, value in (("requests_per_s", -1.0), ("keep_alive_s", -5.0), ("requests_per_s", "often")):
        bad = copy.deepcopy(base)
        bad["instances"].append({**idle, field: value})
        assert field in assert_problem(client.put("/v1/clusters/demo", json=bad), 422)["detail"]
    # Nothing stored is lost to a refused write.
    assert client.get("/v1/clusters/demo").json()["version"] == 2
