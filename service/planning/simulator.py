"""Event-driven simulation of continuous batching: collocated replicas and disaggregated pools."""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.planning.prefix_cache import PrefixCache
from service.planning.schedulers import (
    Batch,
    BatchScheduler,
    InstanceConfig,
    Role,
    SchedulerKnobs,
    SimInstance,
    SimRequest,
    make_scheduler,
    prompt_sized_budget_tokens,
)
from service.planning.workload import ArrivalKind, FloatArray, RequestSample

__all__ = [
    "InstanceConfig",
    "KvTransfer",
    "LatencyStats",
    "Role",
    "SchedulerKnobs",
    "SimulationResult",
    "simulate",
]

# A simulation that has not finished by this many steps is overloaded beyond any useful answer.
MAX_STEPS = 2_000_000
# Default work budget of one simulation, in sequence-steps (one sequence in one engine step).
MAX_SEQUENCE_STEPS = 200_000_000
# What one engine step costs the simulator beyond its sequences, in sequence-steps (profiled: ~40 us a step,
# ~0.7 us a sequence).
STEP_SEQUENCE_EQUIVALENT = 40
# Engine steps between two calls of a simulation's checkpoint (cancel, time limit): 256 steps take a few ms, and
# tens of ms on a loaded machine under coverage, while a call costs well under a microsecond. At 2,048 a cancel on
# CI took 1.2 s (0.5 s heartbeat + the rest of the steps), against the 1 s the service promises.
CHECKPOINT_EVERY_STEPS = 256
# How the entry instances share arriving requests (open loop) or issued ones (closed loop).
ROUTERS = ("round_robin", "random", "least_loaded")


def quantiles_ms(values_s: FloatArray, qs: Sequence[float], weights: FloatArray | None = None) -> list[float]:
    """Quantiles ``qs`` (0..1) of values given in seconds, in milliseconds, each value counted ``weights`` times."""
    if values_s.size == 0:
        return [math.nan] * len(qs)
    ms = values_s * 1e3
    if weights is None or bool(np.all(weights == weights[0])):
        return [float(v) for v in np.percentile(ms, [100.0 * q for q in qs])]
    order = np.argsort(ms, kind="stable")
    sorted_ms, sorted_w = ms[order], weights[order]
    # Weighted percentiles: the value where the cumulative weight (at each value's midpoint) crosses q.
    cumulative = (np.cumsum(sorted_w) - 0.5 * sorted_w) / sorted_w.sum()
    return [float(v) for v in np.interp(list(qs), cumulative, sorted_ms)]


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Mean and percentiles of one latency metric, in milliseconds."""

    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values_s: FloatArray, weights: FloatArray | None = None) -> LatencyStats:
        """Summarise values given in seconds, each counted ``weights`` times (default once)."""
        if values_s.size == 0:
            return cls(math.nan, math.nan, math.nan, math.nan)
        ms = values_s * 1e3
        p50, p90, p99 = quantiles_ms(values_s, (0.5, 0.9, 0.99), weights)
        mean = float(np.mean(ms)) if weights is None else float(np.average(ms, weights=weights))
        return cls(mean, p50, p90, p99)

    def as_dict(self) -> dict[str, float]:
        """Plain mapping for JSON output."""
        return {"mean": self.mean, "p50": self.p50, "p90": self.p90, "p99": self.p99}


@dataclass(frozen=True, slots=True)
class SimulationResult:
    """Per-request latencies and the aggregate figures of one simulated run."""

    ttft_s: FloatArray
    tpot_s: FloatArray
    e2e_s: FloatArray
    output_tokens: FloatArray
    duration_s: float
    completed: int
    offered: int
    busy_fraction: float
    gemm_share: float
    attention_share: float
    communication_share: float
    cpu_bound_share: float
    mean_batch_tokens: float
    peak_kv_fraction: float
    preemptions: int
    queue_share: float
    # How many profiled requests each simulated one stands for (benchmark rounds not simulated).
    weights: FloatArray | None = None
    # Closed loop: the client round each completed request belongs to.
    rounds: npt.NDArray[np.int64] | None = None
    # Prefix caching: prompt tokens whose prefill a cached prefix skipped, of the prompt tokens looked up.
    prefix_hit_tokens: int = 0
    prefix_looked_up_tokens: int = 0
    # The run hit its work budget (sequence-steps) before every request finished.
    budget_cut: bool = False
    # Work the simulation did: one sequence in one engine step is one sequence-step.
    sequence_steps: int = 0

    def round_means_s(self, last: int) -> list[tuple[float, float]]:
        """Mean (TTFT, TPOT) of each of the last ``last`` closed-loop rounds, oldest first."""
        if self.rounds is None or self.rounds.size == 0:
            return []
        top = int(self.rounds.max())
        out = []
        for index in range(max(0, top - last + 1), top + 1):
            sel = self.rounds == index
            if np.any(sel):
                out.append((float(self.ttft_s[sel].mean()), float(self.tpot_s[sel].mean())))
        return out

    @property
    def ttft(self) -> LatencyStats:
        """Time to first token."""
        return LatencyStats.of(self.ttft_s, self.weights)

    @property
    def tpot(self) -> LatencyStats:
        """Time per output token after the first."""
        return LatencyStats.of(self.tpot_s, self.weights)

    @property
    def e2e(self) -> LatencyStats:
        """End-to-end latency."""
        return LatencyStats.of(self.e2e_s, self.weights)

    @property
    def requests_per_s(self) -> float:
        """Completed requests per second of simulated time."""
        return self.completed / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        """Generated tokens per second of simulated time."""
        return float(self.output_tokens.sum()) / self.duration_s if self.duration_s > 0 else 0.0

    def attainment(self, ttft_slo_s: float, tpot_slo_s: float) -> float:
        """Share of offered requests that completed meeting both SLOs."""
        if self.offered == 0:
            return 0.0
        ok = (self.ttft_s <= ttft_slo_s) & (self.tpot_s <= tpot_slo_s)
        if self.weights is not None:
            missing = self.offered - self.ttft_s.size
            return float(np.sum(self.weights[ok])) / (float(np.sum(self.weights)) + missing)
        return float(np.count_nonzero(ok)) / self.offered

    def step_time_shares(self) -> dict[str, float]:
        """Share of the GPU-busy time spent in each kind of work (``other`` is the rest: norms, sampling)."""
        shares = {
            "gemm": self.gemm_share,
            "attention": self.attention_share,
            "communication": self.communication_share,
            "cpu_dispatch": self.cpu_bound_share,
        }
        shares["other"] = max(0.0, 1.0 - sum(shares.values()))
        return shares

    def bottleneck(self) -> str:
        """The resource that limits this run most."""
        if self.preemptions > 0 or self.peak_kv_fraction > 0.97:
            return "kv_capacity"
        if self.queue_share > 0.5:
            return "queueing"
        if self.cpu_bound_share > 0.5:
            return "cpu_dispatch"
        if self.communication_share > 0.3:
            return "communication"
        return (
            "compute"
            if self.gemm_share * self.mean_batch_tokens > 0 and self.mean_batch_tokens > 256
            else "memory_bandwidth"
        )


@dataclass(frozen=True, slots=True)
class KvTransfer:
    """Moving a request's KV cache from a prefill instance to a decode instance."""

    kv_bytes_per_token: float
    bandwidth_bytes_per_s: float
    latency_s: float = 2.0e-4

    def time_s(self, tokens: int) -> float:
        """Transfer time of ``tokens`` tokens of KV cache."""
        return self.latency_s + tokens * self.kv_bytes_per_token / self.bandwidth_bytes_per_s


_ARRIVE, _DECODE_ARRIVE, _STEP_DONE = 0, 1, 2


class _Simulation:
    def __init__(
        self,
        entry: list[InstanceConfig],
        decode: list[InstanceConfig],
        transfer: KvTransfer | None,
        sample: RequestSample,
        arrival: ArrivalKind,
        rate_per_s: float,
        concurrency: int,
        closed_loop_ramp_s: float = 0.0,
        profiled_rounds: int = 0,
        router: str = "round_robin",
        router_seed: int = 0,
        max_sequence_steps: int = MAX_SEQUENCE_STEPS,
        checkpoint: Callable[[], None] | None = None,
    ) -> None:
        self.max_sequence_steps = max_sequence_steps
        self.checkpoint = checkpoint
        self.budget_cut = False
        self.sequence_steps = 0
        if router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}; use one of {', '.join(ROUTERS)}")
        self.router = router
        self.router_rng = random.Random(router_seed)
        self.ramp_s = closed_loop_ramp_s
        self.profiled_rounds = profiled_rounds
        self.entry = [SimInstance(c, i) for i, c in enumerate(entry)]
        self.decode = [SimInstance(c, len(entry) + i) for i, c in enumerate(decode)]
        self.instances = self.entry + self.decode
        self.schedulers: list[BatchScheduler] = [
            self.scheduler_for(inst, sample, arrival, concurrency) for inst in self.instances
        ]
        self.transfer = transfer
        self.sample = sample
        self.arrival = arrival
        self.rate = rate_per_s
        self.concurrency = concurrency
        self.heap: list[tuple[float, int, int, int, SimRequest | None]] = []
        self.counter = 0
        self.issued = 0
        self.finished: list[SimRequest] = []
        self.next_entry = 0
        self.now = 0.0
        self.request_overhead_s = self.entry[0].config.knobs.request_overhead_s if self.entry else 0.0
        self.prefixes = sample.prefixes
        if self.prefixes is not None:
            # Every replica of a server that served this traffic before holds the same prefixes.
            warm_prefixes = self.prefixes.warm_prefix_tokens() if self.prefixes.warm else []
            for inst in self.entry:
                knobs = inst.config.knobs
                if knobs.prefix_caching:
                    capacity = inst.config.kv_capacity_tokens // knobs.kv_block_tokens
                    inst.prefix_cache = PrefixCache(capacity, knobs.kv_block_tokens)
                    inst.prefix_cache.warm(warm_prefixes)

    def scheduler_for(
        self, inst: SimInstance, sample: RequestSample, arrival: ArrivalKind, concurrency: int
    ) -> BatchScheduler:
        scheduler = make_scheduler(inst.config.knobs)
        knobs = inst.config.knobs
        if knobs.prompt_sized_token_budget and not knobs.chunked_prefill and inst.config.role is not Role.DECODE:
            # Benchmarked TRT-LLM deployments size max_num_tokens to the batch plus the prompt (see docs/ENGINES.md).
            batch = knobs.max_sequences
            if arrival is ArrivalKind.CLOSED and concurrency > 0:
                batch = min(batch, -(-concurrency // max(1, len(self.entry))))
            if inst.config.role is Role.PREFILL:
                batch = 0
            longest = int(sample.input_tokens.max()) if sample.input_tokens.size else 0
            scheduler.token_budget = prompt_sized_budget_tokens(batch, longest)
        return scheduler

    def push(self, time_s: float, kind: int, instance: int, request: SimRequest | None) -> None:
        self.counter += 1
        heapq.heappush(self.heap, (time_s, self.counter, kind, instance, request))

    def issue(self, time_s: float) -> None:
        i = self.issued
        if i >= self.sample.input_tokens.size:
            return
        self.issued += 1
        req = SimRequest(i, int(self.sample.input_tokens[i]), int(self.sample.output_tokens[i]), time_s)
        req.prompt_tokens = req.input_tokens
        if self.prefixes is not None and self.prefixes.group[i] >= 0:
            req.group = int(self.prefixes.group[i])
            req.shared_tokens = int(self.prefixes.shared_tokens[i])
            req.cacheable_tokens = int(self.prefixes.cacheable_tokens[i])
        self.push(time_s, _ARRIVE, 0, req)

    def run(self) -> SimulationResult:
        total = int(self.sample.input_tokens.size)
        if self.arrival is ArrivalKind.CLOSED:
            clients = min(self.concurrency, total)
            for client in range(clients):
                self.issue(self.ramp_s * client / clients)
        else:
            times = self.sample.arrivals_at(self.rate)
            for _ in range(total):
                self.issue(float(times[self.issued]))
        steps = work = 0
        while self.heap:
            time_s, counter, kind, idx, req = heapq.heappop(self.heap)
            if kind == _STEP_DONE and counter != self.instances[idx].pending_event:
                continue  # a fast-forwarded run that an arrival cut short
            self.now = time_s
            if kind == _ARRIVE:
                assert req is not None
                inst = self.route()
                if inst.busy and inst.config.knobs.overlap_scheduling:
                    inst.inbox.append((self.now, req))
                else:
                    inst.waiting.append(req)
                self.cut_fast_forward(inst)
                self.kick(inst)
            elif kind == _DECODE_ARRIVE:
                assert req is not None
                inst = min(self.decode, key=SimInstance.load)
                inst.waiting.append(req)
                self.cut_fast_forward(inst)
                self.kick(inst)
            else:
                inst = self.instances[idx]
                # Work is what the simulator does per step: one unit per sequence the scheduler walks (the running
                # ones, batched or not) plus the step's own cost, which weighs about as much as 40 sequences (costing
                # the batch, the event); a fast-forwarded run of decode steps counts as one step.
                work += max(len(inst.batch), len(inst.running)) + STEP_SEQUENCE_EQUIVALENT
                self.finish_step(inst)
                self.admit_inbox(inst, before_s=inst.step_start_s)
                self.kick(inst)
                steps += 1
                if self.checkpoint is not None and steps % CHECKPOINT_EVERY_STEPS == 0:
                    self.checkpoint()
                if steps > MAX_STEPS or work > self.max_sequence_steps:
                    self.budget_cut = True
                    break
        self.sequence_steps = work
        return self.result(total)

    def route(self) -> SimInstance:
        """The entry instance the router sends the next request to."""
        if self.router == "round_robin" or len(self.entry) == 1:
            inst = self.entry[self.next_entry % len(self.entry)]
            self.next_entry += 1
            return inst
        if self.router == "random":
            return self.entry[self.router_rng.randrange(len(self.entry))]
        # Fewest requests queued or running; ties to the first instance.
        return min(self.entry, key=SimInstance.load)

    def admit_inbox(self, inst: SimInstance, *, before_s: float) -> None:
        """Hand the scheduler the requests that arrived before ``before_s`` (all of them: ``inf``)."""
        while inst.inbox and inst.inbox[0][0] <= before_s:
            inst.waiting.append(inst.inbox.popleft()[1])

    def kick(self, inst: SimInstance) -> None:
        if inst.busy:
            return
        batch = self.form_batch(inst)
        if not batch and inst.inbox:
            # Nothing left to run: the engine loop polls its input at once.
            self.admit_inbox(inst, before_s=math.inf)
            batch = self.form_batch(inst)
        if not batch:
            return
        inst.batch = batch
        inst.step_start_s = self.now
        duration, repeat = self.batch_duration(inst, batch)
        inst.busy = True
        inst.steps += repeat
        self.push(self.now + duration, _STEP_DONE, inst.index, None)
        inst.pending_event = self.counter
        inst.busy_s += duration

    def cut_fast_forward(self, inst: SimInstance) -> None:
        """End a fast-forwarded run at the step in flight now, so a new arrival is scheduled on time."""
        if not inst.busy or inst.ff_steps <= 1:
            return
        first, slope = inst.ff_first_s, inst.ff_slope_s
        elapsed = self.now - inst.ff_start_s
        # Steps k take first + slope*(k-1): the run's first k steps end at k*first + slope*k*(k-1)/2.
        if slope > 0:
            b = first - slope / 2
            k = math.ceil((-b + math.sqrt(b * b + 2 * slope * max(0.0, elapsed))) / slope - 1e-12)
        else:
            k = math.ceil(elapsed / first - 1e-12) if first > 0 else inst.ff_steps
        k = max(1, min(inst.ff_steps, k))
        if k >= inst.ff_steps:
            return
        old_s = inst.ff_steps * first + slope * inst.ff_steps * (inst.ff_steps - 1) / 2
        new_s = k * first + slope * k * (k - 1) / 2
        inst.batch = [(req, k) for req, _ in inst.batch]
        dropped = inst.ff_steps - k
        gemm_s, attention_s, communication_s, seqs, cpu_bound = inst.ff_step
        inst.busy_s -= old_s - new_s
        inst.steps -= dropped
        inst.gemm_s -= gemm_s * dropped
        inst.attention_s -= attention_s * dropped
        inst.communication_s -= communication_s * dropped
        inst.batch_tokens -= seqs * dropped
        if cpu_bound:
            inst.cpu_bound_s -= old_s - new_s
        inst.ff_steps = k
        self.push(inst.ff_start_s + new_s, _STEP_DONE, inst.index, None)
        inst.pending_event = self.counter

    def form_batch(self, inst: SimInstance) -> Batch:
        return self.schedulers[inst.index].form_batch(inst, self.now)

    # Timing ---------------------------------------------------------------------------------------

    def batch_duration(self, inst: SimInstance, batch: list[tuple[SimRequest, int]]) -> tuple[float, int]:
        prefill_tokens = decode_seqs = prefill_seqs = chunks = 0
        key_pairs = kv_read = decode_ctx = query_tiles = key_tiles = longest = 0.0
        cost = inst.config.cost
        for req, tokens in batch:
            if req.in_prefill:
                past = req.prefilled
                chunks += 1
                prefill_tokens += tokens
                key_pairs += tokens * (past + (tokens + 1) / 2.0)
                kv_read += past + tokens
                tiles = cost.chunk_tiles(past, tokens)
                query_tiles += tiles[0]
                key_tiles += tiles[1]
                longest = max(longest, tiles[2])
                if past + tokens >= req.prompt_tokens:
                    prefill_seqs += 1
            else:
                decode_seqs += 1
                decode_ctx += req.context
        step = cost.step(
            prefill_tokens=prefill_tokens,
            prefill_key_pairs=key_pairs,
            prefill_kv_tokens=kv_read,
            prefill_sequences=prefill_seqs,
            prefill_tiles=(query_tiles, key_tiles, longest),
            prefill_chunks=chunks,
            decode_sequences=decode_seqs,
            decode_context_tokens=decode_ctx,
        )
        repeat = 1
        duration = step.total_s
        if prefill_tokens == 0 and decode_seqs > 0:
            duration, repeat = self.fast_forward(inst, batch, step.total_s, decode_seqs, decode_ctx)
            self.schedulers[inst.index].after_decode_steps(inst, repeat)
        inst.gemm_s += step.gemm_s * repeat
        inst.attention_s += step.attention_s * repeat
        inst.communication_s += step.communication_s * repeat
        if step.cpu_s >= step.gpu_s:
            inst.cpu_bound_s += duration
        inst.batch_tokens += (prefill_tokens + decode_seqs) * repeat
        inst.ff_step = (step.gemm_s, step.attention_s, step.communication_s, decode_seqs, step.cpu_s >= step.gpu_s)
        return duration, repeat

    def fast_forward(
        self, inst: SimInstance, batch: list[tuple[SimRequest, int]], first_s: float, seqs: int, ctx: float
    ) -> tuple[float, int]:
        """Run several identical decode steps at once while nothing else can change the batch."""
        inst.ff_steps = 1
        if inst.inbox or (
            inst.config.role is not Role.PREFILL and self.schedulers[inst.index].admission_possible(inst)
        ):
            return first_s, 1
        # Events of other instances cannot change this batch; an arrival routed here cuts the run short
        # (cut_fast_forward), so the run goes on until a request finishes or the KV blocks run out.
        horizon = math.inf
        remaining = min(req.output_tokens - req.generated for req, _ in batch)
        block = inst.config.knobs.kv_block_tokens
        free_blocks = inst.kv_free // block
        kv_steps = block * max(0, free_blocks // max(1, seqs) - 1)
        limit = max(1, min(remaining, kv_steps + 1))
        if limit == 1:
            return first_s, 1
        cost = inst.config.cost
        total = first_s
        steps = 1
        # Decode step time is affine in the context sum; sample it at the end to interpolate.
        last = cost.step(decode_sequences=seqs, decode_context_tokens=ctx + seqs * (limit - 1)).total_s
        # Overlapped steps take max(CPU, GPU): where the two cross inside the run the step time is not
        # affine, so shorten the run until its midpoint lies on the line through its ends.
        while limit > 2:
            middle = (limit - 1) // 2
            mid_s = cost.step(decode_sequences=seqs, decode_context_tokens=ctx + seqs * middle).total_s
            line_s = first_s + (last - first_s) * middle / (limit - 1)
            if abs(mid_s - line_s) <= 1e-6 * abs(line_s):
                break
            limit = middle + 1
            last = mid_s
        if limit <= 1:
            return first_s, 1
        slope = (last - first_s) / (limit - 1)
        # Steps k = 0..n-1 take first_s + slope*k; run while the next event has not arrived.
        # Closed form of the step-by-step loop, then a short exact walk to absorb rounding.
        room = horizon - self.now
        if math.isinf(room):
            steps = limit
        else:
            if slope > 0:
                disc = (first_s - slope / 2) ** 2 + 2 * slope * room
                guess = int(((-(first_s - slope / 2)) + math.sqrt(max(disc, 0.0))) / slope)
            else:
                guess = int(room / first_s) if first_s > 0 else limit
            steps = max(1, min(limit, guess - 1))
        total = steps * first_s + slope * steps * (steps - 1) / 2
        while steps > 1 and self.now + total - (first_s + slope * (steps - 1)) >= horizon:
            # The guess ran past the event: step back until the last step started before it.
            steps -= 1
            total -= first_s + slope * steps
        while steps < limit and self.now + total < horizon:
            total += first_s + slope * steps
            steps += 1
        inst.batch = [(req, steps) for req, _ in batch]
        for req, _ in batch:
            # KV for the extra tokens is claimed up front; it was checked against the free blocks.
            inst.grow_kv(req, req.context + steps)
        inst.ff_start_s, inst.ff_first_s, inst.ff_slope_s, inst.ff_steps = self.now, first_s, slope, steps
        return total, steps

    def finish_step(self, inst: SimInstance) -> None:
        inst.busy = False
        for req, tokens in inst.batch:
            if req.in_prefill:
                req.prefilled += tokens
                if inst.prefix_cache is not None and req.group >= 0:
                    inst.offer_computed(req)
                if req.in_prefill:
                    continue
                req.generated += 1
                if math.isnan(req.first_token_s) and inst.config.role is not Role.PREFILL:
                    req.first_token_s = self.now
                if inst.config.role is Role.PREFILL and req.generated < req.output_tokens:
                    inst.running.remove(req)
                    inst.release(req)
                    assert self.transfer is not None
                    req.prefilled = req.prompt_tokens = req.context
                    self.push(self.now + self.transfer.time_s(req.context), _DECODE_ARRIVE, 0, req)
                    continue
            else:
                req.generated += tokens
            if req.generated >= req.output_tokens:
                if math.isnan(req.first_token_s):
                    req.first_token_s = self.now
                req.finish_s = self.now
                inst.running.remove(req)
                inst.release(req)
                self.finished.append(req)
                if self.arrival is ArrivalKind.CLOSED:
                    self.issue(self.now)
        inst.batch = []

    def result(self, total: int) -> SimulationResult:
        done = self.finished
        arrival = np.array([r.arrival_s for r in done])
        first = np.array([r.first_token_s for r in done])
        finish = np.array([r.finish_s for r in done])
        outputs = np.array([r.output_tokens for r in done], dtype=np.float64)
        # The API server's time per request overlaps the engine's work on the others: it adds to what the client
        # sees, not to the engine's timeline.
        ttft = first - arrival + self.request_overhead_s
        tpot = np.where(outputs > 1, (finish - first) / np.maximum(outputs - 1, 1), 0.0)
        start = float(arrival.min()) if done else 0.0
        duration = float(finish.max()) - start if done else 0.0
        instances = self.entry + self.decode
        busy = sum(i.busy_s for i in instances)
        steps = sum(i.steps for i in instances)
        span = max(duration, 1e-12) * len(instances)
        queue = float(np.mean(ttft / np.maximum(finish - arrival, 1e-12))) if done else 0.0
        weights = rounds = None
        if self.arrival is ArrivalKind.CLOSED and self.concurrency > 0:
            # Closed loop: requests are issued in order, so request i belongs to round i // concurrency.
            rounds = np.array([r.index // self.concurrency for r in done], dtype=np.int64)
            simulated = -(-total // self.concurrency)
            if self.profiled_rounds > simulated >= 3:
                # The last round drains (clients stop, batches shrink) as the benchmark's last round does; the
                # round before it stands for itself and the steady rounds that were not simulated.
                weights = np.where(rounds == simulated - 2, float(self.profiled_rounds - simulated + 1), 1.0)
        return SimulationResult(
            ttft_s=ttft,
            tpot_s=tpot,
            e2e_s=finish - arrival + self.request_overhead_s,
            output_tokens=outputs,
            duration_s=duration,
            completed=len(done),
            offered=total,
            busy_fraction=busy / span,
            gemm_share=sum(i.gemm_s for i in instances) / max(busy, 1e-12),
            attention_share=sum(i.attention_s for i in instances) / max(busy, 1e-12),
            communication_share=sum(i.communication_s for i in instances) / max(busy, 1e-12),
            cpu_bound_share=sum(i.cpu_bound_s for i in instances) / max(busy, 1e-12),
            mean_batch_tokens=sum(i.batch_tokens for i in instances) / max(steps, 1),
            peak_kv_fraction=max(i.peak_kv / max(i.config.kv_capacity_tokens, 1) for i in instances),
            preemptions=sum(i.preemptions for i in instances),
            queue_share=queue,
            weights=weights,
            rounds=rounds,
            budget_cut=self.budget_cut,
            sequence_steps=self.sequence_steps,
            prefix_hit_tokens=sum(i.prefix_cache.hit_tokens for i in instances if i.prefix_cache is not None),
            prefix_looked_up_tokens=sum(
                i.prefix_cache.looked_up_tokens for i in instances if i.prefix_cache is not None
            ),
        )


def simulate(
    *,
    instances: list[InstanceConfig],
    sample: RequestSample,
    arrival: ArrivalKind,
    rate_per_s: float = 0.0,
    concurrency: int = 0,
    decode_instances: list[InstanceConfig] | None = None,
    transfer: KvTransfer | None = None,
    closed_loop_ramp_s: float = 0.0,
    profiled_rounds: int = 0,
    router: str = "round_robin",
    router_seed: int = 0,
    max_sequence_steps: int = MAX_SEQUENCE_STEPS,
    checkpoint: Callable[[], None] | None = None,
) -> SimulationResult:
    """Simulate requests through collocated instances, or prefill instances feeding decode instances.

    ``checkpoint`` is called every CHECKPOINT_EVERY_STEPS engine steps; what it raises stops the simulation.
    """
    decode = decode_instances or []
    if decode and transfer is None:
        raise ValueError("disaggregated simulation needs a KV transfer model")
    return _Simulation(
        instances,
        decode,
        transfer,
        sample,
        arrival,
        rate_per_s,
        concurrency,
        closed_loop_ramp_s,
        profiled_rounds,
        router,
        router_seed,
        max_sequence_steps,
        checkpoint,
    ).run()
