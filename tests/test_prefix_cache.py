"""Prefix caching: hits skip the cached prefill, blocks are shared and bounded by the KV pool, LRU eviction."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.planning.catalog import Catalog
from service.planning.deployment import build_instance, simulate_deployment
from service.planning.estimate import EstimateRequest, resolve_deployment, resolve_workload, run_estimate
from service.planning.prefix_cache import PrefixCache
from service.planning.schedulers import InstanceConfig, Role, SimInstance, SimRequest
from service.planning.simulator import _Simulation
from service.planning.workload import ArrivalKind, PrefixPlan, RequestSample

SIMS = settings(max_examples=12, deadline=None, derandomize=True)


def _request(**kw: object) -> EstimateRequest:
    base: dict[str, object] = {"model": "llama-3.1-8b", "gpu": "h100-sxm"}
    base.update(kw)
    return EstimateRequest(**base)  # type: ignore[arg-type]


def _config(catalog: Catalog, **kw: object) -> InstanceConfig:
    deployment = resolve_deployment(_request(isl=1, osl=1, rate=1.0, **kw), catalog)
    return build_instance(deployment, deployment.layout, Role.COLLOCATED, min_tokens=1).config


def test_a_second_request_sharing_a_1024_token_prefix_prefills_only_the_rest(catalog: Catalog) -> None:
    # Two 1536-token prompts that start with the same 1024 tokens, 10 s apart (the first is long done).
    rows = [
        {"arrival_s": 0, "input_tokens": 1536, "output_tokens": 2, "prefix_id": "sys", "prefix_tokens": 1024},
        {"arrival_s": 10, "input_tokens": 1536, "output_tokens": 2, "prefix_id": "sys", "prefix_tokens": 1024},
    ]
    on = run_estimate(_request(trace=rows), catalog=catalog)
    off = run_estimate(_request(trace=rows, prefix_caching=False), catalog=catalog)
    cost = _config(catalog).cost
    overhead = catalog.engine("vllm").request_overhead_s

    def prefill_s(tokens: int, past: int) -> float:
        return cost.step(
            prefill_tokens=tokens,
            prefill_key_pairs=tokens * (past + (tokens + 1) / 2.0),
            prefill_kv_tokens=past + tokens,
            prefill_sequences=1,
            prefill_chunks=1,
        ).total_s

    cold, warm = prefill_s(1536, 0) + overhead, prefill_s(512, 1024) + overhead
    assert on.result.ttft_s.tolist() == pytest.approx([cold, warm], rel=1e-9)
    assert off.result.ttft_s.tolist() == pytest.approx([cold, cold], rel=1e-9)
    assert on.result.prefix_hit_tokens == 1024
    assert prefill_s(512, 1024) < 0.5 * prefill_s(1536, 0)
    assert on.as_dict()["prefix_cache"]["hit_rate"] == pytest.approx(1024 / 3072)


def test_a_warm_cache_serves_the_first_request_of_a_group_too(catalog: Catalog) -> None:
    # The two requests of the test above, on a server that has served this prefix before.
    rows = [
        {"arrival_s": 0, "input_tokens": 1536, "output_tokens": 2, "prefix_id": "sys", "prefix_tokens": 1024},
        {"arrival_s": 10, "input_tokens": 1536, "output_tokens": 2, "prefix_id": "sys", "prefix_tokens": 1024},
    ]
    warm = run_estimate(_request(trace=rows, prefix_cache_warm=True), catalog=catalog)
    cold = run_estimate(_request(trace=rows), catalog=catalog)
    assert warm.result.prefix_hit_tokens == 2048
    assert warm.result.ttft_s.tolist() == pytest.approx([cold.result.ttft_s[1]] * 2, rel=1e-9)
    # Without caching there is nothing to be warm.
    off = run_estimate(_request(trace=rows, prefix_caching=False, prefix_cache_warm=True), catalog=catalog)
    assert off.result.prefix_hit_tokens == 0
    # Sampled requests with a shared system prompt: only the first request changes.
    base = {"isl": 2048, "osl": 8, "rate": 0.1, "requests": 4, "arrival": "constant", "shared_prefix_tokens": 1536}
    sampled = [run_estimate(_request(prefix_cache_warm=w, **base), catalog=catalog).result.ttft_s for w in (0, 1)]
    assert sampled[1][0] < 0.5 * sampled[0][0]
    assert sampled[1][1:].tolist() == pytest.approx(sampled[0][1:].tolist(), rel=1e-9)


def test_a_warm_start_caches_each_group_prefix_in_first_use_order_up_to_the_pool() -> None:
    plan = PrefixPlan(
        np.array([2, -1, 0, 2, 1], dtype=np.int64),
        np.array([40, 0, 20, 40, 70], dtype=np.int64),
        np.array([40, 0, 20, 40, 70], dtype=np.int64),
        warm=True,
    )
    assert plan.warm_prefix_tokens() == [(2, 40), (0, 20), (1, 70)]
    assert plan.take(np.array([0, 4])).warm
    # A group's longest shared prefix, whichever request has it.
    longer = PrefixPlan(plan.group, np.array([40, 0, 20, 60, 70]), plan.cacheable_tokens, warm=True)
    assert longer.warm_prefix_tokens() == [(2, 60), (0, 20), (1, 70)]
    cache = PrefixCache(capacity_blocks=5, block_tokens=16)
    # Full blocks only: 2 of group 2, 1 of group 0, then group 1's leading 2 of its 4 while the pool has room; each
    # group tail first, so evicting never strands a group's later blocks without its first.
    assert cache.warm(plan.warm_prefix_tokens()) == 5
    key = PrefixCache.key
    assert list(cache.idle) == [key(2, 1), key(2, 0), key(0, 0), key(1, 1), key(1, 0)]
    assert cache.evict(1) == 1
    assert cache.acquire(2, 3) == [key(2, 0)]
    assert cache.acquire(1, 4) == [key(1, 0), key(1, 1)]


def test_a_full_hit_still_recomputes_the_last_token_block(catalog: Catalog) -> None:
    rows = [{"arrival_s": 10.0 * i, "input_tokens": 1024, "output_tokens": 2, "prefix_id": "p"} for i in range(2)]
    est = run_estimate(_request(trace=rows), catalog=catalog)
    # The whole 1024-token prompt is shared; the engine reuses 1008 tokens (63 blocks) and recomputes the rest.
    assert est.result.prefix_hit_tokens == 1008


def test_workloads_without_shared_prefixes_are_unchanged_by_prefix_caching(catalog: Catalog) -> None:
    on = run_estimate(_request(isl="uniform:100:2000", osl=64, rate=20.0, requests=200), catalog=catalog)
    off = run_estimate(
        _request(isl="uniform:100:2000", osl=64, rate=20.0, requests=200, prefix_caching=False), catalog=catalog
    )
    assert on.result.ttft_s.tolist() == off.result.ttft_s.tolist()
    assert on.result.tpot_s.tolist() == off.result.tpot_s.tolist()
    assert on.result.prefix_hit_tokens == 0


def test_a_shared_system_prompt_lowers_ttft(catalog: Catalog) -> None:
    base = {"isl": 2048, "osl": 32, "rate": 4.0, "requests": 200, "arrival": "constant"}
    shared = run_estimate(_request(shared_prefix_tokens=1536, **base), catalog=catalog)
    none = run_estimate(_request(**base), catalog=catalog)
    assert shared.result.ttft.p50 < 0.5 * none.result.ttft.p50
    half = run_estimate(_request(shared_prefix_tokens=1536, prefix_hit_rate=0.5, **base), catalog=catalog)
    assert shared.result.ttft.mean < half.result.ttft.mean < none.result.ttft.mean


def test_lru_evicts_the_least_recently_freed_block() -> None:
    cache = PrefixCache(capacity_blocks=4, block_tokens=16)
    for key in (1, 2, 3):
        assert cache.add_idle(key)
    assert cache.acquire(0, 0) == []
    cache.refs[7] = 1
    assert cache.release([7]) == 1
    assert list(cache.idle) == [1, 2, 3, 7]
    assert cache.evict(2) == 2
    assert list(cache.idle) == [3, 7]
    assert not cache.add_idle(7)


def _simulation_sample(
    groups: list[int], inputs: list[int], prefix: int, gap_s: float, warm: bool = False
) -> RequestSample:
    n = len(inputs)
    tokens = np.minimum(np.asarray(inputs, dtype=np.int64), prefix)
    group = np.asarray(groups, dtype=np.int64)
    return RequestSample(
        np.asarray(inputs, dtype=np.int64),
        np.full(n, 40, dtype=np.int64),
        np.arange(n, dtype=np.float64) * gap_s,
        PrefixPlan(group, np.where(group >= 0, tokens, 0), np.where(group >= 0, tokens, 0), warm),
    )


@SIMS
@given(
    groups=st.lists(st.integers(-1, 6), min_size=8, max_size=40),
    prefix=st.integers(16, 3000),
    capacity_blocks=st.integers(200, 600),
    gap_s=st.sampled_from([0.0, 0.01, 0.2]),
    warm=st.booleans(),
)
def test_the_cache_never_holds_more_than_the_kv_pool(
    catalog: Catalog, groups: list[int], prefix: int, capacity_blocks: int, gap_s: float, warm: bool
) -> None:
    config = replace(_config(catalog), kv_capacity_tokens=capacity_blocks * 16)
    inputs = [min(3000, 200 + 97 * i % 2800) for i in range(len(groups))]
    sim = _Simulation(
        [config], [], None, _simulation_sample(groups, inputs, prefix, gap_s, warm), ArrivalKind.POISSON, 1.0, 0
    )
    if warm and any(g >= 0 for g in groups):
        cache = sim.entry[0].prefix_cache
        assert cache is not None
        assert 0 < cache.cached_blocks <= cache.capacity_blocks
    checks = 0
    grow, release = SimInstance.grow_kv, SimInstance.release

    def check(inst: SimInstance) -> None:
        nonlocal checks
        cache = inst.prefix_cache
        assert cache is not None
        checks += 1
        assert cache.cached_blocks <= cache.capacity_blocks
        assert inst.kv_used >= 0
        assert inst.kv_used + cache.idle_tokens <= inst.config.kv_capacity_tokens
        # Blocks some request holds are counted once in kv_used.
        assert len(cache.refs) * cache.block_tokens <= inst.kv_used

    def checked_grow(inst: SimInstance, req: SimRequest, tokens: int) -> bool:
        ok = grow(inst, req, tokens)
        check(inst)
        return ok

    def checked_release(inst: SimInstance, req: SimRequest) -> None:
        release(inst, req)
        check(inst)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SimInstance, "grow_kv", checked_grow)
        patch.setattr(SimInstance, "release", checked_release)
        result = sim.run()
    assert result.completed == len(groups)
    assert checks > 0
    inst = sim.entry[0]
    assert inst.kv_used == 0  # every hold was dropped


@SIMS
@given(
    inputs=st.lists(st.integers(64, 4000), min_size=2, max_size=12),
    prefix=st.integers(0, 4000),
    more=st.integers(0, 2000),
)
def test_more_shared_prefix_never_raises_ttft(catalog: Catalog, inputs: list[int], prefix: int, more: int) -> None:
    # Requests far apart (no queueing): a longer cached prefix can only shorten each prefill.
    def ttft(shared: int) -> list[float]:
        request = _request(isl=1, osl=8, rate=0.05, requests=len(inputs), arrival="constant")
        workload = replace(resolve_workload(request), shared_prefix_tokens=shared)
        deployment = resolve_deployment(request, catalog)
        base = RequestSample(
            np.asarray(inputs, dtype=np.int64),
            np.full(len(inputs), 8, dtype=np.int64),
            np.arange(len(inputs), dtype=np.float64),
            None,
        )
        tokens = np.minimum(base.input_tokens, shared)
        sample = replace(base, prefixes=PrefixPlan(np.zeros(len(inputs), dtype=np.int64), tokens, tokens.copy()))
        return [float(t) for t in simulate_deployment(deployment, workload, sample=sample).result.ttft_s]

    fewer, most = ttft(prefix), ttft(prefix + more)
    for a, b in zip(fewer, most, strict=True):
        assert b <= a * (1 + 1e-12)
