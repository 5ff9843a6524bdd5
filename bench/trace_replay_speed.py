"""Issue 12 figures: replay speed of a 1,000-request trace, and prefix caching on a small shared-prefix workload.

Run: .venv/bin/python bench/trace_replay_speed.py
"""

from __future__ import annotations

import random
import time

from service.catalog.loader import default_catalog
from service.planning.deployment import build_instance
from service.planning.estimate import EstimateRequest, resolve_deployment, run_estimate
from service.planning.schedulers import Role
from service.planning.trace import trace_from_records

REPEATS = 5


def synthetic_trace(requests: int, rate_per_s: float, seed: int) -> list[dict[str, object]]:
    """Poisson arrivals with ShareGPT-like lengths; a third of the requests share one of 8 system prompts."""
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    t = 0.0
    for _ in range(requests):
        t += rng.expovariate(rate_per_s)
        row: dict[str, object] = {
            "arrival_s": round(t, 4),
            "input_tokens": rng.randint(64, 2048),
            "output_tokens": rng.randint(16, 512),
        }
        if rng.random() < 1 / 3:
            row["prefix_id"] = f"sys{rng.randrange(8)}"
            row["prefix_tokens"] = 512
            row["input_tokens"] = int(row["input_tokens"]) + 512  # type: ignore[call-overload]
        rows.append(row)
    return rows


def replay_speed() -> None:
    catalog = default_catalog()
    rows = synthetic_trace(1000, 8.0, seed=1)
    trace = trace_from_records(rows, source="synthetic")
    request = EstimateRequest(model="llama-3.1-8b", gpu="h100-sxm", trace=trace)
    run_estimate(request, catalog=catalog)  # warm the catalog's caches
    times = []
    for _ in range(REPEATS):
        start = time.process_time()
        est = run_estimate(request, catalog=catalog)
        times.append(time.process_time() - start)
    r = est.result
    print(f"replay of {trace.size} traced requests (llama-3.1-8b, 1 x H100 SXM, vLLM, 8 req/s, prefix caching on)")
    print(f"  CPU time per replay: best {min(times):.3f} s, median {sorted(times)[REPEATS // 2]:.3f} s (one core)")
    print(
        f"  completed {r.completed}, TTFT p50 {r.ttft.p50:.1f} ms p99 {r.ttft.p99:.1f} ms, "
        f"prefix hit tokens {r.prefix_hit_tokens}"
    )


def prefix_caching_ttft() -> None:
    """A 2048-token prompt whose first 1536 tokens are a shared system prompt, at 4 req/s (no queueing)."""
    catalog = default_catalog()
    base: dict[str, object] = {
        "model": "llama-3.1-8b",
        "gpu": "h100-sxm",
        "isl": 2048,
        "osl": 32,
        "rate": 4.0,
        "arrival": "constant",
        "requests": 200,
    }
    print("prefix caching: llama-3.1-8b, 1 x H100 SXM, vLLM, isl 2048 (1536 shared), osl 32, 4 req/s constant")
    print(f"  {'case':38s} {'TTFT p50 ms':>12s} {'TTFT mean ms':>13s} {'hit tokens':>11s}")
    cases: tuple[tuple[str, dict[str, object]], ...] = (
        ("no shared prefix", {}),
        ("shared prefix, caching off", {"shared_prefix_tokens": 1536, "prefix_caching": False}),
        ("shared prefix, caching on", {"shared_prefix_tokens": 1536}),
        ("shared prefix on half, caching on", {"shared_prefix_tokens": 1536, "prefix_hit_rate": 0.5}),
    )
    for label, extra in cases:
        est = run_estimate(EstimateRequest(**{**base, **extra}), catalog=catalog)  # type: ignore[arg-type]
        r = est.result
        print(f"  {label:38s} {r.ttft.p50:12.2f} {r.ttft.mean:13.2f} {r.prefix_hit_tokens:11d}")
    # Hand check: a warm request prefills 512 tokens over 1536 cached ones; a cold one 2048 from scratch.
    deployment = resolve_deployment(EstimateRequest(**base), catalog)  # type: ignore[arg-type]
    cost = build_instance(deployment, deployment.layout, Role.COLLOCATED, min_tokens=1).config.cost
    overhead_ms = deployment.engine.request_overhead_s * 1e3

    def prefill_ms(tokens: int, past: int) -> float:
        step = cost.step(
            prefill_tokens=tokens,
            prefill_key_pairs=tokens * (past + (tokens + 1) / 2.0),
            prefill_kv_tokens=past + tokens,
            prefill_sequences=1,
            prefill_chunks=1,
        )
        return step.total_s * 1e3

    cold, warm = prefill_ms(2048, 0), prefill_ms(512, 1536)
    print(
        f"  hand check: API server {overhead_ms:.2f} ms + prefill step: cold 2048 tokens {cold:.2f} ms "
        f"-> TTFT {overhead_ms + cold:.2f} ms; warm 512 tokens after 1536 cached {warm:.2f} ms "
        f"-> TTFT {overhead_ms + warm:.2f} ms"
    )


if __name__ == "__main__":
    replay_speed()
    prefix_caching_ttft()
