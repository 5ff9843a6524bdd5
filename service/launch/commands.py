"""Engine command lines for a strategy: servers per pool, routers, and TRT-LLM's YAML options."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.launch.engines import EngineData, engine_data
from service.launch.plan import DECODE, MTP_CHECKPOINTS, PREFILL, SERVER, LaunchPlan, Pool
from service.planning.moe_cost import FLASHINFER_CUTLASS_BACKEND, MARLIN_BACKEND
from service.planning.specs import SpeculativeDecoding

# Commands are argv token lists. Values known only where a command runs are shell parameter expansions that
# the bash scripts and the Kubernetes containers both define before running it, so one command serves both:
# PORT (this instance's HTTP port), HEAD (address of node rank 0 of the instance), NODE_RANK, THIS_HOST (this
# node's own address), HOSTS (the instance's nodes as mpirun wants them, host:slots,...), BOOTSTRAP_PORT
# (SGLang prefill), SIDE_CHANNEL_PORT (vLLM NIXL), and the names a server lists in ServerCommands.derived.

# Port numbers of the processes one instance runs besides its HTTP server.
VLLM_DP_RPC_PORT = 13345
VLLM_MASTER_PORT = 29501
SGLANG_DIST_INIT_PORT = 20000
# One all-to-all kernel family per role: DeepEP normal kernels prefill, low-latency kernels decode.
VLLM_ALL2ALL = {PREFILL: "deepep_high_throughput", DECODE: "deepep_low_latency"}
SGLANG_DEEPEP_MODE = {SERVER: "auto", PREFILL: "normal", DECODE: "low_latency"}
SGLANG_TRANSFER_BACKEND = "mooncake"
VLLM_KV_TRANSFER = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both"}, separators=(",", ":"))
# The planner spreads requests evenly over replicas and workers; the routers do the same.
ROUTER_POLICY = "round_robin"
# Speculative decoding per engine. SGLang resolves NEXTN (MTP) to EAGLE and, for DeepSeek-V3-style models,
# points the drafter at the model's own MTP layer; TRT-LLM's PyTorch backend drafts with MTP or EAGLE-3 only.
SGLANG_SPECULATIVE_ALGORITHM = {"mtp": "EAGLE", "eagle": "EAGLE", "eagle3": "EAGLE3"}
TRTLLM_DECODING_TYPE = {"mtp": "MTP", "eagle3": "Eagle3"}
# The EAGLE head checkpoint is the user's to give: a shell parameter of the scripts and containers (vLLM,
# SGLang), and a value to replace in TRT-LLM's options file, which no shell expands.
DRAFT_MODEL = "DRAFT_MODEL"
TRTLLM_DRAFT_MODEL_DIR = "<EAGLE-3 head checkpoint>"
METHOD_TITLES = {"mtp": "MTP", "eagle": "EAGLE", "eagle3": "EAGLE-3"}


@dataclass(frozen=True, slots=True)
class Command:
    """One program invocation: launcher prefix, entry point, positional arguments, options."""

    entry: tuple[str, ...]
    positional: tuple[str, ...] = ()
    options: tuple[tuple[str, ...], ...] = ()
    launcher: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        """All tokens in order."""
        return [*self.launcher, *self.entry, *self.positional, *(t for option in self.options for t in option)]

    def flags(self) -> list[str]:
        """The option names this command passes."""
        return [option[0] for option in self.options]


@dataclass(frozen=True, slots=True)
class ServerCommands:
    """How to start every node of one instance of a pool on one engine."""

    pool: Pool
    head: Command
    # Node ranks 1.. of a multi-node instance; None when single-node or when the head starts all ranks.
    worker: Command | None
    # The head starts every rank through mpirun; the other nodes only have to be reachable.
    mpi: bool = False
    env: tuple[tuple[str, str], ...] = ()
    derived: tuple[tuple[str, str], ...] = ()
    # Shell parameters the user sets before the command runs (name, what it holds); empty ones are refused.
    inputs: tuple[tuple[str, str], ...] = ()
    # TRT-LLM: the --extra_llm_api_options file's name (under config/) and content.
    options_file: str = ""
    options_yaml: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RouterCommands:
    """The process in front of the instances: the engine's router, or none (a Service, nginx)."""

    kind: str
    command: Command
    # Kubernetes: the router finds servers by pod labels (needs RBAC to watch pods).
    discovery: bool = False
    # A config file the router reads (TRT-LLM disaggregated server, nginx), rendered by the caller.
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EngineLaunch:
    """All commands of one strategy on one engine, and what a reader must know about them."""

    engine: str
    data: EngineData
    servers: tuple[ServerCommands, ...]
    router: RouterCommands | None
    k8s_router: RouterCommands | None
    notes: tuple[str, ...]


def _q(value: float) -> str:
    return f"{value:g}"


def _draft_inputs(plan: LaunchPlan) -> tuple[tuple[str, str], ...]:
    """The EAGLE head checkpoint as a user input, where the plan's drafter needs one."""
    if plan.speculative is None or not plan.draft_model_needed:
        return ()
    return ((DRAFT_MODEL, f"the {METHOD_TITLES[plan.speculative.method]} head checkpoint"),)


def vllm_speculative_config(speculative: SpeculativeDecoding) -> str:
    """vLLM's --speculative-config JSON: MTP drafts with the target's own layers, EAGLE loads the head."""
    config: dict[str, Any] = {"method": speculative.method, "num_speculative_tokens": speculative.draft_tokens}
    if speculative.method != "mtp":
        config["model"] = f"${{{DRAFT_MODEL}}}"
    return json.dumps(config, separators=(",", ":"))


def _sglang_speculative(speculative: SpeculativeDecoding) -> list[tuple[str, ...]]:
    steps = speculative.draft_tokens
    opts: list[tuple[str, ...]] = [
        ("--speculative-algorithm", SGLANG_SPECULATIVE_ALGORITHM[speculative.method]),
        ("--speculative-num-steps", str(steps)),
        # One draft chain (top-k 1), as the planner prices it: the verify pass holds the steps + the bonus token.
        ("--speculative-eagle-topk", "1"),
        ("--speculative-num-draft-tokens", str(steps + 1)),
    ]
    if speculative.method != "mtp":
        opts.append(("--speculative-draft-model-path", f"${{{DRAFT_MODEL}}}"))
    return opts


def trtllm_speculative_config(speculative: SpeculativeDecoding) -> dict[str, Any] | None:
    """The speculative_config of TRT-LLM's options (None: TRT-LLM does not run the method)."""
    decoding_type = TRTLLM_DECODING_TYPE.get(speculative.method)
    if decoding_type == "MTP":
        return {"decoding_type": decoding_type, "num_nextn_predict_layers": speculative.draft_tokens}
    if decoding_type is not None:
        return {
            "decoding_type": decoding_type,
            "max_draft_len": speculative.draft_tokens,
            "speculative_model_dir": TRTLLM_DRAFT_MODEL_DIR,
        }
    return None


def _speculative_notes(plan: LaunchPlan, engine: str) -> list[str]:
    speculative = plan.speculative
    if speculative is None:
        return []
    title = METHOD_TITLES[speculative.method]
    notes: list[str] = []
    if speculative.method == "mtp" and plan.model_name not in MTP_CHECKPOINTS:
        notes.append(
            f"MTP drafts with the checkpoint's own MTP layers: {plan.checkpoint.model} must carry them "
            "(num_nextn_predict_layers in its config.json, as DeepSeek-V3 and R1 do)."
        )
    if engine == "trtllm" and trtllm_speculative_config(speculative) is None:
        notes.append(
            f"TRT-LLM's PyTorch backend drafts with MTP or EAGLE-3 heads only: these servers run without the plan's "
            f"{title} drafter, so decode is slower than planned."
        )
    elif engine == "trtllm" and plan.draft_model_needed:
        notes.append(
            f"Replace speculative_model_dir {TRTLLM_DRAFT_MODEL_DIR!r} in config/<role>.yaml (Kubernetes: the config "
            f"map) with the {title} head trained for {plan.checkpoint.model} (a Hugging Face id or a local directory)."
        )
    elif plan.draft_model_needed:
        notes.append(
            f"Set {DRAFT_MODEL} (cluster.env; Kubernetes: the engine containers' env) to the {title} head trained "
            f"for {plan.checkpoint.model} (a Hugging Face id or a directory on every node); the servers refuse to "
            "start without it."
        )
    return notes


def _quantization(plan: LaunchPlan, engine: str) -> tuple[list[tuple[str, ...]], list[str]]:
    """Options that tell ``engine`` the planned weight format, and notes on the checkpoint they assume."""
    ckpt = plan.checkpoint
    planned = ckpt.weight_dtype + (f" (experts {ckpt.expert_dtype})" if ckpt.expert_dtype else "")
    if ckpt.from_model_config:
        return [], [f"{ckpt.model} (the spec's model_config) is taken to hold {planned} weights as planned."]
    if ckpt.as_published:
        return [], [f"{ckpt.model} is served as published ({planned} weights)."]
    if ckpt.online_fp8 and engine in ("vllm", "sglang"):
        return [("--quantization", "fp8")], [
            f"{ckpt.model} is published in bf16; --quantization fp8 quantizes its weights to fp8 while loading."
        ]
    wanted = {"fp4": "an NVFP4 (NVIDIA ModelOpt)", "mxfp4": "an MXFP4", "int4": "an int4 (AWQ or GPTQ)"}
    kind = wanted.get(ckpt.weight_dtype, wanted.get(ckpt.expert_dtype or "", f"a {ckpt.weight_dtype}"))
    if engine == "trtllm":
        kind = "an FP8 (NVIDIA ModelOpt)" if ckpt.weight_dtype == "fp8" else kind
        return [], [
            f"TRT-LLM takes the weight format from the checkpoint: replace {ckpt.model} with {kind} checkpoint "
            f"of it ({planned} as planned)."
        ]
    method = {"fp4": "modelopt_fp4", "mxfp4": "mxfp4"}.get(ckpt.weight_dtype) or {"mxfp4": "mxfp4"}.get(
        ckpt.expert_dtype or ""
    )
    note = f"Replace {ckpt.model} with {kind} checkpoint of it ({planned} as planned)."
    return ([("--quantization", method)] if method else []), [note]


def _layout_notes(plan: LaunchPlan, pool: Pool, engine: str) -> list[str]:
    layout = pool.layout
    notes: list[str] = []
    where = f"{pool.role} {layout.label()}"
    if engine == "vllm" and plan.moe and layout.moe_ep > 1 and layout.moe_tp > 1:
        notes.append(
            f"{where}: vLLM splits experts over all {layout.stage_gpus} GPUs of a stage with "
            f"--enable-expert-parallel; moe_tp {layout.moe_tp} x moe_ep {layout.moe_ep} is not expressible."
        )
    if engine == "trtllm" and layout.attention_dp > 1 and layout.tp > 1:
        notes.append(
            f"{where}: TRT-LLM's enable_attention_dp runs attention with TP 1 on each of the {layout.stage_gpus} "
            f"ranks; the plan's attention TP {layout.tp} x DP {layout.attention_dp} is not expressible."
        )
    if engine == "trtllm" and layout.attention_dp > 1 and not plan.moe:
        notes.append(
            f"{where}: dense model with attention DP {layout.attention_dp}: TRT-LLM's enable_attention_dp keeps "
            "the MLPs tensor-parallel over all ranks (the plan's DP ranks are independent)."
        )
    if engine == "vllm" and plan.moe and layout.attention_dp > 1 and layout.moe_ep > 1 and pool.role == SERVER:
        notes.append(
            f"{where}: vLLM picks one all-to-all kernel for both phases; the default "
            "(allgather_reducescatter) is kept, where the plan assumed DeepEP (--all2all-backend)."
        )
    return notes


def _vllm_server(plan: LaunchPlan, pool: Pool) -> ServerCommands:
    layout = pool.layout
    opts: list[tuple[str, ...]] = [("--host", "0.0.0.0"), ("--port", "${PORT}")]
    opts.append(("--tensor-parallel-size", str(layout.tp)))
    if layout.pp > 1:
        opts.append(("--pipeline-parallel-size", str(layout.pp)))
    if layout.attention_dp > 1:
        opts.append(("--data-parallel-size", str(layout.attention_dp)))
    if plan.moe and layout.moe_ep > 1:
        opts.append(("--enable-expert-parallel",))
        if layout.attention_dp > 1 and pool.role in VLLM_ALL2ALL:
            opts.append(("--all2all-backend", VLLM_ALL2ALL[pool.role]))
    quant, _ = _quantization(plan, "vllm")
    opts += quant
    if plan.kv_dtype == "fp8":
        opts.append(("--kv-cache-dtype", "fp8"))
    opts += [
        ("--max-num-batched-tokens", str(plan.max_batched_tokens)),
        ("--max-num-seqs", str(plan.max_sequences)),
        ("--gpu-memory-utilization", _q(plan.memory_fraction_for("vllm", pool))),
    ]
    env: tuple[tuple[str, str], ...] = ()
    if pool.role != SERVER:
        opts.append(("--kv-transfer-config", VLLM_KV_TRANSFER))
        # Each DP rank listens on the base port + its index; the host must be reachable from the peer pool.
        env = (("VLLM_NIXL_SIDE_CHANNEL_HOST", "${THIS_HOST}"), ("VLLM_NIXL_SIDE_CHANNEL_PORT", "${SIDE_CHANNEL_PORT}"))
    if plan.moe and plan.moe_backend == MARLIN_BACKEND:
        # The plan priced the 4-bit experts as Marlin kernels; vLLM's MXFP4 method picks them only when told to.
        env = (*env, ("VLLM_MXFP4_USE_MARLIN", "1"))
    if plan.moe and plan.moe_backend == FLASHINFER_CUTLASS_BACKEND:
        # FlashInfer's "throughput" MoE backend is its CUTLASS fused MoE ("latency" is its TRT-LLM kernels).
        env = (*env, ("VLLM_FLASHINFER_MOE_BACKEND", "throughput"))
    # Every server drafts, prefill included: a decode worker's drafter continues from what the prefill side
    # computed for the prompt (draft KV, first draft tokens). The planner charges drafting to decode steps only.
    if plan.speculative is not None:
        opts.append(("--speculative-config", vllm_speculative_config(plan.speculative)))
    if plan.trust_remote_code:
        opts.append(("--trust-remote-code",))
    entry, model = ("vllm", "serve"), (plan.checkpoint.model,)
    inputs = _draft_inputs(plan)
    if not pool.multi_node:
        return ServerCommands(pool, Command(entry, model, tuple(opts)), None, env=env, inputs=inputs)
    within_dp = layout.tp * layout.pp
    if within_dp <= pool.gpus_per_node and layout.attention_dp % pool.nodes == 0:
        # Whole DP ranks on every node: the documented multi-node data-parallel launch.
        local = layout.attention_dp // pool.nodes
        dp = [
            ("--data-parallel-size-local", str(local)),
            ("--data-parallel-address", "${HEAD}"),
            ("--data-parallel-rpc-port", str(VLLM_DP_RPC_PORT)),
        ]
        head = Command(entry, model, (*opts, *dp))
        # Headless nodes run engine cores only: no API server, so no --host/--port.
        engine_opts = tuple(o for o in opts if o[0] not in ("--host", "--port"))
        worker_opts = (*engine_opts, *dp, ("--headless",), ("--data-parallel-start-rank", "${START_RANK}"))
        worker = Command(entry, model, worker_opts)
        start = (("START_RANK", f"$((NODE_RANK * {local}))"),)
        return ServerCommands(pool, head, worker, env=env, derived=start, inputs=inputs)
    # A DP rank spans nodes: torch.distributed over the nodes (multiprocessing backend, --nnodes).
    nodes = [
        ("--nnodes", str(pool.nodes)),
        ("--node-rank", "${NODE_RANK}"),
        ("--master-addr", "${HEAD}"),
        ("--master-port", str(VLLM_MASTER_PORT)),
    ]
    if layout.attention_dp > 1:
        nodes += [("--data-parallel-address", "${HEAD}"), ("--data-parallel-rpc-port", str(VLLM_DP_RPC_PORT))]
    head = Command(entry, model, (*opts, *nodes))
    engine_opts = tuple(o for o in opts if o[0] not in ("--host", "--port"))
    worker = Command(entry, model, (*engine_opts, *nodes, ("--headless",)))
    return ServerCommands(pool, head, worker, env=env, inputs=inputs)


def _sglang_server(plan: LaunchPlan, pool: Pool) -> ServerCommands:
    layout = pool.layout
    dp = layout.attention_dp
    opts: list[tuple[str, ...]] = [
        ("--model-path", plan.checkpoint.model),
        ("--host", "0.0.0.0"),
        ("--port", "${PORT}"),
    ]
    # With attention DP SGLang divides the scheduler budgets by the DP ranks; the plan's are per rank.
    per_rank = dp if plan.moe else 1
    if plan.moe:
        opts.append(("--tp-size", str(layout.stage_gpus)))
        if dp > 1:
            opts.append(("--attn-dp-size", str(dp)))
        if layout.moe_ep > 1:
            opts.append(("--ep-size", str(layout.moe_ep)))
            if dp > 1:
                opts += [("--moe-a2a-backend", "deepep"), ("--deepep-mode", SGLANG_DEEPEP_MODE[pool.role])]
    else:
        opts.append(("--tp-size", str(layout.tp)))
        if dp > 1:
            opts.append(("--dp-size", str(dp)))
    if layout.pp > 1:
        opts.append(("--pp-size", str(layout.pp)))
    if pool.multi_node:
        opts += [
            ("--nnodes", str(pool.nodes)),
            ("--node-rank", "${NODE_RANK}"),
            ("--dist-init-addr", f"${{HEAD}}:{SGLANG_DIST_INIT_PORT}"),
        ]
    quant, _ = _quantization(plan, "sglang")
    opts += quant
    if plan.moe and plan.moe_backend == FLASHINFER_CUTLASS_BACKEND:
        opts.append(("--moe-runner-backend", "flashinfer_cutlass"))
    if plan.kv_dtype == "fp8":
        opts.append(("--kv-cache-dtype", "fp8_e4m3"))
    opts += [
        ("--chunked-prefill-size", str(plan.max_batched_tokens * per_rank)),
        ("--max-running-requests", str(plan.max_sequences * per_rank)),
        ("--mem-fraction-static", _q(plan.memory_fraction_for("sglang", pool))),
    ]
    if plan.speculative is not None:
        # PD prefill drafts the first tokens and hands them to decode (speculative/eagle_disaggregation.py).
        opts += _sglang_speculative(plan.speculative)
    if pool.role != SERVER:
        opts += [("--disaggregation-mode", pool.role), ("--disaggregation-transfer-backend", SGLANG_TRANSFER_BACKEND)]
        if pool.role == PREFILL:
            opts.append(("--disaggregation-bootstrap-port", "${BOOTSTRAP_PORT}"))
    if plan.trust_remote_code:
        opts.append(("--trust-remote-code",))
    command = Command(("python", "-m", "sglang.launch_server"), (), tuple(opts))
    # Every node runs the same command; --node-rank tells them apart.
    return ServerCommands(pool, command, command if pool.multi_node else None, inputs=_draft_inputs(plan))


def trtllm_options(plan: LaunchPlan, pool: Pool) -> dict[str, Any]:
    """The --extra_llm_api_options YAML of a TRT-LLM instance of ``pool``."""
    layout = pool.layout
    options: dict[str, Any] = {}
    if layout.attention_dp > 1:
        options["enable_attention_dp"] = True
    if plan.moe:
        options["moe_tensor_parallel_size"] = layout.stage_gpus // layout.moe_ep
    options["enable_chunked_prefill"] = plan.chunked_prefill
    fraction = plan.memory_fraction_for("trtllm", pool)
    kv_dtype = "fp8" if plan.kv_dtype == "fp8" else "auto"
    options["kv_cache_config"] = {"free_gpu_memory_fraction": fraction, "dtype": kv_dtype}
    if pool.role != SERVER:
        # The transfer buffer holds one prompt's KV at a time; smaller buffers split the transfer.
        buffer = max(plan.max_input_tokens, plan.max_batched_tokens)
        options["cache_transceiver_config"] = {"backend": "DEFAULT", "max_tokens_in_buffer": buffer}
    if pool.role == PREFILL:
        # examples/disaggregated/README.md: context servers run without the overlap scheduler.
        options["disable_overlap_scheduler"] = True
    speculative = trtllm_speculative_config(plan.speculative) if plan.speculative is not None else None
    if speculative is not None:
        options["speculative_config"] = speculative
    return options


def _trtllm_server(plan: LaunchPlan, pool: Pool) -> ServerCommands:
    layout = pool.layout
    options_file = f"config/{pool.role}.yaml"
    opts: list[tuple[str, ...]] = [
        ("--host", "0.0.0.0"),
        ("--port", "${PORT}"),
        ("--backend", "pytorch"),
        ("--tp_size", str(layout.stage_gpus)),
    ]
    if layout.pp > 1:
        opts.append(("--pp_size", str(layout.pp)))
    if plan.moe:
        opts.append(("--ep_size", str(layout.moe_ep)))
    if pool.multi_node:
        opts.append(("--gpus_per_node", str(pool.gpus_per_node)))
    opts += [
        ("--max_batch_size", str(plan.max_sequences)),
        ("--max_num_tokens", str(plan.max_batched_tokens)),
        ("--kv_cache_free_gpu_memory_fraction", _q(plan.memory_fraction_for("trtllm", pool))),
        ("--extra_llm_api_options", options_file),
    ]
    if plan.trust_remote_code:
        opts.append(("--trust_remote_code",))
    launcher: tuple[str, ...] = ()
    if pool.multi_node:
        ranks = str(layout.gpus)
        launcher = ("mpirun", "--allow-run-as-root", "--bind-to", "none", "-H", "${HOSTS}", "-np", ranks)
        launcher += ("trtllm-llmapi-launch",)
    head = Command(("trtllm-serve",), (plan.checkpoint.model,), tuple(opts), launcher)
    return ServerCommands(
        pool,
        head,
        None,
        mpi=pool.multi_node,
        options_file=options_file,
        options_yaml=trtllm_options(plan, pool),
    )


def server_commands(plan: LaunchPlan, engine: str) -> tuple[ServerCommands, ...]:
    """The server commands of every pool of the strategy on ``engine``."""
    build = {"vllm": _vllm_server, "sglang": _sglang_server, "trtllm": _trtllm_server}[engine]
    return tuple(build(plan, pool) for pool in plan.pools)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the router reaches one instance: its HTTP URL and, for SGLang prefill, its bootstrap port."""

    url: str
    bootstrap_port: str = ""


def bare_router(
    plan: LaunchPlan, engine: str, endpoints: Mapping[str, Sequence[Endpoint]], port: str
) -> RouterCommands | None:
    """The router in front of the instances on hosts without Kubernetes (None: one instance, no router)."""
    servers = endpoints.get(SERVER, ())
    if not plan.disaggregated and len(servers) <= 1:
        return None
    listen: tuple[tuple[str, ...], ...] = (("--host", "0.0.0.0"), ("--port", port))
    if engine == "vllm":
        if plan.disaggregated:
            pd: list[tuple[str, ...]] = [("--vllm-pd-disaggregation",), ("--kv-connector", "nixl")]
            pd += [("--prefill", e.url) for e in endpoints[PREFILL]]
            pd += [("--decode", e.url) for e in endpoints[DECODE]]
            opts = (*listen, ("--policy", ROUTER_POLICY), *pd)
        else:
            opts = (*listen, ("--policy", ROUTER_POLICY), ("--worker-urls", *(e.url for e in servers)))
        return RouterCommands("vllm-router", Command(("vllm-router",), (), opts))
    if engine == "sglang":
        if plan.disaggregated:
            pd = [("--pd-disaggregation",)]
            pd += [("--prefill", e.url, e.bootstrap_port) for e in endpoints[PREFILL]]
            pd += [("--decode", e.url) for e in endpoints[DECODE]]
            opts = (*listen, ("--policy", ROUTER_POLICY), *pd)
        else:
            opts = (*listen, ("--policy", ROUTER_POLICY), ("--worker-urls", *(e.url for e in servers)))
        return RouterCommands("sglang-router", Command(("python", "-m", "sglang_router.launch_router"), (), opts))
    if plan.disaggregated:
        hosts = {role: [e.url.removeprefix("http://") for e in found] for role, found in endpoints.items()}
        config = trtllm_disagg_config(plan, port, hosts)
        command = Command(("trtllm-serve", "disaggregated"), (), (("-c", "config/disagg.yaml"),))
        return RouterCommands("trtllm-disaggregated", command, config=config)
    # trtllm-serve has no router of its own for aggregated servers: nginx balances round-robin.
    command = Command(("nginx",), (), (("-c", "${PWD}/config/nginx.conf"), ("-g", "daemon off;")))
    return RouterCommands("nginx", command, config={"upstreams": [e.url for e in servers], "port": port})


def trtllm_disagg_config(plan: LaunchPlan, port: str | int, hosts: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The `trtllm-serve disaggregated -c` YAML; ``hosts`` lists each role's instances as ``host:port``."""
    return {
        "hostname": "0.0.0.0",
        "port": port,
        "backend": "pytorch",
        "context_servers": {"num_instances": plan.pool(PREFILL).instances, "urls": list(hosts[PREFILL])},
        "generation_servers": {"num_instances": plan.pool(DECODE).instances, "urls": list(hosts[DECODE])},
    }


def k8s_router(
    plan: LaunchPlan, engine: str, selectors: Mapping[str, Sequence[str]], server_port: int, port: int
) -> RouterCommands | None:
    """The router in Kubernetes: the engine's router discovering pods by label, or none (a Service)."""
    if not plan.disaggregated and plan.pool(SERVER).instances <= 1:
        return None
    listen: tuple[tuple[str, ...], ...] = (("--host", "0.0.0.0"), ("--port", str(port)))
    discovery: tuple[tuple[str, ...], ...] = (
        ("--service-discovery",),
        ("--service-discovery-namespace", "${POD_NAMESPACE}"),
        ("--service-discovery-port", str(server_port)),
    )
    if engine in ("vllm", "sglang"):
        if plan.disaggregated:
            mode = (
                (("--vllm-pd-disaggregation",), ("--kv-connector", "nixl"))
                if engine == "vllm"
                else (("--pd-disaggregation",),)
            )
            pools: tuple[tuple[str, ...], ...] = (
                ("--prefill-selector", *selectors[PREFILL]),
                ("--decode-selector", *selectors[DECODE]),
            )
            opts = (*listen, ("--policy", ROUTER_POLICY), *mode, *discovery, *pools)
        else:
            opts = (*listen, ("--policy", ROUTER_POLICY), *discovery, ("--selector", *selectors[SERVER]))
        if engine == "vllm":
            return RouterCommands("vllm-router", Command(("vllm-router",), (), opts), discovery=True)
        command = Command(("python", "-m", "sglang_router.launch_router"), (), opts)
        return RouterCommands("sglang-router", command, discovery=True)
    if not plan.disaggregated:
        return None
    command = Command(("trtllm-serve", "disaggregated"), (), (("-c", "config/disagg.yaml"),))
    return RouterCommands("trtllm-disaggregated", command)


def engine_launch(plan: LaunchPlan, engine: str) -> EngineLaunch:
    """Server commands and notes of the strategy on ``engine``; routers are added by the renderers."""
    notes: list[str] = []
    _, checkpoint_notes = _quantization(plan, engine)
    notes += checkpoint_notes
    for pool in plan.pools:
        notes += _layout_notes(plan, pool, engine)
    notes += _speculative_notes(plan, engine)
    if engine == "trtllm" and plan.moe and plan.moe_backend == FLASHINFER_CUTLASS_BACKEND:
        notes.append(
            "The plan priced the experts as FlashInfer's CUTLASS fused MoE (moe_backend: flashinfer_cutlass); "
            "TRT-LLM picks its MoE kernels with moe_config.backend (CUTLASS or TRTLLM), not set by this bundle."
        )
    if engine != "vllm" and plan.moe and plan.moe_backend == MARLIN_BACKEND:
        notes.append(
            f"The plan priced the experts as vLLM's Marlin kernels (moe_backend: marlin); {engine} runs its own MoE "
            "kernels, so its latencies can differ from the plan's."
        )
    if engine != plan.plan_engine:
        notes.append(
            f"The plan simulated {plan.plan_engine}; these {engine} commands apply its layout, token budgets and "
            f"KV-cache size, but {engine} schedules requests its own way."
        )
    if engine == "trtllm" and not plan.chunked_prefill and plan.max_input_tokens > plan.max_batched_tokens:
        notes.append(
            f"Prompts up to {plan.max_input_tokens} tokens exceed max_num_tokens {plan.max_batched_tokens} "
            "without chunked prefill: TRT-LLM rejects them."
        )
    return EngineLaunch(engine, engine_data(engine), server_commands(plan, engine), None, None, tuple(notes))
