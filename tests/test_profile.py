"""Calibration profiles: validation, how they adjust the catalog, and their use by estimate, plan and the API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli import main
from service.planning.catalog import Catalog
from service.planning.estimate import EstimateRequest, run_estimate
from service.planning.profile import apply_profile, parse_profile, profiled_catalog
from service.planning.specs import DType, PlanningError

PROFILE: dict[str, Any] = {
    "kind": "splan-profile",
    "gpu": "h100-sxm",
    "engine": "vllm",
    "models": ["llama-3.1-8b"],
    "factors": {"compute": 0.8, "memory_bandwidth": 0.5, "collective_bandwidth": 1.0},
    "engine_constants": {"request_overhead_s": 0.2},
}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "must be a mapping"),
        ({**PROFILE, "gpu": ""}, "gpu"),
        ({**PROFILE, "extra": 1}, "unknown key 'extra'"),
        ({**PROFILE, "factors": {"compute": 0.1}}, "at least 0.2"),
        ({**PROFILE, "factors": {"flops": 1.0}}, "unknown factor 'flops'"),
        ({**PROFILE, "engine_constants": {"step_overhead_s": -1}}, "must not be negative"),
        ({**PROFILE, "kernel_calibration": {"nope": 1}}, "nope"),
    ],
)
def test_bad_profiles_are_refused_in_one_line(doc: Any, message: str) -> None:
    with pytest.raises(PlanningError, match=message) as err:
        parse_profile(doc)
    assert "\n" not in str(err.value)


def test_apply_scales_the_efficiencies_and_sets_the_engine(catalog: Catalog) -> None:
    adjusted, warnings = apply_profile(
        catalog, parse_profile(PROFILE), gpu="h100-sxm", engine="vllm", model="llama-3.1-8b"
    )
    gpu = catalog.gpu("h100-sxm")
    before, after = catalog.calibration_for(gpu), adjusted.calibration_for(gpu)
    assert after.gemm_bandwidth_efficiency == pytest.approx(before.gemm_bandwidth_efficiency * 0.5)
    assert after.attention_decode_bandwidth_efficiency[DType.BF16] == pytest.approx(
        before.attention_decode_bandwidth_efficiency[DType.BF16] * 0.5
    )
    assert after.gemm_peak_efficiency[DType.BF16] == pytest.approx(before.gemm_peak_efficiency[DType.BF16] * 0.8)
    assert after.collective_bus_efficiency == before.collective_bus_efficiency
    assert adjusted.engine("vllm").request_overhead_s == 0.2
    assert adjusted.engine("vllm").step_overhead_s == catalog.engine("vllm").step_overhead_s
    # Other GPUs and the input catalog are untouched.
    assert adjusted.calibration_for(catalog.gpu("b200")) == catalog.calibration_for(catalog.gpu("b200"))
    assert catalog.engine("vllm").request_overhead_s != 0.2
    assert warnings == []
    # No efficiency passes the datasheet peak, whatever the factor.
    big, _ = apply_profile(
        catalog,
        parse_profile({**PROFILE, "factors": {"memory_bandwidth": 3.0}}),
        gpu="h100-sxm",
        engine="vllm",
        model="llama-3.1-8b",
    )
    assert big.calibration_for(gpu).gemm_bandwidth_efficiency == 1.0


def test_out_of_scope_use_warns(catalog: Catalog) -> None:
    _, warnings = profiled_catalog(catalog, PROFILE, gpu="h200-sxm", engine="sglang", model="qwen3-32b")
    assert warnings == [
        "profile fitted on GPU h100-sxm is applied to h200-sxm: its factors may not carry over",
        "profile fitted on engine vllm is applied to sglang: its CPU constants may not hold",
        "profile fitted on model(s) llama-3.1-8b is applied to qwen3-32b: expect larger errors",
    ]


def test_estimate_applies_the_profile(catalog: Catalog) -> None:
    request = EstimateRequest(model="llama-3.1-8b", gpu="h100-sxm", isl=512, osl=64, rate=1.0, requests=20)
    plain = run_estimate(request, catalog=catalog).as_dict()
    from dataclasses import replace

    profiled = run_estimate(replace(request, profile=PROFILE), catalog=catalog).as_dict()
    assert plain["warnings"] == []
    assert profiled["warnings"] == []
    # Half the bandwidth: decode (weight reads) takes about twice as long; TTFT gains the 200 ms front end.
    assert profiled["tpot_ms"]["mean"] > 1.6 * plain["tpot_ms"]["mean"]
    assert profiled["ttft_ms"]["mean"] > plain["ttft_ms"]["mean"] + 190


def test_cli_estimate_with_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(PROFILE))
    args = ["estimate", "--model", "qwen3-32b", "--gpu", "h100-sxm", "--isl", "128", "--osl", "8", "--rate", "1"]
    assert main([*args, "--profile", str(path), "--requests", "10", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["warnings"] == [
        "profile fitted on model(s) llama-3.1-8b is applied to qwen3-32b: expect larger errors"
    ]
    assert "splan: warning: profile fitted on model(s) llama-3.1-8b" in captured.err
    path.write_text(yaml.safe_dump({**PROFILE, "factors": {"compute": "fast"}}))
    assert main([*args, "--profile", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("splan: error: ")
    assert err.count("\n") == 1
    assert "factors.compute" in err


def test_plan_spec_profile_path_is_read_by_the_cli_and_stored_inline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({**PROFILE, "models": ["qwen3-32b"]}))
    spec = {
        "model": "llama-3.1-8b",
        "gpu": "h100-sxm",
        "max_gpus": 1,
        "workload": {"arrival": "poisson", "isl": 256, "osl": 32, "rate": 1.0},
        "slo": {"ttft_ms": 2000, "tpot_ms": 100},
        "search": {"modes": ["collocated"], "tp": [1], "pp": [1], "simulate_top": 1, "requests": 40},
        "profile": "p.yaml",
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["plan", str(tmp_path / "spec.yaml"), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["warnings"] == [
        "profile fitted on model(s) qwen3-32b is applied to llama-3.1-8b: expect larger errors"
    ]
    assert "splan: warning:" in captured.err


def test_plan_spec_refuses_a_path_outside_the_cli(catalog: Catalog) -> None:
    from service.planning.plan_spec import parse_plan_spec

    spec = {
        "model": "llama-3.1-8b",
        "gpu": "h100-sxm",
        "max_gpus": 1,
        "workload": {"isl": 256, "osl": 32, "rate": 1.0},
        "slo": {"ttft_ms": 2000, "tpot_ms": 100},
    }
    with pytest.raises(PlanningError, match="a path is read only by `splan plan`"):
        parse_plan_spec({**spec, "profile": "/etc/profile.yaml"}, catalog=catalog)
    with pytest.raises(PlanningError, match="unknown factor"):
        parse_plan_spec({**spec, "profile": {**PROFILE, "factors": {"x": 1}}}, catalog=catalog)
    assert parse_plan_spec({**spec, "profile": PROFILE}, catalog=catalog).gpu == "h100-sxm"


def test_api_estimate_with_inline_profile(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from tests.conftest import migrated_settings

    settings = migrated_settings(f"sqlite:///{tmp_path / 'api.db'}", tmp_path)
    body = {"model": "llama-3.1-8b", "gpu": "h200-sxm", "isl": 256, "osl": 16, "rate": 1.0, "requests": 10}
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/estimates", json={**body, "profile": PROFILE})
        assert response.status_code == 200, response.text
        assert response.json()["warnings"] == [
            "profile fitted on GPU h100-sxm is applied to h200-sxm: its factors may not carry over"
        ]
        bad = client.post("/v1/estimates", json={**body, "profile": {**PROFILE, "kind": "other"}})
        assert bad.status_code == 422
        assert bad.headers["content-type"].startswith("application/problem+json")
        assert "kind" in bad.json()["detail"]
