"""Issue 15: prewarming copies into free room only, and replayed copies that yield the loader to cold starts."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.placement.cluster import TierKind
from service.placement.estimators import checkpoint_bytes
from service.placement.optimizer import PlacementRequest, place
from service.placement.prewarm import ModelDemand, PrewarmRequest, advise_prewarm
from service.placement.replay import Policy, ReplayConfig, _Copy, _Simulation, make_trace
from service.planning.catalog import Catalog
from service.planning.specs import DType
from tests.test_placement import BIG, GB, SMALL, cluster, server


def small_dram_server() -> dict[str, object]:
    """One server whose 150 GB of DRAM holds the 8B checkpoint; the 70B one (141 GB) is on its SSD."""
    s = server("a", dram=(SMALL,), ssd=(BIG,))
    s["tiers"][0]["capacity_bytes"] = 150 * GB
    return s


def test_prewarm_evicts_for_a_copy_only_when_allowed(catalog: Catalog) -> None:
    demand = [ModelDemand(model=BIG, tp=4, rate_per_s=0.01), ModelDemand(model=SMALL, rate_per_s=0.0)]
    c = cluster(small_dram_server())
    evicting = advise_prewarm(c, PrewarmRequest(models=demand), catalog=catalog, now_s=0.0)
    size = checkpoint_bytes(catalog.model(BIG), weight_dtype=DType.BF16)
    assert [(x.server, x.checkpoint, x.to_tier, x.from_tier) for x in evicting.copies] == [
        ("a", BIG, TierKind.DRAM, TierKind.SSD)
    ]
    assert evicting.copies[0].copy_s == pytest.approx(size / (6 * GB))
    # The 8B checkpoint nobody asks for makes room; its loss is nil.
    assert [(e.server, e.tier, e.checkpoint, e.startup_s_lost_per_hour) for e in evicting.evictions] == [
        ("a", TierKind.DRAM, SMALL, 0.0)
    ]
    kept = advise_prewarm(c, PrewarmRequest(models=demand, evict=False), catalog=catalog, now_s=0.0)
    assert kept.copies == []
    assert kept.evictions == []


def test_replayed_copy_pauses_for_a_cold_start_and_keeps_its_progress(catalog: Catalog) -> None:
    config = ReplayConfig(seed=0, servers=2, checkpoints=12, duration_s=10.0, rate_per_s=0.1, initial_ssd_fill=0.1)
    sim = _Simulation(config, make_trace(config, catalog=catalog), Policy.OURS_PREWARM, catalog)
    trace = sim.trace
    # A checkpoint that server 0 has on neither tier: the copy downloads it at the server's own link rate.
    target = next(i for i in range(len(trace.checkpoints)) if i not in sim.ssd[0] and i not in sim.dram[0])
    size = trace.checkpoints[target].size_bytes
    link = trace.servers[0].true_network_bytes_per_s
    sim.copies[0].append(_Copy(0, target, to_ssd=True))
    sim.kick(0, 0.0)
    copy = sim.copying[0]
    assert copy is not None
    assert copy.left_s == pytest.approx(size / link)
    # A cold start at t = 1 s takes the loader at once; the copy keeps the second it ran and waits.
    sim.now_s = 1.0
    other = next(iter(sim.ssd[0]))
    load = sim.start_load(0, other, 1.0)
    assert load.start_s == 1.0
    assert sim.copying[0] is None
    assert sim.copies[0][0].left_s == pytest.approx(size / link - 1.0)
    # When the load is done the copy resumes and finishes its remaining time, and only then is it cached.
    sim.load_done(load)
    sim.kick(0, load.end_s)
    resumed = sim.copying[0]
    assert resumed is copy
    sim.copy_done(copy, copy.epoch, load.end_s + copy.left_s)
    assert target in sim.ssd[0]
    assert target not in sim.dram[0]
    assert sim.copied_bytes == pytest.approx(size)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ssd_gb_per_s=st.floats(0.2, 20.0),
    network_gb_per_s=st.floats(0.1, 10.0),
    pcie_gb_per_s=st.floats(5.0, 64.0),
    model=st.sampled_from([(SMALL, 1), (BIG, 4)]),
)
def test_a_faster_tier_never_yields_a_slower_estimate(
    catalog: Catalog, ssd_gb_per_s: float, network_gb_per_s: float, pcie_gb_per_s: float, model: tuple[str, int]
) -> None:
    name, tp = model

    def startup_s(*, dram: tuple[str, ...], ssd: tuple[str, ...], ssd_scale: float = 1.0) -> float:
        s = server("a", dram=dram, ssd=ssd, network_bytes_per_s=network_gb_per_s * GB)
        s["tiers"][1]["read_bandwidth_bytes_per_s"] = ssd_gb_per_s * ssd_scale * GB
        s["pcie_bandwidth_bytes_per_s"] = pcie_gb_per_s * GB
        decision = place(cluster(s), PlacementRequest(model=name, tp=tp), now_s=0.0, catalog=catalog)
        return decision.placements[0].startup_latency_s

    from_dram = startup_s(dram=(name,), ssd=(name,))
    from_ssd = startup_s(dram=(), ssd=(name,))
    from_remote = startup_s(dram=(), ssd=())
    assert from_dram <= from_ssd <= from_remote
    assert startup_s(dram=(), ssd=(name,), ssd_scale=2.0) <= from_ssd
