"""The splan command's text outputs (estimate, catalog, prewarm) and its file-reading errors, one line each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.cli import main, read_length_column
from service.planning.specs import PlanningError
from tests.conftest import REPO

ESTIMATE = ["estimate", "--model", "llama-3.1-8b", "--gpu", "h100-sxm"]
CLUSTER = str(REPO / "examples" / "cluster.yaml")


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one stderr line of a command that exits 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.removeprefix("splan: error: ").rstrip("\n")


def test_estimate_text_names_the_deployment_and_the_replayed_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s,input_tokens,output_tokens\n0,100,10\n0.5,200,5\n2,300,20\n")
    assert main([*ESTIMATE, "--trace", str(trace)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "llama-3.1-8b on 1 x h100-sxm (vllm, collocated)"
    assert lines[1].startswith('layout: {"tp": 1, "pp": 1')
    assert lines[1].endswith("weights bf16, KV bf16")
    assert lines[2].split() == ["metric", "mean", "p50", "p90", "p99"]
    assert [line.split()[0] for line in lines[3:6]] == ["ttft_ms", "tpot_ms", "e2e_ms"]
    assert lines[6].startswith("throughput: ")
    # Three requests over the 2 s from the first arrival to the last, replayed at the recorded times.
    assert lines[7].startswith(f"trace: {trace}, 3 requests over 2.0 s (")
    assert "time scale 1); columns arrival=arrival_s, input=input_tokens, output=output_tokens" in lines[7]
    assert len(lines) == 8


def test_estimate_text_says_what_was_refused_and_reused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The second request's 3000-token prompt is over the 1024-token cap: refused; the other two run.
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s,input_tokens,output_tokens\n0,100,10\n0.5,3000,5\n2,300,20\n")
    assert main([*ESTIMATE, "--trace", str(trace), "--max-model-len", "1024"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "refused: 1 requests longer than max_model_len"
    # 20 prompts of 1024 tokens share a 512-token prefix: all but the first reuse it, 19 x 512 = 9728 tokens, which
    # is 9728 / (20 x 1024) = 47.5% of their prompt tokens.
    shared = ["--shared-prefix-tokens", "512", "--enable-prefix-caching", "--requests", "20"]
    assert main([*ESTIMATE, "--isl", "1024", "--osl", "4", "--rate", "2", *shared]) == 0
    cache = [line for line in capsys.readouterr().out.splitlines() if line.startswith("prefix cache: ")]
    assert cache == ["prefix cache: 9728 prompt tokens reused (48% of the prompts that share a prefix)"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trace", "t.csv", "--isl", "10"], "--trace brings each request's lengths and arrival: leave out --isl,"),
        (["--trace", "t.csv", "--concurrency", "2"], "--trace brings each request's lengths and arrival: leave out"),
        (["--isl", "10", "--osl", "10"], "one of the arguments --concurrency --rate is required (or --trace FILE)"),
    ],
)
def test_estimate_with_a_trace_and_lengths_or_neither_is_refused(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _error([*ESTIMATE, *extra], capsys).startswith(message)


def test_estimate_needs_a_model(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["estimate", "--gpu", "h100-sxm", "--isl", "10", "--osl", "10", "--rate", "1"]
    assert _error(argv, capsys) == "give --model NAME or --model-config PATH"


@pytest.mark.parametrize(
    ("name", "text", "column", "message"),
    [
        ("lengths.jsonl", '{"n": 1}\n{"n": 2', None, "cannot parse {path}: Expecting ',' delimiter at line 2"),
        ("lengths.csv", "", None, "{path} holds no rows"),
        ("lengths.csv", "n\n5\n", "tokens", "{path} has no column 'tokens'"),
        ("lengths.csv", "name,id\nx,y\n", None, "{path} has no numeric column"),
        ("lengths.csv", "n\n5\nfive\n", None, "column 'n' of {path} is not all numbers"),
    ],
)
def test_a_length_file_that_cannot_be_read_is_one_line(
    tmp_path: Path, name: str, text: str, column: str | None, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PlanningError) as refused:
        read_length_column(path, column)
    assert str(refused.value).startswith(message.format(path=path))


def test_lengths_come_from_a_named_jsonl_column(tmp_path: Path) -> None:
    path = tmp_path / "lengths.jsonl"
    path.write_text('{"id": "a", "prompt": 120, "reply": 7}\n\n{"id": "b", "prompt": 80.0, "reply": 9}\n')
    assert read_length_column(path, "reply") == [7, 9]
    # Unnamed: the first numeric column.
    assert read_length_column(path, None) == [120, 80]


def test_catalog_json_lists_every_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["catalog", "gpus", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    names = {row["name"] for row in table} if isinstance(table, list) else set(table)
    assert {"h100-sxm", "b200", "mi300x"} <= names


def test_catalog_check_takes_only_gpu_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("{}\n")
    message = "--check takes a GPU catalog file: `splan catalog gpus --check FILE`"
    assert _error(["catalog", "models", "--check", str(models)], capsys) == message


def test_prewarm_json_and_a_cluster_that_is_not_a_mapping(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rates = tmp_path / "rates.yaml"
    rates.write_text(
        "models:\n- {model: qwen3-32b, tp: 2, rate_per_s: 0.05}\n- {model: llama-3.1-8b, rate_per_s: 0.5}\n"
    )
    assert main(["prewarm", "--cluster", CLUSTER, "--rates", str(rates), "--json"]) == 0
    advice = json.loads(capsys.readouterr().out)
    assert advice["expected_cold_start_s_after"] <= advice["expected_cold_start_s_before"]
    assert {k["checkpoint"] for k in advice["keep_alive"]} >= {"qwen3-32b"}
    listed = tmp_path / "cluster.yaml"
    listed.write_text("- a\n- b\n")
    assert (
        _error(["prewarm", "--cluster", str(listed), "--rates", str(rates)], capsys) == f"{listed} must hold a mapping"
    )


def test_plan_report_to_a_missing_directory_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = REPO / "examples" / "llama8b-h100-closed.yaml"
    report = tmp_path / "no" / "such" / "report.html"
    assert main(["plan", str(spec), "--report", str(report)]) == 2
    # Progress lines first, then the one error line.
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == f"splan: error: cannot write the report to {report}: No such file or directory"
