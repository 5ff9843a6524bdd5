"""Prometheus metrics: request latency, plans by status, queue depth, plan run time, placements."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from service.db import plans as plan_store
from service.db.session import SessionFactory

RUN_TIME_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class ApiMetrics:
    """The metrics of one app instance, on its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_latency = Histogram(
            "splan_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
        self.placement_latency = Histogram(
            "splan_placement_duration_seconds",
            "Placement decision latency",
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1),
        )
        self.placement_decisions = Counter(
            "splan_placement_decisions",
            "Placement decisions by the tier the model loads from",
            ["tier"],
            registry=self.registry,
        )
        self.migrations = Counter(
            "splan_placement_migrations", "Live migrations proposed by placement decisions", registry=self.registry
        )


class PlanCollector(Collector):
    """Plans by status, queue depth and plan run times, read from the database at scrape time."""

    def __init__(self, session_factory: SessionFactory, queue_depth: Callable[[], int | None]) -> None:
        self.session_factory = session_factory
        self.queue_depth = queue_depth

    def collect(self) -> Iterator[Metric]:
        """One consistent reading per scrape."""
        with self.session_factory() as session:
            counts = plan_store.count_by_status(session)
            run_times = plan_store.recent_run_times_s(session)
        by_status = GaugeMetricFamily("splan_plans", "Plans by status", labels=["status"])
        for status, count in counts.items():
            by_status.add_metric([status], count)
        yield by_status
        yield GaugeMetricFamily("splan_plans_queued", "Plans waiting to run (database)", value=counts["queued"])
        depth = self.queue_depth()
        if depth is not None:
            yield GaugeMetricFamily("splan_queue_depth", "Messages waiting in the executor queue", value=depth)
        yield _histogram("splan_plan_run_seconds", "Run time of the last 1000 finished plans", run_times)


def _histogram(name: str, documentation: str, values: list[float]) -> HistogramMetricFamily:
    buckets = []
    for bound in RUN_TIME_BUCKETS_S:
        buckets.append((repr(bound), float(sum(1 for v in values if v <= bound))))
    buckets.append(("+Inf", float(len(values))))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=float(sum(values)))
