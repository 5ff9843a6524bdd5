"""Datasheet GPU entries: what `splan catalog gpus --check` finds, and calibration by architecture family."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from service.catalog.loader import DATA_DIR, check_gpu_catalog, load_catalog, read_structured_file
from service.cli import main

RTX_4090 = {
    "memory_bytes": 25757220864.0,
    "hbm_bandwidth_bytes_per_s": 1.008e12,
    "peak_flops_per_s": {"bf16": 165.2e12, "fp8": 330.3e12},
    "intra_node_bandwidth_bytes_per_s": 32.0e9,
    "nvlink_domain_gpus": 0,
    "num_sms": 128,
    "architecture": "ada",
}


def test_the_built_in_catalog_has_no_errors() -> None:
    findings = check_gpu_catalog(read_structured_file(DATA_DIR / "gpus.yaml"))
    assert [f for f in findings if f.severity == "error"] == []


def test_a_datasheet_entry_is_enough(tmp_path: Path) -> None:
    findings = check_gpu_catalog({"rtx-4090": RTX_4090})
    assert {f.severity for f in findings} == {"warning"}
    messages = " | ".join(f.message for f in findings)
    assert "price_per_hour_usd not given" in messages
    assert "no calibrated ada GPU" in messages
    (tmp_path / "gpus.yaml").write_text(yaml.safe_dump({"rtx-4090": RTX_4090}))
    catalog = load_catalog((tmp_path,))
    gpu = catalog.gpu("rtx-4090")
    assert (gpu.gpus_per_node, gpu.price_per_hour_usd, gpu.inter_node_bandwidth_bytes_per_s) == (1, 0.0, 25e9)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({**RTX_4090, "memory_bytes": 24}, "give bytes"),
        ({**RTX_4090, "hbm_bandwidth_bytes_per_s": 1008}, "bytes per second"),
        ({**RTX_4090, "peak_flops_per_s": {"bf16": 165.2}}, "give FLOP/s"),
        ({**RTX_4090, "architecture": "volta"}, "unknown architecture 'volta'"),
        ({**RTX_4090, "speed": 1}, "unknown field 'speed'"),
        ({k: v for k, v in RTX_4090.items() if k != "peak_flops_per_s"}, "peak_flops_per_s is required"),
        ({**RTX_4090, "peak_flops_per_s": {"bf16": 165e12, "fp9": 1e12}}, "fp9"),
    ],
)
def test_errors(entry: dict[str, object], message: str) -> None:
    errors = [f for f in check_gpu_catalog({"x": entry}) if f.severity == "error"]
    assert any(message in f.message for f in errors), errors


def test_implausible_numbers_are_warned() -> None:
    sparse = {**RTX_4090, "peak_flops_per_s": {"bf16": 1000e12, "fp8": 1000e12}}
    messages = [f.message for f in check_gpu_catalog({"x": sparse})]
    assert any("with-sparsity" in m for m in messages)
    assert any("per SM" in m for m in messages)
    no_family = {k: v for k, v in RTX_4090.items() if k not in ("architecture", "num_sms")}
    messages = [f.message for f in check_gpu_catalog({"x": no_family})]
    assert any("architecture not given" in m for m in messages)
    assert any("num_sms not given: assumed 22" in m for m in messages)


def test_new_gpus_take_their_family_calibration(tmp_path: Path) -> None:
    blackwell = {**RTX_4090, "architecture": "blackwell", "peak_flops_per_s": {"bf16": 500e12, "fp8": 1000e12}}
    (tmp_path / "gpus.yaml").write_text(yaml.safe_dump({"new-bw": blackwell, "new-ada": RTX_4090}))
    catalog = load_catalog((tmp_path,))
    b200 = catalog.calibration_for(catalog.gpu("b200"))
    assert catalog.calibration_for(catalog.gpu("new-bw")) == b200
    assert catalog.calibration_for(catalog.gpu("b300")) == b200
    h100 = catalog.calibration_for(catalog.gpu("h100-sxm"))
    assert catalog.calibration_for(catalog.gpu("h200-sxm")) == h100
    # No calibrated Ada GPU: the shared default.
    assert catalog.calibration_for(catalog.gpu("new-ada")) == catalog.calibration


def test_cli_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"rtx-4090": RTX_4090}))
    assert main(["catalog", "gpus", "--check", str(good)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"{good}: 0 errors, {len(out) - 1} warnings"
    assert all(line.startswith(f"{good}: gpu rtx-4090: warning: ") for line in out[:-1])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"rtx-4090": {**RTX_4090, "memory_bytes": 24}}))
    assert main(["catalog", "gpus", "--check", str(bad)]) == 2
    assert f"{bad}: gpu rtx-4090: error: memory_bytes 24 is under 1 GB" in capsys.readouterr().out
