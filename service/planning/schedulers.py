"""Iteration-level batch formation of each engine family (vLLM V1, SGLang, TRT-LLM) behind one interface."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from service.planning.memory import KV_BLOCK_TOKENS
from service.planning.prefix_cache import PrefixCache
from service.planning.specs import EngineSpec
from service.planning.stepcost import ReplicaStepCost

# SGLang sets a request's KV estimate from at most this many output tokens (SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION).
SGLANG_CLIP_MAX_NEW_TOKENS = 4096
# aiconfigurator's TRT-LLM rule sizes max_num_tokens as max_batch_size + isl + 500, in multiples of tokens_per_block.
TRTLLM_PROMPT_BUDGET_HEADROOM_TOKENS = 500
TRTLLM_TOKENS_PER_BLOCK = 32


class Role(StrEnum):
    """What an engine instance does."""

    COLLOCATED = "collocated"
    PREFILL = "prefill"
    DECODE = "decode"


class SchedulerKind(StrEnum):
    """Engine family whose batch-forming rules an instance follows."""

    VLLM = "vllm"
    SGLANG = "sglang"
    TRTLLM = "trtllm"


@dataclass(frozen=True, slots=True)
class SchedulerKnobs:
    """Iteration-level scheduler settings of one instance."""

    max_batched_tokens: int
    max_sequences: int
    chunked_prefill: bool
    mixed_batches: bool
    kv_reserve_output_fraction: float = 0.0
    scheduler: str = SchedulerKind.VLLM.value
    # vLLM: cap on one request's prefill chunk per step (0 = only the token budget limits it).
    long_prefill_token_threshold_tokens: int = 0
    # SGLang: admission ratio of remaining output tokens, decayed per decode step, reset on retraction.
    new_token_ratio_init: float = 0.7
    new_token_ratio_min: float = 0.098
    new_token_ratio_decay_steps: int = 600
    retract_decode_steps: int = 20
    max_prefill_tokens: int = 16384
    # TRT-LLM: size max_num_tokens to max_batch_size + prompt + 500 as benchmark deployments do.
    prompt_sized_token_budget: bool = False
    # API-server latency each request adds to the client's TTFT and E2E (EngineSpec.request_overhead_s).
    request_overhead_s: float = 0.0
    # Automatic prefix caching (vLLM enable_prefix_caching, SGLang radix cache, TRT-LLM enable_block_reuse).
    prefix_caching: bool = False
    # The next batch is formed while the current one runs (vLLM async scheduling, SGLang's overlap scheduler,
    # TRT-LLM's overlap scheduler): a request arriving during a step joins the batch after the next one.
    overlap_scheduling: bool = False
    # Tokens per KV-cache block: the allocation unit, and the unit a cached prefix is reused in.
    kv_block_tokens: int = KV_BLOCK_TOKENS

    @classmethod
    def from_engine(cls, engine: EngineSpec, **changes: Any) -> SchedulerKnobs:
        """``engine``'s settings (its max_num_batched_tokens and max_num_seqs as the caps), with ``changes``."""
        engine_fields = {f.name for f in fields(engine)}
        same_name = {f.name: getattr(engine, f.name) for f in fields(cls) if f.name in engine_fields}
        values = {
            "max_batched_tokens": engine.max_num_batched_tokens,
            "max_sequences": engine.max_num_seqs,
            **same_name,
            **changes,
        }
        return cls(**values)


@dataclass(slots=True, eq=False)
class SimRequest:
    """One request's progress through an instance."""

    index: int
    input_tokens: int
    output_tokens: int
    arrival_s: float
    prompt_tokens: int = 0
    prefilled: int = 0
    generated: int = 0
    kv_alloc: int = 0
    first_token_s: float = math.nan
    finish_s: float = math.nan
    preemptions: int = 0
    # Prefix caching: the request's prefix group (-1: none), the leading prompt tokens earlier requests of the
    # group computed, the leading context tokens it leaves for later ones, and the cached blocks it holds.
    group: int = -1
    shared_tokens: int = 0
    cacheable_tokens: int = 0
    cache_keys: list[int] | None = None
    # Leading blocks already offered to the cache, and whether this admission looked the prefix up.
    offered_blocks: int = 0
    looked_up: bool = False

    @property
    def context(self) -> int:
        """Tokens whose KV the request holds once its prompt is done."""
        return self.input_tokens + self.generated

    @property
    def in_prefill(self) -> bool:
        """Whether prompt tokens remain to be processed."""
        return self.prefilled < self.prompt_tokens


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    """One engine instance to simulate: its role, step cost, KV capacity and scheduler."""

    role: Role
    cost: ReplicaStepCost
    kv_capacity_tokens: int
    knobs: SchedulerKnobs


Batch = list[tuple[SimRequest, int]]


@dataclass(slots=True, eq=False)
class SimInstance:
    """Queues, KV accounting and counters of one simulated engine instance."""

    config: InstanceConfig
    index: int
    waiting: deque[SimRequest] = field(default_factory=deque)
    # Requests that arrived while a step ran on an overlapping engine, with their arrival times: the batch after
    # that step was already formed, so they wait for the one after it.
    inbox: deque[tuple[float, SimRequest]] = field(default_factory=deque)
    running: list[SimRequest] = field(default_factory=list)
    kv_used: int = 0
    busy: bool = False
    batch: Batch = field(default_factory=list)
    busy_s: float = 0.0
    gemm_s: float = 0.0
    attention_s: float = 0.0
    communication_s: float = 0.0
    cpu_bound_s: float = 0.0
    steps: int = 0
    batch_tokens: int = 0
    peak_kv: int = 0
    preemptions: int = 0
    rejected: int = 0
    # The step-done event now pending for this instance (stale ones are skipped) and the fast-forwarded
    # run it ends: start time, first step, per-step growth and step count.
    pending_event: int = 0
    # When the last step in flight started (for a fast-forwarded run, its last step).
    step_start_s: float = 0.0
    ff_start_s: float = 0.0
    ff_first_s: float = 0.0
    ff_slope_s: float = 0.0
    ff_steps: int = 0
    # Per-step figures of that run (GEMM, attention, communication seconds, sequences, CPU-bound).
    ff_step: tuple[float, float, float, int, bool] = (0.0, 0.0, 0.0, 0, False)
    # Cached prefix blocks (None: caching off, or no request shares a prefix).
    prefix_cache: PrefixCache | None = None

    @property
    def kv_free(self) -> int:
        """KV tokens not allocated to any request."""
        return self.config.kv_capacity_tokens - self.kv_used

    def load(self) -> int:
        """Requests queued or running here."""
        return len(self.inbox) + len(self.waiting) + len(self.running)

    def grow_kv(self, req: SimRequest, tokens: int) -> bool:
        """Ensure ``req`` has KV blocks for ``tokens`` tokens; False when the cache is full."""
        need = tokens - req.kv_alloc
        if need <= 0:
            return True
        block = self.config.knobs.kv_block_tokens
        blocks = -(-need // block) * block
        if blocks > self.kv_free:
            return False
        cache = self.prefix_cache
        if cache is not None:
            # Idle cached blocks sit in free memory: the allocator takes the least recently freed ones when
            # no never-cached block is left.
            untouched = self.config.kv_capacity_tokens - self.kv_used - cache.idle_tokens
            if blocks > untouched:
                cache.evict(-(-(blocks - untouched) // block))
        req.kv_alloc += blocks
        self.kv_used += blocks
        self.peak_kv = max(self.peak_kv, self.kv_used)
        return True

    def release(self, req: SimRequest) -> None:
        """Free all of ``req``'s KV blocks (its cached prefix blocks stay cached, idle once nobody holds them)."""
        if self.prefix_cache is not None and req.group >= 0:
            self.release_cached(req, self.prefix_cache)
            return
        self.kv_used -= req.kv_alloc
        req.kv_alloc = 0

    def match_prefix(self, req: SimRequest) -> None:
        """At admission: hold the cached leading blocks of ``req``'s prefix and skip their prefill."""
        cache = self.prefix_cache
        if cache is None or req.group < 0 or req.looked_up or req.kv_alloc or req.prefilled:
            return
        req.looked_up = True
        block = cache.block_tokens
        # The engine recomputes at least the last prompt token (vLLM caps a full hit at prompt - 1 tokens).
        limit = min(req.shared_tokens, req.prompt_tokens - 1) // block
        cache.looked_up_tokens += req.prompt_tokens
        if limit <= 0:
            return
        before = len(cache.idle)
        keys = cache.acquire(req.group, limit)
        if not keys:
            return
        # Blocks that were idle are in use again (held blocks already count in kv_used).
        self.kv_used += (before - len(cache.idle)) * block
        self.peak_kv = max(self.peak_kv, self.kv_used)
        tokens = len(keys) * block
        req.cache_keys = keys
        req.offered_blocks = len(keys)
        req.kv_alloc = req.prefilled = tokens
        cache.hit_tokens += tokens

    def offer_computed(self, req: SimRequest) -> None:
        """Name ``req``'s newly computed full prefix blocks in the cache, so later requests of its group reuse them."""
        cache = self.prefix_cache
        if cache is None or req.group < 0:
            return
        block = cache.block_tokens
        limit = min(req.prefilled, req.cacheable_tokens, req.kv_alloc) // block
        if limit <= req.offered_blocks:
            return
        keys = req.cache_keys if req.cache_keys is not None else []
        base = req.group * (1 << 32)
        for index in range(req.offered_blocks, limit):
            key = base + index
            # A block another request computed first stays this request's own copy (not shared).
            if cache.add_held(key):
                keys.append(key)
        req.cache_keys = keys
        req.offered_blocks = limit

    def release_cached(self, req: SimRequest, cache: PrefixCache) -> None:
        """Free ``req``'s own blocks and drop its holds; prefix blocks stay cached, the tail ones evicted first."""
        block = cache.block_tokens
        keys = req.cache_keys or []
        held_tokens = len(keys) * block
        computed = req.prefilled if req.in_prefill else req.context
        limit = min(computed, req.cacheable_tokens, req.kv_alloc) // block
        base = req.group * (1 << 32)
        # Blocks computed since the last offer (a session's answer) are kept too, freed tail first like vLLM.
        kept = sum(1 for index in range(limit - 1, req.offered_blocks - 1, -1) if cache.add_idle(base + index))
        freed_holds = cache.release(keys[::-1])
        self.kv_used -= req.kv_alloc - held_tokens + freed_holds * block
        req.kv_alloc = 0
        req.cache_keys = None
        req.offered_blocks = 0
        req.looked_up = False
        del kept  # kept blocks move from this request's own memory to idle cached memory: no change to kv_used

    def evict(self, victim: SimRequest, *, front: bool) -> None:
        """Recompute preemption: drop the cache; the request re-prefills prompt plus output so far."""
        self.running.remove(victim)
        self.release(victim)
        victim.prompt_tokens = victim.input_tokens + victim.generated
        victim.prefilled = 0
        victim.preemptions += 1
        self.preemptions += 1
        if front:
            self.waiting.appendleft(victim)
        else:
            self.waiting.append(victim)


class BatchScheduler(ABC):
    """Forms the batch of an instance's next step from its waiting and running requests."""

    def __init__(self, knobs: SchedulerKnobs) -> None:
        self.knobs = knobs
        self.token_budget = knobs.max_batched_tokens

    @abstractmethod
    def form_batch(self, inst: SimInstance, now_s: float) -> Batch:
        """The (request, tokens) pairs of the next step; empty when there is nothing to run."""

    def admission_possible(self, inst: SimInstance) -> bool:
        """Whether a waiting request might join during the next decode steps (stops fast-forwarding)."""
        return bool(inst.waiting) and len(inst.running) < self.knobs.max_sequences and inst.kv_free > 0

    def after_decode_steps(self, inst: SimInstance, steps: int) -> None:
        """Hook called after ``steps`` decode-only steps ran."""
        del inst, steps  # vLLM and TRT-LLM keep no state that decode steps change

    def admit_transferred(self, inst: SimInstance, budget: int, batch: Batch, now_s: float, reserved: int) -> Batch:
        """Disaggregated decode: requests arrive with their KV and start decoding at once."""
        while inst.waiting and budget > 0 and len(inst.running) < self.knobs.max_sequences:
            req = inst.waiting[0]
            if inst.kv_free - reserved < self.reserve_for(req) + 1:
                break
            inst.waiting.popleft()
            inst.grow_kv(req, req.context + 1)
            inst.running.append(req)
            if math.isnan(req.first_token_s):
                req.first_token_s = now_s
            batch.append((req, 1))
            budget -= 1
        return batch

    def reserve_for(self, req: SimRequest) -> int:
        """KV tokens admission must find free for ``req`` (prompt plus the reserved share of output)."""
        remaining_output = req.output_tokens - req.generated
        return req.prompt_tokens + int(self.knobs.kv_reserve_output_fraction * remaining_output)

    def decode_one(self, inst: SimInstance, req: SimRequest, *, front: bool) -> bool:
        """Claim KV for one more token of ``req``, preempting the newest requests; False if ``req`` itself went."""
        # Most steps need no new KV block: skip the allocator (a hot path).
        if req.input_tokens + req.generated + 1 <= req.kv_alloc:
            return True
        while not inst.grow_kv(req, req.context + 1):
            victim = inst.running[-1]
            inst.evict(victim, front=front)
            if victim is req:
                return False
        return True


class VllmScheduler(BatchScheduler):
    """vLLM V1: one token budget; running requests first (decodes, partial prefills), then waiting FCFS."""

    def prefill_chunk(self, req: SimRequest, budget: int) -> int | None:
        """Prompt tokens of ``req`` this step can take from ``budget``; None when an unchunked prompt must wait."""
        knobs = self.knobs
        remaining = req.prompt_tokens - req.prefilled
        chunk = min(remaining, budget)
        if knobs.long_prefill_token_threshold_tokens > 0:
            chunk = min(chunk, knobs.long_prefill_token_threshold_tokens)
        if not knobs.chunked_prefill and chunk < remaining:
            return None
        return chunk

    def form_batch(self, inst: SimInstance, now_s: float) -> Batch:
        """Running requests in order, then new prompts chunked into what is left of the budget."""
        knobs = self.knobs
        budget = self.token_budget
        batch: Batch = []
        preempted = False
        # An evicted request is out of the running list: check membership (linear) only once one was evicted.
        evictions = inst.preemptions
        if inst.config.role is Role.DECODE:
            for req in list(inst.running):
                if budget <= 0 or (inst.preemptions != evictions and req not in inst.running):
                    continue
                if self.decode_one(inst, req, front=True):
                    batch.append((req, 1))
                    budget -= 1
                else:
                    preempted = True
            return batch if preempted else self.admit_transferred(inst, budget, batch, now_s, 0)
        for req in list(inst.running):
            if budget <= 0:
                break
            if inst.preemptions != evictions and req not in inst.running:
                continue  # preempted earlier in this step
            if req.in_prefill:
                chunk = self.prefill_chunk(req, budget)
                if chunk is None or not inst.grow_kv(req, req.prefilled + chunk):
                    continue
                batch.append((req, chunk))
                budget -= chunk
                continue
            if inst.config.role is Role.PREFILL:
                continue
            # V1 preempts the last request of the running list (the newest under FCFS) until this one fits.
            if self.decode_one(inst, req, front=True):
                batch.append((req, 1))
                budget -= 1
            else:
                preempted = True
        if preempted:
            # V1 admits no waiting request in a step that had to preempt.
            return batch
        while inst.waiting and budget > 0 and len(inst.running) < knobs.max_sequences:
            req = inst.waiting[0]
            if inst.prefix_cache is not None:
                inst.match_prefix(req)
            chunk = self.prefill_chunk(req, budget)
            if chunk is None or not inst.grow_kv(req, req.prefilled + chunk):
                break
            inst.waiting.popleft()
            inst.running.append(req)
            batch.append((req, chunk))
            budget -= chunk
        return batch


class SglangScheduler(BatchScheduler):
    """SGLang: prefill batches first (decodes pause), admission by new_token_ratio, retraction when KV runs out."""

    def __init__(self, knobs: SchedulerKnobs) -> None:
        super().__init__(knobs)
        self.new_token_ratio = knobs.new_token_ratio_init
        decay_steps = max(1, knobs.new_token_ratio_decay_steps)
        self.new_token_ratio_decay = (knobs.new_token_ratio_init - knobs.new_token_ratio_min) / decay_steps

    @staticmethod
    def clipped_remaining_output(req: SimRequest) -> int:
        """Output tokens SGLang still expects from ``req`` (clipped like the engine's estimate)."""
        return min(req.output_tokens - req.generated, SGLANG_CLIP_MAX_NEW_TOKENS)

    def remaining_total_tokens(self, inst: SimInstance) -> float:
        """PrefillAdder.rem_total_tokens: free KV less the running requests' ratio-scaled future tokens."""
        future = sum(self.clipped_remaining_output(r) for r in inst.running if not r.in_prefill)
        return inst.kv_free - self.new_token_ratio * future

    def form_batch(self, inst: SimInstance, now_s: float) -> Batch:
        """A prefill batch when prompts wait and fit, else one decode step for every running request."""
        if not inst.waiting and not inst.running:
            # The idle scheduler re-initialises its estimate (self_check_during_idle).
            self.new_token_ratio = self.knobs.new_token_ratio_init
            return []
        if inst.config.role is not Role.DECODE:
            batch = self.prefill_batch(inst)
            if batch:
                if self.knobs.mixed_batches and inst.config.role is Role.COLLOCATED:
                    # enable_mixed_chunk: the running decodes ride along with the prefill batch.
                    batch.extend(self.decode_batch(inst, exclude=batch))
                return batch
        batch = self.decode_batch(inst, exclude=[])
        if inst.config.role is Role.DECODE and inst.waiting:
            reserved = int(self.new_token_ratio * sum(self.clipped_remaining_output(r) for r in inst.running))
            batch = self.admit_transferred(inst, self.token_budget - len(batch), batch, now_s, reserved)
        return batch

    def prefill_batch(self, inst: SimInstance) -> Batch:
        """PrefillAdder: the in-progress chunk first, then waiting prompts while the budgets allow."""
        knobs = self.knobs
        rem_chunk = self.token_budget
        rem_input = knobs.max_prefill_tokens
        rem_total = self.remaining_total_tokens(inst)
        batch: Batch = []
        for req in inst.running:
            if req.in_prefill and rem_chunk > 0:
                chunk = min(req.prompt_tokens - req.prefilled, rem_chunk)
                if not inst.grow_kv(req, req.prefilled + chunk):
                    break
                batch.append((req, chunk))
                rem_chunk -= chunk
                rem_input -= chunk
                rem_total -= chunk
                if req.prefilled + chunk < req.prompt_tokens:
                    return batch  # only one chunked request at a time
        if inst.config.role is Role.PREFILL:
            rem_total = float(inst.kv_free)
        while inst.waiting and rem_chunk > 0 and rem_input > 0 and len(inst.running) < knobs.max_sequences:
            req = inst.waiting[0]
            if inst.prefix_cache is not None:
                inst.match_prefix(req)
            remaining = req.prompt_tokens - req.prefilled
            expected_output = min(req.output_tokens - req.generated, SGLANG_CLIP_MAX_NEW_TOKENS)
            if inst.config.role is Role.PREFILL:
                expected_output = 0
            if remaining + expected_output >= rem_total:
                break  # AddReqResult.NO_TOKEN
            chunk = min(remaining, rem_chunk)
            if not inst.grow_kv(req, req.prefilled + chunk):
                break
            inst.waiting.popleft()
            inst.running.append(req)
            batch.append((req, chunk))
            if chunk < remaining:
                return batch  # the prompt was truncated to the chunk budget and becomes the chunked request
            rem_chunk -= chunk
            rem_input -= chunk
            # A newly admitted request reserves its whole clipped output, not the decayed ratio.
            rem_total -= remaining + expected_output
        return batch

    def decode_batch(self, inst: SimInstance, exclude: Batch) -> Batch:
        """One token for each decoding request, retracting requests first when the cache cannot hold them."""
        if inst.config.role is Role.PREFILL:
            return []
        skip = {id(req) for req, _ in exclude}
        decoding = [r for r in inst.running if not r.in_prefill and id(r) not in skip]
        if not decoding:
            return []
        need = (
            sum(1 for r in decoding if r.input_tokens + r.generated + 1 > r.kv_alloc)
            * inst.config.knobs.kv_block_tokens
        )
        if need > inst.kv_free:
            self.retract(inst, decoding)
            decoding = [r for r in inst.running if not r.in_prefill and id(r) not in skip]
        batch: Batch = []
        for req in decoding:
            if inst.grow_kv(req, req.context + 1):
                batch.append((req, 1))
        return batch

    def retract(self, inst: SimInstance, decoding: list[SimRequest]) -> None:
        """retract_decode: drop the requests with the fewest outputs until retract_decode_steps fit; reset the ratio."""
        steps = self.knobs.retract_decode_steps
        # Retraction order: most outputs kept, ties by shorter prompt; the tail of the sort goes first.
        order = sorted(decoding, key=lambda r: (r.generated, -r.input_tokens), reverse=True)
        while len(order) > 1 and inst.kv_free < len(order) * steps:
            victim = order.pop()
            inst.evict(victim, front=False)
        decoded = sum(r.generated for r in order)
        max_new = sum(r.output_tokens for r in order)
        self.new_token_ratio = min(1.0, (decoded + steps * len(order)) / max(1, max_new))

    def admission_possible(self, inst: SimInstance) -> bool:
        """Whether the head prompt could pass the ratio check even once the ratio has decayed to its floor."""
        if not inst.waiting or len(inst.running) >= self.knobs.max_sequences:
            return False
        req = inst.waiting[0]
        need = req.prompt_tokens - req.prefilled + self.clipped_remaining_output(req)
        future = sum(self.clipped_remaining_output(r) for r in inst.running if not r.in_prefill)
        # Decode steps shrink free KV faster than they shrink the ratio-scaled future: this bound only falls.
        return need < inst.kv_free - self.knobs.new_token_ratio_min * future

    def after_decode_steps(self, inst: SimInstance, steps: int) -> None:
        """Each decode step lowers the ratio by the decay, down to its floor."""
        self.new_token_ratio = max(
            self.knobs.new_token_ratio_min, self.new_token_ratio - steps * self.new_token_ratio_decay
        )


class TrtllmScheduler(BatchScheduler):
    """TRT-LLM: GUARANTEED_NO_EVICT capacity scheduling, then the MicroBatchScheduler's max_num_tokens pass."""

    def form_batch(self, inst: SimInstance, now_s: float) -> Batch:
        """Requests in arrival order; the pass stops at the first one whose tokens do not fit (it never skips)."""
        knobs = self.knobs
        budget = self.token_budget
        if inst.config.role is Role.DECODE:
            batch: Batch = []
            for req in list(inst.running):
                if budget <= 0:
                    break
                if self.decode_one(inst, req, front=True):
                    batch.append((req, 1))
                    budget -= 1
            return self.admit_transferred(inst, budget, batch, now_s, self.reserved_growth(inst))
        self.admit_capacity(inst)
        batch = []
        chunked: list[SimRequest] = []
        scheduled = 0
        for req in inst.running:
            if req.in_prefill:
                remaining = req.prompt_tokens - req.prefilled
                if knobs.chunked_prefill:
                    chunked.append(req)
                    continue
                if remaining > budget:
                    break  # microBatchScheduler.cpp: `batchNumTokens + reqNumTokens > maxNumTokens` -> break
                inst.grow_kv(req, req.prompt_tokens)
                batch.append((req, remaining))
                budget -= remaining
            else:
                if inst.config.role is Role.PREFILL:
                    continue
                if budget < 1:
                    break
                inst.grow_kv(req, req.context + 1)
                batch.append((req, 1))
                budget -= 1
            scheduled += 1
            if scheduled >= knobs.max_sequences:
                break
        for req in chunked:
            # FIRST_COME_FIRST_SERVED chunking: each context takes what is left, in order.
            if budget <= 0:
                break
            chunk = min(req.prompt_tokens - req.prefilled, budget)
            inst.grow_kv(req, req.prefilled + chunk)
            batch.append((req, chunk))
            budget -= chunk
        return batch

    def reserved_growth(self, inst: SimInstance) -> int:
        """KV tokens the running requests are still guaranteed (prompt plus reserved output not yet allocated)."""
        fraction = self.knobs.kv_reserve_output_fraction
        return sum(max(0, r.input_tokens + int(fraction * r.output_tokens) - r.kv_alloc) for r in inst.running)

    def admit_capacity(self, inst: SimInstance) -> None:
        """GUARANTEED_NO_EVICT: start waiting requests in order while their whole reservation fits."""
        reserved = self.reserved_growth(inst)
        while inst.waiting and len(inst.running) < self.knobs.max_sequences:
            req = inst.waiting[0]
            if not self.knobs.chunked_prefill and req.prompt_tokens > self.token_budget:
                # The LLM API refuses such a prompt with HTTP 400 (prompt length > max_num_tokens):
                # it never runs, and the micro-batch pass would otherwise stall behind it forever.
                inst.waiting.popleft()
                inst.rejected += 1
                continue
            if inst.prefix_cache is not None:
                inst.match_prefix(req)
            # Cached prefix blocks it holds are allocated already.
            need = self.reserve_for(req) - req.kv_alloc
            if inst.kv_free - reserved < need:
                break
            inst.waiting.popleft()
            inst.running.append(req)
            reserved += need

    def admission_possible(self, inst: SimInstance) -> bool:
        """A waiting request starts only once its full reservation fits."""
        if not inst.waiting or len(inst.running) >= self.knobs.max_sequences:
            return False
        return inst.kv_free - self.reserved_growth(inst) >= self.reserve_for(inst.waiting[0])


def prompt_sized_budget_tokens(max_batch_size: int, longest_prompt_tokens: int) -> int:
    """max_num_tokens of aiconfigurator's TRT-LLM agg rule: max_batch_size + isl + 500, rounded up to 32."""
    raw = max_batch_size + longest_prompt_tokens + TRTLLM_PROMPT_BUDGET_HEADROOM_TOKENS
    return -(-raw // TRTLLM_TOKENS_PER_BLOCK) * TRTLLM_TOKENS_PER_BLOCK


def make_scheduler(knobs: SchedulerKnobs) -> BatchScheduler:
    """The scheduler of the engine family ``knobs.scheduler`` names."""
    try:
        kind = SchedulerKind(knobs.scheduler)
    except ValueError:
        names = ", ".join(k.value for k in SchedulerKind)
        raise ValueError(f"unknown scheduler {knobs.scheduler!r}; use one of {names}") from None
    if kind is SchedulerKind.SGLANG:
        return SglangScheduler(knobs)
    if kind is SchedulerKind.TRTLLM:
        return TrtllmScheduler(knobs)
    return VllmScheduler(knobs)
