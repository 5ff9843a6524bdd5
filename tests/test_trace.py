"""Trace replay: reading CSV/JSONL traces, pairs and order kept, rate rescaling, errors naming the columns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.planning.catalog import Catalog
from service.planning.estimate import EstimateRequest, resolve_workload, run_estimate
from service.planning.specs import PlanningError
from service.planning.trace import read_trace, trace_from_records
from service.planning.workload import sample_requests

ROWS = [
    {"arrival_s": 0.0, "input_tokens": 100, "output_tokens": 10},
    {"arrival_s": 0.5, "input_tokens": 2000, "output_tokens": 5},
    {"arrival_s": 2.0, "input_tokens": 300, "output_tokens": 400},
]


def test_csv_and_jsonl_read_alike_with_common_column_names(tmp_path: Path) -> None:
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("timestamp,prompt_tokens,completion_tokens\n0,100,10\n0.5,2000,5\n2,300,400\n")
    jsonl_path = tmp_path / "t.jsonl"
    jsonl_path.write_text("\n".join(json.dumps({"arrival_time": r["arrival_s"], "isl": r["input_tokens"],
                                                "osl": r["output_tokens"]}) for r in ROWS))  # fmt: skip
    a, b = read_trace(csv_path), read_trace(jsonl_path)
    assert a.columns == {"arrival": "timestamp", "input": "prompt_tokens", "output": "completion_tokens"}
    assert b.columns == {"arrival": "arrival_time", "input": "isl", "output": "osl"}
    for trace in (a, b):
        assert trace.input_tokens.tolist() == [100, 2000, 300]
        assert trace.output_tokens.tolist() == [10, 5, 400]
        assert trace.arrival_s.tolist() == [0.0, 0.5, 2.0]
        assert trace.rate_per_s == pytest.approx(1.0)


def test_a_missing_column_is_refused_naming_the_columns_found() -> None:
    with pytest.raises(PlanningError, match=r"no output column .*columns found: arrival_s, input_tokens, latency"):
        trace_from_records([{"arrival_s": 0, "input_tokens": 5, "latency": 1.0}])
    with pytest.raises(PlanningError, match="must be numbers"):
        trace_from_records([{"arrival_s": "soon", "input_tokens": 5, "output_tokens": 1}])


def test_the_replay_keeps_the_recorded_times_and_pairs(catalog: Catalog) -> None:
    workload = resolve_workload(EstimateRequest(model="llama-3.1-8b", gpu="h100-sxm", trace=ROWS))
    sample = sample_requests(workload)
    assert sample.arrivals_at(workload.rate_per_s).tolist() == pytest.approx([0.0, 0.5, 2.0])
    assert sample.input_tokens.tolist() == [100, 2000, 300]
    assert sample.output_tokens.tolist() == [10, 5, 400]
    # A time scale stretches the offsets; a rate rescales them to that mean rate.
    slow = resolve_workload(EstimateRequest(model="m", gpu="g", trace=ROWS, time_scale=2.0))
    assert sample_requests(slow).arrivals_at(slow.rate_per_s).tolist() == pytest.approx([0.0, 1.0, 4.0])
    fast = resolve_workload(EstimateRequest(model="m", gpu="g", trace=ROWS, rate=4.0))
    assert sample_requests(fast).arrivals_at(fast.rate_per_s).tolist() == pytest.approx([0.0, 0.125, 0.5])
    out = run_estimate(EstimateRequest(model="llama-3.1-8b", gpu="h100-sxm", trace=ROWS), catalog=catalog).as_dict()
    assert out["completed"] == 3
    assert out["trace"]["requests"] == 3
    assert out["trace"]["columns"]["input"] == "input_tokens"


def test_trace_with_lengths_or_concurrency_is_refused() -> None:
    with pytest.raises(PlanningError, match="leave isl and osl out"):
        resolve_workload(EstimateRequest(model="m", gpu="g", trace=ROWS, isl=10, osl=10))
    with pytest.raises(PlanningError, match="not a concurrency"):
        resolve_workload(EstimateRequest(model="m", gpu="g", trace=ROWS, concurrency=4))
    with pytest.raises(PlanningError, match="rate or a time scale, not both"):
        resolve_workload(EstimateRequest(model="m", gpu="g", trace=ROWS, rate=2.0, time_scale=2.0))


records = st.lists(
    st.tuples(st.floats(0, 100, allow_nan=False), st.integers(1, 5000), st.integers(1, 500)), min_size=1, max_size=40
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(rows=records)
def test_replay_preserves_pairs_and_arrival_order(rows: list[tuple[float, int, int]]) -> None:
    trace = trace_from_records([{"arrival_s": t, "input_tokens": i, "output_tokens": o} for t, i, o in rows])
    sample = sample_requests(resolve_workload(EstimateRequest(model="m", gpu="g", trace=trace)))
    # Every (input, output) pair of the file is replayed once, in arrival order (ties in file order).
    expected = sorted(enumerate(rows), key=lambda item: (item[1][0], item[0]))
    assert list(zip(sample.input_tokens.tolist(), sample.output_tokens.tolist(), strict=True)) == [
        (i, o) for _, (_, i, o) in expected
    ]
    times = trace.arrival_s
    assert np.all(np.diff(times) >= 0)
    assert times.tolist() == pytest.approx([t - expected[0][1][0] for _, (t, _, _) in expected])


def test_sessions_share_the_conversation_so_far() -> None:
    rows = [
        {"arrival_s": 0, "input_tokens": 1000, "output_tokens": 200, "session_id": "a"},
        {"arrival_s": 1, "input_tokens": 500, "output_tokens": 10, "session_id": "b"},
        {"arrival_s": 5, "input_tokens": 1300, "output_tokens": 50, "session_id": "a"},
    ]
    trace = trace_from_records(rows)
    assert trace.columns["session_id"] == "session_id"
    assert trace.shared_tokens.tolist() == [0, 0, 1200]
    assert trace.cacheable_tokens.tolist() == [1200, 510, 1350]
    assert trace.prefix_group.tolist() == [0, 1, 0]


def test_the_api_takes_a_trace_inline_and_the_engine_settings(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from tests.conftest import migrated_settings

    settings = migrated_settings(f"sqlite:///{tmp_path / 'api.db'}", tmp_path, max_body_bytes=65536)
    body = {
        "model": "llama-3.1-8b",
        "gpu": "h100-sxm",
        "trace": [{**row, "prefix_id": "s"} for row in ROWS],
        "time_scale": 2.0,
        "gpu_memory_utilization": 0.8,
        "max_model_len": 4096,
        "enable_prefix_caching": False,
        "kv_block_size": 32,
        "router": "least_loaded",
        "replicas": 2,
    }
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/estimates", json=body)
        assert response.status_code == 200, response.text
        out = response.json()
        assert out["completed"] == 3
        assert out["trace"]["time_scale"] == pytest.approx(2.0)
        assert out["prefix_cache"]["enabled"] is False
        assert out["router"] == "least_loaded"
        assert out["memory"]["replica"]["kv_capacity_tokens"] % 32 == 0
        # A server never reads its own disk: a path is not a trace.
        refused = client.post("/v1/estimates", json={**body, "trace": "/etc/passwd"})
        assert refused.status_code == 422
        assert refused.headers["content-type"].startswith("application/problem+json")
        missing = client.post("/v1/estimates", json={**body, "trace": [{"t": 1, "input_tokens": 5}]})
        assert missing.status_code == 422
        assert "columns found: t, input_tokens" in missing.json()["detail"]


def test_a_plan_spec_replays_a_trace_and_searches_its_rate(catalog: Catalog, tmp_path: Path) -> None:
    from service.planning.plan_spec import parse_plan_spec
    from service.planning.search import plan

    rows = [{"arrival_s": 0.25 * i, "input_tokens": 300 + 37 * i % 900, "output_tokens": 50} for i in range(60)]
    spec = {
        "model": "llama-3.1-8b",
        "gpu": "h100-sxm",
        "max_gpus": 2,
        "workload": {"trace": rows, "time_scale": 2.0},
        "slo": {"ttft_ms": 500, "tpot_ms": 50},
        "search": {"modes": ["collocated"], "tp": [1], "pp": [1], "simulate_top": 1, "requests": 20},
        "engine_settings": {"gpu_memory_utilization": 0.85, "kv_block_size": 32, "router": "random"},
    }
    request = parse_plan_spec(spec, catalog=catalog)
    assert request.workload.trace is not None
    assert request.workload.time_scale == pytest.approx(2.0)
    assert request.knobs.kv_block_tokens == 32
    result = plan(request, catalog=catalog).as_dict()
    best = result["strategies"][0]
    assert best["goodput_rps"] > 0
    assert best["gpu_memory_fraction"] == pytest.approx(0.85)
    # A path is read only from spec files (relative to the spec), never by the server.
    with pytest.raises(PlanningError, match="a path is read only by `splan plan`"):
        parse_plan_spec({**spec, "workload": {"trace": "t.csv"}}, catalog=catalog)
    (tmp_path / "t.csv").write_text("arrival_s,input_tokens,output_tokens\n0,10,5\n1,20,5\n")
    from_file = parse_plan_spec({**spec, "workload": {"trace": "t.csv"}}, catalog=catalog, base_dir=tmp_path)
    assert from_file.workload.trace is not None
    assert from_file.workload.trace.size == 2
    with pytest.raises(PlanningError, match="leave isl, osl and closed arrivals out"):
        parse_plan_spec({**spec, "workload": {"trace": rows, "isl": 5}}, catalog=catalog)
