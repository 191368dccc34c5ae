"""Prometheus metrics: what the gateway measures per request, and gauges read from the coordinator's status.

Names follow vLLM's (`e2e_request_latency_seconds`, `time_to_first_token_seconds`, `request_queue_time_seconds`,
`inter_token_latency_seconds`, `num_requests_waiting`) and Triton's `_bytes` style, under a `lyra_` prefix.
Each gateway owns its registry, so several apps in one process (tests) never collide.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.wire.messages import STAGES, StatusReply

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class StatusCollector(Collector):
    """Gauges and counters from the coordinator's last StatusReply (refreshed on every scrape)."""

    def __init__(self) -> None:
        self.status: StatusReply | None = None

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("lyra_coordinator_up", "1 when the coordinator answered this scrape's status request")
        up.add_metric([], 0.0 if self.status is None else 1.0)
        yield up
        status = self.status
        if status is None:
            return
        yield GaugeMetricFamily("lyra_num_requests_waiting", "Requests queued in the coordinator",
                                value=status.queue_depth)
        yield GaugeMetricFamily("lyra_num_requests_running", "Requests the pipeline is executing",
                                value=1.0 if status.running else 0.0)
        for name, value in sorted(status.counters.items()):  # the coordinator's counters since it started
            family = CounterMetricFamily(f"lyra_coordinator_{name}", f"Coordinator counter {name!r} since its start")
            family.add_metric([], value)
            yield family
        yield from self._workers(status)
        yield from self._gpus(status)

    def _workers(self, status: StatusReply) -> Iterator[Metric]:
        state = GaugeMetricFamily("lyra_worker_up", "1 when the worker is up or busy", labels=["service"])
        restarts = CounterMetricFamily("lyra_worker_restarts", "Worker registrations after its first",
                                       labels=["service"])
        resident = GaugeMetricFamily("lyra_worker_resident_models", "1 per model resident in a worker",
                                     labels=["service", "model"])
        cached = GaugeMetricFamily("lyra_host_cache_bytes", "Bytes a model holds in the host weight cache",
                                   labels=["service", "model"])
        for s in status.services:
            state.add_metric([s.service], 1.0 if s.state in ("up", "busy") else 0.0)
            restarts.add_metric([s.service], max(0, s.registrations - 1))
            for model in s.resident:
                resident.add_metric([s.service, model], 1.0)
            for model, size in s.cached.items():
                cached.add_metric([s.service, model], size)
        yield from (state, restarts, resident, cached)

    def _gpus(self, status: StatusReply) -> Iterator[Metric]:
        budget = GaugeMetricFamily("lyra_vram_budget_bytes", "The ledger's budget per GPU", labels=["gpu"])
        estimated = GaugeMetricFamily("lyra_vram_estimated_bytes", "Ledger estimate per GPU and service",
                                      labels=["gpu", "service"])
        measured = GaugeMetricFamily("lyra_vram_measured_bytes", "Measured usage per GPU and service",
                                     labels=["gpu", "service"])
        resident = GaugeMetricFamily("lyra_gpu_resident_models", "Models resident per GPU", labels=["gpu"])
        for g in status.gpus:
            gpu = str(g.gpu)
            budget.add_metric([gpu], g.budget_bytes)
            resident.add_metric([gpu], len(g.resident))
            for service, numbers in g.by_service.items():
                if "estimated" in numbers:
                    estimated.add_metric([gpu, service], numbers["estimated"])
                if "measured" in numbers:
                    measured.add_metric([gpu, service], numbers["measured"])
        yield from (budget, estimated, measured, resident)


class GatewayMetrics:
    """Every metric the gateway exports, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("lyra_requests", "HTTP API requests by endpoint, outcome and specialist",
                                ["endpoint", "outcome", "specialist"], registry=r)
        self.e2e = Histogram("lyra_e2e_request_latency_seconds", "From the HTTP request to its last byte",
                             ["endpoint", "specialist"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("lyra_time_to_first_token_seconds", "From the HTTP request to the voice's first text",
                              ["specialist"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("lyra_request_queue_time_seconds", "Time a request waited in the coordinator's queue",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("lyra_stage_duration_seconds", "Each pipeline stage (route, load, specialist, voice)",
                               ["stage", "specialist"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lyra_inter_token_latency_seconds", "Gap between streamed pieces of the voice's text",
                             buckets=TOKEN_BUCKETS, registry=r)
        self.pieces = Counter("lyra_generation_pieces", "Pieces of voice text streamed (a piece is one or more tokens)",
                              registry=r)
        self.swaps = Counter("lyra_swaps", "Specialist swaps by what left, what came and where its weights came from",
                             ["unloaded", "loaded", "source"], registry=r)
        self.load_seconds = Histogram("lyra_model_load_seconds", "The load stage of each swap (unload, load, ready)",
                                      ["model", "source"], buckets=LATENCY_BUCKETS, registry=r)
        self.seen_swaps: tuple[str | None, int] = (None, 0)  # (coordinator instance, last swap seq counted)
        self.status = StatusCollector()
        r.register(self.status)

    def observe_done(self, specialist: str, timings: dict[str, float]) -> None:
        """Queue and stage times from a DoneEvent's timings."""
        if "queue" in timings:
            self.queue.observe(timings["queue"])
        for stage in STAGES:
            if stage in timings:
                self.stage.labels(stage, specialist).observe(timings[stage])

    def render(self, status: StatusReply | None) -> bytes:
        """The exposition text, with the status gauges taken from `status` (None: the coordinator is down)."""
        self.status.status = status
        if status is not None:
            self._count_swaps(status)
        return generate_latest(self.registry)

    def _count_swaps(self, status: StatusReply) -> None:
        """Count the swaps the coordinator made since the last scrape (its records are numbered)."""
        instance, last = self.seen_swaps
        if instance != status.coordinator:
            last = 0  # a new coordinator numbers its swaps from 1 again
        for record in status.swaps:
            if record.seq > last:
                self.swaps.labels(record.unloaded or "none", record.loaded, record.source).inc()
                self.load_seconds.labels(record.loaded, record.source).observe(record.seconds)
                last = record.seq
        self.seen_swaps = (status.coordinator, last)
