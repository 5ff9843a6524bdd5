"""Fleet packing of already-planned deployments onto GPU counts or a cluster."""

from __future__ import annotations

from typing import Any

import pytest

from service.placement.cluster import TierKind, parse_cluster
from service.placement.fleet import FleetDeployment, pack_fleet
from service.planning.catalog import Catalog
from service.planning.specs import PlanningError

GB = 1e9


def deployment(name: str, model: str, gpus: int, instances: int, gpu_type: str = "h100-sxm") -> FleetDeployment:
    return FleetDeployment(name=name, model=model, gpu_type=gpu_type, gpus_per_instance=gpus, instances=instances)


def node(name: str, *, dram: tuple[str, ...] = (), busy: tuple[int, ...] = ()) -> dict[str, Any]:
    return {
        "name": name,
        "gpus": [{"id": i, "type": "h100-sxm", "busy": i in busy} for i in range(8)],
        "tiers": [{"kind": "dram", "capacity_bytes": 1e12, "read_bandwidth_bytes_per_s": 1e11, "checkpoints": [*dram]}],
        "network_bandwidth_bytes_per_s": 3e9,
        "pcie_bandwidth_bytes_per_s": 25e9,
    }


def test_counts_pack_and_report_gpus_used(catalog: Catalog) -> None:
    plan = pack_fleet(
        [deployment("chat", "llama-3.1-70b", 4, 2), deployment("small", "llama-3.1-8b", 1, 3)],
        catalog=catalog,
        gpus_by_type={"h100-sxm": 16},
    )
    assert [p.name for p in plan.placed] == ["chat", "small"]
    assert plan.unplaced == []
    assert plan.gpus_used_by_type == {"h100-sxm": 11}
    assert plan.gpus_available_by_type == {"h100-sxm": 16}


def test_counts_fail_with_a_reason_when_gpus_are_short(catalog: Catalog) -> None:
    plan = pack_fleet(
        [
            deployment("big", "llama-3.1-70b", 8, 1),
            deployment("mid", "qwen3-32b", 4, 2),
            deployment("other", "llama-3.1-8b", 1, 1, gpu_type="a100-sxm"),
        ],
        catalog=catalog,
        gpus_by_type={"h100-sxm": 12},
    )
    reasons = {u.name: u.reason for u in plan.unplaced}
    assert [p.name for p in plan.placed] == ["big"]
    assert reasons["mid"] == "needs 8 h100-sxm GPUs (2 instances x 4), only 4 left"
    assert reasons["other"] == "needs 1 a100-sxm GPUs per instance, only 0 left"
    assert plan.gpus_used_by_type == {"h100-sxm": 8}


def test_counts_refuse_weights_that_do_not_fit(catalog: Catalog) -> None:
    plan = pack_fleet([deployment("huge", "llama-3.1-405b", 1, 1)], catalog=catalog, gpus_by_type={"h100-sxm": 8})
    assert plan.placed == []
    assert "exceed" in plan.unplaced[0].reason


def test_cluster_packing_prefers_servers_holding_the_checkpoint(catalog: Catalog) -> None:
    cluster = parse_cluster(
        {
            "servers": [node("cold-0"), node("warm", dram=("llama-3.1-70b",)), node("cold-1")],
            "remote_store_bandwidth_bytes_per_s": 10 * GB,
        }
    )
    plan = pack_fleet(
        [deployment("small", "llama-3.1-8b", 1, 2), deployment("chat", "llama-3.1-70b", 4, 2)],
        catalog=catalog,
        cluster=cluster,
    )
    chat = next(p for p in plan.placed if p.name == "chat")
    assert [i.server for i in chat.instances] == ["warm", "warm"]
    assert [i.tier for i in chat.instances] == [TierKind.DRAM, TierKind.DRAM]
    first, second = chat.instances
    assert first.load_s is not None
    assert second.load_s is not None
    assert second.load_s > first.load_s  # the second load queues behind the first
    small = next(p for p in plan.placed if p.name == "small")
    assert all(i.server != "warm" for i in small.instances)
    assert plan.gpus_used_by_type == {"h100-sxm": 10}


def test_cluster_packing_is_all_or_nothing_per_deployment(catalog: Catalog) -> None:
    cluster = parse_cluster(
        {
            "servers": [node("a", busy=(0, 1, 2, 3, 4, 5)), node("b", busy=(0, 1, 2, 3))],
            "remote_store_bandwidth_bytes_per_s": 10 * GB,
        }
    )
    plan = pack_fleet(
        [deployment("wide", "qwen3-32b", 4, 2), deployment("pair", "llama-3.1-8b", 2, 3)],
        catalog=catalog,
        cluster=cluster,
    )
    reasons = {u.name: u.reason for u in plan.unplaced}
    assert reasons["wide"] == (
        "needs 4 h100-sxm GPUs per instance on one server; only 1 of its 2 instances fit (the most free on any server "
        "is then 2), and a deployment is placed whole or not at all: none placed"
    )
    pair = next(p for p in plan.placed if p.name == "pair")
    assert len(pair.instances) == 3
    used = [(i.server, g) for i in pair.instances for g in i.gpu_ids]
    assert len(used) == len(set(used)) == 6
    assert plan.gpus_used_by_type == {"h100-sxm": 6}


def test_bad_fleet_inputs_raise(catalog: Catalog) -> None:
    with pytest.raises(PlanningError, match="unique"):
        pack_fleet([deployment("x", "llama-3.1-8b", 1, 1)] * 2, catalog=catalog, gpus_by_type={"h100-sxm": 8})
    with pytest.raises(PlanningError, match="GPU counts by type or as a cluster"):
        pack_fleet([deployment("x", "llama-3.1-8b", 1, 1)], catalog=catalog)
    with pytest.raises(PlanningError, match="unknown model"):
        pack_fleet([deployment("x", "no-such-model", 1, 1)], catalog=catalog, gpus_by_type={"h100-sxm": 8})
