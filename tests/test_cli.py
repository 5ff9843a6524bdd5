"""The splan command: output shapes and one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.cli import main

REPO = Path(__file__).resolve().parents[1]


def estimate_args(*extra: str, model: str = "llama-3.1-8b", gpu: str = "h100-sxm", isl: str = "1") -> list[str]:
    """`splan estimate` arguments: a small model on one GPU at rate 1, unless overridden."""
    base = ["estimate", "--model", model, "--gpu", gpu, "--isl", isl, "--osl", "1"]
    return [*base, *(extra or ("--rate", "1"))]


def test_estimate_json_has_latency_stats(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main([*estimate_args("--concurrency", "4", isl="512"), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        assert set(out[key]) >= {"mean", "p50", "p90", "p99"}
    assert out["throughput"]["requests_per_s"] > 0
    assert out["throughput"]["output_tokens_per_s"] > 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (estimate_args(model="nope"), "unknown model"),
        (estimate_args(gpu="tpu"), "unknown GPU"),
        (estimate_args("--tp", "3", "--rate", "1"), "does not divide"),
        (estimate_args("--rate", "-2"), "rate must be positive"),
        (estimate_args(model="llama-3.1-405b"), "does not fit"),
        (estimate_args(isl="file:/no/such.csv"), "cannot read"),
        (["plan", "/no/such/spec.yaml"], "cannot read"),
        (["estimate", "--gpu", "h100-sxm"], "required"),
        (estimate_args("--concurrency", "2", "--client-start", "sometimes"), "invalid choice"),
    ],
)
def test_bad_input_is_one_line_exit_2(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_lengths_from_csv_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "lengths.csv"
    data.write_text("prompt_tokens,other\n100,x\n300,y\n200,z\n")
    rc = main([*estimate_args("--rate", "2", "--requests", "30", isl=f"file:{data}"), "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["completed"] == 30


def test_model_config_from_disk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 16,
        "hidden_size": 2048,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rc = main(
        [
            "estimate",
            "--model-config",
            str(tmp_path),
            "--gpu",
            "l40s",
            "--isl",
            "256",
            "--osl",
            "32",
            "--concurrency",
            "2",
            "--json",
        ]
    )
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["tpot_ms"]["mean"] > 0


def test_plan_example_ranks_strategies(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["plan", str(REPO / "examples" / "llama8b-h100-closed.yaml"), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    strategies = out["strategies"]
    assert strategies
    per_gpu = [s["goodput_per_gpu"] for s in strategies]
    assert per_gpu == sorted(per_gpu, reverse=True)
    assert all(s["mode"] in ("collocated", "disaggregated") for s in strategies)
    assert out["frontier"]


def test_plan_spec_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "model: llama-3.1-8b\ngpu: h100-sxm\nmax_gpus: 2\n"
        "workload: {isl: 10, osl: 10}\nslo: {ttft_ms: -1, tpot_ms: 5}\n"
    )
    assert main(["plan", str(spec)]) == 2
    assert "slo.ttft_ms" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["models", "gpus", "engines"])
def test_catalog_lists(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["catalog", kind]) == 0
    assert len(capsys.readouterr().out.splitlines()) >= 3


def test_place_on_a_cluster_file(capsys: pytest.CaptureFixture[str]) -> None:
    cluster = str(REPO / "examples" / "cluster.yaml")
    assert main(["place", "--cluster", cluster, "--model", "llama-3.1-70b", "--tp", "4", "--json"]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["placements"][0]["tier"] == "dram"
    assert main(["place", "--cluster", cluster, "--model", "llama-3.1-70b", "--tp", "4", "--no-migration"]) == 0
    table = capsys.readouterr().out
    assert "startup s" in table
    assert "node-" in table


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--cluster", "/no/such.yaml", "--model", "llama-3.1-8b"], "cannot read"),
        (["--cluster", str(REPO / "examples" / "cluster.yaml"), "--model", "gpt-9"], "unknown model"),
        (["--cluster", str(REPO / "examples" / "llama70b-h100.yaml"), "--model", "llama-3.1-8b"], "servers"),
    ],
)
def test_place_bad_input(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["place", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert err.count("\n") == 1


def test_db_upgrade_on_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nothing", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "db", "upgrade"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "cannot upgrade the database" in done.stderr


def test_attention_dp_and_expert_parallel_layout_in_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--tp", "1", "--attention-dp", "8", "--moe-ep", "8", "--weight-dtype", "fp8", "--concurrency", "16"]
    rc = main([*estimate_args(*args, model="qwen3-235b-a22b", isl="256"), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layout"] == {"tp": 1, "pp": 1, "attention_dp": 8, "moe_tp": 1, "moe_ep": 8, "replicas": 1}
    assert out["gpus"] == 8
    # One rank stands for eight: the deployment's throughput counts all of them.
    assert out["throughput"]["requests_per_s"] > 0
    assert out["moe_weight_dtype"] == "fp8"


def test_disaggregated_pools_take_their_own_layouts(capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "--mode",
        "disagg",
        "--weight-dtype",
        "fp8",
        "--prefill-tp",
        "16",
        "--prefill-moe-ep",
        "16",
        "--decode-tp",
        "1",
        "--decode-attention-dp",
        "16",
        "--decode-moe-ep",
        "16",
        "--concurrency",
        "32",
    ]
    rc = main([*estimate_args(*args, model="deepseek-r1", isl="1024"), "--json"])
    assert rc == 0
    layout = json.loads(capsys.readouterr().out)["layout"]
    assert layout["prefill"] == {"tp": 16, "pp": 1, "attention_dp": 1, "moe_tp": 1, "moe_ep": 16, "workers": 1}
    assert layout["decode"] == {"tp": 1, "pp": 1, "attention_dp": 16, "moe_tp": 1, "moe_ep": 16, "workers": 1}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--tp", "3", "--attention-dp", "2", "--rate", "1"], "does not divide the 64 attention heads"),
        (["--tp", "2", "--attention-dp", "2", "--moe-ep", "3", "--rate", "1"], "must equal tp x attention_dp"),
        (["--weight-dtype", "fp4", "--rate", "1"], "cannot serve fp4 weights"),
    ],
)
def test_bad_layouts_and_dtypes_are_refused(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    gpu = "mi300x" if "fp4" in args else "h100-sxm"
    assert main(estimate_args(*args, model="qwen3-235b-a22b", gpu=gpu)) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert err.count("\n") == 1


def test_attention_dp_open_loop_serves_the_offered_rate(capsys: pytest.CaptureFixture[str]) -> None:
    # One rank stands for eight; it must see an eighth of the arrivals, not a sixty-fourth.
    args = ["--tp", "1", "--attention-dp", "8", "--moe-ep", "8", "--weight-dtype", "fp8", "--rate", "4"]
    rc = main([*estimate_args(*args, "--requests", "400", model="qwen3-235b-a22b", isl="256"), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["throughput"]["requests_per_s"] == pytest.approx(4.0, rel=0.2)
