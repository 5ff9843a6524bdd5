"""The joint fleet solve, shortfall by priority, rate profiles, the candidate cache and the work budget at the door."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from service.api.app import create_app
from service.db import fleet_cache
from service.db import plans as plan_store
from service.db.session import SessionFactory, make_engine, make_session_factory
from service.fleet_jobs import FleetSearches, run_fleet_candidate, search_under_claim
from service.placement.fleet_candidates import CandidateTask, candidate_tasks
from service.placement.fleet_plan import FLEET_MAX_CANDIDATE_SEARCHES, parse_fleet_spec, plan_fleet
from service.placement.fleet_solve import Option, aligned_slots, greedy_fleet, solve_fleet
from service.planning.catalog import Catalog
from service.planning.specs import PlanningError
from tests.conftest import migrated_settings

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
    options = [Option(0, "h100-sxm", 2, (3,), 6.0), Option(0, "h100-sxm", 1, (6,), 7.0)]
    solved = solve_fleet(
        options,
        priorities=[0],
        capacity_by_type={"h100-sxm": 6},
        slots=aligned_slots([{"h100-sxm": 3}, {"h100-sxm": 3}], [2]),
    )
    assert solved.chosen == {0: 1}
    assert solved.cost_usd == pytest.approx(7.0)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(st.sampled_from(["a", "b"]), st.sampled_from([1, 2, 4]), st.integers(1, 4)),
            min_size=1,
            max_size=3,
        ),
        min_size=1,
        max_size=6,
    ),
    st.integers(0, 16),
    st.integers(0, 16),
    st.lists(st.integers(0, 2), min_size=6, max_size=6),
)
def test_the_solve_never_costs_more_than_greedy_and_keeps_within_the_fleet(
    choices: list[list[tuple[str, int, int]]], have_a: int, have_b: int, levels: list[int]
) -> None:
    price = {"a": 1.0, "b": 1.7}
    options = [
        Option(d, gpu_type, size, (instances,), instances * size * price[gpu_type])
        for d, per_deployment in enumerate(choices)
        for gpu_type, size, instances in per_deployment
    ]
    priorities = levels[: len(choices)]
    capacity = {"a": have_a, "b": have_b}
    solved = solve_fleet(options, priorities=priorities, capacity_by_type=capacity)
    greedy = greedy_fleet(options, priorities=priorities, capacity_by_type=capacity)
    for gpu_type, have in capacity.items():
        assert sum(options[j].peak_gpus for j in solved.chosen.values() if options[j].gpu_type == gpu_type) <= have
    # Priority first: at every level, from the top, the solve serves at least as many as greedy did
    # whenever it served as many at every level above.
    for level in sorted(set(priorities), reverse=True):
        mine = sum(1 for d in solved.chosen if priorities[d] == level)
        theirs = sum(1 for d in greedy.chosen if priorities[d] == level)
        assert mine >= theirs
        if mine > theirs:
            break
    else:
        assert solved.cost_usd <= greedy.cost_usd + 1e-6


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
