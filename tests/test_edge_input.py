"""Edge input never yields a 5xx: control characters, seeds, tiny and huge numbers, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api.app import create_app
from service.settings import Settings
from tests.test_jobs import SPEC

PROBLEM = "application/problem+json"
ESTIMATE: dict[str, Any] = {
    "model": "llama-3.1-8b",
    "gpu": "h100-sxm",
    "isl": 256,
    "osl": 32,
    "rate": 1.0,
    "requests": 20,
}


@pytest.fixture
def client(db_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(db_settings)) as test_client:
        yield test_client


def _is_422(response: Any) -> str:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    detail: str = response.json()["detail"]
    return detail


@pytest.mark.parametrize("text", ["a\x00b", "a\x01", "\x7f", "line\nbreak", "tab\t"])
def test_control_characters_are_refused_everywhere(client: TestClient, text: str) -> None:
    quoted = text.encode().hex()
    raw = "".join(f"%{quoted[i : i + 2]}" for i in range(0, len(quoted), 2))
    assert "control character" in _is_422(client.get(f"/v1/plans/{raw}"))
    assert "control character" in _is_422(client.get(f"/v1/plans?model={raw}"))
    assert "control character" in _is_422(client.get(f"/v1/clusters/{raw}"))
    assert "model" in _is_422(client.post("/v1/estimates", json={**ESTIMATE, "model": text}))
    assert "slo" not in _is_422(client.post("/v1/plans", json={**SPEC, "gpu": text}))
    nested = {**SPEC, "search": {**SPEC["search"], "modes": [text]}}
    assert "search.modes[0]" in _is_422(client.post("/v1/plans", json=nested))
    # Nothing was stored, and the store still answers.
    assert client.get("/v1/plans").json()["items"] == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", -1), ("seed", 2**64), ("rate", 1e-310), ("rate", 1e300), ("requests", 0), ("concurrency", -3)],
)
def test_out_of_range_numbers_are_refused_at_the_door(client: TestClient, field: str, value: float) -> None:
    body = {**ESTIMATE, field: value}
    if field == "concurrency":
        body.pop("rate")
    _is_422(client.post("/v1/estimates", json=body))
    workload = {**SPEC["workload"], field: value}
    if field in ("seed", "rate"):
        _is_422(client.post("/v1/plans", json={**SPEC, "workload": workload}))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True)
@given(
    seed=st.integers(min_value=-(2**70), max_value=2**70),
    rate=st.one_of(st.floats(allow_nan=False), st.just(1e-310), st.just(float("inf"))),
    isl=st.one_of(st.integers(min_value=-5, max_value=10**7), st.text(max_size=12)),
)
def test_no_estimate_answers_a_5xx(client: TestClient, seed: int, rate: float, isl: int | str) -> None:
    body = {**ESTIMATE, "seed": seed, "rate": rate, "isl": isl}
    response = client.post("/v1/estimates", content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code < 500, response.text


def test_estimates_are_priced_at_the_door_and_cut_at_the_work_budget(client: TestClient) -> None:
    explosive = {**ESTIMATE, "isl": 100_000, "requests": 1000, "max_batched_tokens": 1, "rate": None, "concurrency": 64}
    detail = _is_422(client.post("/v1/estimates", json=explosive))
    assert "100000000 engine steps" in detail
    assert "work budget of 1200000 sequence-steps" in detail
    heavy = {**ESTIMATE, "isl": 8192, "osl": 8192, "rate": None, "concurrency": 1000, "requests": 1000}
    body = client.post("/v1/estimates", json=heavy).json()
    assert body["truncated"] is True
    assert 0 < body["completed"] < 1000
    assert "work budget of 1200000 sequence-steps" in body["truncated_reason"]
    light = client.post("/v1/estimates", json=ESTIMATE).json()
    assert (light["truncated"], light["truncated_reason"], light["completed"]) == (False, None, 20)


def test_a_plan_over_its_work_budget_is_refused_at_the_door(client: TestClient) -> None:
    search = {**SPEC["search"], "modes": ["collocated", "disaggregated"], "simulate_top": 50, "requests": 5000}
    detail = _is_422(client.post("/v1/plans", json={**SPEC, "search": search}))
    assert "simulate_top x modes x requests is 500000" in detail
    assert "work budget of 100000" in detail
    assert client.get("/v1/plans").json()["items"] == []
