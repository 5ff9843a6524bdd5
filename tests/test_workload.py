"""Request samples: length distributions' text forms, explicit arrival times, gamma arrivals, repeats and routing."""

from __future__ import annotations

import numpy as np
import pytest

from service.planning.specs import PlanningError
from service.planning.trace import trace_from_records
from service.planning.workload import (
    ArrivalKind,
    LengthDistribution,
    LengthKind,
    Workload,
    sample_requests,
)


@pytest.mark.parametrize(
    ("text", "described"),
    [
        ("512", "512"),
        ("fixed:64", "64"),
        ("uniform:100:200", "uniform:100:200"),
        ("normal:300:50", "normal:300:50"),
        ("lognormal:300:0", "lognormal:300:0"),
    ],
)
def test_lengths_parse_and_describe_themselves(text: str, described: str) -> None:
    assert LengthDistribution.parse(text).describe() == described


def test_samples_describe_their_count_and_mean() -> None:
    assert LengthDistribution.from_samples([100, 200, 600]).describe() == "samples(n=3, mean=300)"


@pytest.mark.parametrize(
    ("distribution", "message"),
    [
        (LengthDistribution(LengthKind.UNIFORM, low=300, high=200), "invalid length distribution: uniform:300:200"),
        (LengthDistribution(LengthKind.NORMAL, mean=0, std=5), "invalid length distribution: normal:0:5"),
        (LengthDistribution(LengthKind.FIXED, value=0), "invalid length distribution: 0"),
    ],
)
def test_inverted_or_empty_lengths_are_refused(distribution: LengthDistribution, message: str) -> None:
    with pytest.raises(PlanningError) as refused:
        distribution.validate()
    assert str(refused.value) == message
    with pytest.raises(PlanningError, match="use N, uniform:LOW:HIGH"):
        LengthDistribution.parse("fixed:1:2")
    with pytest.raises(PlanningError, match="invalid length distribution: samples"):
        LengthDistribution.from_samples([5, 0])


def _workload(**fields: object) -> Workload:
    base: dict[str, object] = {
        "arrival": ArrivalKind.POISSON,
        "input_length": LengthDistribution.fixed(100),
        "output_length": LengthDistribution.fixed(10),
        "rate_per_s": 2.0,
        "num_requests": 4,
    }
    return Workload(**{**base, **fields})  # type: ignore[arg-type]


def test_explicit_arrival_times_are_kept_as_unit_rate_offsets() -> None:
    sample = sample_requests(_workload(arrival_times_s=(10.0, 10.5, 12.0, 13.0)))
    # Offsets from the first arrival x the rate (2/s): arrivals_at(2) gives back the recorded gaps.
    assert sample.unit_arrival_s.tolist() == [0.0, 1.0, 4.0, 6.0]
    assert sample.arrivals_at(2.0).tolist() == [0.0, 0.5, 2.0, 3.0]


def test_gamma_arrivals_have_the_asked_variation() -> None:
    sample = sample_requests(_workload(arrival=ArrivalKind.GAMMA, cv=3.0, num_requests=5000, seed=3))
    gaps = np.diff(sample.unit_arrival_s)
    assert sample.unit_arrival_s[0] == 0.0
    # Unit-rate gaps of mean 1 and coefficient of variation 3 (5000 draws: within 10%).
    assert float(np.mean(gaps)) == pytest.approx(1.0, rel=0.1)
    assert float(np.std(gaps) / np.mean(gaps)) == pytest.approx(3.0, rel=0.1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_requests": 0}, "requests must be at least 1"),
        ({"arrival": ArrivalKind.CLOSED, "concurrency": 0}, "closed-loop workloads need a concurrency of at least 1"),
        ({"rate_per_s": 0.0}, "poisson arrivals need a positive rate (got 0)"),
    ],
)
def test_a_malformed_workload_is_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(PlanningError) as refused:
        _workload(**fields).validate()
    assert str(refused.value) == message


def test_a_replayed_trace_needs_a_rate_and_scales_its_time() -> None:
    trace = trace_from_records([{"arrival_s": float(i), "input_tokens": 10, "output_tokens": 2} for i in range(5)])
    replay = _workload(trace=trace, rate_per_s=2 * trace.rate_per_s)
    # Twice the recorded rate: the recorded offsets are halved.
    assert replay.time_scale == pytest.approx(0.5)
    assert _workload(rate_per_s=3.0).time_scale == 1.0
    with pytest.raises(PlanningError, match="a replayed trace needs a positive rate"):
        _workload(trace=trace, rate_per_s=0.0).validate()


def test_repeating_a_sample_keeps_its_prefix_plan_and_spaces_the_copies() -> None:
    workload = _workload(
        arrival=ArrivalKind.CONSTANT,
        shared_prefix_tokens=40,
        prefix_hit_rate=1.0,
        input_length=LengthDistribution.fixed(100),
    )
    sample = sample_requests(workload)
    assert sample.prefixes is not None
    # Constant arrivals at unit rate: 0, 1, 2, 3; one gap after the last, the copy starts at 4.
    twice = sample.repeated(2)
    assert twice.unit_arrival_s.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert twice.prefixes is not None
    assert twice.prefixes.shared_tokens.tolist() == [40] * 8
    assert twice.prefixes.group.tolist() == [0] * 8
    # head() repeats a shorter sample; thinned() to one part is the sample itself.
    assert sample.head(6).size == 6
    assert sample.thinned(1, seed=0) is sample
    assert sample.strided(1) is sample
    assert sample.strided(2).unit_arrival_s.tolist() == [0.0, 2.0]


def test_a_random_router_that_sends_nothing_to_a_target_still_leaves_it_one_request() -> None:
    one = sample_requests(_workload(num_requests=1))
    # With 1000 targets the single request most likely goes elsewhere: the first target keeps one request anyway.
    picked = [one.thinned(1000, seed=s).size for s in range(5)]
    assert picked == [1, 1, 1, 1, 1]
