"""Launch bundles: every emitted command and YAML key is one the engine's CLI (as recorded) accepts."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import stat
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.launch import ENGINES, LaunchError, launch_bundle, write_launch_bundle
from service.launch.engines import EngineData, EntryPoint, engine_data
from service.planning.catalog import Catalog
from service.planning.plan_spec import PlanSpec, parse_plan_spec
from service.planning.search import plan

REPO = Path(__file__).resolve().parents[1]


def _is_strategy_spec(path: Path) -> bool:
    raw = yaml.safe_load(path.read_text())
    return isinstance(raw, dict) and "workload" in raw and raw.get("kind", "strategy") == "strategy"


# Plan specs of one model (not the cluster file, not fleet specs).
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml") if _is_strategy_spec(p))
GPU_RESOURCE = "nvidia.com/gpu"
SCRIPT_BY_ROLE = {"server": "serve.sh", "prefill": "prefill.sh", "decode": "decode.sh"}
NUMBER = re.compile(r"-?\d+(\.\d+)?")

Bundle = dict[str, str]


# --- helpers -------------------------------------------------------------------------------------


def _logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        if raw.endswith("\\"):
            current += raw[:-1] + " "
            continue
        lines.append(current + raw)
        current = ""
    return lines


def _find(tokens: list[str], invocation: tuple[str, ...]) -> int:
    for i in range(len(tokens) - len(invocation) + 1):
        if tuple(tokens[i : i + len(invocation)]) == invocation:
            return i
    return -1


def invocations(text: str, data: EngineData) -> list[tuple[EntryPoint, list[str]]]:
    """Every engine invocation in a shell script: its entry point and the tokens after it."""
    found: list[tuple[EntryPoint, list[str]]] = []
    # Longest invocation first: `trtllm-serve disaggregated` before `trtllm-serve`.
    entries = sorted(data.entry_points, key=lambda e: -len(e.invocation))
    for line in _logical_lines(text):
        stripped = line.strip()
        if stripped.startswith("#") or not any(" ".join(e.invocation) in stripped for e in entries):
            continue
        tokens = shlex.split(stripped)
        for entry in entries:
            start = _find(tokens, entry.invocation)
            if start >= 0:
                found.append((entry, tokens[start + len(entry.invocation) :]))
                break
    return found


def check_invocation(entry: EntryPoint, args: list[str]) -> list[str]:
    """Flags of ``args`` missing from the recorded data, or given a value the data does not list."""
    problems = []
    for i, token in enumerate(args):
        if not token.startswith("-") or NUMBER.fullmatch(token):
            continue
        argument = entry.argument(token)
        if argument is None:
            problems.append(f"{' '.join(entry.invocation)}: unknown flag {token}")
            continue
        if argument.deprecated:
            problems.append(f"{' '.join(entry.invocation)}: deprecated flag {token} (use {argument.deprecated})")
        if argument.values and (i + 1 >= len(args) or args[i + 1] not in argument.values):
            value = args[i + 1] if i + 1 < len(args) else None
            problems.append(f"{' '.join(entry.invocation)}: {token} {value!r} not in {argument.values}")
    return problems


def vllm_speculative_problems(args: list[str], data: EngineData) -> list[str]:
    """Keys and methods of a --speculative-config JSON that the vLLM data does not list."""
    problems: list[str] = []
    argument = data.entry_point(("vllm", "serve")).argument("--speculative-config")
    assert argument is not None
    for i, token in enumerate(args[:-1]):
        if token not in (argument.name, *argument.aliases):
            continue
        config = json.loads(args[i + 1])
        problems += [
            f"--speculative-config key {k}" for k in sorted(set(config) - data.yaml_keys["speculative_config"])
        ]
        if config.get("method") not in data.yaml_keys["speculative_config.method"]:
            problems.append(f"--speculative-config method {config.get('method')!r}")
    return problems


def dotted_keys(mapping: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            keys |= dotted_keys(value, f"{name}.")
        else:
            keys.add(name)
    return keys


def heredoc(text: str, target: str) -> str:
    """The body of the `cat > target <<EOF` here-document in a script."""
    match = re.search(rf"cat > {re.escape(target)} <<EOF\n(.*?)\nEOF\n", text, re.S)
    assert match, f"no here-document for {target}"
    return match.group(1)


def k8s_documents(bundle: Bundle, engine: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(bundle[f"k8s/{engine}.yaml"]) if d]


def pod_templates(document: dict[str, Any]) -> list[dict[str, Any]]:
    if document["kind"] == "Deployment":
        return [document["spec"]["template"]]
    if document["kind"] == "LeaderWorkerSet":
        template = document["spec"]["leaderWorkerTemplate"]
        return [template["leaderTemplate"], template["workerTemplate"]]
    return []


def container_scripts(bundle: Bundle, engine: str) -> list[str]:
    scripts = []
    for document in k8s_documents(bundle, engine):
        for pod in pod_templates(document):
            for container in pod["spec"]["containers"]:
                assert container["command"][:2] == ["/bin/sh", "-c"]
                scripts.append(container["command"][2])
    return scripts


def all_problems(bundle: Bundle, engines: tuple[str, ...] = ENGINES) -> list[str]:
    """Every flag, value and TRT-LLM YAML key of the bundle that the engine data does not know."""
    problems: list[str] = []
    for engine in engines:
        data = engine_data(engine)
        texts = [text for path, text in bundle.items() if path.startswith(f"{engine}/") and path.endswith(".sh")]
        texts += container_scripts(bundle, engine)
        for text in texts:
            for entry, args in invocations(text, data):
                problems += check_invocation(entry, args)
                if engine == "vllm":
                    problems += vllm_speculative_problems(args, data)
        if engine != "trtllm":
            continue
        options = [yaml.safe_load(t) for p, t in bundle.items() if p.startswith("trtllm/config/")]
        disagg: list[dict[str, Any]] = []
        for document in k8s_documents(bundle, engine):
            if document["kind"] == "ConfigMap":
                for name, text in document["data"].items():
                    (disagg if name == "disagg.yaml" else options).append(yaml.safe_load(text))
        if "trtllm/router.sh" in bundle and "config/disagg.yaml" in bundle["trtllm/router.sh"]:
            disagg.append(yaml.safe_load(heredoc(bundle["trtllm/router.sh"], "config/disagg.yaml")))
        for content in options:
            problems += sorted(dotted_keys(content) - data.yaml_keys["extra_llm_api_options"])
        for content in disagg:
            problems += sorted(dotted_keys(content) - data.yaml_keys["disaggregated_config"])
    return problems


def server_args(bundle: Bundle, engine: str, script: str) -> list[list[str]]:
    return [args for _, args in invocations(bundle[f"{engine}/{script}"], engine_data(engine))]


def strategy(
    layout: dict[str, Any],
    *,
    mode: str = "collocated",
    weight: str = "fp8",
    experts: str | None = None,
    kv: str = "bf16",
    engine: str = "vllm",
    sequences: int = 1024,
    fraction: float = 0.9,
) -> dict[str, Any]:
    if mode == "collocated":
        gpus = layout["tp"] * layout.get("attention_dp", 1) * layout.get("pp", 1) * layout.get("replicas", 1)
    else:
        gpus = sum(
            p["tp"] * p.get("attention_dp", 1) * p.get("pp", 1) * p.get("workers", 1)
            for p in (layout["prefill"], layout["decode"])
        )
    return {
        "label": "hand-made",
        "mode": mode,
        "gpus": gpus,
        "layout": layout,
        "engine": engine,
        "weight_dtype": weight,
        "moe_weight_dtype": experts,
        "kv_dtype": kv,
        "max_batched_tokens": 8192,
        "max_sequences": sequences,
        "gpu_memory_fraction": fraction,
        "goodput_rps": 1.0,
        "rank": 1,
    }


def spec_for(model: str, gpu: str = "h100-sxm", engine: str = "vllm") -> dict[str, Any]:
    return {
        "model": model,
        "gpu": gpu,
        "max_gpus": 64,
        "engine": engine,
        "workload": {"arrival": "poisson", "isl": 2048, "osl": 256},
        "slo": {"ttft_ms": 1000, "tpot_ms": 50},
    }


def dense(tp: int, *, pp: int = 1, replicas: int = 1) -> dict[str, Any]:
    return {"tp": tp, "pp": pp, "attention_dp": 1, "moe_tp": tp, "moe_ep": 1, "replicas": replicas}


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_results(catalog: Catalog) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Every example spec planned with a small search (two strategies simulated per mode)."""
    out = {}
    for path in EXAMPLES:
        raw = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "kind"}
        request = parse_plan_spec(raw, catalog=catalog, base_dir=path.parent)
        request = replace(request, limits=replace(request.limits, simulate_top=2, requests=20))
        out[path.stem] = (raw, plan(request, catalog=catalog).as_dict())
    return out


# --- engine data ---------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_data_records_version_and_sources(engine: str) -> None:
    data = engine_data(engine)
    assert data.engine == engine
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?\S*", data.version)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", data.read_on)
    assert data.source
    assert data.files
    assert data.image
    assert data.entry_points
    for entry in data.entry_points:
        assert entry.arguments
        assert entry.version
        assert entry.source
        for argument in entry.arguments:
            assert argument.name.startswith("-")
            assert all(alias.startswith("-") for alias in argument.aliases)


def test_unknown_engine_data_is_refused() -> None:
    with pytest.raises(LaunchError, match="unknown engine"):
        engine_data("tgi")


# --- every example, top strategies, every engine -------------------------------------------------


@pytest.mark.parametrize("example", [p.stem for p in EXAMPLES])
def test_top_strategies_of_every_example_emit_known_flags_only(
    example: str, example_results: dict[str, tuple[dict[str, Any], dict[str, Any]]], catalog: Catalog
) -> None:
    spec, result = example_results[example]
    ranks = range(1, min(3, len(result["strategies"])) + 1)
    assert ranks
    for rank in ranks:
        bundle = launch_bundle(spec, result, strategy_rank=rank, catalog=catalog)
        assert all_problems(bundle) == [], f"{example} strategy {rank}"
        chosen = result["strategies"][rank - 1]
        roles = ["prefill", "decode"] if chosen["mode"] == "disaggregated" else ["server"]
        for engine in ENGINES:
            for role in roles:
                assert server_args(bundle, engine, SCRIPT_BY_ROLE[role]), f"{engine} {role}"
        assert bundle["README.md"].startswith("# Launch bundle")


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_scripts_are_valid_bash(
    example_results: dict[str, tuple[dict[str, Any], dict[str, Any]]], catalog: Catalog
) -> None:
    spec, result = example_results["deepseek-r1-h100"]
    bundle = launch_bundle(spec, result, catalog=catalog)
    for path, text in bundle.items():
        if path.endswith((".sh", "cluster.env")):
            run = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True, check=False)
            assert run.returncode == 0, f"{path}: {run.stderr}"


# --- exact commands on hand-checked cases -------------------------------------------------------


def test_collocated_llama70b_tp4_fp8_exact_commands(catalog: Catalog) -> None:
    result = {"strategies": [strategy(dense(4))]}
    bundle = launch_bundle(spec_for("llama-3.1-70b"), result, catalog=catalog)
    assert server_args(bundle, "vllm", "serve.sh") == [
        [
            "meta-llama/Llama-3.1-70B-Instruct",
            "--host",
            "0.0.0.0",
            "--port",
            "${PORT}",
            "--tensor-parallel-size",
            "4",
            "--quantization",
            "fp8",
            "--max-num-batched-tokens",
            "8192",
            "--max-num-seqs",
            "1024",
            "--gpu-memory-utilization",
            "0.9",
        ]
    ]
    assert "exec vllm serve meta-llama/Llama-3.1-70B-Instruct \\\n    --host 0.0.0.0 \\\n" in bundle["vllm/serve.sh"]
    # Without the plan's per-GPU memory SGLang and TRT-LLM get the planner's fraction unchanged.
    sglang = "--model-path meta-llama/Llama-3.1-70B-Instruct --host 0.0.0.0 --port ${PORT} --tp-size 4"
    sglang += " --quantization fp8 --chunked-prefill-size 8192 --max-running-requests 1024 --mem-fraction-static 0.9"
    assert server_args(bundle, "sglang", "serve.sh") == [sglang.split()]
    trtllm = "meta-llama/Llama-3.1-70B-Instruct --host 0.0.0.0 --port ${PORT} --backend pytorch --tp_size 4"
    trtllm += " --max_batch_size 1024 --max_num_tokens 8192 --kv_cache_free_gpu_memory_fraction 0.9"
    trtllm += " --extra_llm_api_options config/server.yaml"
    assert server_args(bundle, "trtllm", "serve.sh") == [trtllm.split()]
    assert yaml.safe_load(bundle["trtllm/config/server.yaml"]) == {
        "enable_chunked_prefill": True,
        "kv_cache_config": {"free_gpu_memory_fraction": 0.9, "dtype": "auto"},
    }
    # TRT-LLM cannot quantize while loading: the script says which checkpoint it needs.
    assert "FP8 (NVIDIA ModelOpt) checkpoint" in bundle["trtllm/serve.sh"]
    # One instance: no router, the Service is the front door.
    assert not any(path.endswith("router.sh") for path in bundle)
    assert all_problems(bundle) == []


def test_kv_fp8_and_native_fp8_checkpoint(catalog: Catalog) -> None:
    layout = {"tp": 8, "pp": 1, "attention_dp": 1, "moe_tp": 8, "moe_ep": 1, "replicas": 1}
    result = {"strategies": [strategy(layout, experts="fp8", kv="fp8")]}
    bundle = launch_bundle(spec_for("deepseek-r1"), result, catalog=catalog)
    (vllm,) = server_args(bundle, "vllm", "serve.sh")
    # DeepSeek-R1 is published in fp8: no --quantization, and pure MoE-TP needs no expert parallelism.
    assert "--quantization" not in vllm
    assert "--enable-expert-parallel" not in vllm
    assert vllm[vllm.index("--kv-cache-dtype") + 1] == "fp8"
    (sglang,) = server_args(bundle, "sglang", "serve.sh")
    assert sglang[sglang.index("--kv-cache-dtype") + 1] == "fp8_e4m3"
    assert "--ep-size" not in sglang
    assert yaml.safe_load(bundle["trtllm/config/server.yaml"])["kv_cache_config"]["dtype"] == "fp8"
    assert "served as published" in bundle["README.md"]


def test_deepseek_attention_dp_and_expert_parallel_per_engine(catalog: Catalog) -> None:
    layout = {"tp": 1, "pp": 1, "attention_dp": 8, "moe_tp": 1, "moe_ep": 8, "replicas": 2}
    result = {"strategies": [strategy(layout, experts="fp8", engine="sglang", sequences=256)]}
    bundle = launch_bundle(spec_for("deepseek-r1", engine="sglang"), result, catalog=catalog)
    (vllm,) = server_args(bundle, "vllm", "serve.sh")
    assert vllm[vllm.index("--tensor-parallel-size") + 1] == "1"
    assert vllm[vllm.index("--data-parallel-size") + 1] == "8"
    assert "--enable-expert-parallel" in vllm
    (sglang,) = server_args(bundle, "sglang", "serve.sh")
    # SGLang's --tp-size is every GPU of the instance; attention DP and EP split it.
    assert sglang[sglang.index("--tp-size") + 1] == "8"
    assert sglang[sglang.index("--attn-dp-size") + 1] == "8"
    assert sglang[sglang.index("--ep-size") + 1] == "8"
    assert sglang[sglang.index("--deepep-mode") + 1] == "auto"
    # Per-rank budgets times the 8 DP ranks, which SGLang divides back.
    assert sglang[sglang.index("--max-running-requests") + 1] == str(256 * 8)
    assert sglang[sglang.index("--chunked-prefill-size") + 1] == str(8192 * 8)
    (trtllm,) = server_args(bundle, "trtllm", "serve.sh")
    assert trtllm[trtllm.index("--tp_size") + 1] == "8"
    assert trtllm[trtllm.index("--ep_size") + 1] == "8"
    options = yaml.safe_load(bundle["trtllm/config/server.yaml"])
    assert options["enable_attention_dp"] is True
    assert options["moe_tensor_parallel_size"] == 1
    # Two replicas: a router in front for vLLM and SGLang, nginx for TRT-LLM.
    (vllm_router,) = server_args(bundle, "vllm", "router.sh")
    assert vllm_router.count("http://${SERVER_HEAD_0}:${SERVER_PORTS[0]}") == 1
    assert "--worker-urls" in vllm_router
    (sglang_router,) = server_args(bundle, "sglang", "router.sh")
    assert sglang_router[sglang_router.index("--worker-urls") + 1 :][:2] == [
        "http://${SERVER_HEAD_0}:${SERVER_PORTS[0]}",
        "http://${SERVER_HEAD_1}:${SERVER_PORTS[1]}",
    ]
    assert "server ${SERVER_HEAD_1}:${SERVER_PORTS[1]};" in heredoc(bundle["trtllm/router.sh"], "config/nginx.conf")
    assert all_problems(bundle) == []


def test_multi_node_instance_per_engine(catalog: Catalog) -> None:
    layout = {"tp": 1, "pp": 1, "attention_dp": 16, "moe_tp": 1, "moe_ep": 16, "replicas": 1}
    result = {"strategies": [strategy(layout, experts="fp8", engine="sglang")]}
    bundle = launch_bundle(spec_for("deepseek-r1", engine="sglang"), result, catalog=catalog)
    head, worker = server_args(bundle, "vllm", "serve.sh")
    assert head[head.index("--data-parallel-size-local") + 1] == "8"
    assert head[head.index("--data-parallel-address") + 1] == "${HEAD}"
    assert "--headless" not in head
    assert "--headless" in worker
    assert worker[worker.index("--data-parallel-start-rank") + 1] == "${START_RANK}"
    assert "START_RANK=$((NODE_RANK * 8))" in bundle["vllm/serve.sh"]
    (sglang,) = server_args(bundle, "sglang", "serve.sh")
    assert sglang[sglang.index("--nnodes") + 1] == "2"
    assert sglang[sglang.index("--node-rank") + 1] == "${NODE_RANK}"
    assert sglang[sglang.index("--dist-init-addr") + 1] == "${HEAD}:20000"
    assert "mpirun" in bundle["trtllm/serve.sh"]
    assert "trtllm-llmapi-launch trtllm-serve" in bundle["trtllm/serve.sh"]
    (trtllm,) = server_args(bundle, "trtllm", "serve.sh")
    assert trtllm[trtllm.index("--gpus_per_node") + 1] == "8"
    for engine in ENGINES:
        (lws,) = [d for d in k8s_documents(bundle, engine) if d["kind"] == "LeaderWorkerSet"]
        assert lws["spec"]["replicas"] == 1
        assert lws["spec"]["leaderWorkerTemplate"]["size"] == 2
        for pod in pod_templates(lws):
            assert pod["spec"]["containers"][0]["resources"]["limits"][GPU_RESOURCE] == 8
    assert all_problems(bundle) == []


def test_vllm_rank_spanning_nodes_uses_nnodes(catalog: Catalog) -> None:
    result = {"strategies": [strategy(dense(8, pp=2))]}
    bundle = launch_bundle(spec_for("llama-3.1-405b"), result, catalog=catalog)
    head, worker = server_args(bundle, "vllm", "serve.sh")
    assert head[head.index("--nnodes") + 1] == "2"
    assert head[head.index("--master-addr") + 1] == "${HEAD}"
    assert "--headless" in worker
    assert worker[worker.index("--node-rank") + 1] == "${NODE_RANK}"
    assert all_problems(bundle) == []


def test_disaggregated_strategy_has_prefill_decode_and_router_per_engine(catalog: Catalog) -> None:
    layout = {
        "prefill": {"tp": 2, "pp": 1, "attention_dp": 1, "moe_tp": 2, "moe_ep": 1, "workers": 3},
        "decode": {"tp": 4, "pp": 1, "attention_dp": 1, "moe_tp": 4, "moe_ep": 1, "workers": 2},
    }
    result = {"strategies": [strategy(layout, mode="disaggregated")]}
    bundle = launch_bundle(spec_for("llama-3.1-70b"), result, catalog=catalog)
    for engine in ENGINES:
        assert {f"{engine}/prefill.sh", f"{engine}/decode.sh", f"{engine}/router.sh"} <= set(bundle)
    (prefill,) = server_args(bundle, "vllm", "prefill.sh")
    assert "NixlConnector" in prefill[prefill.index("--kv-transfer-config") + 1]
    (router,) = server_args(bundle, "vllm", "router.sh")
    assert "--vllm-pd-disaggregation" in router
    assert router.count("--prefill") == 3
    assert router.count("--decode") == 2
    (prefill,) = server_args(bundle, "sglang", "prefill.sh")
    assert prefill[prefill.index("--disaggregation-mode") + 1] == "prefill"
    assert "--disaggregation-transfer-backend" in prefill
    (decode,) = server_args(bundle, "sglang", "decode.sh")
    assert decode[decode.index("--disaggregation-mode") + 1] == "decode"
    (router,) = server_args(bundle, "sglang", "router.sh")
    assert "--pd-disaggregation" in router
    assert router.count("--prefill") == 3
    # SGLang's --prefill takes the server URL and its bootstrap port.
    assert router[router.index("--prefill") + 2] == "${PREFILL_BOOTSTRAP_PORTS[0]}"
    (router,) = server_args(bundle, "trtllm", "router.sh")
    assert router == ["-c", "config/disagg.yaml"]
    config = yaml.safe_load(heredoc(bundle["trtllm/router.sh"], "config/disagg.yaml"))
    assert config["context_servers"]["num_instances"] == 3
    assert len(config["context_servers"]["urls"]) == 3
    assert config["generation_servers"]["num_instances"] == 2
    assert yaml.safe_load(bundle["trtllm/config/prefill.yaml"])["disable_overlap_scheduler"] is True
    assert "cache_transceiver_config" in yaml.safe_load(bundle["trtllm/config/decode.yaml"])
    assert all_problems(bundle) == []


def test_kubernetes_manifests_gpu_and_replica_counts(catalog: Catalog) -> None:
    layout = {
        "prefill": {"tp": 2, "pp": 1, "attention_dp": 1, "moe_tp": 2, "moe_ep": 1, "workers": 3},
        "decode": {"tp": 4, "pp": 1, "attention_dp": 1, "moe_tp": 4, "moe_ep": 1, "workers": 2},
    }
    result = {"strategies": [strategy(layout, mode="disaggregated")]}
    bundle = launch_bundle(spec_for("llama-3.1-70b"), result, catalog=catalog)
    expected = {"prefill": (3, 2), "decode": (2, 4)}
    for engine in ENGINES:
        documents = k8s_documents(bundle, engine)
        pools = {
            d["metadata"]["name"].rsplit("-", 1)[1]: d
            for d in documents
            if d["kind"] in ("Deployment", "LeaderWorkerSet") and not d["metadata"]["name"].endswith("router")
        }
        assert set(pools) == set(expected)
        for role, (replicas, gpus) in expected.items():
            document = pools[role]
            # TRT-LLM's router names each worker, so its pools get the stable pod names of a LeaderWorkerSet.
            assert document["kind"] == ("LeaderWorkerSet" if engine == "trtllm" else "Deployment")
            assert document["spec"]["replicas"] == replicas
            for pod in pod_templates(document):
                container = pod["spec"]["containers"][0]
                assert container["image"] == engine_data(engine).image
                assert container["resources"]["limits"][GPU_RESOURCE] == gpus
        routers = [d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("router")]
        assert len(routers) == 1
        router_pod = routers[0]["spec"]["template"]["spec"]
        assert "resources" not in router_pod["containers"][0]
        (front,) = [
            d for d in documents if d["kind"] == "Service" and d["metadata"]["name"] == f"llama-3-1-70b-{engine}"
        ]
        assert front["spec"]["selector"]["splan.io/pool"] == routers[0]["metadata"]["name"]


def test_collocated_single_node_replicas_on_kubernetes(catalog: Catalog) -> None:
    result = {"strategies": [strategy(dense(2, replicas=4))]}
    bundle = launch_bundle(spec_for("llama-3.1-70b"), result, catalog=catalog)
    for engine in ENGINES:
        (deployment,) = [
            d
            for d in k8s_documents(bundle, engine)
            if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-server")
        ]
        assert deployment["spec"]["replicas"] == 4
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"][GPU_RESOURCE] == 2
    kinds = {d["kind"] for d in k8s_documents(bundle, "vllm")}
    assert {"ServiceAccount", "Role", "RoleBinding"} <= kinds


def test_model_config_spec_uses_the_local_checkpoint(catalog: Catalog) -> None:
    spec = spec_for("unused")
    del spec["model"]
    spec["model_config"] = "models/my-llama/config.json"
    result = {"strategies": [strategy(dense(1), weight="bf16")]}
    bundle = launch_bundle(spec, result, engines=["vllm"], catalog=catalog)
    (vllm,) = server_args(bundle, "vllm", "serve.sh")
    assert vllm[0] == "models/my-llama"
    assert "model_config" in bundle["vllm/serve.sh"]
    assert "model_config" in bundle["README.md"]
    assert not any(path.startswith("sglang/") for path in bundle)


# --- speculative decoding ------------------------------------------------------------------------


def speculative_spec(model: str, method: str, draft_tokens: int, acceptance_length: float) -> dict[str, Any]:
    spec = spec_for(model)
    spec["engine_settings"] = {
        "speculative": {"method": method, "draft_tokens": draft_tokens, "acceptance_length": acceptance_length}
    }
    return spec


def after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _gpt_oss_bundles(catalog: Catalog, moe_backend: str) -> tuple[dict[str, str], str]:
    """gpt-oss-120b's bundle with ``moe_backend`` and, joined, the bundle without it."""
    layout = {"tp": 2, "pp": 1, "attention_dp": 1, "moe_tp": 2, "moe_ep": 1, "replicas": 1}
    result = {"strategies": [strategy(layout, weight="bf16", experts="mxfp4")]}
    spec = {**spec_for("gpt-oss-120b"), "engine_settings": {"moe_backend": moe_backend}}
    default = launch_bundle(spec_for("gpt-oss-120b"), result, catalog=catalog)
    return launch_bundle(spec, result, catalog=catalog), "".join(default.values())


def test_a_marlin_plan_tells_vllm_to_run_marlin_and_notes_it_elsewhere(catalog: Catalog) -> None:
    bundle, default = _gpt_oss_bundles(catalog, "marlin")
    assert 'export VLLM_MXFP4_USE_MARLIN="1"' in bundle["vllm/serve.sh"]
    assert "VLLM_MXFP4_USE_MARLIN" in bundle["k8s/vllm.yaml"]
    assert "VLLM_MXFP4_USE_MARLIN" not in bundle["sglang/serve.sh"] + bundle["trtllm/serve.sh"]
    for engine in ("sglang", "trtllm"):
        assert f"Marlin kernels (moe_backend: marlin); {engine} runs its own MoE kernels" in bundle["README.md"]
    assert all_problems(bundle) == []
    assert "VLLM_MXFP4_USE_MARLIN" not in default


def test_a_flashinfer_cutlass_plan_sets_each_engines_moe_backend(catalog: Catalog) -> None:
    bundle, default = _gpt_oss_bundles(catalog, "flashinfer_cutlass")
    assert 'export VLLM_FLASHINFER_MOE_BACKEND="throughput"' in bundle["vllm/serve.sh"]
    assert "VLLM_FLASHINFER_MOE_BACKEND" in bundle["k8s/vllm.yaml"]
    assert "--moe-runner-backend flashinfer_cutlass" in bundle["sglang/serve.sh"]
    assert "moe_config.backend" in bundle["README.md"]
    assert all_problems(bundle) == []
    assert "VLLM_FLASHINFER_MOE_BACKEND" not in default
    assert "--moe-runner-backend" not in default


def test_mtp_plan_emits_speculative_decoding_per_engine(catalog: Catalog) -> None:
    layout = {"tp": 8, "pp": 1, "attention_dp": 1, "moe_tp": 8, "moe_ep": 1, "replicas": 1}
    result = {"strategies": [strategy(layout, experts="fp8")]}
    bundle = launch_bundle(speculative_spec("deepseek-r1", "mtp", 3, 2.4), result, catalog=catalog)
    (vllm,) = server_args(bundle, "vllm", "serve.sh")
    # vLLM 0.34 spells every <model>_mtp method "mtp"; without a model it drafts with the target's MTP layer.
    assert after(vllm, "--speculative-config") == '{"method":"mtp","num_speculative_tokens":3}'
    (sglang,) = server_args(bundle, "sglang", "serve.sh")
    start = sglang.index("--speculative-algorithm")
    assert sglang[start : start + 8] == [
        "--speculative-algorithm",
        "EAGLE",
        "--speculative-num-steps",
        "3",
        "--speculative-eagle-topk",
        "1",
        "--speculative-num-draft-tokens",
        "4",
    ]
    # SGLang points DeepSeek's drafter at the model itself: no draft path.
    assert "--speculative-draft-model-path" not in sglang
    assert yaml.safe_load(bundle["trtllm/config/server.yaml"])["speculative_config"] == {
        "decoding_type": "MTP",
        "num_nextn_predict_layers": 3,
    }
    assert "DRAFT_MODEL" not in "".join(bundle.values())
    readme_text = bundle["README.md"]
    assert "Speculative decoding: MTP, 3 draft tokens per step, verified in one pass of 4 tokens" in readme_text
    assert "acceptance length of 2.4 tokens per step" in readme_text
    assert "MTP drafts with the model's own MTP layers" in readme_text
    assert all_problems(bundle) == []


def _expand(word: str, draft_model: str) -> str:
    """What bash makes of one rendered shell word with DRAFT_MODEL set."""
    run = subprocess.run(
        ["bash", "-c", f"DRAFT_MODEL={shlex.quote(draft_model)}; printf %s {word}"],
        text=True,
        capture_output=True,
        check=True,
    )
    return run.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_eagle3_disaggregated_plan_drafts_on_every_server_with_the_users_head(catalog: Catalog) -> None:
    layout = {
        "prefill": {"tp": 2, "pp": 1, "attention_dp": 1, "moe_tp": 2, "moe_ep": 1, "workers": 1},
        "decode": {"tp": 4, "pp": 1, "attention_dp": 1, "moe_tp": 4, "moe_ep": 1, "workers": 2},
    }
    result = {"strategies": [strategy(layout, mode="disaggregated")]}
    bundle = launch_bundle(speculative_spec("llama-3.1-70b", "eagle3", 2, 2.2), result, catalog=catalog)
    config = '{"method":"eagle3","num_speculative_tokens":2,"model":"${DRAFT_MODEL}"}'
    for script in ("prefill.sh", "decode.sh"):
        (vllm,) = server_args(bundle, "vllm", script)
        assert after(vllm, "--speculative-config") == config
        (sglang,) = server_args(bundle, "sglang", script)
        assert after(sglang, "--speculative-algorithm") == "EAGLE3"
        assert after(sglang, "--speculative-num-steps") == "2"
        assert after(sglang, "--speculative-eagle-topk") == "1"
        assert after(sglang, "--speculative-num-draft-tokens") == "3"
        assert after(sglang, "--speculative-draft-model-path") == "${DRAFT_MODEL}"
    for role in ("prefill", "decode"):
        assert yaml.safe_load(bundle[f"trtllm/config/{role}.yaml"])["speculative_config"] == {
            "decoding_type": "Eagle3",
            "max_draft_len": 2,
            "speculative_model_dir": "<EAGLE-3 head checkpoint>",
        }
    # The JSON survives the shell: single-quoted text around the double-quoted expansion.
    line = next(ln for ln in bundle["vllm/decode.sh"].splitlines() if "--speculative-config" in ln)
    word = line.split("--speculative-config ", 1)[1].rstrip(" \\")
    expanded = json.loads(_expand(word, "yuhuili/EAGLE3-LLaMA3.3-Instruct-70B"))
    assert expanded == {
        "method": "eagle3",
        "num_speculative_tokens": 2,
        "model": "yuhuili/EAGLE3-LLaMA3.3-Instruct-70B",
    }
    # The head is the user's to give: empty in cluster.env and the containers, and the scripts stop without it.
    for engine in ("vllm", "sglang"):
        assert 'DRAFT_MODEL=""' in bundle[f"{engine}/cluster.env"]
        for document in k8s_documents(bundle, engine):
            for pod in pod_templates(document):
                container = pod["spec"]["containers"][0]
                if container["name"] == "engine":
                    assert {"name": "DRAFT_MODEL", "value": ""} in container["env"]
                    assert ': "${DRAFT_MODEL:?set DRAFT_MODEL' in container["command"][2]
    assert "DRAFT_MODEL" not in bundle["trtllm/cluster.env"]
    assert "EAGLE-3 head checkpoint is yours to supply" in bundle["README.md"]
    assert "acceptance length of 2.2 tokens per step" in bundle["README.md"]
    assert all_problems(bundle) == []


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_script_without_the_draft_model_stops_before_the_engine(tmp_path: Path, catalog: Catalog) -> None:
    result = {"strategies": [strategy(dense(4))]}
    bundle = launch_bundle(speculative_spec("llama-3.1-70b", "eagle", 3, 2.5), result, catalog=catalog)
    write_launch_bundle(bundle, tmp_path)
    run = subprocess.run(["bash", str(tmp_path / "vllm/serve.sh")], text=True, capture_output=True, check=False)
    assert run.returncode != 0
    assert "set DRAFT_MODEL in cluster.env to the EAGLE head checkpoint" in run.stderr
    # EAGLE-1/2 heads have no TRT-LLM PyTorch path: no speculative_config, and the notes say so.
    assert "speculative_config" not in yaml.safe_load(bundle["trtllm/config/server.yaml"])
    assert "drafts with MTP or EAGLE-3 heads only" in bundle["trtllm/serve.sh"]
    (vllm,) = server_args(bundle, "vllm", "serve.sh")
    assert json.loads(after(vllm, "--speculative-config"))["method"] == "eagle"
    (sglang,) = server_args(bundle, "sglang", "serve.sh")
    assert after(sglang, "--speculative-algorithm") == "EAGLE"
    assert all_problems(bundle) == []


def test_mtp_on_a_model_without_mtp_layers_is_flagged(catalog: Catalog) -> None:
    bundle = launch_bundle(
        speculative_spec("llama-3.1-70b", "mtp", 1, 1.8), {"strategies": [strategy(dense(4))]}, catalog=catalog
    )
    assert "meta-llama/Llama-3.1-70B-Instruct must carry them" in bundle["README.md"]
    deepseek = launch_bundle(
        speculative_spec("deepseek-r1", "mtp", 1, 1.8),
        {"strategies": [strategy(dense(8), experts="fp8")]},
        catalog=catalog,
    )
    assert "must carry them" not in deepseek["README.md"]


def test_stored_spec_of_the_api_carries_the_speculative_setting(catalog: Catalog) -> None:
    # GET /v1/plans/{id}/launch reads the spec as the service stored it (plans_service.validate_plan).
    raw = speculative_spec("deepseek-r1", "mtp", 2, 2.1)
    stored = PlanSpec.model_validate(raw).model_dump(mode="json", by_alias=True, exclude_unset=True, exclude={"kind"})
    bundle = launch_bundle(
        stored, {"strategies": [strategy(dense(8), experts="fp8")]}, engines=["vllm"], catalog=catalog
    )
    (vllm,) = server_args(bundle, "vllm", "serve.sh")
    assert after(vllm, "--speculative-config") == '{"method":"mtp","num_speculative_tokens":2}'


def test_plan_without_speculative_decoding_emits_none(catalog: Catalog) -> None:
    for spec in (spec_for("deepseek-r1"), {**spec_for("deepseek-r1"), "engine_settings": {"speculative": None}}):
        bundle = launch_bundle(spec, {"strategies": [strategy(dense(8), experts="fp8")]}, catalog=catalog)
        text = "".join(bundle.values())
        assert "speculative" not in text.lower()
        assert "DRAFT_MODEL" not in text


def test_flag_checker_refuses_speculative_values_the_data_does_not_list() -> None:
    sglang = engine_data("sglang").entry_point(("python", "-m", "sglang.launch_server"))
    assert check_invocation(sglang, ["--speculative-algorithm", "EAGLE3"]) == []
    assert check_invocation(sglang, ["--speculative-algorithm", "NEXTN"]) != []
    assert check_invocation(sglang, ["--speculative-draft-model", "x"]) == []
    vllm = engine_data("vllm")
    assert vllm_speculative_problems(["-sc", '{"method":"mtp","num_speculative_tokens":1}'], vllm) == []
    assert vllm_speculative_problems(["--speculative-config", '{"method":"deepseek_mtp","n":1}'], vllm) == [
        "--speculative-config key n",
        "--speculative-config method 'deepseek_mtp'",
    ]


@pytest.mark.parametrize(
    ("speculative", "message"),
    [
        ({"method": "medusa", "draft_tokens": 2, "acceptance_length": 2.0}, "unknown speculative method"),
        ({"method": "mtp", "draft_tokens": 0, "acceptance_length": 1.0}, "draft_tokens"),
        ({"method": "mtp", "draft_tokens": 1, "acceptance_length": 2.5}, "acceptance length"),
        ({"method": "mtp", "draft_tokens": 1}, "incomplete or malformed"),
        ("mtp:1:1.8", "not a mapping"),
    ],
)
def test_malformed_speculative_setting_is_refused(speculative: Any, message: str, catalog: Catalog) -> None:
    spec = {**spec_for("deepseek-r1"), "engine_settings": {"speculative": speculative}}
    with pytest.raises(LaunchError, match=message):
        launch_bundle(spec, {"strategies": [strategy(dense(8), experts="fp8")]}, catalog=catalog)


# --- refusals -----------------------------------------------------------------------------------


def test_bad_rank_engine_or_empty_plan_raise_launch_error(catalog: Catalog) -> None:
    spec = spec_for("llama-3.1-70b")
    result = {"strategies": [strategy(dense(4))]}
    for rank in (0, 2, -1):
        with pytest.raises(LaunchError, match="out of range"):
            launch_bundle(spec, result, strategy_rank=rank, catalog=catalog)
    with pytest.raises(LaunchError, match="unknown engine 'tgi'"):
        launch_bundle(spec, result, engines=["vllm", "tgi"], catalog=catalog)
    with pytest.raises(LaunchError, match="no engine"):
        launch_bundle(spec, result, engines=[], catalog=catalog)
    with pytest.raises(LaunchError, match="no strategies"):
        launch_bundle(spec, {"strategies": []}, catalog=catalog)
    with pytest.raises(LaunchError, match="unknown model"):
        launch_bundle(spec_for("no-such-model"), result, catalog=catalog)
    for message in (str(e) for e in _errors(spec, result, catalog)):
        assert "\n" not in message


def _errors(spec: dict[str, Any], result: dict[str, Any], catalog: Catalog) -> list[LaunchError]:
    errors = []
    for kwargs in ({"strategy_rank": 9}, {"engines": ["x"]}):
        try:
            launch_bundle(spec, result, catalog=catalog, **kwargs)
        except LaunchError as exc:
            errors.append(exc)
    return errors


def test_engine_names_are_case_insensitive_and_deduplicated(catalog: Catalog) -> None:
    result = {"strategies": [strategy(dense(4))]}
    bundle = launch_bundle(spec_for("llama-3.1-70b"), result, engines=["SGLang", "sglang"], catalog=catalog)
    assert {path.split("/")[0] for path in bundle} == {"sglang", "k8s", "README.md"}


# --- writing ------------------------------------------------------------------------------------


def test_write_launch_bundle_makes_scripts_executable(tmp_path: Path, catalog: Catalog) -> None:
    layout = {
        "prefill": {"tp": 2, "pp": 1, "attention_dp": 1, "moe_tp": 2, "moe_ep": 1, "workers": 1},
        "decode": {"tp": 2, "pp": 1, "attention_dp": 1, "moe_tp": 2, "moe_ep": 1, "workers": 1},
    }
    bundle = launch_bundle(
        spec_for("llama-3.1-70b"), {"strategies": [strategy(layout, mode="disaggregated")]}, catalog=catalog
    )
    written = write_launch_bundle(bundle, tmp_path / "bundle")
    assert sorted(p.relative_to(tmp_path / "bundle").as_posix() for p in written) == sorted(bundle)
    for path in written:
        assert path.read_text() == bundle[path.relative_to(tmp_path / "bundle").as_posix()]
        executable = bool(path.stat().st_mode & stat.S_IXUSR)
        assert executable == (path.suffix == ".sh")
    with pytest.raises(LaunchError, match="relative path"):
        write_launch_bundle({"../escape.sh": "x"}, tmp_path / "other")
