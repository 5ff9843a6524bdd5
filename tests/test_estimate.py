"""Estimate requests: each malformed one is refused before simulating, with one line naming what is wrong."""

from __future__ import annotations

from typing import Any

import pytest

from service.planning.catalog import Catalog
from service.planning.deployment import Mode
from service.planning.estimate import (
    MAX_REQUESTS,
    EstimateRequest,
    resolve_deployment,
    resolve_workload,
    run_estimate,
    trace_workload,
)
from service.planning.specs import PlanningError
from service.planning.trace import trace_from_records
from service.planning.workload import MAX_SEED, MIN_RATE_PER_S, ArrivalKind

BASE: dict[str, Any] = {"model": "llama-3.1-8b", "gpu": "h100-sxm", "isl": 128, "osl": 16}
RECORDS = [{"arrival_s": 0.5 * i, "input_tokens": 100 + i, "output_tokens": 10} for i in range(4)]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rate": 2.0, "concurrency": 4}, "give either a concurrency (closed loop) or a rate, not both"),
        ({}, "give a concurrency (closed loop) or a request rate"),
        ({"isl": None, "rate": 1.0}, "give the input and output lengths (isl and osl), or a trace"),
        ({"rate": 1.0, "time_scale": 2.0}, "a time scale applies to a trace only"),
        ({"rate": 1.0, "arrival": "bursty"}, "unknown arrival 'bursty'; use one of poisson, gamma, constant, closed"),
        ({"rate": 1.0, "seed": -1}, f"seed must be between 0 and {MAX_SEED} (got -1)"),
        ({"rate": 1.0, "seed": MAX_SEED + 1}, f"seed must be between 0 and {MAX_SEED} (got {MAX_SEED + 1})"),
        ({"rate": -2.0}, "rate must be positive (got -2)"),
        ({"rate": MIN_RATE_PER_S / 2}, f"rate must be at least {MIN_RATE_PER_S:g} requests per second (got 5e-07)"),
        ({"concurrency": 0}, "concurrency must be at least 1 (got 0)"),
        ({"concurrency": -3}, "concurrency must be at least 1 (got -3)"),
        ({"concurrency": 2, "requests_per_client": 0}, "requests per client must be at least 1 (got 0)"),
        ({"rate": 1.0, "requests": MAX_REQUESTS + 1}, f"requests must be between 1 and {MAX_REQUESTS} (got 20001)"),
        ({"rate": 1.0, "arrival": "gamma", "cv": 0.0}, "gamma arrivals need a positive cv"),
        ({"rate": 1.0, "shared_prefix_tokens": -1}, "shared prefix tokens must be at least 0"),
        ({"rate": 1.0, "prefix_hit_rate": 1.5}, "prefix hit rate must be between 0 and 1 (got 1.5)"),
        ({"rate": 1.0, "client_start": "sometimes"}, "unknown client start 'sometimes'"),
    ],
)
def test_a_malformed_sampled_workload_is_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(PlanningError) as refused:
        resolve_workload(EstimateRequest(**{**BASE, **fields}))
    assert str(refused.value).startswith(message)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"concurrency": 2}, "a trace is replayed open loop: give a rate or a time scale, not a concurrency"),
        ({"requests": 10}, "a trace sets the requests: leave the request count out"),
        ({"isl": 128}, "a trace sets the request lengths: leave isl and osl out"),
        ({"rate": 1.0, "time_scale": 2.0}, "give a trace either a rate or a time scale, not both"),
        ({"arrival": "gamma"}, "a trace brings its own arrival times: leave the arrival law out"),
        ({"time_scale": 0.0}, "time scale must be positive (got 0)"),
        ({"time_scale": float("inf")}, "time scale must be positive (got inf)"),
        ({"rate": 0.0}, "rate must be positive (got 0)"),
    ],
)
def test_a_malformed_trace_replay_is_refused(fields: dict[str, Any], message: str) -> None:
    request = EstimateRequest(**{**BASE, "isl": None, "osl": None, "trace": RECORDS, **fields})
    with pytest.raises(PlanningError) as refused:
        resolve_workload(request)
    assert str(refused.value) == message


def test_a_trace_replays_at_its_own_rate_or_scaled() -> None:
    trace = trace_from_records(RECORDS)
    recorded = trace_workload(trace, rate=None, time_scale=None)
    # 4 arrivals 0.5 s apart.
    assert recorded.arrival is ArrivalKind.POISSON
    assert recorded.num_requests == 4
    assert recorded.rate_per_s == pytest.approx(trace.rate_per_s)
    assert trace_workload(trace, rate=None, time_scale=0.5).rate_per_s == pytest.approx(2 * trace.rate_per_s)
    assert trace_workload(trace, rate=8.0, time_scale=None).rate_per_s == 8.0
    assert trace_workload(trace, rate=None, time_scale=None, arrival="poisson").num_requests == 4


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"memory_fraction": 0.05}, "memory fraction must be between 0.1 and 1.0"),
        ({"memory_fraction": 1.5}, "memory fraction must be between 0.1 and 1.0"),
        ({"max_batched_tokens": 0}, "max batched tokens must be at least 1"),
        ({"max_sequences": 0}, "max sequences must be at least 1"),
        ({"replicas": 0}, "replicas must be at least 1"),
        ({"max_model_len": 1}, "max model length must be at least 2 tokens (got 1)"),
        ({"kv_block_tokens": 0}, "KV block size must be between 1 and 1024 tokens (got 0)"),
        ({"kv_block_tokens": 2048}, "KV block size must be between 1 and 1024 tokens (got 2048)"),
        ({"router": "fastest"}, "unknown router 'fastest'; use one of round_robin, random, least_loaded"),
        (
            {"moe_routing": "zipf"},
            "unknown MoE routing 'zipf'; use one of random, balanced, power_law_1.01, power_law_1.2",
        ),
        ({"moe_backend": "cutlass"}, "unknown MoE backend 'cutlass'; use one of auto, marlin"),
        ({"mode": Mode.DISAGGREGATED, "prefill_workers": 0}, "disaggregated serving needs at least one prefill"),
        ({"mode": Mode.DISAGGREGATED, "decode_workers": 0}, "disaggregated serving needs at least one prefill"),
    ],
)
def test_a_malformed_deployment_is_refused(catalog: Catalog, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(PlanningError) as refused:
        resolve_deployment(EstimateRequest(**{**BASE, "rate": 1.0, **fields}), catalog)
    assert str(refused.value).startswith(message)


def test_a_given_gpu_price_replaces_the_catalogs(catalog: Catalog) -> None:
    priced = resolve_deployment(EstimateRequest(**BASE, rate=1.0, gpu_price_per_hour=1.25), catalog)
    assert priced.gpu.price_per_hour_usd == 1.25
    assert resolve_deployment(EstimateRequest(**BASE, rate=1.0), catalog).gpu == catalog.gpu("h100-sxm")


def test_weights_a_gpu_cannot_run_are_refused(catalog: Catalog) -> None:
    # The MI300X has no FP4 tensor cores and its kernels do not dequantise FP4.
    request = EstimateRequest(**{**BASE, "gpu": "mi300x"}, rate=1.0, weight_dtype="fp4")
    with pytest.raises(PlanningError) as refused:
        resolve_deployment(request, catalog)
    assert str(refused.value).startswith("mi300x cannot serve fp4 weights: its tensor cores run ")


def test_a_work_budget_no_request_can_finish_in_is_refused(catalog: Catalog) -> None:
    # 64 prompts of 128 tokens fit one 8192-token step (the budget check passes), but every request needs 16
    # decode steps: 10 sequence-steps run out before the first one finishes.
    request = EstimateRequest(**BASE, rate=50.0, requests=64, max_sequence_steps=10)
    with pytest.raises(PlanningError) as refused:
        run_estimate(request, catalog=catalog)
    assert str(refused.value).startswith("the work budget of 10 sequence-steps ran out before any request finished")
