"""Shell rendering of commands, node placement, and the bash scripts of one engine."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from service.launch.commands import (
    Command,
    Endpoint,
    EngineLaunch,
    RouterCommands,
    ServerCommands,
    bare_router,
)
from service.launch.plan import DECODE, PREFILL, SERVER, LaunchPlan, Pool

FIRST_SERVER_PORT = 8100
ROUTER_PORT = 8000
FIRST_BOOTSTRAP_PORT = 9000
FIRST_SIDE_CHANNEL_PORT = 5600
# vLLM's NIXL side channel takes one port per DP rank above the base.
SIDE_CHANNEL_STRIDE = 100
SCRIPT_NAMES = {SERVER: "serve.sh", PREFILL: "prefill.sh", DECODE: "decode.sh"}
EXPANSION = re.compile(r"(\$\{[A-Za-z_][A-Za-z0-9_]*\})")


def shell_word(token: str) -> str:
    """One shell word: parameter expansions inside double quotes, anything else quoted as needed."""
    if "$" not in token:
        return shlex.quote(token)
    if not any(c in token for c in '"\\`'):
        return f'"{token}"'
    # JSON around an expansion: quote the text single and the expansions double, side by side.
    parts = [part for part in EXPANSION.split(token) if part]
    if any("$" in part and not EXPANSION.fullmatch(part) for part in parts):
        raise ValueError(f"cannot quote {token!r}")
    return "".join(f'"{part}"' if EXPANSION.fullmatch(part) else shlex.quote(part) for part in parts)


def input_check(name: str, what: str, where: str) -> str:
    """A shell line that stops the script when the user left ``name`` unset or empty."""
    return f': "${{{name}:?set {name} {where} to {what}}}"'


def render_command(command: Command, *, indent: str = "", prefix: str = "exec ") -> str:
    """The command over several lines, one option per line."""
    head = [*command.launcher, *command.entry, *command.positional]
    lines = [indent + prefix + " ".join(shell_word(t) for t in head)]
    lines += [indent + "    " + " ".join(shell_word(t) for t in option) for option in command.options]
    return " \\\n".join(lines)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one instance runs on bare hosts: its nodes (rank order), GPUs on each, and its ports."""

    role: str
    index: int
    nodes: tuple[int, ...]
    gpus: str
    port: int
    bootstrap_port: int
    side_channel_port: int


def place(plan: LaunchPlan) -> tuple[dict[str, list[Placement]], int]:
    """Pack the strategy's instances onto nodes: multi-node instances get whole nodes, others share."""
    per_node = plan.gpu.gpus_per_node
    used: list[int] = []
    placements: dict[str, list[Placement]] = {}
    serial = 0
    for pool in plan.pools:
        placements[pool.role] = []
        for index in range(pool.instances):
            need = pool.gpus_per_node
            if pool.multi_node:
                nodes = tuple(range(len(used), len(used) + pool.nodes))
                used += [per_node] * pool.nodes
                first = 0
            else:
                node = next((n for n, taken in enumerate(used) if per_node - taken >= need), len(used))
                if node == len(used):
                    used.append(0)
                first = used[node]
                used[node] += need
                nodes = (node,)
            placements[pool.role].append(
                Placement(
                    role=pool.role,
                    index=index,
                    nodes=nodes,
                    gpus=",".join(str(g) for g in range(first, first + need)),
                    port=FIRST_SERVER_PORT + serial,
                    bootstrap_port=FIRST_BOOTSTRAP_PORT + serial,
                    side_channel_port=FIRST_SIDE_CHANNEL_PORT + SIDE_CHANNEL_STRIDE * serial,
                )
            )
            serial += 1
    return placements, len(used)


def _array(name: str, values: list[str]) -> str:
    return f"{name}=(" + " ".join(f'"{v}"' for v in values) + ")"


def cluster_env(plan: LaunchPlan, launch: EngineLaunch) -> str:
    """cluster.env: where each instance runs, read by every script of the engine."""
    placements, nodes = place(plan)
    lines = [
        f"# Placement of strategy {plan.rank} ({plan.label}) on {nodes} node(s) of {plan.gpu.gpus_per_node} "
        f"{plan.gpu.name} GPUs.",
        "# Replace node-0, node-1, ... with your hosts' names or addresses (reachable from every node and from",
        "# the router's host). Per instance: its nodes in node-rank order, its GPUs on each node, its ports.",
    ]
    for role, items in placements.items():
        upper = role.upper()
        lines.append(_array(f"{upper}_NODES", [" ".join(f"node-{n}" for n in p.nodes) for p in items]))
        lines.append(_array(f"{upper}_GPUS", [p.gpus for p in items]))
        lines.append(_array(f"{upper}_PORTS", [str(p.port) for p in items]))
        if launch.engine == "sglang" and role == PREFILL:
            lines.append(_array(f"{upper}_BOOTSTRAP_PORTS", [str(p.bootstrap_port) for p in items]))
        if launch.engine == "vllm" and role != SERVER:
            lines.append(_array(f"{upper}_SIDE_CHANNEL_PORTS", [str(p.side_channel_port) for p in items]))
    lines += ["ROUTER_HOST=node-0", f"ROUTER_PORT={ROUTER_PORT}"]
    inputs = dict(item for server in launch.servers for item in server.inputs)
    for name, what in inputs.items():
        lines += [f"# {what[0].upper()}{what[1:]} (a Hugging Face id or a directory on every node): set it."]
        lines.append(f'{name}=""')
    return "\n".join([*lines, ""])


def _layout_line(plan: LaunchPlan, pool: Pool) -> str:
    layout = pool.layout
    where = (
        f"{pool.nodes} nodes x {pool.gpus_per_node} GPUs"
        if pool.multi_node
        else f"{layout.gpus} GPU{'s' if layout.gpus > 1 else ''} of one node"
    )
    return f"{layout.label()} ({where}), {pool.instances} instance{'s' if pool.instances > 1 else ''}"


def _comment(lines: list[str] | tuple[str, ...]) -> list[str]:
    return [f"# {line}" for line in lines]


def _prologue(header: list[str]) -> list[str]:
    """Shebang, header comment, strict mode, and cluster.env from the script's own directory."""
    return [
        "#!/usr/bin/env bash",
        *_comment(header),
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        "source ./cluster.env",
    ]


def server_script(plan: LaunchPlan, launch: EngineLaunch, server: ServerCommands) -> str:
    """The bash script that starts one instance (one node of it) of a pool."""
    pool = server.pool
    role, upper = pool.role, pool.role.upper()
    data = launch.data
    name = SCRIPT_NAMES[role]
    last = pool.instances - 1
    run = (
        f"INSTANCE=<0..{last}> NODE_RANK=<0..{pool.nodes - 1}> ./{name}   (on every node of the instance)"
        if pool.multi_node
        else f"INSTANCE=<0..{last}> ./{name}   (on the instance's node)"
    )
    header = [
        f"{data.engine} {data.version}: {role} instances of strategy {plan.rank} ({plan.label}), "
        f"{plan.model_name} on {plan.gpu.name}.",
        f"Layout: {_layout_line(plan, pool)}.",
        f"Run: {run}; placement in cluster.env.",
        *launch.notes,
    ]
    lines = _prologue(header)
    lines += [
        'INSTANCE="${INSTANCE:-0}"',
        'NODE_RANK="${NODE_RANK:-0}"',
        f'read -r -a INSTANCE_NODES <<< "${{{upper}_NODES[$INSTANCE]}}"',
        'HEAD="${INSTANCE_NODES[0]}"',
        'THIS_HOST="${INSTANCE_NODES[$NODE_RANK]}"',
        f'PORT="${{{upper}_PORTS[$INSTANCE]}}"',
    ]
    if launch.engine == "sglang" and role == PREFILL:
        lines.append(f'BOOTSTRAP_PORT="${{{upper}_BOOTSTRAP_PORTS[$INSTANCE]}}"')
    if launch.engine == "vllm" and role != SERVER:
        lines.append(f'SIDE_CHANNEL_PORT="${{{upper}_SIDE_CHANNEL_PORTS[$INSTANCE]}}"')
    if server.mpi:
        lines.append(f'HOSTS="$(printf \'%s:{pool.gpus_per_node},\' "${{INSTANCE_NODES[@]}}")"')
        lines.append('HOSTS="${HOSTS%,}"')
    if not pool.multi_node:
        lines.append(f'export CUDA_VISIBLE_DEVICES="${{{upper}_GPUS[$INSTANCE]}}"')
    lines += [f'export {key}="{value}"' for key, value in server.env]
    lines += [f"{key}={value}" for key, value in server.derived]
    lines += [input_check(name, what, "in cluster.env") for name, what in server.inputs]
    if server.mpi:
        lines += [
            'if [ "$NODE_RANK" -ne 0 ]; then',
            '    echo "node rank 0 starts every rank of this instance through mpirun (passwordless SSH to $THIS_HOST)"',
            "    exit 0",
            "fi",
            render_command(server.head),
        ]
    elif server.worker is not None and server.worker is not server.head:
        lines += [
            'if [ "$NODE_RANK" -eq 0 ]; then',
            render_command(server.head, indent="    "),
            "else",
            render_command(server.worker, indent="    "),
            "fi",
        ]
    else:
        lines.append(render_command(server.head))
    return "\n".join(lines) + "\n"


def bare_endpoints(plan: LaunchPlan) -> dict[str, list[Endpoint]]:
    """How router.sh addresses each instance (shell variables it defines from cluster.env)."""
    endpoints: dict[str, list[Endpoint]] = {}
    for pool in plan.pools:
        upper = pool.role.upper()
        endpoints[pool.role] = [
            Endpoint(
                url=f"http://${{{upper}_HEAD_{i}}}:${{{upper}_PORTS[{i}]}}",
                bootstrap_port=f"${{{upper}_BOOTSTRAP_PORTS[{i}]}}" if pool.role == PREFILL else "",
            )
            for i in range(pool.instances)
        ]
    return endpoints


def _disagg_yaml_text(router: RouterCommands) -> list[str]:
    config = router.config
    lines = [f"hostname: {config['hostname']}", f"port: {config['port']}", f"backend: {config['backend']}"]
    for key in ("context_servers", "generation_servers"):
        lines += [f"{key}:", f"  num_instances: {config[key]['num_instances']}", "  urls:"]
        lines += [f'    - "{url}"' for url in config[key]["urls"]]
    return lines


def _nginx_text(router: RouterCommands) -> list[str]:
    return [
        "events {}",
        "http {",
        "  upstream servers {",
        *(f"    server {url.removeprefix('http://')};" for url in router.config["upstreams"]),
        "  }",
        "  server {",
        f"    listen {router.config['port']};",
        "    location / {",
        "      proxy_pass http://servers;",
        "      proxy_http_version 1.1;",
        '      proxy_set_header Connection "";',
        "      proxy_buffering off;",
        "      proxy_read_timeout 3600s;",
        "    }",
        "  }",
        "}",
    ]


def router_script(plan: LaunchPlan, launch: EngineLaunch) -> tuple[RouterCommands | None, str]:
    """router.sh (None and empty when one instance serves alone)."""
    router = bare_router(plan, launch.engine, bare_endpoints(plan), "${ROUTER_PORT}")
    if router is None:
        return None, ""
    entries = {"vllm-router": ("vllm-router",), "sglang-router": ("python", "-m", "sglang_router.launch_router")}
    if router.kind in entries:
        what = f"{router.kind} {launch.data.entry_point(entries[router.kind]).version}"
    elif router.kind == "nginx":
        what = "nginx (trtllm-serve has no router for aggregated servers)"
    else:
        what = f"trtllm-serve disaggregated ({launch.data.engine} {launch.data.version})"
    policy = "round-robin, as the plan assumed"
    header = [
        f"Router of strategy {plan.rank} ({plan.label}): {what}, {policy}.",
        "Run on ROUTER_HOST after the servers; clients send OpenAI API requests to ROUTER_HOST:ROUTER_PORT.",
    ]
    lines = _prologue(header)
    for pool in plan.pools:
        upper = pool.role.upper()
        lines += [f'read -r {upper}_HEAD_{i} _ <<< "${{{upper}_NODES[{i}]}}"' for i in range(pool.instances)]
    if router.kind == "trtllm-disaggregated":
        lines += ["mkdir -p config", "cat > config/disagg.yaml <<EOF", *_disagg_yaml_text(router), "EOF"]
    if router.kind == "nginx":
        lines += ["mkdir -p config", "cat > config/nginx.conf <<EOF", *_nginx_text(router), "EOF"]
    lines.append(render_command(router.command))
    return router, "\n".join(lines) + "\n"
