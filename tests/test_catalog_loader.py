"""Catalog files a user adds: one-line errors for what cannot be read, and the datasheet checks' other findings."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.catalog.loader import (
    calibration_source,
    check_gpu_catalog,
    check_gpu_entry,
    load_catalog,
    load_hf_model_config,
    read_structured_file,
)
from service.planning.kernels import gemm_time_s
from service.planning.specs import DType, PlanningError
from tests.test_catalog_check import RTX_4090


def _refusal(call: Any, *args: Any) -> str:
    with pytest.raises(PlanningError) as refused:
        call(*args)
    return str(refused.value)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.yaml", "a: [1, 2\n", "cannot parse {path}: while parsing a flow sequence"),
        ("bad.json", '{"a": 1,}', "cannot parse {path}: Expecting property name enclosed in double quotes"),
    ],
)
def test_an_unparsable_file_is_one_line_naming_it(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    assert _refusal(read_structured_file, path).startswith(message.format(path=path))
    assert "\n" not in _refusal(read_structured_file, path)
    assert _refusal(read_structured_file, tmp_path / "none.yaml").startswith(f"cannot read {tmp_path / 'none.yaml'}")


def test_a_catalog_directory_must_exist_and_hold_mappings(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert _refusal(load_catalog, (missing,)) == f"catalog directory {missing} does not exist"
    (tmp_path / "models.yaml").write_text("- just\n- a list\n")
    assert _refusal(load_catalog, (tmp_path,)) == f"{tmp_path / 'models.yaml'} must hold a mapping of names to entries"


@pytest.mark.parametrize(
    ("kind", "entries", "message"),
    [
        ("models", {"tiny": {"num_layers": 2, "colour": "blue"}}, "model 'tiny': "),
        ("engines", {"fast": {"step_overhead_s": 0.001, "turbo": True}}, "engine 'fast': "),
        # A string in a boolean field would count as true: refused, naming the field.
        (
            "engines",
            {"fast": {"custom_all_reduce": "maybe"}},
            "engine 'fast': field 'custom_all_reduce' must be true or false, not 'maybe'",
        ),
        ("models", {"tiny": {"num_layers": "two"}}, "model 'tiny': could not convert string to float: 'two'"),
        (
            "calibration",
            {"default": {"gemm_launch_secs": 1e-6}},
            "calibration: unknown calibration field 'gemm_launch_secs'",
        ),
        (
            "calibration",
            {"ada": {"attention_prefill_pack_gqa": "false"}},
            "calibration: calibration field 'attention_prefill_pack_gqa' must be true or false, not 'false'",
        ),
        (
            "gemm_dispatch",
            {"ada": [{"kernel": "wide", "tile_m": 128, "tile_width": 128}]},
            "calibration: gemm dispatch rule {'kernel': 'wide', 'tile_m': 128, 'tile_width': 128}: unknown keys "
            "['tile_width'], missing keys ['tile_n']",
        ),
        ("gemm_dispatch", {"ada": "fast"}, "calibration: gemm dispatch: each architecture needs a non-empty list"),
        ("gemm_dispatch", {"ada": [{"kernel": "k", "tile_m": 0, "tile_n": 64}]}, "calibration: gemm dispatch rule"),
    ],
)
def test_a_bad_entry_names_its_kind_and_name(tmp_path: Path, kind: str, entries: dict[str, Any], message: str) -> None:
    (tmp_path / f"{kind}.yaml").write_text(yaml.safe_dump(entries))
    refusal = _refusal(load_catalog, (tmp_path,))
    assert refusal.startswith(message), refusal
    assert "\n" not in refusal


def test_a_user_dispatch_table_gives_its_architecture_the_tiled_fp8_gemm(tmp_path: Path) -> None:
    rules = {"ada": [{"kernel": "ada_default", "tile_m": 128, "tile_n": 128}]}
    (tmp_path / "gemm_dispatch.yaml").write_text(yaml.safe_dump(rules))
    (tmp_path / "calibration.yaml").write_text(yaml.safe_dump({"ada": {"gemm_tiled_efficiency": {"ada_default": 0.4}}}))
    built_in, extended = load_catalog(), load_catalog((tmp_path,))
    gpu = built_in.gpu("l40s")
    rule = extended.calibration_for(gpu).gemm_dispatch["ada"][0]
    assert (rule.kernel, rule.tile_m, rule.tile_n, rule.cluster_m, rule.m_max) == ("ada_default", 128, 128, 1, math.inf)
    # The built-in hopper and blackwell tables are still there; the L40S fp8 GEMM now takes the tiled model.
    assert {"hopper", "blackwell", "ada"} <= set(extended.calibration_for(gpu).gemm_dispatch)
    assert "ada" not in built_in.calibration_for(gpu).gemm_dispatch

    def time_s(catalog: Any) -> float:
        cal = catalog.calibration_for(gpu)
        return float(gemm_time_s(4096.0, 4096.0, 4096.0, gpu=gpu, weight_dtype=DType.FP8, calibration=cal))

    assert time_s(extended) != time_s(built_in)


def test_model_numbers_written_as_strings_or_floats_are_read_as_integers(tmp_path: Path) -> None:
    # YAML 1.1 reads 8e3 without a dot as a string; 32.0 is a float: both are whole numbers of a field typed int.
    entry = {
        "num_layers": "32",
        "hidden_size": 4096.0,
        "num_attention_heads": 32,
        "num_kv_heads": 8,
        "head_dim": 128,
        "intermediate_size": "14336",
        "vocab_size": 128256,
        "max_position_embeddings": "8e3",
    }
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"mini-llama": entry}))
    model = load_catalog((tmp_path,)).model("mini-llama")
    assert (model.num_layers, model.hidden_size, model.intermediate_size, model.max_position_embeddings) == (
        32,
        4096,
        14336,
        8000,
    )


@pytest.mark.parametrize(
    ("change", "severity", "message"),
    [
        ({"memory_bytes": 3e12}, "warning", "memory_bytes 3e+12 is over 2 TB for one GPU"),
        ({"hbm_bandwidth_bytes_per_s": 4e13}, "warning", "hbm_bandwidth_bytes_per_s 4e+13 is over 30 TB/s for one GPU"),
        (
            {"peak_flops_per_s": {"bf16": 6e16, "fp8": 12e16}},
            "warning",
            "peak_flops_per_s bf16 6e+16 is over 50 PFLOP/s for one GPU",
        ),
        ({"hbm_bandwidth_bytes_per_s": 1e11}, "warning", "bf16 peak / HBM bandwidth is 1652 FLOP/byte"),
        ({"intra_node_bandwidth_bytes_per_s": 3e12}, "warning", "intra_node_bandwidth_bytes_per_s is over 2 TB/s"),
        ({"intra_node_bandwidth_bytes_per_s": 1e8}, "error", "link bandwidths are in bytes per second per direction"),
        (
            {"gpus_per_node": 8, "nvlink_domain_gpus": 4},
            "warning",
            "gpus_per_node 8 exceeds nvlink_domain_gpus 4",
        ),
        ({"peak_flops_per_s": {"fp8": 330e12}}, "error", "peak_flops_per_s needs a bf16 figure (dense, FLOP/s)"),
        (
            {"intra_node_bandwidth_bytes_per_s": None},
            "warning",
            "intra_node_bandwidth_bytes_per_s not given: assumed PCIe Gen4 x16 (32e9 B/s per direction)",
        ),
    ],
)
def test_the_datasheet_check_finds(change: dict[str, Any], severity: str, message: str) -> None:
    entry = {k: v for k, v in {**RTX_4090, **change}.items() if v is not None}
    findings = check_gpu_entry("x", entry)
    assert any(f.severity == severity and f.message.startswith(message) for f in findings), findings


def test_a_gpu_file_or_entry_that_is_not_a_mapping_is_an_error() -> None:
    empty: list[Any] = [[], {}, "gpus"]
    for content in empty:
        assert [str(f) for f in check_gpu_catalog(content)] == [
            "gpu -: error: a GPU catalog file is a mapping of GPU names to datasheet entries"
        ]
    assert [str(f) for f in check_gpu_entry("x", ["not", "a", "mapping"])] == [
        "gpu x: error: the entry must be a mapping of GpuSpec fields"
    ]


def test_a_family_section_calibrates_its_gpus() -> None:
    sections: dict[str, dict[str, float]] = {"default": {}, "ada": {}, "h100-sxm": {}}
    assert calibration_source("rtx-4090", "ada", sections) == "ada"
    assert calibration_source("h200", "Hopper", sections) == "h100-sxm"
    assert calibration_source("h100-sxm", "hopper", sections) == "h100-sxm"
    assert calibration_source("mi300x", "cdna3", sections) == "default"


def test_a_model_config_must_be_a_json_object(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[1, 2]")
    assert _refusal(load_hf_model_config, tmp_path) == f"{tmp_path / 'config.json'} is not a config.json object"
