"""Calibration profiles: what parse_profile refuses (one line each) and what a profile's kernel section changes."""

from __future__ import annotations

from typing import Any

import pytest

from service.planning.catalog import Catalog
from service.planning.profile import PROFILE_KIND, Profile, apply_profile, parse_profile
from service.planning.specs import PlanningError

DOC: dict[str, Any] = {"kind": PROFILE_KIND, "gpu": "h100-sxm", "engine": "vllm"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"models": [1, 2]}, "invalid profile: models must be a list of model names"),
        ({"factors": [1.0]}, "invalid profile: factors must be a mapping"),
        ({"factors": {"compute": True}}, "invalid profile: factors.compute must be a number"),
        ({"factors": {"compute": "fast"}}, "invalid profile: factors.compute must be a number (got 'fast')"),
        ({"factors": {"compute": "nan"}}, "invalid profile: factors.compute must be finite"),
        ({"engine_constants": [0.001]}, "invalid profile: engine_constants must be a mapping"),
        (
            {"engine_constants": {"warmup_s": 1.0}},
            "invalid profile: unknown engine constant 'warmup_s'; known: step_overhead_s, per_sequence_overhead_s, "
            "step_gap_s, request_overhead_s",
        ),
        (
            {"kernel_calibration": ["gemm_launch_s"]},
            "invalid profile: kernel_calibration must be a mapping of calibration fields",
        ),
        (
            {"kernel_calibration": {"attention_prefill_pack_gqa": "no"}},
            "invalid profile: kernel_calibration: calibration field 'attention_prefill_pack_gqa' must be true or "
            "false, not 'no'",
        ),
    ],
)
def test_a_malformed_profile_is_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(PlanningError) as refused:
        parse_profile({**DOC, **change})
    assert str(refused.value) == message


def test_one_model_name_is_a_list_of_one() -> None:
    assert parse_profile({**DOC, "models": "llama-3.1-8b"}).models == ("llama-3.1-8b",)


def test_a_profiles_kernel_section_overrides_the_catalog_calibration(catalog: Catalog) -> None:
    profile = parse_profile({**DOC, "kernel_calibration": {"gemm_launch_s": 7.5e-6}})
    assert profile.as_document()["kernel_calibration"] == {"gemm_launch_s": 7.5e-6}
    gpu = catalog.gpu("h100-sxm")
    assert catalog.calibration_for(gpu).gemm_launch_s != 7.5e-6
    scope = {"gpu": "h100-sxm", "engine": "vllm", "model": "llama-3.1-8b"}
    profiled, warnings = apply_profile(catalog, profile, **scope)
    assert profiled.calibration_for(gpu).gemm_launch_s == 7.5e-6
    assert warnings == []
    # Without a kernel section (and factors of 1) the catalog's constants stay.
    plain, _ = apply_profile(catalog, Profile(gpu="h100-sxm", engine="vllm"), **scope)
    assert plain.calibration_for(gpu).gemm_launch_s == catalog.calibration_for(gpu).gemm_launch_s
