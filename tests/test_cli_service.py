"""`splan submit` and `splan status` against a real embedded server (`splan serve` on loopback)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from service.cli import main
from tests.conftest import REPO
from tests.helpers import start_quiet, stop, wait_ready
from tests.test_jobs import SPEC


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The embedded service (SQLite file, plans in-process) as a real process on a free loopback port."""
    workdir = tmp_path_factory.mktemp("embedded")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL", "SPLAN_SERVER")}
    env.update(PYTHONPATH=str(REPO), SPLAN_DATA_DIR=str(workdir))
    api, base_url = start_quiet(["serve"], env, workdir)
    try:
        wait_ready(base_url, api)
        yield base_url
    finally:
        stop(api)


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return path


def test_submit_wait_prints_a_summary_and_status_repeats_it(
    server: str, spec_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPLAN_SERVER", server)
    assert main(["submit", str(spec_file), "--wait", "--timeout", "120"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("plan ")
    assert lines[0].endswith(": succeeded (strategy: llama-3.1-8b on h100-sxm)")
    plan_id = lines[0].split()[1].rstrip(":")
    best = next(line for line in lines if line.startswith("best: "))
    assert " on 1 GPUs: goodput " in best or " on 2 GPUs: goodput " in best
    assert "req/s/GPU" in best
    assert any(line.startswith("latency at that rate: TTFT p50 ") for line in lines)
    assert any(line.startswith("why ") and " wins: highest goodput per GPU" in line for line in lines)
    assert any(line.startswith("pruned: ") for line in lines)
    assert lines[-1] == f"the whole result: splan status {plan_id} --json"
    assert len(lines) <= 24
    assert f"plan {plan_id} " in captured.err
    assert "\x1b" not in captured.err

    assert main(["status", plan_id]) == 0
    assert capsys.readouterr().out.splitlines()[:-2] == lines[:-2]
    assert main(["status", plan_id, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["id"] == plan_id
    assert plan["result"]["strategies"]


def test_submit_without_wait_and_the_server_flag(
    server: str, spec_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPLAN_SERVER", "http://127.0.0.1:1")
    assert main(["submit", str(spec_file), "--server", server]) == 0
    lines = capsys.readouterr().out.splitlines()
    plan_id = lines[0].split()[1].rstrip(":")
    assert lines[0].split()[2] in ("queued", "running", "succeeded")
    assert lines[-1] == f"follow it with: splan status {plan_id} --server {server}"
    assert main(["submit", str(spec_file), "--server", server, "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"id", "status", "created_at"}
    # The environment's server is used when --server is not given: this one refuses connections.
    assert main(["status", plan_id]) == 2
    err = capsys.readouterr().err
    assert err.startswith("splan: error: cannot reach http://127.0.0.1:1")
    assert err.count("\n") == 1


def test_submit_a_fleet_example(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", str(REPO / "examples" / "fleet.yaml"), "--server", server, "--wait"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(": succeeded (fleet: llama-3.1-70b,llama-3.1-8b,qwen3-32b on h100-sxm,l40s)")
    assert any(line.startswith("deployment ") and "GPU type" in line for line in lines)
    assert any(line.startswith("total:    11 GPUs used of 24") for line in lines)
    assert main(["submit", str(REPO / "examples" / "fleet-cluster.yaml"), "--server", server]) == 2
    err = capsys.readouterr().err
    assert "cluster_file is read by `splan plan` only" in err
    assert err.count("\n") == 1


def test_status_of_an_unknown_plan_is_one_line(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "nope", "--server", server]) == 2
    err = capsys.readouterr().err
    assert "404" in err
    assert err.count("\n") == 1
