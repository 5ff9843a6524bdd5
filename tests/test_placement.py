"""Placement domain: cluster model, events, load/migration estimators, place() and reserve(), trace replay."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from service.placement.cluster import (
    Cluster,
    ClusterError,
    TierKind,
    apply_events,
    parse_cluster,
    parse_events,
)
from service.placement.estimators import EstimatorOptions, checkpoint_bytes, estimate_load
from service.placement.optimizer import PlacementRequest, place, reserve
from service.placement.replay import Policy, ReplayConfig, run_replay
from service.planning.catalog import Catalog
from service.planning.specs import DType, PlanningError

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
SMALL = "llama-3.1-8b"
BIG = "llama-3.1-70b"


def server(
    name: str,
    *,
    gpus: int = 8,
    busy: tuple[int, ...] = (),
    gpu_type: str = "h100-sxm",
    dram: tuple[str, ...] = (),
    ssd: tuple[str, ...] = (),
    network_bytes_per_s: float = 2.5 * GB,
    queue: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "gpus": [{"id": i, "type": gpu_type, "busy": i in busy} for i in range(gpus)],
        "tiers": [
            {
                "kind": "dram",
                "capacity_bytes": 512 * GB,
                "read_bandwidth_bytes_per_s": 100 * GB,
                "checkpoints": list(dram),
            },
            {
                "kind": "ssd",
                "capacity_bytes": 4000 * GB,
                "read_bandwidth_bytes_per_s": 6 * GB,
                "checkpoints": list(ssd),
            },
        ],
        "network_bandwidth_bytes_per_s": network_bytes_per_s,
        "pcie_bandwidth_bytes_per_s": 25 * GB,
        "loading_queue": queue or [],
    }


def cluster(*servers: dict[str, Any], instances: list[dict[str, Any]] | None = None, **extra: Any) -> Cluster:
    return parse_cluster(
        {"servers": list(servers), "instances": instances or [], "remote_store_bandwidth_bytes_per_s": 10 * GB, **extra}
    )


def instance(iid: str, model: str, srv: str, gpu_ids: list[int], **extra: Any) -> dict[str, Any]:
    return {"id": iid, "model": model, "server": srv, "gpu_ids": gpu_ids, "tp": len(gpu_ids), **extra}


def load_s(c: Cluster, srv: str, catalog: Catalog, model: str = SMALL, **kw: Any) -> tuple[TierKind, float, float]:
    est = estimate_load(c, server=srv, model=catalog.model(model), weight_dtype=DType.BF16, now_s=0.0, **kw)
    return est.tier, est.queue_wait_s, est.transfer_s


def test_copies_do_not_reuse_a_stale_index(catalog: Catalog) -> None:
    c = cluster(server("a", dram=(SMALL,)), server("b"))
    assert place(c, PlacementRequest(model=SMALL), now_s=0.0, catalog=catalog).placements[0].server == "a"
    full = server("a", busy=tuple(range(8)), dram=(SMALL,))
    changed = c.model_copy(
        update={"servers": [parse_cluster({**c.model_dump(), "servers": [full]}).servers[0], c.servers[1]]}
    )
    assert place(changed, PlacementRequest(model=SMALL), now_s=0.0, catalog=catalog).placements[0].server == "b"


def test_example_cluster_validates() -> None:
    data = yaml.safe_load((REPO / "examples" / "cluster.yaml").read_text())
    c = Cluster.model_validate(data)
    assert len(c.servers) == 4
    assert c.server("node-a").tier(TierKind.DRAM) is not None


def test_load_prefers_dram_over_ssd_over_remote(catalog: Catalog) -> None:
    c = cluster(server("d", dram=(SMALL,), ssd=(SMALL,)), server("s", ssd=(SMALL,)), server("r"))
    tiers = {name: load_s(c, name, catalog) for name in ("d", "s", "r")}
    assert [tiers[n][0] for n in ("d", "s", "r")] == [TierKind.DRAM, TierKind.SSD, TierKind.REMOTE]
    assert tiers["d"][2] < tiers["s"][2] < tiers["r"][2]
    size = checkpoint_bytes(catalog.model(SMALL), weight_dtype=DType.BF16)
    # DRAM loads run at the host-to-GPU link, SSD at the disk, remote at the server's link.
    assert tiers["d"][2] == pytest.approx(size / (25 * GB))
    assert tiers["s"][2] == pytest.approx(size / (6 * GB))
    assert tiers["r"][2] == pytest.approx(size / (2.5 * GB))


def test_tensor_parallel_dram_load_runs_shards_in_parallel(catalog: Catalog) -> None:
    c = cluster(server("d", dram=(BIG,)))
    _, _, tp1 = load_s(c, "d", catalog, model=BIG)
    _, _, tp4 = load_s(c, "d", catalog, model=BIG, tp=4)
    assert tp4 < tp1 / 3.5


def test_queue_wait_adds_to_load_time(catalog: Catalog) -> None:
    queue = [{"model": "other", "tier": "ssd", "remaining_bytes": 30 * GB, "bandwidth_bytes_per_s": 3 * GB}]
    c = cluster(server("a", dram=(SMALL,), queue=queue), server("b", dram=(SMALL,)))
    _, wait_a, transfer_a = load_s(c, "a", catalog)
    _, wait_b, transfer_b = load_s(c, "b", catalog)
    assert wait_a == pytest.approx(10.0)
    assert wait_b == 0.0
    assert transfer_a == pytest.approx(transfer_b)
    decision = place(c, PlacementRequest(model=SMALL), now_s=0.0, catalog=catalog)
    assert decision.placements[0].server == "b"


def test_link_sharing_slows_concurrent_remote_downloads(catalog: Catalog) -> None:
    busy_queue = [{"model": "other", "tier": "remote", "remaining_bytes": 1 * GB, "bandwidth_bytes_per_s": 1 * GB}]
    fast = 8 * GB
    alone = cluster(server("a", network_bytes_per_s=fast), server("b", network_bytes_per_s=fast))
    shared = cluster(
        server("a", network_bytes_per_s=fast),
        server("b", network_bytes_per_s=fast, queue=busy_queue),
        server("c", network_bytes_per_s=fast, queue=busy_queue),
    )
    _, _, transfer_alone = load_s(alone, "a", catalog)
    _, _, transfer_shared = load_s(shared, "a", catalog)
    # Two other servers download: the 10 GB/s store gives each of three downloads a third.
    size = checkpoint_bytes(catalog.model(SMALL), weight_dtype=DType.BF16)
    assert transfer_alone == pytest.approx(size / fast)
    assert transfer_shared == pytest.approx(size / (10 * GB / 3))
    off = EstimatorOptions(share_remote_link=False)
    _, _, transfer_unshared = load_s(shared, "a", catalog, options=off)
    assert transfer_unshared == pytest.approx(transfer_alone)


def busy_holder_cluster() -> Cluster:
    """The only DRAM holder of BIG is full with one small instance; the other server must download BIG."""
    return cluster(
        server("holder", busy=tuple(range(8)), dram=(BIG, SMALL)),
        server("spare", dram=(SMALL,), network_bytes_per_s=1.25 * GB),
        instances=[
            instance("small-0", SMALL, "holder", [0, 1, 2, 3], input_tokens=500, generated_tokens=20),
            instance("small-1", SMALL, "holder", [4, 5, 6, 7], input_tokens=800, generated_tokens=100),
        ],
    )


def test_migration_chosen_when_the_dram_holder_is_busy(catalog: Catalog) -> None:
    c = busy_holder_cluster()
    decision = place(c, PlacementRequest(model=BIG, tp=4), now_s=0.0, catalog=catalog)
    best = decision.placements[0]
    assert best.server == "holder"
    assert best.tier is TierKind.DRAM
    assert len(best.migrations) == 1
    move = best.migrations[0]
    assert move.instance_id == "small-0"  # fewer tokens to recompute
    assert move.to_server == "spare"
    assert best.gpu_ids == [0, 1, 2, 3]
    assert best.migration_s == pytest.approx(move.load.total_s + move.recompute_s)
    assert best.startup_latency_s >= best.migration_s
    remote = next(cand for cand in decision.candidates if cand.server == "spare")
    assert remote.tier is TierKind.REMOTE
    assert best.startup_latency_s < remote.startup_latency_s


def test_migration_not_chosen_when_disallowed(catalog: Catalog) -> None:
    c = busy_holder_cluster()
    decision = place(c, PlacementRequest(model=BIG, tp=4, allow_migration=False), now_s=0.0, catalog=catalog)
    assert decision.placements[0].server == "spare"
    assert not decision.placements[0].migrations
    reasons = {e.server: e.reason for e in decision.excluded}
    assert "migration not allowed" in reasons["holder"]


def test_excluded_servers_carry_reasons(catalog: Catalog) -> None:
    c = cluster(server("h100", gpus=8), server("tiny", gpus=2), server("a100", gpu_type="a100-sxm"))
    decision = place(c, PlacementRequest(model=BIG, tp=4, gpu_type="h100-sxm"), now_s=0.0, catalog=catalog)
    reasons = {e.server: e.reason for e in decision.excluded}
    assert [p.server for p in decision.placements] == ["h100"]
    assert reasons["tiny"] == "has only 2 h100-sxm GPUs, an instance needs 4"
    assert reasons["a100"].startswith("no h100-sxm GPUs")
    too_big = place(c, PlacementRequest(model=BIG, tp=1), now_s=0.0, catalog=catalog)
    assert not too_big.placements
    assert too_big.unplaced_reason is not None
    assert all("exceed" in e.reason for e in too_big.excluded)


def test_bad_request_raises_planning_error(catalog: Catalog) -> None:
    c = cluster(server("a"))
    with pytest.raises(PlanningError, match="unknown model"):
        place(c, PlacementRequest(model="no-such-model"), now_s=0.0, catalog=catalog)
    with pytest.raises(PlanningError, match="tp=3"):
        place(c, PlacementRequest(model=SMALL, tp=3), now_s=0.0, catalog=catalog)


def test_instances_of_one_decision_never_share_gpus(catalog: Catalog) -> None:
    c = cluster(server("a", dram=(SMALL,)), server("b"))
    decision = place(c, PlacementRequest(model=SMALL, tp=2, instances=6), now_s=0.0, catalog=catalog)
    used = [(p.server, g) for p in decision.placements for g in p.gpu_ids]
    assert len(decision.placements) == 6
    assert len(used) == len(set(used))
    # The second load on a server queues behind the first.
    on_a = [p for p in decision.placements if p.server == "a"]
    assert on_a[1].load.queue_wait_s == pytest.approx(on_a[0].load.transfer_s)


def test_place_then_reserve_never_returns_the_same_gpus(catalog: Catalog) -> None:
    c = cluster(server("a", gpus=4, dram=(SMALL,)), server("b", gpus=4))
    seen: set[tuple[str, int]] = set()
    for _ in range(4):
        decision = place(c, PlacementRequest(model=SMALL, tp=2), now_s=100.0, catalog=catalog)
        chosen = {(p.server, g) for p in decision.placements for g in p.gpu_ids}
        assert chosen
        assert not chosen & seen
        seen |= chosen
        c = reserve(c, decision, now_s=100.0, ttl_s=30.0)
    assert not place(c, PlacementRequest(model=SMALL, tp=2), now_s=100.0, catalog=catalog).placements
    assert len(c.reservations) == 4
    assert len(c.server("a").loading_queue) == 2


def test_reservations_expire(catalog: Catalog) -> None:
    c = cluster(server("a", gpus=2, dram=(SMALL,)), server("b", gpus=2))
    request = PlacementRequest(model=SMALL, tp=2)
    first = place(c, request, now_s=0.0, catalog=catalog)
    held = reserve(c, first, now_s=0.0, ttl_s=10.0)
    during = place(held, request, now_s=5.0, catalog=catalog)
    after = place(held, request, now_s=10.0, catalog=catalog)
    assert first.placements[0].server == "a"
    assert during.placements[0].server == "b"
    assert during.placements[0].load.queue_wait_s == 0.0
    assert after.placements[0].server == "a"
    assert after.placements[0].load.queue_wait_s == 0.0  # the expired reservation's load left the queue too
    confirmed = apply_events(held, parse_events([{"type": "reservation_confirmed", "id": held.reservations[0].id}]))
    assert place(confirmed, request, now_s=1000.0, catalog=catalog).placements[0].server == "b"


def test_reserve_refuses_a_stale_decision(catalog: Catalog) -> None:
    c = cluster(server("a", gpus=2))
    decision = place(c, PlacementRequest(model=SMALL, tp=2), now_s=0.0, catalog=catalog)
    held = reserve(c, decision, now_s=0.0, ttl_s=10.0)
    with pytest.raises(ClusterError, match="no longer free"):
        reserve(held, decision, now_s=1.0, ttl_s=10.0)


def test_reserve_holds_migration_destinations(catalog: Catalog) -> None:
    c = busy_holder_cluster()
    decision = place(c, PlacementRequest(model=BIG, tp=4), now_s=0.0, catalog=catalog)
    held = reserve(c, decision, now_s=0.0, ttl_s=60.0)
    by_server = {r.server: r for r in held.reservations}
    assert by_server["spare"].migrating_instance == "small-0"
    assert by_server["holder"].gpu_ids == [0, 1, 2, 3]
    # A second request cannot move the instance already moving nor use its destination.
    again = place(held, PlacementRequest(model=BIG, tp=4), now_s=1.0, catalog=catalog)
    for p in again.placements:
        assert not {(p.server, g) for g in p.gpu_ids} & {("spare", g) for g in by_server["spare"].gpu_ids}
        assert all(m.instance_id != "small-0" for m in p.migrations)


def test_events_apply_without_mutating(catalog: Catalog) -> None:
    c = cluster(server("a", ssd=(SMALL,)), server("b"))
    events = parse_events(
        [
            {"type": "instance_started", "id": "i1", "model": SMALL, "server": "a", "gpu_ids": [0, 1], "tp": 2},
            {"type": "request_progress", "id": "i1", "input_tokens": 300, "generated_tokens": 40},
            {"type": "checkpoint_cached", "server": "a", "tier": "dram", "model": SMALL},
            {"type": "checkpoint_evicted", "server": "a", "tier": "ssd", "model": SMALL},
        ]
    )
    after = apply_events(c, events)
    assert [g.busy for g in after.server("a").gpus[:3]] == [True, True, False]
    assert after.instances[0].generated_tokens == 40
    dram, ssd = after.server("a").tier(TierKind.DRAM), after.server("a").tier(TierKind.SSD)
    assert dram is not None
    assert dram.checkpoints == [SMALL]
    assert ssd is not None
    assert ssd.checkpoints == []
    assert not c.instances
    assert not any(g.busy for g in c.server("a").gpus)
    stopped = apply_events(after, parse_events([{"type": "instance_stopped", "id": "i1"}]))
    assert not stopped.instances
    assert not any(g.busy for g in stopped.server("a").gpus)


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ({"type": "instance_stopped", "id": "ghost"}, "unknown instance 'ghost'"),
        (
            {"type": "instance_started", "id": "x", "model": SMALL, "server": "a", "gpu_ids": [0]},
            "GPU 0 on 'a' is already busy",
        ),
        ({"type": "instance_started", "id": "x", "model": SMALL, "server": "zz", "gpu_ids": [0]}, "unknown server"),
        ({"type": "instance_started", "id": "x", "model": SMALL, "server": "a", "gpu_ids": [9]}, "has no GPU 9"),
        ({"type": "checkpoint_evicted", "server": "a", "tier": "dram", "model": BIG}, "does not hold"),
        ({"type": "reservation_released", "id": "nope"}, "unknown reservation"),
        (
            {
                "type": "load_finished",
                "server": "a",
                "model": SMALL,
                "tier": "ssd",
                "size_bytes": 1.0,
                "duration_s": 1.0,
            },
            "has no ssd tier",
        ),
        ({"type": "request_progress", "id": "ghost", "input_tokens": 1, "generated_tokens": 1}, "unknown instance"),
    ],
)
def test_bad_events_raise_cluster_error(event: dict[str, Any], message: str) -> None:
    lone = server("a", busy=(0,))
    lone["tiers"] = lone["tiers"][:1]
    c = cluster(lone, instances=[instance("i0", SMALL, "a", [0])])
    with pytest.raises(ClusterError, match=r"event 0 \(") as info:
        apply_events(c, parse_events([event]))
    assert message in str(info.value)


def test_malformed_events_and_clusters_raise_cluster_error() -> None:
    with pytest.raises(ClusterError, match="invalid events"):
        parse_events([{"type": "instance_exploded", "id": "x"}])
    with pytest.raises(ClusterError, match="not marked busy"):
        cluster(server("a"), instances=[instance("i0", SMALL, "a", [0])])
    with pytest.raises(ClusterError, match="listed twice"):
        cluster(server("a"), server("a"))
    bad = server("a")
    bad["tiers"] = [{"kind": "remote", "capacity_bytes": 1.0, "read_bandwidth_bytes_per_s": 1.0}]
    with pytest.raises(ClusterError, match="remote store is cluster-wide"):
        cluster(bad)
    with pytest.raises(ClusterError, match="surprise: Extra inputs are not permitted"):
        cluster(server("a"), surprise=1)


def test_learned_bandwidth_moves_toward_reported_loads(catalog: Catalog) -> None:
    queue = [{"model": SMALL, "tier": "ssd", "remaining_bytes": 16 * GB, "bandwidth_bytes_per_s": 6 * GB}]
    c = cluster(server("a", ssd=(SMALL,), queue=queue))
    _, _, before = load_s(c, "a", catalog)
    report = {"type": "load_finished", "server": "a", "model": SMALL, "tier": "ssd", "size_bytes": 16 * GB}
    once = apply_events(c, parse_events([{**report, "duration_s": 8.0}]))
    learned = once.learned.bandwidths[0]
    assert learned.bandwidth_bytes_per_s == pytest.approx(2 * GB)
    assert once.server("a").loading_queue == []
    twice = apply_events(once, parse_events([{**report, "duration_s": 4.0}]))
    assert 2 * GB < twice.learned.bandwidths[0].bandwidth_bytes_per_s < 4 * GB
    _, _, after = load_s(twice, "a", catalog)
    assert after > before
    _, _, ignored = load_s(twice, "a", catalog, options=EstimatorOptions(use_learned=False))
    assert ignored == pytest.approx(before)


def test_migration_reports_refit_a_and_b(catalog: Catalog) -> None:
    c = busy_holder_cluster()
    derived = place(c, PlacementRequest(model=BIG, tp=4), now_s=0.0, catalog=catalog).placements[0].migrations[0]
    assert derived.recompute_source == "derived"
    base = {"type": "migration_finished", "model": SMALL, "gpu": "h100-sxm", "tp": 4, "output_tokens": 0}
    reports = [{**base, "input_tokens": n, "duration_s": 0.5 + 0.001 * n} for n in (1000, 2000, 4000)]
    fitted = apply_events(c, parse_events(reports))
    fit = fitted.learned.migrations[0]
    assert fit.a_s_per_token == pytest.approx(0.001)
    assert fit.b_s == pytest.approx(0.5)
    move = place(fitted, PlacementRequest(model=BIG, tp=4), now_s=0.0, catalog=catalog).placements[0].migrations[0]
    assert move.recompute_source == "fitted"
    assert move.recompute_s == pytest.approx(0.5 + 0.001 * move.tokens)


def test_migration_finished_moves_the_instance() -> None:
    c = busy_holder_cluster()
    event = {
        "type": "migration_finished",
        "model": SMALL,
        "gpu": "h100-sxm",
        "tp": 4,
        "input_tokens": 500,
        "output_tokens": 30,
        "duration_s": 0.2,
        "instance_id": "small-0",
        "to_server": "spare",
        "to_gpu_ids": [0, 1, 2, 3],
    }
    moved = apply_events(c, parse_events([event]))
    inst = next(i for i in moved.instances if i.id == "small-0")
    assert (inst.server, inst.gpu_ids, inst.generated_tokens) == ("spare", [0, 1, 2, 3], 30)
    assert [g.busy for g in moved.server("holder").gpus[:5]] == [False, False, False, False, True]


def test_instance_started_consumes_its_reservation(catalog: Catalog) -> None:
    c = cluster(server("a", gpus=2))
    decision = place(c, PlacementRequest(model=SMALL, tp=2), now_s=0.0, catalog=catalog)
    held = reserve(c, decision, now_s=0.0, ttl_s=30.0)
    start = {"type": "instance_started", "id": "i1", "model": SMALL, "server": "a", "gpu_ids": [0, 1], "tp": 2}
    started = apply_events(held, parse_events([start]))
    assert started.reservations == []
    assert started.server("a").loading_queue == []
    other = {**start, "model": "qwen3-14b"}
    with pytest.raises(ClusterError, match=r"reserved for 'llama-3\.1-8b'"):
        apply_events(held, parse_events([other]))


def test_replay_is_deterministic_and_beats_any_free_gpu(catalog: Catalog) -> None:
    config = ReplayConfig(seed=3, servers=6, checkpoints=24, rate_per_s=1.0, duration_s=300.0)
    first = run_replay(config, catalog=catalog)
    second = run_replay(config, catalog=catalog)
    assert first.results == second.results
    assert first.result(Policy.OURS).mean_s <= first.result(Policy.ANY_FREE).mean_s
    assert len(first.result(Policy.OURS).startup_s) == len(first.result(Policy.ANY_FREE).startup_s) > 0
    assert "| ours |" in first.markdown()
