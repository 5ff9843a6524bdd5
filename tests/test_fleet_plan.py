"""The joint fleet solve, shortfall by priority, rate profiles, the candidate cache and the work budget at the door."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from service.api.app import create_app
from service.cli import fleet_summary
from service.db import fleet_cache
from service.db import plans as plan_store
from service.db.session import SessionFactory, make_engine, make_session_factory
from service.fleet_jobs import FleetSearches, run_fleet_candidate, search_under_claim
from service.placement.cluster import parse_cluster
from service.placement.fleet import (
    FleetDeployment,
    FleetPlan,
    PackedDeployment,
    PackedInstance,
    UnplacedDeployment,
)
from service.placement.fleet_candidates import CandidateTask, candidate_tasks
from service.placement.fleet_plan import FLEET_MAX_CANDIDATE_SEARCHES, parse_fleet_spec, plan_fleet
from service.placement.fleet_solve import (
    MIP_REL_GAP,
    Option,
    aligned_slots,
    covers,
    gpus_used,
    greedy_fleet,
    solve_fleet,
)
from service.planning.catalog import Catalog
from service.planning.specs import PlanningError
from service.reporting import render_fleet_report
from tests.conftest import migrated_settings
from tests.test_reporting import section, tables

PRICES = {"h100-sxm": 2.0, "b200": 3.0}


def option(goodput_rps: float, tp: int = 1) -> dict[str, Any]:
    """A candidate strategy as a search reports it."""
    return {
        "strategy": f"tp{tp}",
        "tp": tp,
        "pp": 1,
        "attention_dp": 1,
        "moe_ep": 1,
        "gpus_per_instance": tp,
        "goodput_per_instance_rps": goodput_rps,
        "ttft_ms": {"p90": 100.0},
        "tpot_ms": {"p90": 20.0},
    }


# Per (model, GPU type): what one instance of each layout serves within the SLOs, chosen so the sums are easy.
SEARCHED = {
    ("llama-3.1-8b", "h100-sxm"): [option(10.0)],
    ("llama-3.1-8b", "b200"): [option(14.0)],
    ("qwen3-32b", "h100-sxm"): [option(4.0, tp=2)],
    ("qwen3-32b", "b200"): [option(6.0)],
}


def known_searches(tasks: list[CandidateTask], done: Callable[[int], None]) -> dict[str, dict[str, Any]]:
    """The candidate searches' answers from the table above (the solve is what these tests check)."""
    out = {}
    for i, task in enumerate(tasks, 1):
        out[task.key] = {"gpu_type": task.gpu_type, "options": SEARCHED[(task.spec["model"], task.gpu_type)]}
        done(i)
    return out


def deployment(name: str, model: str, rate: float | list[float], **extra: Any) -> dict[str, Any]:
    workload: dict[str, Any] = {"isl": 1024, "osl": 256}
    doc: dict[str, Any] = {"name": name, "model": model, "workload": workload, "slo": {"ttft_ms": 800, "tpot_ms": 40}}
    if isinstance(rate, list):
        doc["rate_profile"] = rate
    else:
        workload["rate"] = rate
    return {**doc, "search": {"tp": [1, 2], "pp": [1], "requests": 40, "simulate_top": 1}, **extra}


def fleet(gpus: dict[str, int], *deployments: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"kind": "fleet", "gpus": gpus, "prices": PRICES, "deployments": list(deployments), **extra}


def plan(spec: dict[str, Any], catalog: Catalog) -> dict[str, Any]:
    return plan_fleet(parse_fleet_spec(spec), catalog=catalog, run_searches=known_searches)


def test_the_joint_solve_takes_the_cheaper_type_where_the_greedy_rule_takes_the_fewest_gpus(catalog: Catalog) -> None:
    # chat: 40 req/s is 4 H100 ($8/h) or 3 B200 ($9/h). code: 10 req/s is 3 x tp2 H100 (6 GPUs, $12/h) or
    # 2 B200 ($6/h). With 4 B200 the greedy rule gives chat its 3 B200, so code must take 6 H100: $21/h.
    # The optimum puts chat on H100 and code on B200: $14/h.
    result = plan(
        fleet({"h100-sxm": 8, "b200": 4}, deployment("chat", "llama-3.1-8b", 40), deployment("code", "qwen3-32b", 10)),
        catalog,
    )
    rows = {d["name"]: d for d in result["deployments"]}
    assert (rows["chat"]["gpu_type"], rows["chat"]["instances"], rows["chat"]["gpus"]) == ("h100-sxm", 4, 4)
    assert (rows["code"]["gpu_type"], rows["code"]["instances"], rows["code"]["gpus"]) == ("b200", 2, 2)
    assert rows["chat"]["cost_per_hour_usd"] == pytest.approx(8.0)
    assert rows["code"]["cost_per_hour_usd"] == pytest.approx(6.0)
    assert result["cost_per_hour_usd"] == pytest.approx(14.0)
    assert result["greedy"]["cost_per_hour_usd"] == pytest.approx(21.0)
    assert result["greedy"]["unserved"] == []
    assert result["solver"]["status"] == "optimal"
    assert result["solver"]["mip_gap"] == pytest.approx(0.0, abs=1e-4)
    assert result["gpus_used_by_type"] == {"b200": 2, "h100-sxm": 4}
    assert result["all_slos_met"]
    assert result["candidate_searches"] == {"total": 4, "reused": 0}


def test_a_remainder_cheaper_on_the_other_type_mixes_instances_and_the_router_splits_by_goodput(
    catalog: Catalog,
) -> None:
    # chat: 24 req/s. Alone, 3 H100 (10 req/s each, $2/h) or 2 B200 (14 req/s each, $3/h) cost $6/h either
    # way; 1 B200 + 1 H100 serve 14 + 10 = 24 req/s for $5/h. The router gives each instance its goodput's share:
    # B200 14/24 of the rate, H100 10/24, so both run at exactly their goodput.
    spec = fleet({"h100-sxm": 8, "b200": 8}, deployment("chat", "llama-3.1-8b", 24))
    result = plan(spec, catalog)
    (row,) = result["deployments"]
    assert row["mixed"]
    assert row["router"] == "goodput_weighted"
    got = [(o["gpu_type"], o["strategy"], o["instances"], o["gpus"]) for o in row["options"]]
    assert got == [("b200", "tp1", 1, 1), ("h100-sxm", "tp1", 1, 1)]
    assert [o["rate_share"] for o in row["options"]] == pytest.approx([14 / 24, 10 / 24])
    assert [o["rate_per_instance_rps"] for o in row["options"]] == pytest.approx([14.0, 10.0])
    assert [o["cost_per_hour_usd"] for o in row["options"]] == pytest.approx([3.0, 2.0])
    # The row's own strategy fields are those of the option with the largest share; its counts, all of them.
    assert (row["gpu_type"], row["instances"], row["gpus"]) == ("b200", 2, 2)
    assert row["capacity_rps"] == pytest.approx(24.0)
    assert [(i["option"], i["gpu_type"]) for i in row["instances_placed"]] == [(0, "b200"), (1, "h100-sxm")]
    assert result["cost_per_hour_usd"] == pytest.approx(5.0)
    assert result["greedy"]["cost_per_hour_usd"] == pytest.approx(6.0)
    assert result["gpus_used_by_type"] == {"b200": 1, "h100-sxm": 1}
    assert result["solver"]["mip_gap"] == pytest.approx(0.0, abs=1e-4)
    # mix_instances: false keeps one strategy per deployment: $6/h, the greedy rule's cost.
    single = plan({**spec, "mix_instances": False}, catalog)
    (alone,) = single["deployments"]
    assert not alone["mixed"]
    assert len(alone["options"]) == 1
    assert alone["options"][0]["rate_share"] == pytest.approx(1.0)
    assert single["cost_per_hour_usd"] == pytest.approx(6.0)
    assert "one strategy per deployment" in single["solver"]["method"]


def test_mixed_instances_follow_a_rate_profile_period_by_period(catalog: Catalog) -> None:
    # 24 req/s by day takes 1 B200 + 1 H100 ($5/h); 10 req/s by night, 1 H100 ($2/h) rather than 1 B200 ($3/h).
    result = plan(
        fleet({"h100-sxm": 8, "b200": 8}, deployment("chat", "llama-3.1-8b", [24, 10]), period_hours=12), catalog
    )
    (row,) = result["deployments"]
    by_type = {o["gpu_type"]: o for o in row["options"]}
    assert by_type["b200"]["instances_by_period"] == [1, 0]
    assert by_type["h100-sxm"]["instances_by_period"] == [1, 1]
    assert by_type["h100-sxm"]["rate_share_by_period"] == pytest.approx([10 / 24, 1.0])
    assert row["instances_by_period"] == [2, 1]
    assert result["cost_usd"] == pytest.approx(12 * 5.0 + 12 * 2.0)
    # The greedy rule takes the fewest GPUs at peak: 2 B200 by day, 1 by night, $108 over the day.
    assert result["greedy"]["cost_usd"] == pytest.approx(12 * 6.0 + 12 * 3.0)
    assert result["gpus_used_by_period"] == {"b200": [1, 0], "h100-sxm": [1, 1]}


def test_a_mixed_plan_on_a_cluster_places_every_option_and_holds_its_peak(catalog: Catalog) -> None:
    cluster = parse_cluster(
        {
            "remote_store_bandwidth_bytes_per_s": 10.0e9,
            "servers": [
                {
                    "name": name,
                    "network_bandwidth_bytes_per_s": 3.125e9,
                    "pcie_bandwidth_bytes_per_s": 25.0e9,
                    "gpus": [{"id": i, "type": gpu_type} for i in range(2)],
                }
                for name, gpu_type in (("h", "h100-sxm"), ("b", "b200"))
            ],
        }
    )
    spec = fleet({"h100-sxm": 1}, deployment("chat", "llama-3.1-8b", [24, 10]), period_hours=12)
    del spec["gpus"]
    result = plan_fleet(
        parse_fleet_spec({**spec, "cluster": "two-types"}),
        catalog=catalog,
        cluster=cluster,
        run_searches=known_searches,
    )
    (row,) = result["deployments"]
    assert row["placed"]
    assert result["all_slos_met"]
    # The B200 instance keeps its GPU by night (instances stay on their servers), though it runs only by day.
    assert result["gpus_used_by_period"] == {"b200": [1, 1], "h100-sxm": [1, 1]}
    assert sorted((i["server"], i["gpu_type"]) for i in row["instances_placed"]) == [("b", "b200"), ("h", "h100-sxm")]
    assert result["cost_usd"] == pytest.approx(12 * 5.0 + 12 * 2.0)
    where = section(render_fleet_report(spec, result), "where").split('<div class="server">')[1:]
    placed = [(cells[1], cells[5]) for chunk in where for _, cells in tables(chunk)["placements"].rows]
    assert sorted(placed) == [("chat", "b200"), ("chat", "h100-sxm")]


def test_a_mixed_deployment_whose_part_does_not_fit_is_left_out_whole_and_the_rest_packed_again(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    # chat mixes a B200 and an H100 instance; say the packer finds no server for its H100 part. Its B200 part,
    # packed first, must not stay: chat is unmet with that part's reason and the packing runs again without it.
    calls: list[list[str]] = []

    def pack(parts: list[FleetDeployment], **_: Any) -> FleetPlan:
        calls.append(sorted(p.name for p in parts))
        placed, unplaced = [], []
        for part in parts:
            if part.gpu_type == "h100-sxm" and part.name.startswith("0/"):
                unplaced.append(UnplacedDeployment(name=part.name, reason="no server has a free h100-sxm"))
                continue
            instances = [PackedInstance(server="s", gpu_ids=[i]) for i in range(part.instances)]
            placed.append(
                PackedDeployment(
                    name=part.name,
                    model=part.model,
                    gpu_type=part.gpu_type,
                    gpus_per_instance=part.gpus_per_instance,
                    instances=instances,
                )
            )
        return FleetPlan(placed=placed, unplaced=unplaced, gpus_available_by_type={}, gpus_used_by_type={})

    monkeypatch.setattr("service.placement.fleet_plan.pack_fleet", pack)
    spec = fleet({"h100-sxm": 1}, deployment("chat", "llama-3.1-8b", 24), deployment("code", "qwen3-32b", 6))
    del spec["gpus"]
    cluster = parse_cluster(
        {
            "remote_store_bandwidth_bytes_per_s": 10.0e9,
            "servers": [
                {
                    "name": "s",
                    "network_bandwidth_bytes_per_s": 3.125e9,
                    "pcie_bandwidth_bytes_per_s": 25.0e9,
                    "gpus": [{"id": i, "type": t} for i, t in enumerate(["h100-sxm"] * 4 + ["b200"] * 4)],
                }
            ],
        }
    )
    result = plan_fleet(
        parse_fleet_spec({**spec, "cluster": "one"}), catalog=catalog, cluster=cluster, run_searches=known_searches
    )
    rows = {d["name"]: d for d in result["deployments"]}
    assert rows["chat"]["mixed"]
    assert not rows["chat"]["placed"]
    assert rows["chat"]["instances_placed"] == []
    assert rows["code"]["placed"]
    assert result["unmet"] == [{"name": "chat", "reason": "option 2: no server has a free h100-sxm"}]
    assert calls == [["0/0", "0/1", "1/0"], ["1/0"]]
    assert result["cost_per_hour_usd"] == pytest.approx(rows["code"]["cost_per_hour_usd"])


def test_the_report_and_the_cli_table_list_each_option_of_a_mixed_deployment(catalog: Catalog) -> None:
    spec = fleet({"h100-sxm": 8, "b200": 8}, deployment("chat", "llama-3.1-8b", 24))
    result = plan(spec, catalog)
    rows = tables(render_fleet_report(spec, result))["deployments"]
    column = {h: i for i, h in enumerate(rows.headers)}
    got = [
        (cls, cells[0], cells[column["GPU type"]], cells[column["Instances (count)"]], cells[column["Rate share (%)"]])
        for cls, cells in rows.rows
    ]
    assert got == [("deployment", "chat", "b200", "1", "58"), ("deployment option", "chat", "h100-sxm", "1", "42")]
    assert {cells[column["Headroom (%)"]] for _, cells in rows.rows} == {"0"}
    gpu_rows = {cells[0]: cells[-1] for _, cells in tables(render_fleet_report(spec, result))["gpu-types"].rows}
    assert gpu_rows == {"b200": "chat (1 x 1 GPU)", "h100-sxm": "chat (1 x 1 GPU)"}
    lines = fleet_summary(result, on_cluster=False)
    header = lines[0].split("  ")
    assert "rate share (%)" in lines[0]
    first, second = lines[1].split(), lines[2].split()
    assert first[:6] == ["chat", "llama-3.1-8b", "b200", "tp1", "1", "1"]
    assert first[-1] == "yes"
    assert second[:4] == ["h100-sxm", "tp1", "1", "1"]
    assert lines[2].startswith(" ")
    assert lines[2].split()[5] == "42"
    assert header[0] == "deployment"
    assert "the greedy rule costs $6.00/hour" in "\n".join(lines)


def test_catalog_prices_apply_without_an_override(catalog: Catalog) -> None:
    spec = fleet({"h100-sxm": 8}, deployment("chat", "llama-3.1-8b", 40))
    del spec["prices"]
    result = plan(spec, catalog)
    h100 = catalog.gpu("h100-sxm").price_per_hour_usd
    assert result["prices_per_gpu_hour_usd"] == {"h100-sxm": h100}
    assert result["cost_per_hour_usd"] == pytest.approx(4 * h100)


def test_a_short_fleet_serves_by_priority_and_says_what_is_short(catalog: Catalog) -> None:
    # Both need 4 + 6 = 10 H100 of 8: the priority-5 deployment is served, the other is short of 2 GPUs, and
    # the 2 left serve 2 instances x 10 req/s.
    result = plan(
        fleet(
            {"h100-sxm": 8},
            deployment("chat", "llama-3.1-8b", 40, gpu_types=["h100-sxm"]),
            deployment("code", "qwen3-32b", 10, gpu_types=["h100-sxm"], priority=5),
        ),
        catalog,
    )
    assert [d["name"] for d in result["deployments"]] == ["code"]
    assert result["unmet"] == [
        {
            "name": "chat",
            "reason": "short of 2 h100-sxm GPUs: needs 4 (4 x 1-GPU tp1), the plan leaves 2 free; those serve "
            "20.00 of its 40.00 req/s",
        }
    ]
    (short,) = result["shortfall"]
    assert (short["gpus_needed"], short["gpus_free"], short["gpus_short"]) == (4, 2, 2)
    assert short["servable_rps"] == pytest.approx(20.0)
    assert not result["all_slos_met"]
    # The other way round, the 4-GPU deployment goes first and the 6-GPU one is short of 2.
    flipped = plan(
        fleet(
            {"h100-sxm": 8},
            deployment("chat", "llama-3.1-8b", 40, gpu_types=["h100-sxm"], priority=5),
            deployment("code", "qwen3-32b", 10, gpu_types=["h100-sxm"]),
        ),
        catalog,
    )
    assert [d["name"] for d in flipped["deployments"]] == ["chat"]
    assert flipped["shortfall"][0]["gpus_short"] == 2
    assert flipped["shortfall"][0]["servable_rps"] == pytest.approx(8.0)


def test_rate_profiles_size_each_period_and_share_gpus_across_periods(catalog: Catalog) -> None:
    # Three 8-hour periods. day peaks first, night second; each period needs 5 H100 in all though the peaks
    # add up to 8. flat: 10 req/s all day on B200 = 1 GPU.
    result = plan(
        fleet(
            {"h100-sxm": 5, "b200": 1},
            deployment("day", "llama-3.1-8b", [40, 10, 20], gpu_types=["h100-sxm"]),
            deployment("night", "llama-3.1-8b", [10, 40, 30], gpu_types=["h100-sxm"]),
            deployment("flat", "llama-3.1-8b", [10, 10, 10], gpu_types=["b200"]),
            period_hours=8,
        ),
        catalog,
    )
    rows = {d["name"]: d for d in result["deployments"]}
    assert rows["day"]["instances_by_period"] == [4, 1, 2]
    assert rows["night"]["instances_by_period"] == [1, 4, 3]
    assert rows["flat"]["instances_by_period"] == [1, 1, 1]
    assert rows["day"]["instances"] == 4  # at peak
    assert result["gpus_used_by_period"] == {"b200": [1, 1, 1], "h100-sxm": [5, 5, 5]}
    assert result["gpus_used_by_type"] == {"b200": 1, "h100-sxm": 5}
    # GPU-hours: day 7 x 8, night 8 x 8 on H100 at $2; flat 3 x 8 on B200 at $3.
    assert rows["day"]["cost_usd"] == pytest.approx(112.0)
    assert result["cost_usd"] == pytest.approx(112.0 + 128.0 + 72.0)
    assert result["cost_per_hour_usd"] == pytest.approx(312.0 / 24)
    assert result["peak_cost_per_hour_usd"] == pytest.approx(5 * 2.0 + 3.0)
    assert result["all_slos_met"]


def test_profiles_must_agree_on_their_periods() -> None:
    spec = fleet({"h100-sxm": 5}, deployment("a", "llama-3.1-8b", [1, 2]), deployment("b", "llama-3.1-8b", [1, 2, 3]))
    with pytest.raises(PlanningError, match="same number of periods"):
        parse_fleet_spec(spec)


def test_on_a_cluster_instances_fit_whole_servers(catalog: Catalog) -> None:
    # Two servers with 3 free H100 each: 6 free, but a 2-GPU instance fits once per server, so 2 instances of
    # tp2 at most; aligned_slots says so and the solve holds to it.
    assert aligned_slots([{"h100-sxm": 3}, {"h100-sxm": 3}], [2, 4]) == {("h100-sxm", 2): 4, ("h100-sxm", 4): 0}
    # 6 req/s: three tp2 instances (2 req/s each, $2 per instance) or six tp1 (1 req/s each, $7/6 per instance).
    options = [Option(0, "h100-sxm", 2, 2.0, 2.0), Option(0, "h100-sxm", 1, 1.0, 7.0 / 6)]
    for mix in (False, True):
        solved = solve_fleet(
            options,
            rates=[[6.0]],
            priorities=[0],
            capacity_by_type={"h100-sxm": 6},
            slots=aligned_slots([{"h100-sxm": 3}, {"h100-sxm": 3}], [2]),
            mix=mix,
        )
        # One option alone: six tp1. Mixed: two tp2 (one per server) and two tp1 in the GPUs left, $6.33.
        expected = {1: (6,)} if not mix else {0: (2,), 1: (2,)}
        assert solved.instances == {0: expected}
        assert solved.cost_usd == pytest.approx(7.0 if not mix else 4.0 + 7.0 / 3)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.floats(0.0, 40.0, allow_nan=False), min_size=2, max_size=2),
            st.lists(
                st.tuples(st.sampled_from(["a", "b"]), st.sampled_from([1, 2, 4]), st.floats(0.5, 12.0)),
                min_size=1,
                max_size=3,
            ),
        ),
        min_size=1,
        max_size=6,
    ),
    st.integers(0, 24),
    st.integers(0, 24),
    st.lists(st.integers(0, 2), min_size=6, max_size=6),
    st.booleans(),
    st.booleans(),
)
def test_the_solve_covers_every_rate_never_costs_more_than_greedy_and_keeps_within_the_fleet(
    deployments: list[tuple[list[float], list[tuple[str, int, float]]]],
    have_a: int,
    have_b: int,
    levels: list[int],
    mix: bool,
    hold_peak: bool,
) -> None:
    price = {"a": 1.0, "b": 1.7}
    rates = [profile for profile, _ in deployments]
    options = [
        Option(d, gpu_type, size, goodput, size * price[gpu_type])
        for d, (_, per_deployment) in enumerate(deployments)
        for gpu_type, size, goodput in per_deployment
    ]
    priorities = levels[: len(deployments)]
    capacity = {"a": have_a, "b": have_b}
    args: dict[str, Any] = {"rates": rates, "priorities": priorities, "capacity_by_type": capacity}
    solved = solve_fleet(options, mix=mix, hold_peak=hold_peak, **args)
    greedy = greedy_fleet(options, hold_peak=hold_peak, **args)
    assert solved.status == "optimal"
    for d, counts in solved.instances.items():
        assert all(options[j].deployment == d for j in counts)
        assert covers(options, counts, rates[d])
        if not mix:
            assert len(counts) == 1
    for gpu_type, row in gpus_used(options, solved, ["a", "b"], 2, hold_peak=hold_peak).items():
        assert max(row) <= capacity[gpu_type]
    # Priority first: at every level, from the top, the solve serves at least as many as greedy did
    # whenever it served as many at every level above.
    for level in sorted(set(priorities), reverse=True):
        mine = sum(1 for d in solved.instances if priorities[d] == level)
        theirs = sum(1 for d in greedy.instances if priorities[d] == level)
        assert mine >= theirs
        if mine > theirs:
            break
    else:
        assert solved.cost_usd <= greedy.cost_usd * (1 + MIP_REL_GAP) + 1e-9
    single = solve_fleet(options, mix=False, hold_peak=hold_peak, **args) if mix else solved
    if not solved.unserved and not single.unserved:
        # Mixing only adds choices: never dearer than the best single option per deployment.
        assert solved.cost_usd <= single.cost_usd * (1 + MIP_REL_GAP) + 1e-9


def test_candidate_keys_ignore_rate_name_and_priority_but_not_slos(catalog: Catalog) -> None:
    a = deployment("a", "llama-3.1-8b", 3)
    b = deployment("b", "llama-3.1-8b", 30, priority=4)
    c = deployment("c", "llama-3.1-8b", 3, slo={"ttft_ms": 500, "tpot_ms": 40})
    tasks, keys = candidate_tasks([(a, ["l40s"]), (b, ["l40s"]), (c, ["l40s", "h100-sxm"])], catalog=catalog)
    assert len(tasks) == 3
    assert keys[0] == keys[1]
    assert keys[2]["l40s"] != keys[0]["l40s"]


@pytest.fixture
def sessions(tmp_path: Path) -> SessionFactory:
    settings_ = migrated_settings(f"sqlite:///{tmp_path / 'cache.db'}", tmp_path)
    return make_session_factory(make_engine(settings_))


REAL: dict[str, Any] = {
    "kind": "fleet",
    "gpus": {"l40s": 8},
    "deployments": [
        {
            "name": name,
            "model": "llama-3.1-8b",
            "workload": {"isl": 512, "osl": 64, "rate": rate},
            "slo": {"ttft_ms": ttft_ms, "tpot_ms": 60},
            "search": {"tp": [1], "pp": [1], "requests": 40, "simulate_top": 1},
        }
        for name, rate, ttft_ms in (("a", 2.0, 800), ("b", 4.0, 800), ("c", 3.0, 1200))
    ],
}


def test_a_replan_reuses_cached_searches_and_searches_only_what_changed(
    catalog: Catalog, sessions: SessionFactory
) -> None:
    def run(spec: dict[str, Any]) -> dict[str, Any]:
        searches = FleetSearches(catalog=catalog, session_factory=sessions)
        return plan_fleet(parse_fleet_spec(spec), catalog=catalog, run_searches=searches, reused=searches.reused_count)

    first = run(REAL)
    assert first["candidate_searches"] == {"total": 2, "reused": 0}
    assert first["all_slos_met"]
    same = run(REAL)
    assert same["candidate_searches"] == {"total": 2, "reused": 2}
    assert same["deployments"] == first["deployments"]
    # A new rate needs no search; a new SLO needs one.
    changed = copy.deepcopy(REAL)
    changed["deployments"][0]["workload"]["rate"] = 5.0
    assert run(changed)["candidate_searches"] == {"total": 2, "reused": 2}
    changed["deployments"][2]["slo"]["ttft_ms"] = 1500
    assert run(changed)["candidate_searches"] == {"total": 2, "reused": 1}


def test_the_local_pool_gives_what_the_sequential_run_gives(catalog: Catalog) -> None:
    alone = plan_fleet(parse_fleet_spec(REAL), catalog=catalog)
    pooled = plan_fleet(parse_fleet_spec(REAL), catalog=catalog, run_searches=FleetSearches(catalog=catalog, jobs=2))
    assert pooled["deployments"] == alone["deployments"]
    assert pooled["cost_per_hour_usd"] == alone["cost_per_hour_usd"]


def test_claims_lapse_and_release(sessions: SessionFactory) -> None:
    with sessions() as session:
        fleet_cache.add_pending(session, [("k", {"x": 1})])
        assert fleet_cache.claim(session, key="k", worker="w1", lease_s=60) == {"x": 1}
        assert fleet_cache.claim(session, key="k", worker="w2", lease_s=60) is None
        assert fleet_cache.claimable(session, ["k"]) == []
        assert not fleet_cache.renew(session, key="k", worker="w2", lease_s=60)
        fleet_cache.release(session, key="k", worker="w1")
        assert fleet_cache.claimable(session, ["k"]) == ["k"]
        # A lease that lapsed (its worker was lost) can be taken over.
        assert fleet_cache.claim(session, key="k", worker="w1", lease_s=-1) == {"x": 1}
        assert fleet_cache.claim(session, key="k", worker="w2", lease_s=60) == {"x": 1}
        fleet_cache.finish(session, key="k", result={"options": []}, search_s=0.1)
        assert fleet_cache.done_results(session, ["k"]) == {"k": {"options": []}}
        assert fleet_cache.claim(session, key="k", worker="w3", lease_s=60) is None


def test_a_worker_part_of_a_canceled_plan_stops_and_gives_its_search_back(
    catalog: Catalog, sessions: SessionFactory
) -> None:
    tasks, _ = candidate_tasks([(REAL["deployments"][0], ["l40s"])], catalog=catalog)
    (task,) = tasks
    with sessions() as session:
        fleet_cache.add_pending(session, [(task.key, task.spec)])
        stored, _ = plan_store.create_plan(
            session, new=plan_store.NewPlan(REAL, "fleet", "llama-3.1-8b", "l40s", 1), idempotency_key=None
        )
    # The plan is queued, not running under attempt 1: the part does nothing and the search stays pending.
    outcome = run_fleet_candidate(
        stored.id, 1, task.key, session_factory=sessions, catalog=catalog, worker="w", lease_s=30
    )
    assert outcome == "aborted"
    with sessions() as session:
        assert fleet_cache.states(session, [task.key]) == {task.key: fleet_cache.PENDING}

    class CanceledError(Exception):
        pass

    def canceled() -> None:
        raise CanceledError

    with pytest.raises(CanceledError):
        search_under_claim(
            task.key, session_factory=sessions, catalog=catalog, worker="w", lease_s=30, still_wanted=canceled
        )
    with sessions() as session:
        assert fleet_cache.states(session, [task.key]) == {task.key: fleet_cache.PENDING}
    assert search_under_claim(task.key, session_factory=sessions, catalog=catalog, worker="w", lease_s=30) == "done"
    with sessions() as session:
        assert fleet_cache.done_results(session, [task.key])[task.key]["options"]


def many(count: int, *, distinct: bool) -> dict[str, Any]:
    return {
        "kind": "fleet",
        "gpus": {"h100-sxm": 64, "b200": 64},
        "deployments": [
            {
                "name": f"d{i}",
                "model": "llama-3.1-8b",
                "workload": {"isl": 512 + (i if distinct else 0), "osl": 64, "rate": 1 + i % 7},
                "slo": {"ttft_ms": 800, "tpot_ms": 40},
            }
            for i in range(count)
        ],
    }


def test_five_hundred_deployments_pass_the_door_and_the_budget_is_named_when_exceeded() -> None:
    assert len(parse_fleet_spec(many(500, distinct=True)).deployments) == 500
    assert len(parse_fleet_spec(many(1000, distinct=False)).deployments) == 1000
    with pytest.raises(PlanningError, match=f"over the work budget of {FLEET_MAX_CANDIDATE_SEARCHES} candidate"):
        parse_fleet_spec(many(501, distinct=True))


def test_the_api_refuses_a_fleet_over_the_budget_with_a_problem(tmp_path: Path) -> None:
    settings_ = migrated_settings(f"sqlite:///{tmp_path / 'api.db'}", tmp_path)
    with TestClient(create_app(settings_)) as client:
        response = client.post("/v1/plans", json=many(501, distinct=True))
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert f"work budget of {FLEET_MAX_CANDIDATE_SEARCHES} candidate searches" in response.json()["detail"]


def test_a_stop_reaches_the_pool_and_the_plans_own_search(catalog: Catalog) -> None:
    """A checkpoint that raises (a cancel) ends the local pool's run and the search on the plan's own thread."""

    class CanceledError(Exception):
        pass

    calls = 0

    def cancel_on_third_look() -> None:
        nonlocal calls
        calls += 1
        if calls >= 3:
            raise CanceledError

    # Searches long enough that both the pool's and the thread's are still running at the third look.
    spec = copy.deepcopy(REAL)
    for deployment in spec["deployments"]:
        deployment["search"]["requests"] = 20_000
    searches = FleetSearches(catalog=catalog, jobs=2, checkpoint=cancel_on_third_look)
    started = time.perf_counter()
    with pytest.raises(CanceledError):
        plan_fleet(parse_fleet_spec(spec), catalog=catalog, run_searches=searches)
    assert calls == 3
    assert time.perf_counter() - started < 30
    assert not [t for t in threading.enumerate() if t.name == "splan-fleet-search"]
