"""The splan command: output shapes and one-line errors with exit code 2."""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from service.catalog.loader import read_structured_file
from service.cli import ProgressReporter, build_parser, main
from service.planning.specs import spec_kind

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
        (estimate_args("--rate", "1", "--moe-routing", "zipf"), "invalid choice"),
        (estimate_args("--rate", "1", "--moe-backend", "cutlass"), "invalid choice"),
        (estimate_args("--rate", "1", "--moe-backend", "marlin", model="gpt-oss-120b"), "not bf16"),
        (estimate_args("--rate", "1", "--speculative", "mtp:3"), "METHOD:DRAFT_TOKENS:ACCEPTANCE_LENGTH"),
        (estimate_args("--rate", "1", "--speculative", "mtp:1:2.5"), "at most draft tokens + 1"),
        (estimate_args("--rate", "1", "--speculative", "medusa:2:2"), "unknown speculative method"),
    ],
)
def test_bad_input_is_one_line_exit_2(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_a_stated_moe_routing_slows_a_wide_expert_parallel_prefill(capsys: pytest.CaptureFixture[str]) -> None:
    wide_ep = ["--engine", "sglang", "--weight-dtype", "fp8", "--tp", "1", "--attention-dp", "8", "--moe-ep", "8"]
    args = [*estimate_args(*wide_ep, "--concurrency", "8", model="qwen3-235b-a22b", isl="4096"), "--json"]
    ttft_ms = {}
    for routing in ("random", "power_law_1.01"):
        assert main([*args, "--moe-routing", routing]) == 0
        out = json.loads(capsys.readouterr().out)
        assert (out["moe_routing"], out["moe_kernel"]) == (routing, "fp8_block")
        ttft_ms[routing] = out["ttft_ms"]["mean"]
    # The GPU that holds the hottest experts sets each MoE layer's time in prefill.
    assert ttft_ms["power_law_1.01"] > 1.05 * ttft_ms["random"]


def test_the_output_names_the_moe_kernel_it_priced(capsys: pytest.CaptureFixture[str]) -> None:
    gpt_oss = estimate_args("--moe-weight-dtype", "mxfp4", "--rate", "1", model="gpt-oss-120b")
    for backend, kernel in (("auto", "mxfp4_bf16"), ("marlin", "w4a16_mxfp4")):
        assert main([*gpt_oss, "--moe-backend", backend, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["moe_kernel"] == kernel
    assert main([*estimate_args(), "--json"]) == 0
    dense = json.loads(capsys.readouterr().out)
    assert (dense["moe_kernel"], dense["moe_routing"]) == (None, None)


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


PRUNING_SPEC = (
    "model: llama-3.1-70b\ngpu: h100-sxm\nmax_gpus: 8\n"
    "workload: {arrival: poisson, isl: 512, osl: 64}\nslo: {ttft_ms: 1000, tpot_ms: 30}\n"
    "search: {modes: [collocated], tp: [1, 2, 4, 8], pp: [1, 2], simulate_top: 2, requests: 40}\n"
)


@pytest.fixture(scope="module")
def pruning_plan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A plan spec whose layouts are pruned for all three reasons, and its JSON result."""
    spec = tmp_path_factory.mktemp("plan") / "spec.yaml"
    spec.write_text(PRUNING_SPEC)
    with redirect_stdout(io.StringIO()) as out, redirect_stderr(io.StringIO()):
        assert main(["plan", str(spec), "--json"]) == 0
    return spec, json.loads(out.getvalue())


def test_plan_table_has_units_echo_why_and_pruned_counts(
    pruning_plan: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    spec, result = pruning_plan
    assert main(["plan", str(spec)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "\x1b" not in out
    assert lines[0] == (
        "model:    llama-3.1-70b on h100-sxm, at most 8 GPUs; engine vllm, weights bf16, "
        "KV cache bf16 (the engine's default)"
    )
    assert lines[1] == "workload: poisson arrivals, input 512 tokens, output 64 tokens, 40 requests per simulation"
    assert lines[2].startswith("SLOs:     TTFT <= 1000 ms and TPOT <= 30 ms for 90% of requests")
    assert lines[3] == "searched: modes collocated; TP 1, 2, 4, 8; PP 1, 2"
    header = lines[5].split("  ")
    assert [h.strip() for h in header if h.strip()] == [
        "#",
        "strategy",
        "GPUs",
        "goodput (req/s)",
        "goodput/GPU (req/s)",
        "cost ($/M out tok)",
        "TTFT p90 (ms)",
        "TPOT p90 (ms)",
        "bottleneck",
    ]
    best, second = result["strategies"][:2]
    assert lines[6].split()[1] == best["label"].split()[0]
    why = next(line for line in lines if line.startswith("why "))
    assert why.startswith(f"why {best['label']} wins: highest goodput per GPU, {best['goodput_per_gpu']:.3f} req/s/GPU")
    assert f"above the runner-up {second['label']}" in why
    assert f"bottleneck: {best['bottleneck']}" in why
    counts = Counter(r["category"] for r in result["rejected"])
    assert set(counts) == {"does_not_fit", "tpot_floor", "analytic_bound"}
    assert lines[-1] == (
        f"pruned: {len(result['rejected'])} of {result['strategies_enumerated']} enumerated "
        f"(does not fit: {counts['does_not_fit']}, TPOT floor above the SLO: {counts['tpot_floor']}, "
        f"analytic bound below the leaders: {counts['analytic_bound']}); simulated: {result['strategies_evaluated']}"
    )


def test_plan_progress_is_plain_lines_when_stderr_is_not_a_terminal(
    pruning_plan: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    spec, result = pruning_plan
    assert main(["plan", str(spec), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["strategies_evaluated"] == result["strategies_evaluated"]
    lines = captured.err.splitlines()
    total = result["strategies_evaluated"]
    assert lines[0].startswith(f"splan: planning llama-3.1-70b on h100-sxm: 1/{total} (")
    assert lines[-1].startswith(f"splan: planning llama-3.1-70b on h100-sxm: {total}/{total} (100%) after ")
    assert 2 <= len(lines) <= 12
    assert "\x1b" not in captured.err


def test_plan_progress_is_a_bar_on_a_terminal(
    pruning_plan: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, _ = pruning_plan
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["plan", str(spec)]) == 0
    captured = capsys.readouterr()
    assert "━" in captured.err
    assert "\x1b[" in captured.err
    assert "splan: planning" not in captured.err
    assert "\x1b" not in captured.out
    assert captured.out.splitlines()[0].startswith("model:")


def test_progress_lines_are_not_chatty(capsys: pytest.CaptureFixture[str]) -> None:
    ticks = iter(range(1000))
    with ProgressReporter("work", clock=lambda: next(ticks) * 0.3) as progress:
        for done in range(1, 101):
            progress(done, 100)
        progress(100, 100)
    lines = capsys.readouterr().err.splitlines()
    # 0.3 s per call: a line per 10% once a second has passed, the last one always, never twice.
    assert lines[0] == "splan: work: 1/100 (1%) after 0.3 s"
    assert lines[-1].startswith("splan: work: 100/100 (100%)")
    assert len(lines) == len(set(lines)) <= 12


def test_plan_with_a_model_config_runs_through_the_job_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 16,
        "hidden_size": 2048,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "vocab_size": 128256,
    }
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(cfg))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "model_config: tiny\ngpu: l40s\nmax_gpus: 1\nworkload: {arrival: poisson, isl: 256, osl: 32}\n"
        "slo: {ttft_ms: 500, tpot_ms: 50}\nsearch: {modes: [collocated], tp: [1], pp: [1], requests: 40}\n"
    )
    assert main(["plan", str(spec)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model:    tiny (config tiny) on l40s")
    assert "why tp1 x1 wins" in out


@pytest.mark.parametrize("name", ["fleet.yaml", "fleet-cluster.yaml"])
def test_fleet_examples_plan_from_the_command_line(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(REPO / "examples" / name)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    spec = read_structured_file(REPO / "examples" / name)
    assert lines[0].startswith(f"fleet:    {len(spec['deployments'])} deployments on ")
    header = next(line for line in lines if line.startswith("deployment "))
    assert "GPU type" in header
    assert "capacity (req/s)" in header
    rows = {line.split()[0]: line.split() for line in lines[lines.index(header) + 1 :] if line and line[0] != " "}
    for deployment in spec["deployments"]:
        row = rows[deployment["name"]]
        assert row[1] == deployment["model"]
        assert row[-1] == "yes"
    total = next(line for line in lines if line.startswith("total:"))
    assert total.endswith("all SLOs met")
    if name == "fleet-cluster.yaml":
        assert "GPUs used of 25 free (h100-sxm" in total
        assert any(line.startswith("  chat #1: node-") for line in lines)
    else:
        assert "(h100-sxm 8 of 16, l40s 3 of 8)" in total
    assert "100%" in captured.err.splitlines()[-1]


def test_fleet_spec_without_kind_json_and_unmet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "fleet.yaml"
    spec.write_text(
        "gpus: {h100-sxm: 2}\ndeployments:\n"
        "  - {name: small, model: llama-3.1-8b, workload: {isl: 512, osl: 64, rate: 2},\n"
        "     slo: {ttft_ms: 500, tpot_ms: 40}, search: {tp: [1], pp: [1], requests: 40}}\n"
        "  - {name: never, model: llama-3.1-8b, workload: {isl: 512, osl: 64, rate: 2},\n"
        "     slo: {ttft_ms: 1, tpot_ms: 1}, search: {tp: [1], pp: [1], requests: 40}}\n"
    )
    assert main(["plan", str(spec), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "fleet"
    assert [u["name"] for u in result["unmet"]] == ["never"]
    assert main(["plan", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "1 not met" in out
    assert f"not met:  never: {result['unmet'][0]['reason']}" in out.splitlines()


def test_spec_kind() -> None:
    assert spec_kind({"model": "x"}) == "strategy"
    assert spec_kind({"deployments": []}) == "fleet"
    assert spec_kind({"kind": "fleet"}) == "fleet"
    assert spec_kind({"kind": "strategy", "deployments": []}) == "strategy"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("kind: nope\n", "unknown spec kind 'nope'"),
        ("- a list\n", "must hold a mapping"),
        (
            "kind: fleet\ncluster: prod\ndeployments: [{name: a, model: llama-3.1-8b, "
            "workload: {isl: 1, osl: 1, rate: 1}, slo: {ttft_ms: 1, tpot_ms: 1}}]\n",
            "stored on a server",
        ),
        (
            "kind: fleet\ncluster_file: nowhere.yaml\ndeployments: [{name: a, model: llama-3.1-8b, "
            "workload: {isl: 1, osl: 1, rate: 1}, slo: {ttft_ms: 1, tpot_ms: 1}}]\n",
            "cannot read",
        ),
        (
            "kind: fleet\ngpus: {h100-sxm: 1}\ndeployments: [{name: a, model: llama-3.1-8b, "
            "workload: {isl: 1, osl: 1, arrival: closed}, slo: {ttft_ms: 1, tpot_ms: 1}}]\n",
            "needs an open-loop",
        ),
    ],
)
def test_bad_fleet_specs_are_one_line(
    spec: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(spec)
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert err.startswith("splan: error: ")
    assert err.count("\n") == 1


@pytest.mark.parametrize("command", [["status", "some-id"], ["submit", str(REPO / "examples" / "fleet.yaml")]])
def test_service_commands_need_a_server(
    command: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPLAN_SERVER", raising=False)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err == f"splan: error: splan {command[0]} needs a server: give --server URL or set SPLAN_SERVER\n"


def _parsers(parser: argparse.ArgumentParser, path: str = "splan") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_help_describes_every_option_and_its_default() -> None:
    parsers = dict(_parsers(build_parser()))
    assert {"splan plan", "splan submit", "splan status", "splan db upgrade", "splan estimate"} <= set(parsers)
    for path, parser in parsers.items():
        assert parser.description, f"{path} has no description"
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{path} {action.dest} has no help"
            if action.option_strings and action.nargs != 0 and not action.required:
                text = formatter._expand_help(action)
                assert "default" in text, f"{path} {action.option_strings[0]}: {text}"
    help_text = parsers["splan submit"].format_help()
    assert "(default: 600.0)" in " ".join(help_text.split())
    assert "(default: $SPLAN_SERVER)" in " ".join(help_text.split())


def test_readme_first_code_block_is_the_two_commands() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```[a-z]*\n(.*?)```", text, re.DOTALL)
    assert block is not None
    assert block.group(1).splitlines() == [
        "python3 -m venv .venv && .venv/bin/pip install -q -e . && "
        ".venv/bin/splan plan examples/llama70b-h100.yaml --report plan-report.html",
        "python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]' && .venv/bin/python -m pytest -q -n 2 --cov "
        "--cov-fail-under=92",
    ]


def test_speculative_decoding_shortens_tpot_by_less_than_its_acceptance_length(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def tpot_ms(*extra: str) -> float:
        assert main([*estimate_args("--concurrency", "1", *extra, isl="512"), "--osl", "128", "--json"]) == 0
        return float(json.loads(capsys.readouterr().out)["tpot_ms"]["mean"])

    plain = tpot_ms()
    drafted = tpot_ms("--speculative", "eagle:2:2.5")
    # Tokens come 2.5 per step, but each step verifies 3 tokens per sequence and runs 2 draft passes.
    assert plain / 2.5 < drafted < plain
    assert tpot_ms("--speculative", "eagle:2:3") < drafted
