"""Laws the planning core must obey whatever the numbers (hypothesis property tests).

- more tokens never cost less: a step's time does not fall when decode sequences, context or prefill grow;
- a layout that fits keeps fitting with more GPU memory, and never gets fewer KV tokens;
- the decode fast-forward equals running the same decode steps one by one;
- an estimate is a function of its seed;
- more replicas never lower throughput at a fixed open-loop rate;
- attention-DP ranks folded into one simulated rank give what simulating every rank gives.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.planning import deployment as deployment_module
from service.planning import simulator as simulator_module
from service.planning.catalog import Catalog
from service.planning.deployment import Deployment, KnobOverrides, simulate_deployment
from service.planning.estimate import EstimateRequest, run_estimate
from service.planning.kernels import (
    KernelCalibration,
    attention_prefill_time_s,
    gemm_time_s,
    prefill_chunk_tiles,
    prefill_tile_shape,
)
from service.planning.memory import GIB, MemoryPlan, plan_memory, require_fit
from service.planning.moe_cost import MoeCalibration, moe_layer_time_s
from service.planning.schedulers import InstanceConfig, Role, SchedulerKnobs, SimInstance, SimRequest
from service.planning.simulator import SimulationResult, simulate
from service.planning.specs import DType, MLASpec, ModelSpec, MoESpec, SpeculativeDecoding
from service.planning.stepcost import ParallelLayout, ReplicaStepCost, make_layout
from service.planning.workload import ArrivalKind, LengthDistribution, RequestSample, Workload, sample_requests
from tests.specs_for_tests import engine_spec, gpu_spec, step_cost, tiny_dense

# Derandomized: the same examples every run, so a failure here is a finding and not a flake.
_FIXTURES_OK = [HealthCheck.function_scoped_fixture]
LAWS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=_FIXTURES_OK)
SIMS = settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=_FIXTURES_OK)

DENSE = tiny_dense(
    name="law-dense",
    num_layers=8,
    hidden_size=1024,
    num_attention_heads=16,
    num_kv_heads=4,
    head_dim=64,
    intermediate_size=4096,
    vocab_size=32_000,
)
MOE = replace(
    DENSE,
    name="law-moe",
    moe=MoESpec(
        num_experts=32,
        experts_per_token=4,
        expert_intermediate_size=512,
        num_shared_experts=1,
        num_dense_layers=1,
    ),
)
MLA_MOE = replace(
    MOE,
    name="law-mla-moe",
    mla=MLASpec(q_lora_rank=384, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64),
)

GPU = gpu_spec(
    name="law-gpu",
    memory_bytes=80 * GIB,
    hbm_bandwidth_bytes_per_s=3.0e12,
    intra_node_bandwidth_bytes_per_s=4.0e11,
    inter_node_bandwidth_bytes_per_s=5.0e10,
    price_per_hour_usd=2.0,
    num_sms=132,
)

ENGINE = engine_spec(
    name="law-engine",
    step_overhead_s=2.0e-4,
    per_sequence_overhead_s=2.0e-6,
    kernel_launch_s=4.0e-6,
    max_num_batched_tokens=1024,
    max_num_seqs=128,
)

# (model, layout) pairs the step-cost laws run over: dense TP and PP, MoE with TP only, attention DP with
# expert parallelism (whole and sliced experts), attention DP with MoE-TP (all-gather path), and MLA.
LAYOUTS: list[tuple[ModelSpec, ParallelLayout]] = [
    (DENSE, make_layout()),
    (DENSE, make_layout(tp=4)),
    (DENSE, make_layout(tp=2, pp=2)),
    (MOE, make_layout(tp=2)),
    (MOE, make_layout(tp=1, attention_dp=4, moe_ep=4)),
    (MOE, make_layout(tp=2, attention_dp=4, moe_ep=4)),
    (MOE, make_layout(tp=2, attention_dp=2)),
    (MLA_MOE, make_layout(tp=1, attention_dp=8, moe_ep=8)),
]
LAYOUT_IDS = [f"{model.name}-{layout.label()}" for model, layout in LAYOUTS]
MAX_TOKENS = 1025


def _cost(model: ModelSpec, layout: ParallelLayout, weight_dtype: DType = DType.BF16) -> ReplicaStepCost:
    return step_cost(
        model,
        layout,
        gpu=GPU,
        engine=ENGINE,
        max_tokens=MAX_TOKENS,
        calibration=KernelCalibration(),
        moe_calibration=MoeCalibration(),
        weight_dtype=weight_dtype,
    )


COSTS = {i: _cost(model, layout) for i, (model, layout) in enumerate(LAYOUTS)}


def _prefill(cost: ReplicaStepCost, tokens: int, past: int, decode: int, decode_ctx: float) -> float:
    """One prompt chunk of ``tokens`` after ``past`` cached tokens, beside ``decode`` decoding sequences."""
    return cost.step(
        prefill_tokens=tokens,
        prefill_key_pairs=tokens * (past + (tokens + 1) / 2.0),
        prefill_kv_tokens=float(past + tokens),
        prefill_sequences=1 if tokens > 0 else 0,
        decode_sequences=decode,
        decode_context_tokens=decode_ctx,
    ).total_s


# More tokens never cost less -----------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(LAYOUTS)), ids=LAYOUT_IDS)
@LAWS
@given(
    seqs=st.integers(1, 1500),
    more=st.integers(1, 600),
    ctx_per_seq=st.integers(1, 8000),
)
def test_more_decode_sequences_never_cost_less(index: int, seqs: int, more: int, ctx_per_seq: int) -> None:
    cost = COSTS[index]
    fewer = cost.step(decode_sequences=seqs, decode_context_tokens=float(seqs * ctx_per_seq)).total_s
    larger = cost.step(decode_sequences=seqs + more, decode_context_tokens=float(seqs * ctx_per_seq)).total_s
    assert larger >= fewer


@pytest.mark.parametrize("index", range(len(LAYOUTS)), ids=LAYOUT_IDS)
def test_more_decode_sequences_never_cost_less_exhaustive_small(index: int) -> None:
    # Every batch size up to past the table edge, at 500 tokens of context per sequence.
    cost = COSTS[index]
    times = [cost.step(decode_sequences=n, decode_context_tokens=500.0 * n).total_s for n in range(1, 1100)]
    drops = [(n + 1, n + 2) for n, (a, b) in enumerate(itertools.pairwise(times)) if b < a]
    assert drops == [], f"step time falls from n to n+1 sequences at {drops[:5]}"


@pytest.mark.parametrize("index", range(len(LAYOUTS)), ids=LAYOUT_IDS)
@LAWS
@given(seqs=st.integers(1, 1500), ctx=st.floats(1.0, 5.0e6), extra=st.floats(0.0, 5.0e6))
def test_more_context_never_costs_less(index: int, seqs: int, ctx: float, extra: float) -> None:
    cost = COSTS[index]
    shorter = cost.step(decode_sequences=seqs, decode_context_tokens=ctx).total_s
    longer = cost.step(decode_sequences=seqs, decode_context_tokens=ctx + extra).total_s
    assert longer >= shorter


@pytest.mark.parametrize("index", range(len(LAYOUTS)), ids=LAYOUT_IDS)
@LAWS
@given(
    tokens=st.integers(0, 3000),
    more=st.integers(1, 1000),
    past=st.integers(0, 4000),
    decode=st.integers(0, 64),
)
def test_more_prefill_tokens_never_cost_less(index: int, tokens: int, more: int, past: int, decode: int) -> None:
    cost = COSTS[index]
    ctx = 700.0 * decode
    if tokens == 0 and decode == 0:
        assert _prefill(cost, more, past, decode, ctx) > 0
        return
    assert _prefill(cost, tokens + more, past, decode, ctx) >= _prefill(cost, tokens, past, decode, ctx)


@pytest.mark.parametrize("index", range(len(LAYOUTS)), ids=LAYOUT_IDS)
def test_more_prefill_tokens_never_cost_less_exhaustive_small(index: int) -> None:
    # A fresh prompt of every length up to past the table edge, beside 4 decoding sequences.
    cost = COSTS[index]
    times = [_prefill(cost, p, 0, 4, 2000.0) for p in range(1100)]
    drops = [(p, p + 1) for p, (a, b) in enumerate(itertools.pairwise(times)) if b < a]
    assert drops == [], f"step time falls from p to p+1 prefill tokens at {drops[:5]}"


# The kernels under the step: more rows, tokens or queries never run faster.


@pytest.mark.parametrize("weight_dtype", [DType.BF16, DType.FP8, DType.FP4, DType.INT4])
@pytest.mark.parametrize(("n", "k"), [(128, 1024), (1024, 1024), (4096, 1024), (1024, 4096), (32_000, 1024)])
def test_gemm_time_never_falls_with_more_rows(weight_dtype: DType, n: int, k: int) -> None:
    m = np.arange(1, 3000, dtype=np.float64)
    t = gemm_time_s(m, n, k, gpu=GPU, weight_dtype=weight_dtype, calibration=KernelCalibration())
    drops = np.flatnonzero(np.diff(t) < 0) + 1
    assert drops.size == 0, f"GEMM time falls from m to m+1 at m = {drops[:5].tolist()}"


@pytest.mark.parametrize(("local_experts", "topk"), [(32, 4), (8, 4), (4, 8), (1, 2)])
def test_moe_layer_time_never_falls_with_more_tokens(local_experts: int, topk: int) -> None:
    tokens = np.arange(0, 5000, dtype=np.float64)
    t = moe_layer_time_s(
        tokens,
        hidden_size=1024,
        expert_width_per_gpu=512,
        num_experts=32,
        local_experts=local_experts,
        topk=topk,
        weight_dtype=DType.BF16,
        gpu=GPU,
        calibration=MoeCalibration(),
    )
    drops = np.flatnonzero(np.diff(t) < 0) + 1
    assert drops.size == 0, f"MoE layer time falls at tokens = {drops[:5].tolist()}"


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(16, 4, 128), (4, 1, 64), (64, 8, 256), (8, 8, 128)])
def test_prefill_attention_never_falls_with_more_queries(heads: int, kv_heads: int, head_dim: int) -> None:
    cal = KernelCalibration()
    units, rows_per_token, tile_m, tile_n = prefill_tile_shape(heads, kv_heads, head_dim, cal)

    def time_s(p: int) -> float:
        tiles = prefill_chunk_tiles(0.0, float(p), rows_per_token=rows_per_token, tile_m=tile_m, tile_n=tile_n)
        return attention_prefill_time_s(
            query_tiles=tiles[0],
            key_tiles=tiles[1],
            longest_key_tiles=tiles[2],
            head_units=units,
            tile_m=tile_m,
            tile_n=tile_n,
            head_dim=float(head_dim),
            query_tokens=float(p),
            kv_tokens_read=float(p),
            heads_per_gpu=float(heads),
            kv_heads_per_gpu=float(kv_heads),
            kv_bytes_per_element=2.0,
            fp8_kv=False,
            gpu=GPU,
            calibration=cal,
        )

    times = [time_s(p) for p in range(1, 2000)]
    drops = [p + 1 for p, (a, b) in enumerate(itertools.pairwise(times)) if b < a]
    assert drops == [], f"prefill attention falls from p to p+1 query tokens at p = {drops[:5]}"


# More memory never fits less -----------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(LAYOUTS)), ids=LAYOUT_IDS)
@LAWS
@given(
    memory_gib=st.floats(1.0, 200.0),
    extra_gib=st.floats(0.0, 200.0),
    weight_dtype=st.sampled_from([DType.BF16, DType.FP8, DType.FP4]),
    kv_dtype=st.sampled_from([DType.BF16, DType.FP8]),
    batched=st.integers(1, 16384),
)
def test_more_gpu_memory_never_gives_fewer_kv_tokens(
    index: int, memory_gib: float, extra_gib: float, weight_dtype: DType, kv_dtype: DType, batched: int
) -> None:
    model, layout = LAYOUTS[index]

    def plan(gib: float) -> MemoryPlan:
        gpu = replace(GPU, memory_bytes=gib * GIB)
        return plan_memory(
            model=model,
            gpu=gpu,
            engine=ENGINE,
            layout=layout,
            weight_dtype=weight_dtype,
            kv_dtype=kv_dtype,
            max_batched_tokens=batched,
        )

    bigger = plan(memory_gib + extra_gib)
    small, large = plan(memory_gib).kv_capacity_tokens, bigger.kv_capacity_tokens
    assert large >= small >= 0
    if small > 0:
        # A layout that fits a request of ``small`` tokens keeps fitting it with the larger memory.
        require_fit(bigger, min_tokens=small, label="law")


# Fast-forward equals step by step ------------------------------------------------------------------------


def _knobs(scheduler: str, max_sequences: int = 64, *, overlap_scheduling: bool = False) -> SchedulerKnobs:
    return SchedulerKnobs(
        max_batched_tokens=1024,
        max_sequences=max_sequences,
        chunked_prefill=True,
        mixed_batches=scheduler != "sglang",
        scheduler=scheduler,
        kv_reserve_output_fraction=1.0 if scheduler == "trtllm" else 0.0,
        overlap_scheduling=overlap_scheduling,
    )


def _sample(inputs: list[int], outputs: list[int], unit_gap_s: float = 0.0) -> RequestSample:
    count = len(inputs)
    return RequestSample(
        np.asarray(inputs, dtype=np.int64),
        np.asarray(outputs, dtype=np.int64),
        np.arange(count, dtype=np.float64) * unit_gap_s,
    )


def _step_by_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Disable the closed-form decode fast-forward: every decode step is simulated on its own."""

    def one_step(
        self: object, inst: object, batch: list[tuple[SimRequest, int]], first_s: float, seqs: int, ctx: float
    ) -> tuple[float, int]:
        del self, inst, batch, seqs, ctx
        return first_s, 1

    monkeypatch.setattr(simulator_module._Simulation, "fast_forward", one_step)


def _assert_same_latencies(fast: SimulationResult, slow: SimulationResult) -> None:
    assert fast.completed == slow.completed == fast.offered
    assert fast.preemptions == slow.preemptions
    for a, b in ((fast.ttft_s, slow.ttft_s), (fast.tpot_s, slow.tpot_s), (fast.e2e_s, slow.e2e_s)):
        assert float(np.mean(a)) == pytest.approx(float(np.mean(b)), rel=1e-6, abs=1e-12)
    assert fast.duration_s == pytest.approx(slow.duration_s, rel=1e-6)


@SIMS
@given(
    layout_index=st.sampled_from([0, 1, 4, 7]),
    scheduler=st.sampled_from(["vllm", "sglang", "trtllm"]),
    concurrency=st.integers(1, 12),
    instances=st.integers(1, 2),
    inputs=st.lists(st.integers(1, 600), min_size=4, max_size=24),
    output_seed=st.integers(0, 1000),
    kv_blocks=st.integers(40, 2000),
    ramp_s=st.sampled_from([0.0, 0.05]),
)
def test_fast_forward_equals_step_by_step(
    monkeypatch: pytest.MonkeyPatch,
    layout_index: int,
    scheduler: str,
    concurrency: int,
    instances: int,
    inputs: list[int],
    output_seed: int,
    kv_blocks: int,
    ramp_s: float,
) -> None:
    rng = np.random.default_rng(output_seed)
    outputs = [int(x) for x in rng.integers(1, 120, len(inputs))]
    # The KV cache always holds the longest request, but can be tight enough to preempt.
    capacity = max(kv_blocks * 16, (max(inputs) + max(outputs) + 32) // 16 * 16 + 16)
    config = InstanceConfig(Role.COLLOCATED, COSTS[layout_index], capacity, _knobs(scheduler))
    sample = _sample(inputs, outputs)

    def run() -> SimulationResult:
        return simulate(
            instances=[config] * instances,
            sample=sample,
            arrival=ArrivalKind.CLOSED,
            concurrency=concurrency,
            closed_loop_ramp_s=ramp_s,
        )

    fast = run()
    with monkeypatch.context() as patch:
        _step_by_step(patch)
        slow = run()
    _assert_same_latencies(fast, slow)


def test_fast_forward_equals_step_by_step_on_a_long_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    # Decode-heavy closed loop: 16 clients, 400-token outputs; the fast-forward must actually skip steps.
    config = InstanceConfig(Role.COLLOCATED, COSTS[4], 200_000, _knobs("vllm"))
    sample = _sample([200 + 37 * (i % 7) for i in range(48)], [400 - 13 * (i % 5) for i in range(48)])
    repeats: list[int] = []
    original = simulator_module._Simulation.fast_forward

    def recording(
        self: simulator_module._Simulation,
        inst: SimInstance,
        batch: list[tuple[SimRequest, int]],
        first_s: float,
        seqs: int,
        ctx: float,
    ) -> tuple[float, int]:
        out = original(self, inst, batch, first_s, seqs, ctx)
        repeats.append(out[1])
        return out

    with monkeypatch.context() as patch:
        patch.setattr(simulator_module._Simulation, "fast_forward", recording)
        fast = simulate(instances=[config], sample=sample, arrival=ArrivalKind.CLOSED, concurrency=16)
    assert max(repeats) > 10  # whole runs of decode steps were skipped in closed form
    with monkeypatch.context() as patch:
        _step_by_step(patch)
        slow = simulate(instances=[config], sample=sample, arrival=ArrivalKind.CLOSED, concurrency=16)
    _assert_same_latencies(fast, slow)
    assert fast.mean_batch_tokens == pytest.approx(slow.mean_batch_tokens, rel=1e-9)


@pytest.mark.parametrize("index", [0, 3, 7], ids=[LAYOUT_IDS[i] for i in (0, 3, 7)])
def test_fast_forward_equals_step_by_step_with_speculative_decoding(
    monkeypatch: pytest.MonkeyPatch, index: int
) -> None:
    # Speculative decode steps are charged per token gained; the closed-form skip must still match each step.
    model, layout = LAYOUTS[index]
    plain = COSTS[index]
    cost = ReplicaStepCost(
        model=model,
        gpu=plain.gpu,
        engine=plain.engine,
        layout=layout,
        weight_dtype=DType.BF16,
        kv_dtype=DType.BF16,
        calibration=KernelCalibration(),
        max_tokens=MAX_TOKENS,
        moe_calibration=MoeCalibration(),
        speculative=SpeculativeDecoding("mtp", 2, 2.3),
    )
    config = InstanceConfig(Role.COLLOCATED, cost, 200_000, _knobs("vllm"))
    sample = _sample([300 + 41 * (i % 5) for i in range(32)], [200 - 7 * (i % 6) for i in range(32)])
    fast = simulate(instances=[config], sample=sample, arrival=ArrivalKind.CLOSED, concurrency=8)
    with monkeypatch.context() as patch:
        _step_by_step(patch)
        slow = simulate(instances=[config], sample=sample, arrival=ArrivalKind.CLOSED, concurrency=8)
    _assert_same_latencies(fast, slow)
    # And faster per token than the same decode without drafts, at this acceptance.
    plain_run = simulate(
        instances=[InstanceConfig(Role.COLLOCATED, plain, 200_000, _knobs("vllm"))],
        sample=sample,
        arrival=ArrivalKind.CLOSED,
        concurrency=8,
    )
    assert float(np.mean(fast.tpot_s)) < float(np.mean(plain_run.tpot_s))


def test_fast_forward_equals_step_by_step_across_the_cpu_gpu_crossover(monkeypatch: pytest.MonkeyPatch) -> None:
    # With overlap scheduling a step takes max(GPU, CPU) + gap. 16 sequences at ~33k tokens of context: the
    # CPU (2.16 ms) bounds the first decode steps, the growing attention makes the GPU bound later ones, so
    # step time is not affine in the context over the run the fast-forward skips.
    engine = replace(ENGINE, overlap_scheduling=True, step_overhead_s=2.0e-3, per_sequence_overhead_s=1.0e-5)
    cost = step_cost(
        DENSE, make_layout(), gpu=GPU, engine=engine, max_tokens=MAX_TOKENS, calibration=KernelCalibration()
    )
    start = cost.step(decode_sequences=16, decode_context_tokens=16 * 33_000.0)
    end = cost.step(decode_sequences=16, decode_context_tokens=16 * 35_000.0)
    assert start.cpu_s > start.gpu_s
    assert end.gpu_s > end.cpu_s
    config = InstanceConfig(Role.COLLOCATED, cost, 2_000_000, _knobs("vllm"))
    sample = _sample([33_000] * 32, [2_000] * 32)
    fast = simulate(instances=[config], sample=sample, arrival=ArrivalKind.CLOSED, concurrency=16)
    with monkeypatch.context() as patch:
        _step_by_step(patch)
        slow = simulate(instances=[config], sample=sample, arrival=ArrivalKind.CLOSED, concurrency=16)
    _assert_same_latencies(fast, slow)


@SIMS
@given(
    scheduler=st.sampled_from(["vllm", "sglang", "trtllm"]),
    rate=st.floats(2.0, 200.0),
    count=st.integers(4, 30),
    seed=st.integers(0, 1000),
    overlap=st.booleans(),
)
def test_fast_forward_equals_step_by_step_open_loop(
    monkeypatch: pytest.MonkeyPatch, scheduler: str, rate: float, count: int, seed: int, overlap: bool
) -> None:
    rng = np.random.default_rng(seed)
    inputs = [int(x) for x in rng.integers(1, 800, count)]
    outputs = [int(x) for x in rng.integers(1, 150, count)]
    sample = RequestSample(
        np.asarray(inputs, dtype=np.int64),
        np.asarray(outputs, dtype=np.int64),
        np.cumsum(rng.exponential(1.0, count)) - 0.0,
    )
    config = InstanceConfig(Role.COLLOCATED, COSTS[0], 20_000, _knobs(scheduler, overlap_scheduling=overlap))
    fast = simulate(instances=[config], sample=sample, arrival=ArrivalKind.POISSON, rate_per_s=rate)
    with monkeypatch.context() as patch:
        _step_by_step(patch)
        slow = simulate(instances=[config], sample=sample, arrival=ArrivalKind.POISSON, rate_per_s=rate)
    _assert_same_latencies(fast, slow)


def test_an_overlapping_engine_sees_a_request_one_step_later() -> None:
    # A (16-token prompt, 3 tokens) arrives at an idle engine at 0; B arrives halfway through A's prefill step.
    # Without overlap B joins the next step; with it that step was formed when A's prefill started, so B waits
    # for it: one decode step of A alone (context 17 tokens) more, and a mixed step one token of context later.
    prefill_s = COSTS[0].step(prefill_tokens=16, prefill_sequences=1, prefill_chunks=1).total_s
    sample = RequestSample(
        np.asarray([16, 16], dtype=np.int64), np.asarray([3, 2], dtype=np.int64), np.asarray([0.0, prefill_s / 2])
    )

    def run(overlap: bool) -> SimulationResult:
        config = InstanceConfig(Role.COLLOCATED, COSTS[0], 20_000, _knobs("vllm", overlap_scheduling=overlap))
        return simulate(instances=[config], sample=sample, arrival=ArrivalKind.POISSON, rate_per_s=1.0)

    sync, overlapped = run(False), run(True)
    first_a = {round(float(a), 12) for a in (sync.ttft_s[0], overlapped.ttft_s[0])}
    assert len(first_a) == 1  # A found the engine idle either way
    one_decode_s = COSTS[0].step(decode_sequences=1, decode_context_tokens=17).total_s
    assert float(overlapped.ttft_s[1] - sync.ttft_s[1]) == pytest.approx(one_decode_s, rel=0.02)


# Estimates: determinism, replicas, attention-DP folding ----------------------------------------------------


def _deployment(model: ModelSpec, layout: ParallelLayout, replicas: int = 1) -> Deployment:
    return Deployment(
        model=model,
        gpu=GPU,
        engine=ENGINE,
        weight_dtype=DType.BF16,
        kv_dtype=DType.BF16,
        calibration=KernelCalibration(),
        layout=layout,
        replicas=replicas,
        knobs=KnobOverrides(max_batched_tokens=1024, max_sequences=128),
        moe_calibration=MoeCalibration(),
    )


def _workload(**kw: object) -> Workload:
    base: dict[str, object] = {
        "arrival": ArrivalKind.POISSON,
        "input_length": LengthDistribution.parse("uniform:100:900"),
        "output_length": LengthDistribution.parse("uniform:10:120"),
        "rate_per_s": 10.0,
        "num_requests": 120,
        "seed": 0,
    }
    base.update(kw)
    return Workload(**base)  # type: ignore[arg-type]


def test_estimate_is_deterministic_for_a_seed(catalog: Catalog) -> None:
    def estimate(seed: int) -> dict[str, object]:
        request = EstimateRequest(
            model="law-moe",
            model_spec=MOE,
            gpu="h100-sxm",
            isl="lognormal:600:300",
            osl="uniform:20:200",
            tp=1,
            attention_dp=4,
            moe_ep=4,
            rate=20.0,
            requests=150,
            seed=seed,
        )
        return run_estimate(request, catalog=catalog).as_dict()

    first, again, other = estimate(7), estimate(7), estimate(8)
    assert first == again
    assert first["ttft_ms"] != other["ttft_ms"]


@SIMS
@given(
    replicas=st.integers(1, 3),
    rate=st.sampled_from([5.0, 20.0, 60.0, 150.0]),
    seed=st.integers(0, 50),
)
def test_more_replicas_never_lower_throughput_at_a_fixed_rate(replicas: int, rate: float, seed: int) -> None:
    workload = _workload(rate_per_s=rate, seed=seed)
    sample = sample_requests(workload)
    fewer = simulate_deployment(_deployment(DENSE, make_layout(), replicas), workload, sample=sample)
    more = simulate_deployment(_deployment(DENSE, make_layout(), replicas + 1), workload, sample=sample)
    assert fewer.result.completed == more.result.completed == workload.num_requests
    # Throughput is tokens over the span from the first arrival to the last finish. Below saturation it is the
    # offered load give or take the last request's latency, and round-robin may hand that request to a replica
    # that happens to be mid-prefill (a fraction of a millisecond over a ~1 s run), hence the 1% allowance;
    # above saturation one more replica must add capacity.
    assert more.output_tokens_per_s >= fewer.output_tokens_per_s * 0.99
    assert more.requests_per_s >= fewer.requests_per_s * 0.99


@pytest.mark.parametrize(
    ("layout", "replicas", "concurrency"),
    [
        (make_layout(tp=1, attention_dp=4, moe_ep=4), 1, 8),
        (make_layout(tp=2, attention_dp=2, moe_ep=4), 1, 12),
        (make_layout(tp=2, attention_dp=2), 2, 8),
    ],
)
def test_attention_dp_ranks_folded_into_one_match_all_ranks(
    monkeypatch: pytest.MonkeyPatch, layout: ParallelLayout, replicas: int, concurrency: int
) -> None:
    # Fixed lengths and clients that all start at t=0 (no stagger): every rank then runs the same batches at
    # the same times, so one simulated rank (concurrency / dp clients on every dp-th request) must reproduce
    # the full run request for request. simulate_deployment folds the ranks when the closed loop divides
    # evenly; forcing _ranks_symmetric to answer False takes its other path (all dp ranks simulated, with the
    # full sample and concurrency) on the very same deployment and workload. The closed loop's re-issued
    # requests go round-robin, so rank j always gets requests j, j + dp, ... like the strided sample.
    workload = Workload(
        arrival=ArrivalKind.CLOSED,
        input_length=LengthDistribution.fixed(300),
        output_length=LengthDistribution.fixed(40),
        concurrency=concurrency,
        num_requests=concurrency * 5,
    )
    deployment = _deployment(MOE, layout, replicas)
    assert deployment_module._ranks_symmetric(workload, replicas, layout.attention_dp)
    folded = simulate_deployment(deployment, workload)
    with monkeypatch.context() as patch:
        patch.setattr(deployment_module, "_ranks_symmetric", lambda *args: False)
        full = simulate_deployment(deployment, workload)
    assert folded.result.completed * layout.attention_dp == full.result.completed == workload.num_requests
    assert folded.scale == layout.attention_dp
    assert full.scale == 1
    for a, b in ((folded.result.ttft, full.result.ttft), (folded.result.tpot, full.result.tpot)):
        assert a.mean == pytest.approx(b.mean, rel=1e-6)
        assert a.p99 == pytest.approx(b.p99, rel=1e-6)
    assert folded.output_tokens_per_s == pytest.approx(full.output_tokens_per_s, rel=1e-6)


def test_fp8_weights_law_layouts_are_valid() -> None:
    # The law layouts also build with fp8 weights (the monotonicity laws hold per dtype; spot-check one).
    cost = _cost(MOE, make_layout(tp=1, attention_dp=4, moe_ep=4), DType.FP8)
    times = [cost.step(decode_sequences=n, decode_context_tokens=300.0 * n).total_s for n in range(1, 300)]
    assert all(b >= a for a, b in itertools.pairwise(times))
