"""One spec, validated once at the door: every refusal is a 422 naming its field, and what passes runs on the worker."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import event, given, settings
from hypothesis import strategies as st

from service.api.app import create_app
from service.catalog.loader import default_catalog
from service.jobs import execute_spec
from service.planning.catalog import Catalog
from service.planning.plan_spec import SpecFieldError, parse_plan_spec
from service.planning.specs import PlanningError
from service.plans_service import inline_spec_files, validate_plan
from tests.conftest import migrated_settings
from tests.test_jobs import SPEC

PROBLEM = "application/problem+json"


def spec_with(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """SPEC with the field at dotted ``path`` set to ``value`` (None removes it)."""
    spec = copy.deepcopy(base or SPEC)
    *parents, last = path.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return spec


TRACE = [{"arrival_s": 0.1 * i, "input_tokens": 300 + i, "output_tokens": 40} for i in range(30)]
NO_LENGTHS = spec_with("workload", {"arrival": "poisson", "rate": 2})

# Each reason a plan used to fail on the worker (or "succeed" with nothing) although the door could see it:
# (spec, the field the 422 names, a phrase of its detail).
REFUSED: list[tuple[str, dict[str, Any], str, str]] = [
    ("unknown KV dtype", spec_with("kv_dtype", "garbage"), "kv_dtype", "unknown KV-cache dtype 'garbage'"),
    ("int4 KV cache", spec_with("kv_dtype", "int4"), "kv_dtype", "use one of bf16, fp8"),
    ("unknown weight dtype", spec_with("weight_dtype", "int3"), "weight_dtype", "unknown weight dtype 'int3'"),
    (
        "fp4 weights on a GPU that cannot run them",
        spec_with("gpu", "mi300x", spec_with("weight_dtype", "fp4")),
        "weight_dtype",
        "mi300x cannot serve fp4 weights",
    ),
    ("tp that splits no layout", spec_with("search.tp", [3]), "search", "no parallel layout"),
    ("input longer than the context", spec_with("workload.isl", 10**9), "workload.isl", "131072-token context"),
    (
        "input + output over the context",
        spec_with("workload.osl", 100, spec_with("workload.isl", 131_000)),
        "workload.isl",
        "needs 131100 tokens",
    ),
    (
        "drawn lengths over the context",
        spec_with("workload.isl", "uniform:100:200000"),
        "workload.isl",
        "131072-token context",
    ),
    (
        "trace records over the context",
        spec_with("workload.trace", [{**TRACE[0], "input_tokens": 200_000}, *TRACE[1:]], NO_LENGTHS),
        "workload.trace",
        "131072-token context",
    ),
    (
        "max_model_len shorter than every request",
        spec_with("engine_settings", {"max_model_len": 100}),
        "engine_settings.max_model_len",
        "every request is longer than max_model_len 100",
    ),
    (
        "max_model_len over the context",
        spec_with("engine_settings", {"max_model_len": 200_000}),
        "engine_settings.max_model_len",
        "over the 131072-token context",
    ),
    ("unknown model", spec_with("model", "llama-9"), "model", "unknown model 'llama-9'"),
    ("unknown GPU", spec_with("gpu", "h999"), "gpu", "unknown GPU 'h999'"),
    ("unknown engine", spec_with("engine", "tgi"), "engine", "unknown engine 'tgi'"),
    ("dense model split by experts", spec_with("search.moe_ep", [2]), "search.moe_ep", "is dense"),
    (
        "Marlin for fp8 experts",
        spec_with("engine_settings", {"moe_backend": "marlin"}, spec_with("model", "qwen3-30b-a3b")),
        "engine_settings.moe_backend",
        "runs 4-bit weight-only experts (mxfp4, fp4, int4), not bf16",
    ),
    ("bad profile", spec_with("profile", {"factors": {"x": 1}}), "profile", ""),
    ("trace path over HTTP", spec_with("workload.trace", "/etc/passwd", NO_LENGTHS), "workload.trace", "read only"),
    ("model_config path over HTTP", spec_with("model_config", "/etc/passwd"), "model_config", "read only"),
    ("profile path over HTTP", spec_with("profile", "/etc/passwd"), "profile", "read only"),
]

# Refused by the body model itself (pydantic): the location carries the plan kind's tag first.
REFUSED_BY_SCHEMA: list[tuple[str, dict[str, Any], str]] = [
    ("file: lengths over HTTP", spec_with("workload.isl", "file:/etc/passwd"), "strategy.workload.isl"),
    ("token budget of zero", spec_with("search.max_batched_tokens", [0]), "strategy.search.max_batched_tokens.0"),
    ("requests over the one cap", spec_with("search.requests", 20_001), "strategy.search.requests"),
    ("concurrency over the one cap", spec_with("workload.concurrency", 5000), "strategy.workload.concurrency"),
    ("absurd cv", spec_with("workload.cv", 1e9), "strategy.workload.cv"),
    ("no search mode", spec_with("search.modes", []), "strategy.search.modes"),
    (
        "more tokens accepted than drafted",
        spec_with("engine_settings", {"speculative": {"method": "mtp", "draft_tokens": 1, "acceptance_length": 2.5}}),
        "strategy.engine_settings.speculative",
    ),
    (
        "unknown MoE routing",
        spec_with("engine_settings", {"moe_routing": "zipf"}),
        "strategy.engine_settings.moe_routing",
    ),
    (
        "unknown drafter",
        spec_with("engine_settings", {"speculative": {"method": "medusa", "draft_tokens": 1, "acceptance_length": 1}}),
        "strategy.engine_settings.speculative.method",
    ),
]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = migrated_settings(f"sqlite:///{tmp_path / 'api.db'}", tmp_path)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def problem(response: Any) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = response.json()
    assert body["status"] == 422
    return body


@pytest.mark.parametrize(("spec", "field", "phrase"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_the_door_refuses_what_the_worker_would(
    client: TestClient, catalog: Catalog, spec: dict[str, Any], field: str, phrase: str
) -> None:
    body = problem(client.post("/v1/plans", json=spec))
    assert body["errors"][0]["location"] == field
    assert phrase in body["detail"]
    assert body["detail"].startswith(f"invalid plan spec at {field}: ")
    # The worker runs the same check first: had the plan been stored, it would have failed there for this reason.
    with pytest.raises(PlanningError) as failed:
        execute_spec("strategy", spec, catalog=catalog, progress=lambda _d, _t: None)
    assert phrase in str(failed.value)
    assert client.get("/v1/plans").json()["items"] == []


@pytest.mark.parametrize(("spec", "field"), [r[1:] for r in REFUSED_BY_SCHEMA], ids=[r[0] for r in REFUSED_BY_SCHEMA])
def test_the_body_model_refuses_out_of_range_fields(client: TestClient, spec: dict[str, Any], field: str) -> None:
    body = problem(client.post("/v1/plans", json=spec))
    assert body["errors"][0]["location"] == field


def test_one_cap_on_requests_for_plans_estimates_and_traces(client: TestClient) -> None:
    from service.planning.estimate import MAX_REQUESTS
    from service.planning.plan_spec import MAX_SIMULATED_REQUESTS
    from service.planning.trace import MAX_TRACE_REQUESTS

    assert MAX_SIMULATED_REQUESTS == MAX_REQUESTS == MAX_TRACE_REQUESTS == 20_000
    estimate = {"model": "llama-3.1-8b", "gpu": "h100-sxm", "isl": 128, "osl": 16, "rate": 1}
    over = client.post("/v1/estimates", json={**estimate, "requests": 20_001})
    assert problem(over)["errors"][0]["location"] == "requests"
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert schema["EstimateBody"]["properties"]["requests"]["anyOf"][0]["maximum"] == 20_000
    assert schema["SearchSpec"]["properties"]["requests"]["maximum"] == 20_000


def test_fleet_specs_are_checked_per_deployment(client: TestClient) -> None:
    deployment = {
        "name": "chat",
        "model": "llama-3.1-8b",
        "workload": {"isl": 512, "osl": 64, "rate": 2},
        "slo": {"ttft_ms": 500, "tpot_ms": 50},
        "search": {"tp": [1], "pp": [1], "modes": ["collocated"], "requests": 40, "simulate_top": 1},
    }
    fleet = {"kind": "fleet", "deployments": [deployment], "gpus": {"h100-sxm": 2}}
    unknown_gpu = problem(client.post("/v1/plans", json={**fleet, "gpus": {"h999": 2}}))
    assert unknown_gpu["errors"][0]["location"] == "gpus.h999"
    bad_dtype = {**fleet, "deployments": [{**deployment, "weight_dtype": "int3"}]}
    assert problem(client.post("/v1/plans", json=bad_dtype))["errors"][0]["location"] == "deployments.0.weight_dtype"
    too_long = {**fleet, "deployments": [{**deployment, "workload": {"isl": 10**6, "osl": 64, "rate": 2}}]}
    assert problem(client.post("/v1/plans", json=too_long))["errors"][0]["location"] == "deployments.0.workload.isl"
    price = problem(client.post("/v1/plans", json={**fleet, "prices": {"h999": 2.0}}))
    assert price["errors"][0]["location"] == "prices.h999"
    # fp4 runs on b200 though not on mi300x: a deployment needs one GPU type of the fleet that can serve it.
    mixed = {**fleet, "gpus": {"mi300x": 2, "b200": 2}, "deployments": [{**deployment, "weight_dtype": "fp4"}]}
    validate_plan(mixed, client.app.state.catalog)  # type: ignore[attr-defined]
    only_amd = {**mixed, "gpus": {"mi300x": 2}}
    assert problem(client.post("/v1/plans", json=only_amd))["errors"][0]["location"] == "deployments.0.weight_dtype"


def test_a_model_config_travels_inline(client: TestClient, tmp_path: Path) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_hidden_layers": 16,
        "vocab_size": 128256,
        "max_position_embeddings": 2048,
    }
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(config))
    on_disk = {k: v for k, v in SPEC.items() if k != "model"} | {"model_config": "tiny"}
    # What the CLI sends: the file read and inlined, named after its directory.
    inlined = inline_spec_files(on_disk, tmp_path)
    assert inlined["model_config"] == config
    assert inlined["model"] == "tiny"
    response = client.post("/v1/plans", json=inlined)
    assert response.status_code == 202, response.text
    assert response.json()["model"] == "tiny"
    # The model's own context bounds the lengths.
    long = spec_with("workload.isl", 2000, inlined)
    assert "2048-token context of tiny" in problem(client.post("/v1/plans", json=long))["detail"]


def test_inline_spec_files_reads_traces_and_profiles_relative_to_the_spec(tmp_path: Path) -> None:
    rows = "arrival_s,input_tokens,output_tokens\n0,100,10\n0.5,200,20\n"
    (tmp_path / "t.csv").write_text(rows)
    spec = inline_spec_files(spec_with("workload.trace", "t.csv", NO_LENGTHS), tmp_path)
    assert spec["workload"]["trace"] == [
        {"arrival_s": "0", "input_tokens": "100", "output_tokens": "10"},
        {"arrival_s": "0.5", "input_tokens": "200", "output_tokens": "20"},
    ]
    fleet = {"kind": "fleet", "deployments": [{"name": "a", "workload": {"trace": "t.csv"}}]}
    assert len(inline_spec_files(fleet, tmp_path)["deployments"][0]["workload"]["trace"]) == 2


# ------------------------------------------------------------------------------------------------ the property

# Mostly valid names, so that a good share of the drawn specs passes the door and runs.
MODELS = ["llama-3.1-8b", "qwen2.5-7b", "llama-2-7b", "mistral-7b-v0.1"]
GPUS = ["h100-sxm", "a100-sxm", "l40s", "mi300x", "b200"]
DTYPES = ["bf16", "fp8", "int4", "fp4", "mxfp4", "nvfp4", "FP8"]
# At most one field per spec is drawn from values the door must refuse, so that about half the specs pass.
FAULTS: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["llama-1b", "gpt-5"]),
    "weight_dtype": st.sampled_from(["int3", "fp16x", ""]),
    "kv_dtype": st.sampled_from(["int4", "garbage", "fp4"]),
    "gpu": st.sampled_from(["h999", "tpu-v5"]),
}
# Output lengths stay short: the property runs every accepted spec's whole search.
LENGTHS = st.one_of(
    st.integers(min_value=1, max_value=4096),
    st.sampled_from([4000, 40_000, 131_000, 200_000, 10**9]),
    st.sampled_from(["uniform:16:2048", "normal:512:128", "lognormal:800:400", "uniform:1000:200000"]),
)


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    """Small plan specs, some wrong in a way only the catalog, the model's context or the layouts can tell."""
    closed = draw(st.booleans())
    workload: dict[str, Any] = {"isl": draw(LENGTHS), "osl": draw(st.integers(min_value=1, max_value=128))}
    if closed:
        workload |= {"arrival": "closed", "concurrency": draw(st.integers(min_value=1, max_value=16))}
    else:
        workload |= {"rate": draw(st.floats(min_value=0.1, max_value=50))}
    spec: dict[str, Any] = {
        "model": draw(st.sampled_from(MODELS)),
        "gpu": draw(st.sampled_from(GPUS)),
        "max_gpus": draw(st.integers(min_value=1, max_value=4)),
        "engine": draw(st.sampled_from(["vllm", "sglang", "trtllm"])),
        "weight_dtype": draw(st.sampled_from(DTYPES)),
        "workload": workload,
        "slo": {"ttft_ms": 2000, "tpot_ms": 100},
        "search": {
            "tp": draw(st.sampled_from([[1], [1, 2], [2], [3], [1, 3]])),
            "pp": [1],
            "modes": ["collocated"],
            "requests": 20,
            "simulate_top": 1,
        },
    }
    kv = draw(st.sampled_from([None, "bf16", "fp8"]))
    if kv is not None:
        spec["kv_dtype"] = kv
    if draw(st.booleans()):
        spec["engine_settings"] = {"max_model_len": draw(st.integers(min_value=2, max_value=200_000))}
    fault = draw(st.sampled_from([None, None, None, *FAULTS]))
    if fault is not None:
        spec[fault] = draw(FAULTS[fault])
    return spec


@settings(max_examples=50, deadline=None)
@given(spec=specs())
def test_a_spec_the_door_accepts_does_not_fail_on_the_worker(spec: dict[str, Any]) -> None:
    catalog = default_catalog()
    try:
        accepted = validate_plan(spec, catalog)
    except SpecFieldError as exc:
        refused: SpecFieldError | None = exc
    else:
        refused = None
    if refused is not None:
        event(f"refused at {refused.field}")
        assert refused.field
        # The worker calls the same check first, so it refuses the same spec for the same reason.
        with pytest.raises(PlanningError, match=f"invalid plan spec at {refused.field}: "):
            parse_plan_spec(spec, catalog=catalog)
        return
    event("accepted")
    # The worker's code path, in-process: the stored spec runs to a result without a PlanningError.
    result, _ = execute_spec(accepted.kind, accepted.spec, catalog=catalog, progress=lambda _d, _t: None)
    assert result["strategies_enumerated"] == accepted.total
