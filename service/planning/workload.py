"""Workloads: arrival processes and request-length distributions, sampled deterministically by seed."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from service.planning.specs import PlanningError

if TYPE_CHECKING:
    from service.planning.trace import Trace

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


class ArrivalKind(StrEnum):
    """How requests arrive."""

    POISSON = "poisson"
    GAMMA = "gamma"
    CONSTANT = "constant"
    CLOSED = "closed"


class ClientStart(StrEnum):
    """How closed-loop clients start: the benchmark client's protocol, all at t=0, or spread out."""

    # aiperf --concurrency C --num-requests 20C --warmup-request-count 2C (aiconfigurator bench_run.sh.j2):
    # the warm-up phase drains before profiling, then all C clients fire at once and each sends its next
    # request when the previous one completes; every profiled request counts.
    BENCHMARK = "benchmark"
    BURST = "burst"
    STAGGERED = "staggered"


# Profiled requests per client in aiconfigurator's aiperf sweep (BENCH_MULTI_ROUND, 20 since v0.8.0).
BENCHMARK_REQUESTS_PER_CLIENT = 20
# Bounds of a workload's numbers: a lower rate is a day between requests, and seeds are numpy's (non-negative).
MIN_RATE_PER_S = 1e-6
MAX_SEED = 2**63 - 1


class LengthKind(StrEnum):
    """Shapes of a token-length distribution."""

    FIXED = "fixed"
    UNIFORM = "uniform"
    NORMAL = "normal"
    LOGNORMAL = "lognormal"
    SAMPLES = "samples"


@dataclass(frozen=True, slots=True)
class LengthDistribution:
    """A distribution of token counts (fixed, uniform low..high, normal mean/std, lognormal, or samples)."""

    kind: LengthKind
    value: float = 0.0
    low: float = 0.0
    high: float = 0.0
    mean: float = 0.0
    std: float = 0.0
    samples: tuple[int, ...] = ()

    @classmethod
    def fixed(cls, tokens: int) -> LengthDistribution:
        """Every request has exactly ``tokens`` tokens."""
        return cls(LengthKind.FIXED, value=float(tokens))

    @classmethod
    def parse(cls, text: str) -> LengthDistribution:
        """Parse '1024', 'uniform:LOW:HIGH', 'normal:MEAN:STD' or 'lognormal:MEAN:STD'."""
        parts = text.strip().split(":")
        try:
            if len(parts) == 1:
                dist = cls.fixed(int(parts[0]))
            elif parts[0] == "fixed" and len(parts) == 2:
                dist = cls.fixed(int(parts[1]))
            elif parts[0] == "uniform" and len(parts) == 3:
                dist = cls(LengthKind.UNIFORM, low=float(parts[1]), high=float(parts[2]))
            elif parts[0] in ("normal", "lognormal") and len(parts) == 3:
                dist = cls(LengthKind(parts[0]), mean=float(parts[1]), std=float(parts[2]))
            else:
                raise ValueError
        except ValueError:
            raise PlanningError(
                f"bad length {text!r}: use N, uniform:LOW:HIGH, normal:MEAN:STD or lognormal:MEAN:STD"
            ) from None
        dist.validate()
        return dist

    @classmethod
    def from_samples(cls, samples: list[int] | tuple[int, ...]) -> LengthDistribution:
        """Resample from observed lengths (a dataset's column)."""
        dist = cls(LengthKind.SAMPLES, samples=tuple(int(s) for s in samples))
        dist.validate()
        return dist

    def validate(self) -> None:
        """Refuse non-positive or inverted parameters."""
        bad = (
            (self.kind is LengthKind.FIXED and self.value < 1)
            or (self.kind is LengthKind.UNIFORM and not 1 <= self.low <= self.high)
            or (self.kind in (LengthKind.NORMAL, LengthKind.LOGNORMAL) and (self.mean < 1 or self.std < 0))
            or (self.kind is LengthKind.SAMPLES and (not self.samples or min(self.samples) < 1))
        )
        if bad:
            raise PlanningError(f"invalid length distribution: {self.describe()}")

    def describe(self) -> str:
        """Short text form."""
        if self.kind is LengthKind.FIXED:
            return str(int(self.value))
        if self.kind is LengthKind.UNIFORM:
            return f"uniform:{self.low:g}:{self.high:g}"
        if self.kind is LengthKind.SAMPLES:
            return f"samples(n={len(self.samples)}, mean={np.mean(self.samples):.0f})"
        return f"{self.kind.value}:{self.mean:g}:{self.std:g}"

    def sample(self, rng: np.random.Generator, count: int) -> IntArray:
        """Draw ``count`` lengths (at least 1 token each)."""
        if self.kind is LengthKind.FIXED:
            values = np.full(count, self.value)
        elif self.kind is LengthKind.UNIFORM:
            values = rng.uniform(self.low, self.high + 1, count)
        elif self.kind is LengthKind.NORMAL:
            values = rng.normal(self.mean, self.std, count)
        elif self.kind is LengthKind.LOGNORMAL:
            # Parameterised by the distribution's own mean and standard deviation.
            sigma2 = np.log1p((self.std / self.mean) ** 2)
            values = rng.lognormal(np.log(self.mean) - sigma2 / 2, np.sqrt(sigma2), count)
        else:
            values = rng.choice(np.asarray(self.samples, dtype=np.float64), count)
        lengths: IntArray = np.maximum(1, np.floor(values)).astype(np.int64)
        return lengths

    def mean_tokens(self) -> float:
        """Expected length."""
        if self.kind is LengthKind.FIXED:
            return self.value
        if self.kind is LengthKind.UNIFORM:
            return (self.low + self.high) / 2
        if self.kind is LengthKind.SAMPLES:
            return float(np.mean(self.samples))
        return self.mean

    def max_tokens(self) -> int:
        """A practical upper bound (the 99.9th percentile for unbounded shapes)."""
        if self.kind is LengthKind.FIXED:
            return int(self.value)
        if self.kind is LengthKind.UNIFORM:
            return int(self.high)
        if self.kind is LengthKind.SAMPLES:
            return max(self.samples)
        if self.kind is LengthKind.NORMAL:
            return int(self.mean + 3.1 * self.std)
        sigma2 = np.log1p((self.std / self.mean) ** 2)
        return int(np.exp(np.log(self.mean) - sigma2 / 2 + 3.1 * np.sqrt(sigma2)))


@dataclass(frozen=True, slots=True)
class Workload:
    """Traffic offered to a deployment: how requests arrive and how long they are."""

    arrival: ArrivalKind
    input_length: LengthDistribution
    output_length: LengthDistribution
    rate_per_s: float = 0.0
    concurrency: int = 0
    # Coefficient of variation of inter-arrival gaps for the gamma process.
    cv: float = 1.0
    num_requests: int = 400
    seed: int = 0
    # Optional replayed arrival offsets in seconds (from a trace file), used as given.
    arrival_times_s: tuple[float, ...] = field(default=())
    # Closed-loop clients start all at t=0 (a benchmark burst) or spread over one request lifetime.
    closed_loop_staggered: bool = False
    # Closed loop: client rounds the benchmark profiles (0: just the simulated requests). Later rounds of
    # fixed-length requests settle into a steady pattern, so the simulation stops once two rounds agree and
    # its last round stands for the rest.
    profiled_rounds: int = 0
    # Requests replayed as recorded (arrivals, lengths, prefix groups); the rate rescales its time offsets.
    trace: Trace | None = None
    # Leading prompt tokens shared by a share (prefix_hit_rate) of the sampled requests: a system prompt.
    shared_prefix_tokens: int = 0
    prefix_hit_rate: float = 1.0
    # The prefix cache starts warm: every shared prefix cached, as on a server that served this traffic before
    # (a benchmark's later stage, a long-running deployment). Off: the run starts on a cold server.
    prefix_cache_warm: bool = False
    # Work budget in sequence-steps (one sequence in one engine step): a simulation stops there and says so.
    max_sequence_steps: int = 200_000_000

    @property
    def time_scale(self) -> float:
        """Factor on a trace's recorded time offsets at this workload's rate (2: half the recorded rate)."""
        if self.trace is None or not self.rate_per_s > 0:
            return 1.0
        return self.trace.rate_per_s / self.rate_per_s

    def validate(self) -> None:
        """Refuse workloads that cannot be simulated."""
        if self.num_requests < 1:
            raise PlanningError("requests must be at least 1")
        if self.shared_prefix_tokens < 0:
            raise PlanningError("shared prefix tokens must be at least 0")
        if not 0.0 <= self.prefix_hit_rate <= 1.0:
            raise PlanningError(f"prefix hit rate must be between 0 and 1 (got {self.prefix_hit_rate:g})")
        if self.trace is not None:
            if not self.rate_per_s > 0:
                raise PlanningError("a replayed trace needs a positive rate (its own, or one to rescale it to)")
            return
        if self.arrival is ArrivalKind.CLOSED:
            if self.concurrency < 1:
                raise PlanningError("closed-loop workloads need a concurrency of at least 1")
        elif not self.arrival_times_s and not self.rate_per_s > 0:
            raise PlanningError(f"{self.arrival.value} arrivals need a positive rate (got {self.rate_per_s:g})")
        if self.arrival is ArrivalKind.GAMMA and not self.cv > 0:
            raise PlanningError("gamma arrivals need a positive cv")
        self.input_length.validate()
        self.output_length.validate()

    def with_rate(self, rate_per_s: float) -> Workload:
        """The same workload at another request rate."""
        return replace(self, rate_per_s=rate_per_s, arrival_times_s=())


@dataclass(frozen=True, slots=True)
class PrefixPlan:
    """What each request may reuse of earlier requests' KV cache (see service/planning/prefix_cache.py)."""

    # Prefix group of each request (-1: none): requests of a group start with the same tokens.
    group: IntArray
    # Leading prompt tokens earlier requests of the group computed (a warm cache skips their prefill).
    shared_tokens: IntArray
    # Leading context tokens this request leaves in the cache for later requests of its group.
    cacheable_tokens: IntArray
    # The cache starts holding each group's shared prefix, as on a server that served this traffic before.
    warm: bool = False

    def take(self, index: npt.NDArray[np.int64] | slice) -> PrefixPlan:
        """The plan of the requests at ``index``."""
        return PrefixPlan(self.group[index], self.shared_tokens[index], self.cacheable_tokens[index], self.warm)

    def warm_prefix_tokens(self) -> list[tuple[int, int]]:
        """(group, tokens) a warm cache starts with: each group's longest shared prefix, groups in first-use order."""
        grouped = self.group >= 0
        groups, first, inverse = np.unique(self.group[grouped], return_index=True, return_inverse=True)
        longest = np.zeros(groups.size, dtype=np.int64)
        np.maximum.at(longest, inverse, self.shared_tokens[grouped])
        return [(int(groups[k]), int(longest[k])) for k in np.argsort(first, kind="stable")]


@dataclass(frozen=True, slots=True)
class RequestSample:
    """Sampled requests: lengths and unit-rate arrival offsets (scaled by 1/rate when simulated)."""

    input_tokens: IntArray
    output_tokens: IntArray
    unit_arrival_s: FloatArray
    # Shared prefixes, when some requests have them (None: every prompt is unique, nothing to cache).
    prefixes: PrefixPlan | None = None

    @property
    def size(self) -> int:
        """Number of requests."""
        return int(self.input_tokens.size)

    def arrivals_at(self, rate_per_s: float) -> FloatArray:
        """Arrival times at ``rate_per_s`` (common random numbers across rates)."""
        scaled: FloatArray = self.unit_arrival_s / rate_per_s
        return scaled

    def take(self, index: npt.NDArray[np.int64] | slice) -> RequestSample:
        """The requests at ``index`` (a slice or index array), in that order, each with its own lengths."""
        return RequestSample(
            self.input_tokens[index],
            self.output_tokens[index],
            self.unit_arrival_s[index],
            None if self.prefixes is None else self.prefixes.take(index),
        )

    def head(self, count: int) -> RequestSample:
        """The first ``count`` requests, repeating the sample when it is shorter."""
        size = self.input_tokens.size
        longer = self.repeated(-(-count // size)) if count > size else self
        return longer.take(slice(0, count))

    def strided(self, step: int) -> RequestSample:
        """Every ``step``-th request: what one of ``step`` round-robin targets receives."""
        if step <= 1:
            return self
        return self.take(slice(None, None, step))

    def thinned(self, parts: int, seed: int) -> RequestSample:
        """The requests a random router sends to the first of ``parts`` targets (each request picks one uniformly)."""
        if parts <= 1:
            return self
        picks = np.random.default_rng([seed, parts, 0x5EED]).integers(0, parts, self.size)
        chosen = np.flatnonzero(picks == 0)
        if chosen.size == 0:
            chosen = np.zeros(1, dtype=np.int64)
        return self.take(chosen.astype(np.int64))

    def repeated(self, times: int) -> RequestSample:
        """The sample played `times` times back to back (a longer run with the same statistics)."""
        if times <= 1:
            return self
        size = self.input_tokens.size
        gap = float(self.unit_arrival_s[-1]) / max(1, size - 1) if size > 1 else 1.0
        period = float(self.unit_arrival_s[-1]) + gap
        offsets = np.repeat(np.arange(times, dtype=np.float64) * period, size)
        prefixes = None
        if self.prefixes is not None:
            p = self.prefixes
            prefixes = PrefixPlan(
                np.tile(p.group, times), np.tile(p.shared_tokens, times), np.tile(p.cacheable_tokens, times), p.warm
            )
        return RequestSample(
            np.tile(self.input_tokens, times),
            np.tile(self.output_tokens, times),
            np.tile(self.unit_arrival_s, times) + offsets,
            prefixes,
        )


def sample_requests(workload: Workload) -> RequestSample:
    """Draw the request sample of a workload from its seed (a trace: its requests as recorded)."""
    workload.validate()
    if workload.trace is not None:
        trace = workload.trace
        plan = (
            PrefixPlan(trace.prefix_group, trace.shared_tokens, trace.cacheable_tokens, workload.prefix_cache_warm)
            if trace.has_prefixes
            else None
        )
        # Unit-rate offsets: arrivals_at(rate) replays the recorded times scaled by the trace's rate / rate.
        return RequestSample(trace.input_tokens, trace.output_tokens, trace.arrival_s * trace.rate_per_s, plan)
    rng = np.random.default_rng(workload.seed)
    count = workload.num_requests
    inputs = workload.input_length.sample(rng, count)
    outputs = workload.output_length.sample(rng, count)
    if workload.arrival_times_s:
        times = np.asarray(workload.arrival_times_s[:count], dtype=np.float64)
        unit = (times - times[0]) * (workload.rate_per_s or 1.0)
    elif workload.arrival is ArrivalKind.POISSON:
        unit = np.cumsum(rng.exponential(1.0, count))
    elif workload.arrival is ArrivalKind.GAMMA:
        shape = 1.0 / workload.cv**2
        unit = np.cumsum(rng.gamma(shape, 1.0 / shape, count))
    elif workload.arrival is ArrivalKind.CONSTANT:
        unit = np.arange(1, count + 1, dtype=np.float64)
    else:
        unit = np.zeros(count)
    unit = unit - unit[0] if workload.arrival is not ArrivalKind.CLOSED else unit
    return RequestSample(inputs, outputs, unit.astype(np.float64), _shared_prefix_plan(workload, inputs))


def _shared_prefix_plan(workload: Workload, inputs: IntArray) -> PrefixPlan | None:
    """One shared prefix (a system prompt) at the start of a ``prefix_hit_rate`` share of the requests."""
    if workload.shared_prefix_tokens <= 0 or workload.prefix_hit_rate <= 0:
        return None
    # A stream of its own: the lengths and arrivals drawn above stay those of the same workload without a prefix.
    rng = np.random.default_rng([workload.seed, 0x9F1])
    carries = rng.random(inputs.size) < workload.prefix_hit_rate
    tokens = np.where(carries, np.minimum(inputs, workload.shared_prefix_tokens), 0).astype(np.int64)
    group = np.where(carries, 0, -1).astype(np.int64)
    return PrefixPlan(group, tokens, tokens.copy(), workload.prefix_cache_warm)
