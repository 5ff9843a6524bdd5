"""Kubernetes manifests of one engine: a Deployment or LeaderWorkerSet per pool, the router, Services."""

from __future__ import annotations

from typing import Any

import yaml

from service.launch.commands import EngineLaunch, RouterCommands, ServerCommands, k8s_router, trtllm_disagg_config
from service.launch.plan import PREFILL, SERVER, LaunchPlan, Pool
from service.launch.render import input_check, render_command

SERVER_PORT = 8000
ROUTER_PORT = 8000
BOOTSTRAP_PORT = 8998
SIDE_CHANNEL_PORT = 5600
WORKDIR = "/splan"
POOL_LABEL = "splan.io/pool"
SERVING_LABEL = "splan.io/serving"
LWS_GROUP_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/group-index"
VLLM_ROUTER_PIP = "vllm-router=={version}"


class _Dumper(yaml.SafeDumper):
    """Safe dumper that writes multi-line strings (container scripts) as literal blocks, without anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        """Repeat shared values (probes) instead of writing YAML anchors."""
        return True


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def dump_documents(documents: list[dict[str, Any]]) -> str:
    """Documents as one multi-document YAML text."""
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def names(plan: LaunchPlan, engine: str) -> dict[str, str]:
    """Object names: the bundle's base, one per pool, the router, the config map."""
    base = f"{plan.slug}-{engine}"
    found = {pool.role: f"{base}-{pool.role}" for pool in plan.pools}
    return {"base": base, **found, "router": f"{base}-router", "config": f"{base}-config"}


def uses_lws(launch: EngineLaunch, plan: LaunchPlan, pool: Pool) -> bool:
    """LeaderWorkerSet for multi-node instances, and for TRT-LLM pools its router must name one by one."""
    return pool.multi_node or (launch.engine == "trtllm" and plan.disaggregated)


def _env(launch: EngineLaunch, server: ServerCommands | None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}}},
    ]
    if server is not None and server.mpi:
        label = f"metadata.labels['{LWS_GROUP_INDEX_LABEL}']"
        env.append({"name": "GROUP_INDEX", "valueFrom": {"fieldRef": {"fieldPath": label}}})
    # Left empty for the user to fill; the container's script refuses to start the engine without it.
    env += [{"name": name, "value": ""} for name, _ in (server.inputs if server is not None else ())]
    return env


def _preamble(launch: EngineLaunch, server: ServerCommands, lws: bool, name: str) -> list[str]:
    pool = server.pool
    lines = [f"PORT={SERVER_PORT}", 'THIS_HOST="${POD_IP}"']
    if lws:
        lines += ['HEAD="${LWS_LEADER_ADDRESS}"', 'NODE_RANK="${LWS_WORKER_INDEX:-0}"']
    if launch.engine == "sglang" and pool.role == PREFILL:
        lines.append(f"BOOTSTRAP_PORT={BOOTSTRAP_PORT}")
    if launch.engine == "vllm" and pool.role != SERVER:
        lines.append(f"SIDE_CHANNEL_PORT={SIDE_CHANNEL_PORT}")
    if server.mpi:
        # LWS pod DNS: leader <lws>-<group>.<lws>, workers <lws>-<group>-<index>.<lws>.
        hosts = [f"${{LWS_LEADER_ADDRESS}}:{pool.gpus_per_node}"]
        hosts += [f"{name}-${{GROUP_INDEX}}-{i}.{name}:{pool.gpus_per_node}" for i in range(1, pool.nodes)]
        lines.append(f'HOSTS="{",".join(hosts)}"')
    lines += [f'export {key}="{value}"' for key, value in server.env]
    lines += [f"{key}={value}" for key, value in server.derived]
    lines += [input_check(key, what, "in this container's env") for key, what in server.inputs]
    return lines


def _script(lines: list[str]) -> str:
    # kubelet expands $(VAR) in commands; $$ keeps shell command substitutions and arithmetic intact.
    return "\n".join(lines).replace("$(", "$$(") + "\n"


def _container(
    launch: EngineLaunch, name: str, script: str, gpus: int, *, server: ServerCommands | None, serving: bool
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "engine" if server is not None else "router",
        "image": launch.data.image,
        "command": ["/bin/sh", "-c", script],
        "env": _env(launch, server),
    }
    if launch.engine == "trtllm":
        container["workingDir"] = WORKDIR
    if serving:
        container["ports"] = [{"name": "http", "containerPort": SERVER_PORT}]
        probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10}
        container["readinessProbe"] = probe
        # Loading weights and capturing CUDA graphs takes minutes: allow an hour before restarting.
        container["startupProbe"] = {**probe, "failureThreshold": 360}
    mounts = []
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus}}
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if launch.engine == "trtllm":
        mounts.append({"name": "config", "mountPath": f"{WORKDIR}/config"})
    if mounts:
        container["volumeMounts"] = mounts
    return container


def _pod(
    launch: EngineLaunch, names_: dict[str, str], container: dict[str, Any], labels: dict[str, str], gpus: int
) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = []
    if gpus:
        # NCCL and the engines' shared-memory transports need more than the container default of 64 MiB.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}})
    if launch.engine == "trtllm":
        volumes.append({"name": "config", "configMap": {"name": names_["config"]}})
    spec: dict[str, Any] = {"containers": [container]}
    if volumes:
        spec["volumes"] = volumes
    return {"metadata": {"labels": labels}, "spec": spec}


def _labels(names_: dict[str, str], role: str, serving: bool) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": names_["base"], "app.kubernetes.io/part-of": "serving-planner"}
    labels[POOL_LABEL] = names_[role]
    if serving:
        labels[SERVING_LABEL] = "true"
    return labels


def _pool_documents(plan: LaunchPlan, launch: EngineLaunch, server: ServerCommands) -> list[dict[str, Any]]:
    pool = server.pool
    names_ = names(plan, launch.engine)
    name = names_[pool.role]
    lws = uses_lws(launch, plan, pool)
    gpus = pool.gpus_per_node
    preamble = _preamble(launch, server, lws, name)
    leader_script = _script([*preamble, render_command(server.head)])
    labels = _labels(names_, pool.role, serving=True)
    leader = _pod(
        launch, names_, _container(launch, name, leader_script, gpus, server=server, serving=True), labels, gpus
    )
    if launch.engine == "sglang" and pool.role == PREFILL:
        leader["metadata"]["annotations"] = {"sglang.ai/bootstrap-port": str(BOOTSTRAP_PORT)}
    pool_labels = _labels(names_, pool.role, serving=False)
    meta: dict[str, Any] = {"name": name, "labels": pool_labels}
    documents: list[dict[str, Any]] = []
    if lws:
        if server.mpi:
            # mpirun on the leader starts these ranks over SSH: the image must run an SSH server here.
            worker_script = _script(["exec sleep infinity"])
        else:
            worker_command = server.worker if server.worker is not None else server.head
            worker_script = _script([*preamble, render_command(worker_command)])
        worker = _pod(
            launch,
            names_,
            _container(launch, name, worker_script, gpus, server=server, serving=False),
            _labels(names_, pool.role, serving=False),
            gpus,
        )
        documents.append(
            {
                "apiVersion": "leaderworkerset.x-k8s.io/v1",
                "kind": "LeaderWorkerSet",
                "metadata": meta,
                "spec": {
                    "replicas": pool.instances,
                    "leaderWorkerTemplate": {
                        "size": pool.nodes,
                        "restartPolicy": "RecreateGroupOnPodRestart",
                        "leaderTemplate": leader,
                        "workerTemplate": worker,
                    },
                },
            }
        )
    else:
        documents.append(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": meta,
                "spec": {
                    "replicas": pool.instances,
                    "selector": {"matchLabels": {POOL_LABEL: name, SERVING_LABEL: "true"}},
                    "template": leader,
                },
            }
        )
    documents.append(_service(f"{name}-http", pool_labels, {POOL_LABEL: name, SERVING_LABEL: "true"}))
    return documents


def _service(name: str, labels: dict[str, str], selector: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "selector": selector,
            "ports": [{"name": "http", "port": SERVER_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def _rbac(names_: dict[str, str], labels: dict[str, str]) -> list[dict[str, Any]]:
    name = names_["router"]
    meta = {"name": name, "labels": labels}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "subjects": [{"kind": "ServiceAccount", "name": name}],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        },
    ]


def _router_documents(plan: LaunchPlan, launch: EngineLaunch, router: RouterCommands) -> list[dict[str, Any]]:
    names_ = names(plan, launch.engine)
    labels = {
        "app.kubernetes.io/name": names_["base"],
        "app.kubernetes.io/part-of": "serving-planner",
        POOL_LABEL: names_["router"],
    }
    command = render_command(router.command)
    if router.kind == "vllm-router":
        # The vLLM image has pip but not the router.
        version = launch.data.entry_point(("vllm-router",)).version
        command = f"pip install --no-cache-dir {VLLM_ROUTER_PIP.format(version=version)}\n" + command
    container = _container(launch, names_["router"], _script([command]), 0, server=None, serving=True)
    pod = _pod(launch, names_, container, labels, 0)
    documents: list[dict[str, Any]] = []
    if router.discovery:
        documents += _rbac(names_, labels)
        pod["spec"]["serviceAccountName"] = names_["router"]
    documents.append(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": names_["router"], "labels": labels},
            "spec": {"replicas": 1, "selector": {"matchLabels": {POOL_LABEL: names_["router"]}}, "template": pod},
        }
    )
    return documents


def _config_map(plan: LaunchPlan, launch: EngineLaunch) -> dict[str, Any]:
    names_ = names(plan, launch.engine)
    data: dict[str, str] = {}
    for server in launch.servers:
        data[server.options_file.removeprefix("config/")] = yaml.safe_dump(server.options_yaml, sort_keys=False)
    if plan.disaggregated:
        # LWS pod DNS: leader of group i is <lws>-<i>.<lws>.
        hosts = {
            pool.role: [f"{names_[pool.role]}-{i}.{names_[pool.role]}:{SERVER_PORT}" for i in range(pool.instances)]
            for pool in plan.pools
        }
        config = trtllm_disagg_config(plan, ROUTER_PORT, hosts)
        data["disagg.yaml"] = yaml.safe_dump(config, sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": names_["config"], "labels": {"app.kubernetes.io/name": names_["base"]}},
        "data": data,
    }


def manifests(plan: LaunchPlan, launch: EngineLaunch) -> tuple[RouterCommands | None, str]:
    """All manifests of the strategy on one engine, with the router they run (if any)."""
    names_ = names(plan, launch.engine)
    selectors = {pool.role: (f"{POOL_LABEL}={names_[pool.role]}", f"{SERVING_LABEL}=true") for pool in plan.pools}
    router = k8s_router(plan, launch.engine, selectors, SERVER_PORT, ROUTER_PORT)
    documents: list[dict[str, Any]] = []
    if launch.engine == "trtllm":
        documents.append(_config_map(plan, launch))
    for server in launch.servers:
        documents += _pool_documents(plan, launch, server)
    front_labels = {"app.kubernetes.io/name": names_["base"], "app.kubernetes.io/part-of": "serving-planner"}
    if router is not None:
        documents += _router_documents(plan, launch, router)
        front = {POOL_LABEL: names_["router"]}
    else:
        front = {POOL_LABEL: names_[SERVER], SERVING_LABEL: "true"}
    # The Service clients use; without a router, kube-proxy spreads connections over the servers.
    documents.append(_service(names_["base"], front_labels, front))
    return router, dump_documents(documents)
