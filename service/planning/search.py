"""Goodput search: enumerate strategies, prune analytically, bisect the rate by simulation, rank."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from service.planning.catalog import Catalog
from service.planning.deployment import (
    BuiltInstance,
    Deployment,
    Estimate,
    KnobOverrides,
    Mode,
    build_instance,
    min_request_tokens,
    simulate_deployment,
    unit_fold,
)
from service.planning.estimate import parse_dtype, require_supported
from service.planning.simulator import Role, quantiles_ms
from service.planning.specs import KV_DTYPES, WEIGHT_DTYPES, ModelSpec, PlanningError
from service.planning.stepcost import ParallelLayout, ReplicaStepCost, validate_layout
from service.planning.workload import ArrivalKind, RequestSample, Workload, sample_requests

MAX_SEARCH_SPACE = 5000
# Work budget of one simulation in the search, in sequence-steps: about two seconds of one core.
SEARCH_SIMULATION_SEQUENCE_STEPS = 3_000_000
# Quantiles of each simulated strategy's TTFT and TPOT kept in the result, for CDF plots.
CDF_QUANTILES = tuple(i / 20 for i in range(21))
# Attention data-parallel degrees tried for MoE models unless the spec names them (capped by max_gpus).
DEFAULT_MOE_ATTENTION_DP = (1, 2, 4, 8, 16, 32, 64)
# Arrivals must span this many mean request lifetimes for a run to show steady-state queueing.
STEADY_STATE_LIFETIMES = 2.5
MAX_STEADY_STATE_REQUESTS = 2000


@dataclass(frozen=True, slots=True)
class Slo:
    """Latency objectives: both must hold for at least ``attainment`` of requests."""

    ttft_ms: float
    tpot_ms: float
    attainment: float = 0.9

    def validate(self) -> None:
        """Refuse non-positive targets."""
        if not (self.ttft_ms > 0 and self.tpot_ms > 0):
            raise PlanningError("SLO ttft_ms and tpot_ms must be positive")
        if not 0 < self.attainment <= 1:
            raise PlanningError("SLO attainment must be in (0, 1]")


@dataclass(frozen=True, slots=True)
class SearchLimits:
    """Which parts of the strategy space to explore."""

    modes: tuple[Mode, ...] = (Mode.COLLOCATED, Mode.DISAGGREGATED)
    tp: tuple[int, ...] = (1, 2, 4, 8)
    pp: tuple[int, ...] = (1, 2)
    # Attention data-parallel ranks per replica; None: DEFAULT_MOE_ATTENTION_DP for MoE models, (1,) for dense.
    attention_dp: tuple[int, ...] | None = None
    # Expert-parallel degrees of the MoE layers; None ("auto"): pure EP (moe_ep = tp x attention_dp) and
    # pure MoE-TP (moe_ep = 1), what engines deploy. Explicit degrees split the stage moe_tp x moe_ep.
    moe_ep: tuple[int, ...] | None = None
    max_batched_tokens: tuple[int | None, ...] = (None,)
    # Strategies simulated per mode after analytic ranking.
    simulate_top: int = 5
    requests: int = 200
    rate_tolerance: float = 0.04


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """A planning question: model on GPU type under workload and SLOs with a GPU budget."""

    model: ModelSpec
    gpu: str
    max_gpus: int
    workload: Workload
    slo: Slo
    engine: str = "vllm"
    weight_dtype: str = "bf16"
    kv_dtype: str | None = None
    limits: SearchLimits = SearchLimits()
    gpu_price_per_hour: float | None = None
    # Engine settings every strategy keeps (the search varies max_batched_tokens), and the replica router.
    knobs: KnobOverrides = KnobOverrides()
    router: str = "round_robin"


@dataclass(slots=True)
class Candidate:
    """A strategy under consideration with its analytic bound and, once simulated, its goodput."""

    deployment: Deployment
    bound_rps: float
    goodput_rps: float = 0.0
    estimate: Estimate | None = None
    simulated: bool = False


@dataclass(frozen=True, slots=True)
class Rejection:
    """A strategy dropped before simulation, and why."""

    strategy: str
    reason: str
    # One of: does_not_fit (memory or layout refused), tpot_floor (SLO below the fastest step), analytic_bound.
    category: str = "does_not_fit"


@dataclass(slots=True)
class PlanResult:
    """Ranked strategies, the Pareto frontier and what was pruned."""

    strategies: list[dict[str, Any]] = field(default_factory=list)
    frontier: list[int] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    evaluated: int = 0
    enumerated: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready result."""
        return {
            "strategies": self.strategies,
            "frontier": self.frontier,
            "rejected": [{"strategy": r.strategy, "reason": r.reason, "category": r.category} for r in self.rejected],
            "strategies_evaluated": self.evaluated,
            "strategies_enumerated": self.enumerated,
        }


ProgressCallback = Callable[[int, int], None]
# Called before every simulation; raises to stop the search (cancellation, time limit).
Checkpoint = Callable[[], None]


def _base_deployment(request: PlanRequest, catalog: Catalog) -> Deployment:
    gpu = catalog.gpu(request.gpu)
    if request.gpu_price_per_hour is not None:
        gpu = replace(gpu, price_per_hour_usd=request.gpu_price_per_hour)
    engine = catalog.engine(request.engine)
    weight = parse_dtype(request.weight_dtype, allowed=WEIGHT_DTYPES, what="weight dtype")
    require_supported(gpu, weight)
    kv = (
        engine.kv_dtype_for(weight)
        if request.kv_dtype is None
        else parse_dtype(request.kv_dtype, allowed=KV_DTYPES, what="KV-cache dtype")
    )
    return Deployment(
        request.model,
        gpu,
        engine,
        weight,
        kv,
        catalog.calibration_for(gpu),
        moe_calibration=catalog.moe_calibration_for(gpu),
        knobs=request.knobs,
        router=request.router,
    )


def _attention_dps(model: ModelSpec, limits: SearchLimits) -> tuple[int, ...]:
    if limits.attention_dp is not None:
        return limits.attention_dp
    return DEFAULT_MOE_ATTENTION_DP if model.moe is not None else (1,)


def _layouts(model: ModelSpec, limits: SearchLimits, max_gpus: int) -> list[ParallelLayout]:
    """Layouts of one replica (or one disaggregated worker) that fit in max_gpus and that the model splits into.

    Dense models: tp x pp (x attention_dp when asked). MoE models: attention tp x attention_dp x pp with the
    MoE layers of each stage split pure-EP (moe_ep = tp x dp) or pure-TP (moe_ep 1), or moe_tp x moe_ep for
    the degrees the spec names. Layouts validate_layout refuses (heads, experts or expert width that do not
    split) are skipped.
    """
    layouts: list[ParallelLayout] = []
    seen: set[ParallelLayout] = set()
    for tp in limits.tp:
        for dp in _attention_dps(model, limits):
            for pp in limits.pp:
                stage = tp * dp
                if stage * pp > max_gpus:
                    continue
                if model.moe is None:
                    eps: list[int] = [1]
                elif limits.moe_ep is None:
                    eps = sorted({stage, 1}, reverse=True)
                else:
                    eps = [ep for ep in limits.moe_ep if stage % ep == 0]
                for ep in eps:
                    layout = ParallelLayout(tp=tp, pp=pp, attention_dp=dp, moe_ep=ep)
                    if layout in seen:
                        continue
                    try:
                        validate_layout(model, layout)
                    except PlanningError:
                        continue
                    seen.add(layout)
                    layouts.append(layout)
    return layouts


def searchable_layouts(request: PlanRequest) -> list[ParallelLayout]:
    """The layouts the search can enumerate; refused (one line naming the search keys) when there is none."""
    layouts = _layouts(request.model, request.limits, request.max_gpus)
    if not layouts:
        raise PlanningError(
            f"no parallel layout of {request.model.name} fits in {request.max_gpus} GPUs with search.tp, "
            "search.pp, search.attention_dp and search.moe_ep as given (each layout must divide the heads by tp "
            "and the experts by moe_ep)"
        )
    return layouts


def count_search_space(request: PlanRequest) -> int:
    """Number of strategies the request enumerates before pruning.

    Collocated: one per layout (replicated to max_gpus). Disaggregated: one per (prefill, decode) layout
    pair that leaves room for a worker of each within max_gpus. Times the max_batched_tokens choices.
    """
    layouts = _layouts(request.model, request.limits, request.max_gpus)
    knobs = len(request.limits.max_batched_tokens)
    total = 0
    if Mode.COLLOCATED in request.limits.modes:
        total += len(layouts) * knobs
    if Mode.DISAGGREGATED in request.limits.modes:
        sizes = sorted(layout.gpus for layout in layouts)
        pairs = 0
        for size in sizes:
            pairs += bisect.bisect_right(sizes, request.max_gpus - size)
        total += pairs * knobs
    return total


def _decode_capacity(
    cost: ReplicaStepCost, kv_tokens: int, max_seqs: int, isl: float, osl: float, tpot_s: float
) -> float:
    """Requests/s one instance can decode with steps under the TPOT SLO (analytic)."""
    context = isl + osl / 2
    batch_cap = max(1, min(max_seqs, int(kv_tokens // max(1.0, isl + osl))))
    best = 0.0
    batch = 1
    while batch <= batch_cap:
        step = cost.step(decode_sequences=batch, decode_context_tokens=batch * context).total_s
        if step > tpot_s:
            break
        best = batch / (osl * step)
        batch = batch * 2 if batch < 16 else int(batch * 1.25) + 1
    return best


def _prefill_capacity(cost: ReplicaStepCost, budget: int, isl: float) -> float:
    """Requests/s one instance can prefill at full token budget (analytic)."""
    tokens = max(1, min(budget, cost.max_tokens - 1))
    pairs = tokens * (isl / 2.0)
    step = cost.step(prefill_tokens=tokens, prefill_key_pairs=pairs, prefill_kv_tokens=tokens, prefill_sequences=1)
    return tokens / step.total_s / isl


BuiltCache = dict[tuple[ParallelLayout, Role, KnobOverrides], BuiltInstance]


def _built(
    deployment: Deployment, layout: ParallelLayout, role: Role, min_tokens: int, cache: BuiltCache
) -> BuiltInstance:
    key = (layout, role, deployment.knobs)
    built = cache.get(key)
    if built is None:
        built = cache[key] = build_instance(deployment, layout, role, min_tokens=min_tokens)
    return built


def _simulate_unit(
    deployment: Deployment,
    workload: Workload,
    sample: RequestSample,
    level: float,
    cache: BuiltCache,
    checkpoint: Checkpoint | None = None,
) -> Estimate:
    """The deployment at load ``level``, through simulate_deployment: the code path of `splan estimate`.

    ``level`` is the total open-loop rate, or the closed-loop concurrency of one collocated replica (of the
    whole deployment when disaggregated). ``sample`` is the stream offered to the whole deployment.
    """

    def build(dep: Deployment, layout: ParallelLayout, role: Role, min_tokens: int) -> BuiltInstance:
        return _built(dep, layout, role, min_tokens, cache)

    if workload.arrival is ArrivalKind.CLOSED:
        clients = max(1, int(level))
        if deployment.mode is Mode.COLLOCATED:
            clients *= deployment.replicas
        load = replace(workload, concurrency=clients)
        return simulate_deployment(deployment, load, sample=sample, build=build, checkpoint=checkpoint)
    return simulate_deployment(
        deployment, workload.with_rate(level), sample=sample, rate_per_s=level, build=build, checkpoint=checkpoint
    )


def _goodput(
    candidate: Candidate,
    workload: Workload,
    sample: RequestSample,
    slo: Slo,
    limits: SearchLimits,
    cache: BuiltCache | None = None,
    checkpoint: Checkpoint | None = None,
) -> None:
    """Bisect the request rate (or concurrency) for the highest one meeting the SLO attainment."""
    deployment = candidate.deployment
    ttft_s, tpot_s = slo.ttft_ms / 1e3, slo.tpot_ms / 1e3
    cache = {} if cache is None else cache
    closed = workload.arrival is ArrivalKind.CLOSED
    # Identical units (replicas, attention-DP ranks, groups of disaggregated instances) behind a
    # round-robin router are independent: one is simulated at its share of the rate.
    units = unit_fold(deployment, workload)

    # The longest request lifetime seen so far: an overloaded level's is long, and every later level is then
    # replayed long enough to show whether its queue grows.
    lifetime_s = 0.0

    def ok(est: Estimate) -> bool:
        return est.result.attainment(ttft_s, tpot_s) >= slo.attainment

    def run(level: float, *, full: bool = False) -> Estimate:
        nonlocal lifetime_s
        if checkpoint is not None:
            checkpoint()
        if closed:
            # Every replica keeps as many requests as a lone replica would get.
            replicas = deployment.replicas if deployment.mode is Mode.COLLOCATED else 1
            return _simulate_unit(deployment, workload, sample.head(sample.size * replicas), level, cache, checkpoint)
        # A short burst never reaches the steady-state concurrency and looks better than the real thing:
        # replay the sample until arrivals span several request lifetimes (known from the previous run).
        span_s = float(sample.unit_arrival_s[-1]) / (level / units) if level > 0 else 0.0
        est: Estimate | None = None
        reference_s = lifetime_s
        simulated_times = 0
        longest = max(1, MAX_STEADY_STATE_REQUESTS // max(1, sample.input_tokens.size))
        for _ in range(2):
            times = longest if full else 1
            if span_s > 0 and reference_s > 0 and not full:
                times = max(1, min(math.ceil(STEADY_STATE_LIFETIMES * reference_s / span_s), longest))
            if times == simulated_times:
                # The same replay again would give the same answer: a slow level needs no longer run.
                break
            est = _simulate_unit(deployment, workload, sample.repeated(times), level, cache, checkpoint)
            simulated_times = times
            observed = float(np.mean(est.result.e2e_s)) if est.result.e2e_s.size else 0.0
            lifetime_s = max(lifetime_s, observed)
            # Requests that lived much longer than the replay assumed: run the level again, longer.
            long_enough = observed <= max(reference_s, 1e-9) * 1.5 or times * sample.input_tokens.size >= (
                MAX_STEADY_STATE_REQUESTS
            )
            if long_enough:
                break
            reference_s = observed
        assert est is not None
        return est

    closed = workload.arrival is ArrivalKind.CLOSED
    if closed:
        lo, hi = 0.0, float(max(2, min(2048, int(candidate.bound_rps * 4) + 2)))
    else:
        lo, hi = 0.0, max(candidate.bound_rps * 1.3, 1e-3)
    best: Estimate | None = None
    floor_est = run(1.0 if closed else hi * 0.02)
    if not ok(floor_est):
        candidate.goodput_rps = 0.0
        candidate.estimate = floor_est
        candidate.simulated = True
        return
    best, lo = floor_est, (1.0 if closed else hi * 0.02)

    top = run(hi)
    doublings, full = 4, False
    if not closed and ok(top):
        # hi (1.3 x the analytic bound) mostly passes within a step or two of the goodput: doubling it overloads
        # the unit and the bisection of [hi, 2 hi] then probes its way back down. Climbing from hi over the points
        # that bisection can end on (steps of hi / 2^levels, doubled each time) brackets the goodput in the same
        # interval in a probe or two. Each probe above hi is replayed at full length, as the bisection's are once
        # an overloaded run has lengthened the replay, so a short replay cannot pass a level a long one fails.
        full = True
        levels = math.ceil(math.log2(1.0 / limits.rate_tolerance))
        base, step = hi, hi / 2**levels
        best, lo = top, hi
        bracketed = False
        while step < base and not bracketed:
            est = run(base + step, full=True)
            if ok(est):
                best, lo = est, base + step
                step *= 2
            else:
                hi, bracketed = base + step, True
        if bracketed:
            doublings = 0
        else:
            # Everything up to 1.5 hi passed: double from 2 hi on, as before.
            hi, doublings = 2 * base, 3
            top = run(hi, full=True)
    for _ in range(doublings):
        if not ok(top):
            break
        best, lo = top, hi
        hi *= 2
        top = run(hi, full=full)
    for _ in range(12):
        if hi - lo <= max(limits.rate_tolerance * hi, 1.0 if closed else 0.0):
            break
        mid = (lo + hi) / 2
        if closed:
            mid = float(int(mid))
            if mid <= lo:
                break
        est = run(mid, full=full)
        if ok(est):
            best, lo = est, mid
        else:
            hi = mid
    candidate.estimate = best
    candidate.goodput_rps = best.requests_per_s if closed else lo
    candidate.simulated = True


def _strategy_dict(candidate: Candidate, workload: Workload) -> dict[str, Any]:
    deployment = candidate.deployment
    gpus = deployment.gpus
    goodput = candidate.goodput_rps
    osl = workload.output_length.mean_tokens()
    price = deployment.gpu.price_per_hour_usd * gpus
    tokens_per_hour = goodput * osl * 3600.0
    out: dict[str, Any] = {
        "label": deployment.label(),
        "mode": deployment.mode.value,
        "gpus": gpus,
        "layout": deployment.describe_layout(),
        "engine": deployment.engine.name,
        "weight_dtype": deployment.weight_dtype.value,
        **deployment.describe_moe(),
        "kv_dtype": deployment.kv_dtype.value,
        "max_batched_tokens": deployment.knobs.max_batched_tokens or deployment.engine.max_num_batched_tokens,
        "max_sequences": deployment.knobs.max_sequences or deployment.engine.max_num_seqs,
        "gpu_memory_fraction": deployment.knobs.memory_fraction or deployment.engine.gpu_memory_fraction,
        "goodput_rps": goodput,
        "goodput_per_gpu": goodput / gpus if gpus else 0.0,
        "cost_per_million_output_tokens_usd": price / tokens_per_hour * 1e6 if tokens_per_hour > 0 else None,
        "analytic_bound_rps": candidate.bound_rps,
    }
    est = candidate.estimate
    if est is not None:
        r = est.result
        out.update(
            {
                "ttft_ms": r.ttft.as_dict(),
                "tpot_ms": r.tpot.as_dict(),
                "e2e_ms": r.e2e.as_dict(),
                "output_tokens_per_s": est.output_tokens_per_s,
                "bottleneck": r.bottleneck(),
                "step_time_shares": r.step_time_shares(),
                "cdf_quantiles": list(CDF_QUANTILES),
                "ttft_cdf_ms": quantiles_ms(r.ttft_s, CDF_QUANTILES, r.weights),
                "tpot_cdf_ms": quantiles_ms(r.tpot_s, CDF_QUANTILES, r.weights),
                "memory_per_gpu": est.as_dict()["memory"],
                "peak_kv_fraction": r.peak_kv_fraction,
            }
        )
    return out


def _pareto(strategies: list[dict[str, Any]]) -> list[int]:
    """Indices not dominated on (goodput per GPU higher, median TPOT lower)."""
    frontier = []
    for i, s in enumerate(strategies):
        if s["goodput_rps"] <= 0 or "tpot_ms" not in s:
            continue
        dominated = any(
            o is not s
            and o["goodput_rps"] > 0
            and "tpot_ms" in o
            and o["goodput_per_gpu"] >= s["goodput_per_gpu"]
            and o["tpot_ms"]["p50"] <= s["tpot_ms"]["p50"]
            and (o["goodput_per_gpu"] > s["goodput_per_gpu"] or o["tpot_ms"]["p50"] < s["tpot_ms"]["p50"])
            for o in strategies
        )
        if not dominated:
            frontier.append(i)
    return frontier


def plan(
    request: PlanRequest,
    *,
    catalog: Catalog,
    progress: ProgressCallback | None = None,
    checkpoint: Checkpoint | None = None,
) -> PlanResult:
    """Search the strategy space and rank strategies by goodput per GPU."""
    request.slo.validate()
    if request.max_gpus < 1:
        raise PlanningError("max_gpus must be at least 1")
    # Each simulation of the search stops at a work budget, so a cancel or the time limit (checked between
    # simulations) acts within a couple of seconds; a cut run counts its unfinished requests as SLO misses.
    workload = replace(
        request.workload, num_requests=request.limits.requests, max_sequence_steps=SEARCH_SIMULATION_SEQUENCE_STEPS
    )
    workload.validate()
    space = count_search_space(request)
    if space > MAX_SEARCH_SPACE:
        raise PlanningError(f"search space has {space} strategies; the limit is {MAX_SEARCH_SPACE}")
    base = _base_deployment(request, catalog)
    limits = request.limits
    result = PlanResult(enumerated=space)
    layouts = searchable_layouts(request)
    isl = workload.input_length.mean_tokens()
    osl = workload.output_length.mean_tokens()
    need = min_request_tokens(workload)
    tpot_s = request.slo.tpot_ms / 1e3
    cache: BuiltCache = {}
    decode_caps: dict[tuple[ParallelLayout, int | None], float] = {}
    prefill_caps: dict[tuple[ParallelLayout, int | None], float] = {}
    for layout in layouts:
        for mbt in limits.max_batched_tokens:
            dep = replace(base, layout=layout, knobs=replace(base.knobs, max_batched_tokens=mbt))
            try:
                built = _built(dep, layout, Role.COLLOCATED, need, cache)
            except PlanningError as exc:
                result.rejected.append(Rejection(f"{layout.label()}", str(exc)))
                continue
            cost = built.config.cost
            floor = cost.decode_floor_s()
            if floor > tpot_s:
                result.rejected.append(
                    Rejection(
                        layout.label(),
                        f"TPOT floor {floor * 1e3:.1f} ms is above the SLO {request.slo.tpot_ms:g} ms",
                        "tpot_floor",
                    )
                )
                continue
            knobs = built.config.knobs
            # Each attention-DP rank batches its own requests (the step cost charges the lock-step MoE
            # layers for all ranks' tokens), so a replica serves attention_dp times one rank's rate.
            dp = layout.attention_dp
            decode_caps[(layout, mbt)] = dp * _decode_capacity(
                cost, built.config.kv_capacity_tokens, knobs.max_sequences, isl, osl, tpot_s
            )
            prefill_caps[(layout, mbt)] = dp * _prefill_capacity(cost, knobs.max_batched_tokens, isl)
    candidates: dict[Mode, list[Candidate]] = {Mode.COLLOCATED: [], Mode.DISAGGREGATED: []}
    for (layout, mbt), dcap in decode_caps.items():
        pcap = prefill_caps[(layout, mbt)]
        replicas = request.max_gpus // layout.gpus
        if Mode.COLLOCATED in limits.modes and replicas >= 1 and dcap > 0:
            # Collocated: prefill work steals time from decode steps.
            per_replica = 1.0 / (1.0 / dcap + 1.0 / pcap)
            dep = replace(base, layout=layout, replicas=replicas, knobs=replace(base.knobs, max_batched_tokens=mbt))
            candidates[Mode.COLLOCATED].append(Candidate(dep, per_replica * replicas))
    if Mode.DISAGGREGATED in limits.modes and request.max_gpus >= 2:
        for (p_layout, mbt), pcap in prefill_caps.items():
            for (d_layout, d_mbt), dcap in decode_caps.items():
                if d_mbt != mbt or dcap <= 0:
                    continue
                best: tuple[float, int, int] | None = None
                for n_p in range(1, request.max_gpus // p_layout.gpus + 1):
                    n_d = (request.max_gpus - n_p * p_layout.gpus) // d_layout.gpus
                    if n_d < 1:
                        break
                    rate = min(n_p * pcap, n_d * dcap)
                    gpus = n_p * p_layout.gpus + n_d * d_layout.gpus
                    # Prefer the balanced pool sizes that need the fewest GPUs for the same rate.
                    n_d_needed = max(1, math.ceil(rate / dcap - 1e-9))
                    n_p_needed = max(1, math.ceil(rate / pcap - 1e-9))
                    gpus = n_p_needed * p_layout.gpus + n_d_needed * d_layout.gpus
                    score = rate / gpus
                    if best is None or score > best[0] * 1.0001:
                        best = (score, n_p_needed, n_d_needed)
                if best is None:
                    continue
                _, n_p, n_d = best
                dep = replace(
                    base,
                    mode=Mode.DISAGGREGATED,
                    prefill_layout=p_layout,
                    prefill_workers=n_p,
                    decode_layout=d_layout,
                    decode_workers=n_d,
                    knobs=replace(base.knobs, max_batched_tokens=mbt),
                )
                candidates[Mode.DISAGGREGATED].append(Candidate(dep, min(n_p * pcap, n_d * dcap)))
    sample = sample_requests(workload)
    chosen: list[Candidate] = []
    for mode in limits.modes:
        ranked = sorted(candidates[mode], key=lambda c: c.bound_rps / c.deployment.gpus, reverse=True)
        for candidate in ranked[limits.simulate_top :]:
            result.rejected.append(
                Rejection(
                    candidate.deployment.label(),
                    f"analytic bound {candidate.bound_rps / candidate.deployment.gpus:.3g} req/s/GPU "
                    "is below the leaders",
                    "analytic_bound",
                )
            )
        chosen.extend(ranked[: limits.simulate_top])
    total = len(chosen)
    for index, candidate in enumerate(chosen):
        _goodput(candidate, workload, sample, request.slo, limits, cache, checkpoint)
        result.evaluated += 1
        if progress is not None:
            progress(index + 1, total)
    chosen.sort(key=lambda c: (c.goodput_rps / c.deployment.gpus, -c.deployment.gpus), reverse=True)
    result.strategies = [_strategy_dict(c, workload) for c in chosen]
    result.frontier = _pareto(result.strategies)
    for i, s in enumerate(result.strategies):
        s["rank"] = i + 1
        s["on_frontier"] = i in result.frontier
    return result
