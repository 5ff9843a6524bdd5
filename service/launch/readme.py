"""README.md of a launch bundle: the strategy, each engine's commands and caveats, how to run, sources."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.launch.commands import DRAFT_MODEL, METHOD_TITLES, EngineLaunch, RouterCommands
from service.launch.k8s import names, uses_lws
from service.launch.plan import LaunchPlan
from service.launch.render import SCRIPT_NAMES, place, render_command

ENGINE_TITLES = {"vllm": "vLLM", "sglang": "SGLang", "trtllm": "TensorRT-LLM"}


def _latency(strategy: Mapping[str, Any], key: str) -> str:
    stats = strategy.get(key)
    if not isinstance(stats, Mapping) or "p50" not in stats:
        return "n/a"
    p90 = stats.get("p90")
    return f"p50 {float(stats['p50']):.0f} ms" + (f", p90 {float(p90):.0f} ms" if p90 is not None else "")


def _tree(paths: list[str]) -> list[str]:
    """The bundle's files as an indented tree."""
    root: dict[str, Any] = {}
    for path in paths:
        node = root
        for part in path.split("/"):
            node = node.setdefault(part, {})

    def walk(node: dict[str, Any], indent: str) -> list[str]:
        lines = []
        # Directories after files, each group in name order.
        names = sorted(node, key=lambda n: (bool(node[n]), n))
        for i, name in enumerate(names):
            last = i == len(names) - 1
            lines.append(f"{indent}{'└── ' if last else '├── '}{name}{'/' if node[name] else ''}")
            lines += walk(node[name], indent + ("    " if last else "│   "))
        return lines

    return ["```text", ".", *walk(root, ""), "```"]


def _speculative_lines(plan: LaunchPlan) -> list[str]:
    speculative = plan.speculative
    if speculative is None:
        return []
    title = METHOD_TITLES[speculative.method]
    steps = speculative.draft_tokens
    drafter = (
        "MTP drafts with the model's own MTP layers: no checkpoint besides the model."
        if not plan.draft_model_needed
        else f"The {title} head checkpoint is yours to supply (a Hugging Face id or a local directory): "
        f"`{DRAFT_MODEL}` in `<engine>/cluster.env` (Kubernetes: the engine containers' `{DRAFT_MODEL}` env) for "
        "vLLM and SGLang, `speculative_model_dir` in `trtllm/config/<role>.yaml` for TRT-LLM."
    )
    return [
        f"- Speculative decoding: {title}, {steps} draft token{'s' if steps > 1 else ''} per step, verified in one "
        f"pass of {steps + 1} tokens per sequence, on every server. The plan assumed an acceptance length of "
        f"{speculative.acceptance_length:g} tokens per step (bonus token included): a planning input, not an engine "
        "flag. Check it against the acceptance length the engine logs (SGLang `accept len`, vLLM `Mean acceptance "
        "length`) on your prompts; a shorter one makes decode slower than planned. " + drafter,
    ]


def _strategy_section(plan: LaunchPlan) -> list[str]:
    s = plan.strategy
    ckpt = plan.checkpoint
    goodput = s.get("goodput_rps")
    lines = [
        "## The strategy",
        "",
        f"- Strategy {plan.rank} of the plan: `{plan.label}`, {plan.mode}, {plan.gpus} {plan.gpu.name} GPUs "
        f"({plan.gpu.gpus_per_node} per node, NVLink domain {plan.gpu.scale_up_domain_gpus}).",
        f"- Simulated on {plan.plan_engine}: goodput "
        + (f"{float(goodput):.3g} req/s" if isinstance(goodput, int | float) else "n/a")
        + f"; TTFT {_latency(s, 'ttft_ms')}; TPOT {_latency(s, 'tpot_ms')}.",
        f"- Model: `{ckpt.model}`"
        + (" (the spec's model_config: the checkpoint directory next to that config)" if ckpt.from_model_config else "")
        + f"; weights {ckpt.weight_dtype}"
        + (f", experts {ckpt.expert_dtype}" if ckpt.expert_dtype else "")
        + f", KV cache {plan.kv_dtype}.",
        f"- Scheduler: {plan.max_batched_tokens} batched tokens and {plan.max_sequences} sequences per step and "
        f"per attention-DP rank; GPU memory fraction {plan.memory_fraction:g} as the planner counts it "
        "(weights, activations and KV cache out of the GPU's memory).",
        *_speculative_lines(plan),
        "",
        "| pool | layout (tp, attention_dp, pp, moe_tp x moe_ep) | instances | GPUs per instance | nodes per instance "
        "| KV cache per GPU |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for pool in plan.pools:
        layout = pool.layout
        kv = (
            f"{pool.memory.kv_cache_gib:.1f} GiB ({pool.memory.kv_capacity_tokens} tokens)"
            if pool.memory is not None
            else "n/a"
        )
        lines.append(
            f"| {pool.role} | `{layout.label()}`: tp {layout.tp}, dp {layout.attention_dp}, pp {layout.pp}, "
            f"{layout.moe_tp} x {layout.moe_ep} | {pool.instances} | {layout.gpus} | {pool.nodes} | {kv} |"
        )
    return [*lines, ""]


def _engine_section(
    plan: LaunchPlan, launch: EngineLaunch, router: RouterCommands | None, k8s_router: RouterCommands | None
) -> list[str]:
    data = launch.data
    lines = [f"### {ENGINE_TITLES[launch.engine]} {data.version}", ""]
    for server in launch.servers:
        pool = server.pool
        fraction = plan.memory_fraction_for(launch.engine, pool)
        lines.append(
            f"{pool.role.capitalize()} (`{launch.engine}/{SCRIPT_NAMES[pool.role]}`, node rank 0; memory knob "
            f"{fraction:g} gives the planned KV cache):"
        )
        lines += ["", "```bash", render_command(server.head, prefix=""), "```", ""]
        if server.worker is not None and server.worker is not server.head:
            lines += [
                "Other nodes of the instance:",
                "",
                "```bash",
                render_command(server.worker, prefix=""),
                "```",
                "",
            ]
        if server.options_file:
            lines.append(f"`{launch.engine}/{server.options_file}` holds the LLM API options the flags cannot set.")
            lines.append("")
    if router is not None:
        lines += [f"Router (`{launch.engine}/router.sh`, {router.kind}):", "", "```bash"]
        lines += [render_command(router.command, prefix=""), "```", ""]
    k8s = [f"`k8s/{launch.engine}.yaml`:"]
    for pool in plan.pools:
        kind = "LeaderWorkerSet" if uses_lws(launch, plan, pool) else "Deployment"
        k8s.append(
            f"{kind} `{names(plan, launch.engine)[pool.role]}` ({pool.instances} x {pool.nodes} pod(s) of "
            f"{pool.gpus_per_node} `nvidia.com/gpu`)"
        )
    if launch.engine == "trtllm" and plan.disaggregated and not all(pool.multi_node for pool in plan.pools):
        k8s.append("LeaderWorkerSets even for one-node instances: the router's config names every server by its pod")
    k8s.append(
        f"router `{k8s_router.kind}` discovering pods by label"
        if k8s_router is not None and k8s_router.discovery
        else (f"router `{k8s_router.kind}`" if k8s_router is not None else "no router: the Service spreads connections")
    )
    lines += [" ".join(k8s[:1]) + " " + "; ".join(k8s[1:]) + ".", ""]
    if launch.notes:
        lines += ["Notes:", "", *(f"- {note}" for note in launch.notes), ""]
    return lines


def readme(
    plan: LaunchPlan,
    sections: list[tuple[EngineLaunch, RouterCommands | None, RouterCommands | None]],
    paths: list[str],
) -> str:
    """The bundle's README.md."""
    _, nodes = place(plan)
    lines = [
        f"# Launch bundle: {plan.model_name}, strategy {plan.rank} (`{plan.label}`)",
        "",
        "Generated by serving-planner (`service.launch`) from a `splan plan` result. Each engine directory starts "
        "the same strategy on that engine; `k8s/` holds the same on Kubernetes.",
        "",
        *_strategy_section(plan),
        "## Commands per engine",
        "",
        "Each engine's memory knob is set so that its KV cache matches the plan's: vLLM `--gpu-memory-utilization` "
        "is the planner's fraction; SGLang `--mem-fraction-static` counts weights and KV only; TRT-LLM "
        "`free_gpu_memory_fraction` is the share of the memory left after weights and activations. Attention-DP "
        "budgets are per rank: SGLang divides `--chunked-prefill-size` and `--max-running-requests` by the DP "
        "ranks, so they are multiplied here.",
        "",
    ]
    for launch, router, k8s_router in sections:
        lines += _engine_section(plan, launch, router, k8s_router)
    lines += [
        "## Files",
        "",
        *_tree(paths),
        "",
        "## Running on hosts",
        "",
        f"1. The strategy needs {nodes} node(s) of {plan.gpu.gpus_per_node} {plan.gpu.name} GPUs. Edit "
        "`<engine>/cluster.env`: node names, GPUs and ports per instance.",
        "2. Start every instance: `INSTANCE=i ./<engine>/<role>.sh` on its node; an instance spanning several "
        "nodes runs the same script with `NODE_RANK=0..n-1` on each of them (TRT-LLM: node rank 0 starts all "
        "ranks through `mpirun`, which needs passwordless SSH to the other nodes).",
        "3. Start `./<engine>/router.sh` (where there is one) on `ROUTER_HOST`; clients use "
        "`http://ROUTER_HOST:ROUTER_PORT/v1` (or the single server's port).",
        "",
        "## Running on Kubernetes",
        "",
        "`kubectl apply -f k8s/<engine>.yaml` in the target namespace. LeaderWorkerSets need the LWS controller "
        "(sigs.k8s.io/lws). A Secret `hf-token` with key `token` is passed as `HF_TOKEN` when present. Clients use "
        f"the Service `{plan.slug}-<engine>` on port 8000. Multi-node pools also need the cluster's RDMA "
        "network (resources and annotations vary by cluster) for NCCL and KV transfer; TRT-LLM's multi-node pods "
        "need an SSH server in the image for `mpirun`. NVIDIA Dynamo can run the same layouts behind its own "
        "frontend; it is not generated here.",
        "",
        "## Engine versions and sources",
        "",
        "Every flag and YAML key above is checked against `service/launch/data/<engine>.yaml`, which records where "
        "it was read:",
        "",
        "| engine | version | image | read on | source |",
        "| --- | --- | --- | --- | --- |",
    ]
    for launch, _, _ in sections:
        data = launch.data
        lines.append(
            f"| {ENGINE_TITLES[data.engine]} | {data.version} | `{data.image}` | {data.read_on} | "
            f"{', '.join(data.files[:2])} |"
        )
    return "\n".join(lines) + "\n"
