"""Issue 15: migration timeline, priced ways to free GPUs, staging, prewarming advice, fair replay, holds."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.placement.cluster import RunningInstance, TierKind
from service.placement.estimators import (
    EstimatorOptions,
    RecomputeCost,
    checkpoint_bytes,
    migration_timeline,
    shard_bytes,
)
from service.placement.optimizer import PlacementRequest, place
from service.placement.prewarm import ModelDemand, PrewarmRequest, advise_prewarm
from service.placement.replay import Policy, ReplayConfig, Scenario, run_replay
from service.planning.catalog import Catalog
from service.planning.specs import DType
from tests.test_placement import BIG, GB, SMALL, busy_holder_cluster, cluster, instance, load_s, server

NO_STAGING = EstimatorOptions(allow_staging=False)


def test_migration_timeline_two_rounds_by_hand() -> None:
    cost = RecomputeCost(a_s_per_token=0.001, b_s=0.5, source="test")
    inst = RunningInstance(
        id="i", model=SMALL, server="s", gpu_ids=[0], input_tokens=1000, generated_tokens=100, tokens_per_s=30.0
    )
    t = migration_timeline(inst, dest_load_s=2.0, recompute=cost)
    # 60 more tokens during the 2 s load; round one recomputes 1160 tokens, round two the 30 * 1.66 made meanwhile.
    assert t.tokens == 1160
    assert t.recompute_s == pytest.approx(0.001 * 1160 + 0.5)
    assert t.pause_s == pytest.approx(0.001 * 30 * 1.66 + 0.5)
    assert t.gpus_free_s == pytest.approx(2.0 + 1.66 + 0.5498)
    assert not t.finishes_first
    finishing = inst.model_copy(update={"expected_output_tokens": 150})
    early = migration_timeline(finishing, dest_load_s=2.0, recompute=cost)
    assert early.finishes_first
    assert early.gpus_free_s == pytest.approx(50 / 30)
    assert early.pause_s == 0.0


def ssd_holder_cluster(*, spare_dram: tuple[str, ...] = (SMALL,), **extra: Any) -> Any:
    """The 70B checkpoint is only on the busy holder's SSD; the spare server has free GPUs and no copy."""
    return cluster(
        server("holder", busy=tuple(range(8)), ssd=(BIG, SMALL)),
        server("spare", dram=spare_dram, network_bytes_per_s=0.5 * GB),
        instances=[
            instance("small-0", SMALL, "holder", [0, 1, 2, 3], input_tokens=500, generated_tokens=20),
            instance("small-1", SMALL, "holder", [4, 5, 6, 7], input_tokens=800, generated_tokens=100),
        ],
        **extra,
    )


def test_migration_then_load_from_ssd_starts_when_the_gpus_are_free(catalog: Catalog) -> None:
    c = ssd_holder_cluster()
    decision = place(c, PlacementRequest(model=BIG, tp=4), now_s=0.0, catalog=catalog, options=NO_STAGING)
    best = next(cand for cand in decision.candidates if cand.server == "holder")
    model = catalog.model(BIG)
    size = checkpoint_bytes(model, weight_dtype=DType.BF16)
    shard = shard_bytes(model, weight_dtype=DType.BF16, tp=4)
    transfer_s = max(size / (6 * GB), shard / (25 * GB))
    assert best.option == "migrate"
    assert best.tier is TierKind.SSD
    assert len(best.migrations) == 1
    # No staging: the SSD read starts only once the migration hands the GPUs over (the old estimate overlapped them).
    assert best.gpus_free_s == pytest.approx(best.migrations[0].finish_s)
    assert best.startup_latency_s == pytest.approx(best.gpus_free_s + transfer_s)


def test_staging_overlaps_the_migration_and_needs_dram_room(catalog: Catalog) -> None:
    # The moved instance downloads its checkpoint slowly: its migration takes longer than the 70B SSD read.
    c = ssd_holder_cluster(spare_dram=())
    model = catalog.model(BIG)
    size = checkpoint_bytes(model, weight_dtype=DType.BF16)
    shard = shard_bytes(model, weight_dtype=DType.BF16, tp=4)
    decision = place(c, PlacementRequest(model=BIG, tp=4, max_candidates=4), now_s=0.0, catalog=catalog)
    best = next(cand for cand in decision.candidates if cand.server == "holder")
    assert best.option == "migrate-staged"
    assert best.staged_from is TierKind.SSD
    assert best.staging_s == pytest.approx(size / (6 * GB))
    expected = max(best.staging_s, best.gpus_free_s) + shard / (25 * GB)
    assert best.startup_latency_s == pytest.approx(expected)
    # Without DRAM room for the checkpoint, staging is not an option.
    tiny = c.model_copy(
        update={
            "servers": [
                s.model_copy(update={"tiers": [t.model_copy(update={"capacity_bytes": 1 * GB}) for t in s.tiers]})
                for s in c.servers
            ]
        }
    )
    cramped = place(tiny, PlacementRequest(model=BIG, tp=4, max_candidates=4), now_s=0.0, catalog=catalog)
    holder = next(cand for cand in cramped.candidates if cand.server == "holder")
    assert holder.staged_from is None


def test_idle_instances_are_stopped_before_anything_moves(catalog: Catalog) -> None:
    c = cluster(
        server("holder", busy=tuple(range(8)), dram=(BIG,)),
        instances=[
            instance("busy", SMALL, "holder", [0, 1, 2, 3], input_tokens=500, generated_tokens=20),
            instance("idle-old", SMALL, "holder", [4, 5], idle_since_s=10.0),
            instance("idle-new", SMALL, "holder", [6, 7], idle_since_s=50.0),
        ],
    )
    best = place(c, PlacementRequest(model=SMALL, tp=2), now_s=100.0, catalog=catalog).placements[0]
    assert best.option == "stop-idle"
    assert best.stopped_instances == ["idle-old"]
    assert best.gpu_ids == [4, 5]
    assert not best.migrations


def test_waiting_for_a_finishing_request_is_priced(catalog: Catalog) -> None:
    c = cluster(
        server("holder", busy=tuple(range(8)), dram=(BIG,)),
        instances=[
            instance(
                "ending",
                BIG,
                "holder",
                [0, 1, 2, 3],
                input_tokens=500,
                generated_tokens=290,
                expected_output_tokens=300,
                tokens_per_s=20.0,
            ),
            instance("long", BIG, "holder", [4, 5, 6, 7], input_tokens=500, generated_tokens=20),
        ],
    )
    best = place(c, PlacementRequest(model=BIG, tp=4), now_s=0.0, catalog=catalog).placements[0]
    assert best.option == "wait"
    assert best.awaited_instances == ["ending"]
    assert best.gpus_free_s == pytest.approx(0.5)
    shard = shard_bytes(catalog.model(BIG), weight_dtype=DType.BF16, tp=4)
    assert best.startup_latency_s == pytest.approx(0.5 + shard / (25 * GB))


def test_serverlessllm_options_move_at_most_one_instance(catalog: Catalog) -> None:
    c = cluster(
        server("holder", busy=tuple(range(8)), dram=(BIG,)),
        server("spare", dram=(SMALL,)),
        instances=[instance(f"s{i}", SMALL, "holder", [2 * i, 2 * i + 1]) for i in range(4)],
    )
    one = EstimatorOptions(max_migrations=1)
    limited = place(c, PlacementRequest(model=BIG, tp=4, max_candidates=4), now_s=0.0, catalog=catalog, options=one)
    assert all(len(cand.migrations) <= 1 for cand in limited.candidates)
    free = place(c, PlacementRequest(model=BIG, tp=4, max_candidates=4), now_s=0.0, catalog=catalog)
    holder = next(cand for cand in free.candidates if cand.server == "holder")
    assert holder.option.startswith("migrate-several")
    assert len(holder.migrations) == 2


@st.composite
def reserved_clusters(draw: st.DrawFn) -> tuple[Any, set[tuple[str, int]]]:
    servers = []
    reservations = []
    reserved: set[tuple[str, int]] = set()
    instances = []
    for s in range(draw(st.integers(1, 4))):
        name = f"n{s}"
        busy = draw(st.sets(st.integers(0, 7), max_size=6))
        # At most 6 of 8 GPUs are busy: at least two are left to hold.
        held = draw(st.sets(st.sampled_from(sorted(set(range(8)) - busy)), max_size=4))
        servers.append(server(name, busy=tuple(sorted(busy)), dram=(SMALL,) if draw(st.booleans()) else ()))
        for g in sorted(busy):
            idle = draw(st.booleans())
            extra: dict[str, Any] = {"idle_since_s": 0.0} if idle else {"tokens_per_s": 30.0}
            instances.append(instance(f"{name}-{g}", SMALL, name, [g], input_tokens=100, **extra))
        if held:
            reservations.append(
                {"id": f"r-{name}", "server": name, "gpu_ids": sorted(held), "model": SMALL, "expires_at_s": 1e12}
            )
            reserved |= {(name, g) for g in held}
    return cluster(*servers, instances=instances, reservations=reservations), reserved


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=reserved_clusters(), gpus=st.sampled_from([1, 2, 4]), count=st.integers(1, 3))
def test_a_plan_never_hands_out_a_reserved_gpu(
    catalog: Catalog, data: tuple[Any, set[tuple[str, int]]], gpus: int, count: int
) -> None:
    c, reserved = data
    decision = place(c, PlacementRequest(model=SMALL, tp=gpus, instances=count), now_s=0.0, catalog=catalog)
    used: set[tuple[str, int]] = set()
    for p in decision.placements:
        mine = {(p.server, g) for g in p.gpu_ids}
        assert not mine & reserved
        assert not mine & used
        used |= mine
        for m in p.migrations:
            dest = {(m.to_server, g) for g in m.to_gpu_ids}
            assert not dest & reserved
            assert not dest & used
            used |= dest
    assert len(decision.placements) <= count


def test_prewarm_copies_a_popular_checkpoint_into_dram_by_hand(catalog: Catalog) -> None:
    c = cluster(server("a", ssd=(BIG,)), server("b"))
    request = PrewarmRequest(
        models=[ModelDemand(model=BIG, tp=4, rate_per_s=0.01)], max_copy_s_per_server=60.0, min_keep_alive_s=5.0
    )
    advice = advise_prewarm(c, request, catalog=catalog, now_s=0.0)
    size = checkpoint_bytes(catalog.model(BIG), weight_dtype=DType.BF16)
    first = advice.copies[0]
    assert (first.server, first.to_tier, first.from_tier) == ("a", TierKind.DRAM, TierKind.SSD)
    assert first.copy_s == pytest.approx(size / (6 * GB))
    assert advice.expected_cold_start_s_after < advice.expected_cold_start_s_before
    # A single checkpoint with demand spends at most the default's idle GPU-seconds: its keep-alive stays put.
    assert advice.keep_alive[0].keep_alive_s == pytest.approx(60.0)
    quiet = advise_prewarm(
        c, PrewarmRequest(models=[ModelDemand(model=BIG, tp=4, rate_per_s=0.0)]), catalog=catalog, now_s=0.0
    )
    assert quiet.copies == []
    assert quiet.keep_alive[0].keep_alive_s == 5.0


def test_fair_replay_estimates_match_outcomes_when_bandwidths_are_as_stated(catalog: Catalog) -> None:
    config = ReplayConfig(seed=2, servers=6, checkpoints=24, rate_per_s=1.0, duration_s=300.0)
    first = run_replay(config, catalog=catalog, policies=(Policy.SERVERLESSLLM, Policy.OURS))
    second = run_replay(config, catalog=catalog, policies=(Policy.SERVERLESSLLM, Policy.OURS))
    assert first.results == second.results
    ours = first.result(Policy.OURS)
    assert ours.cold_starts > 0
    # The replay runs the estimators' timeline: only future arrivals can make the outcome differ.
    assert ours.estimate_error_s < 0.5
    assert len(ours.startup_s) == len(first.result(Policy.SERVERLESSLLM).startup_s)
    degraded = run_replay(
        ReplayConfig(seed=2, servers=6, checkpoints=24, rate_per_s=1.0, duration_s=300.0, scenario=Scenario.DEGRADED),
        catalog=catalog,
        policies=(Policy.LOCALITY_BLIND, Policy.OURS_PREWARM),
    )
    assert "| ours+prewarm |" in degraded.markdown()


def test_cli_prewarm_prints_copies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main
    from tests.conftest import REPO

    rates = tmp_path / "rates.yaml"
    rates.write_text("- {model: qwen3-32b, tp: 2, rate_per_s: 0.05}\n- {model: llama-3.1-8b, rate_per_s: 0.5}\n")
    assert main(["prewarm", "--cluster", str(REPO / "examples" / "cluster.yaml"), "--rates", str(rates)]) == 0
    out = capsys.readouterr().out
    assert "expected cold start" in out
    assert "keep-alive qwen3-32b" in out


def test_a_migration_is_charged_the_loader_time_it_takes_in_a_busy_cluster(catalog: Catalog) -> None:
    quiet = busy_holder_cluster()
    # A third server loading a checkpoint: one loader in three is busy.
    busy = cluster(
        *[s.model_dump(mode="json") for s in quiet.servers],
        server(
            "loading",
            queue=[{"model": SMALL, "tier": "ssd", "remaining_bytes": 6 * GB, "bandwidth_bytes_per_s": 6 * GB}],
        ),
        instances=[i.model_dump(mode="json") for i in quiet.instances],
    )
    request = PlacementRequest(model=BIG, tp=4)
    calm = place(quiet, request, now_s=0.0, catalog=catalog).placements[0]
    pressed = place(busy, request, now_s=0.0, catalog=catalog).placements[0]
    assert calm.option == pressed.option == "migrate"
    move = pressed.migrations[0]
    assert calm.harm_s == pytest.approx(calm.migrations[0].pause_s)
    assert pressed.harm_s == pytest.approx(move.pause_s + move.load.transfer_s / 3)
    assert pressed.score_s == pytest.approx(pressed.startup_latency_s + pressed.harm_s)
    # The ServerlessLLM-style ranking prices no harm at all.
    sllm = EstimatorOptions(harm_aware=False)
    assert place(busy, request, now_s=0.0, catalog=catalog, options=sllm).placements[0].harm_s == 0.0


def test_a_stopped_idle_instance_is_charged_the_reload_its_next_request_would_need(catalog: Catalog) -> None:
    c = cluster(
        server("holder", busy=tuple(range(8)), dram=(BIG, SMALL)),
        instances=[
            instance("busy", SMALL, "holder", [0, 1, 2, 3], input_tokens=500, generated_tokens=20),
            # Idle longest, but popular: a request within its last 10 s of keep-alive is likely.
            instance("popular", SMALL, "holder", [4, 5], idle_since_s=50.0, keep_alive_s=60.0, requests_per_s=0.2),
            instance("rare", SMALL, "holder", [6, 7], idle_since_s=90.0, keep_alive_s=60.0, requests_per_s=0.001),
        ],
    )
    request = PlacementRequest(model=SMALL, tp=2)
    best = place(c, request, now_s=100.0, catalog=catalog).placements[0]
    assert best.option == "stop-idle"
    assert best.stopped_instances == ["rare"]
    _, _, reload_s = load_s(c, "holder", catalog, tp=2)
    # 50 s of keep-alive left at 0.001 requests/s: a request comes with chance 1 - exp(-0.05).
    assert best.harm_s == pytest.approx((1.0 - math.exp(-0.05)) * reload_s)
    assert best.score_s == pytest.approx(best.startup_latency_s + best.harm_s)
    # The ServerlessLLM-style ranking stops the longest idle and prices nothing.
    sllm = place(c, request, now_s=100.0, catalog=catalog, options=EstimatorOptions(harm_aware=False)).placements[0]
    assert sllm.stopped_instances == ["popular"]
    assert sllm.harm_s == 0.0
    # Past its keep-alive an instance costs nothing to stop.
    assert place(c, request, now_s=200.0, catalog=catalog).placements[0].harm_s == 0.0


def test_a_smaller_keep_alive_budget_keeps_fewer_gpus_idle(catalog: Catalog) -> None:
    config = ReplayConfig(seed=2, servers=6, checkpoints=24, rate_per_s=1.0, duration_s=600.0)
    full = run_replay(config, catalog=catalog, policies=(Policy.OURS_PREWARM,)).result(Policy.OURS_PREWARM)
    tight = replace(config, prewarm_budget_keep_alive_s=10.0, prewarm_min_keep_alive_s=5.0)
    cut = run_replay(tight, catalog=catalog, policies=(Policy.OURS_PREWARM,)).result(Policy.OURS_PREWARM)
    # The advice shortens the keep-alive of the checkpoints whose idle time buys least: fewer GPU-seconds idle,
    # more cold starts.
    assert cut.gpu_seconds < full.gpu_seconds
    assert cut.cold_starts > full.cold_starts
