"""/metrics in Prometheus' text format, read from the engine's counters at each scrape
(prometheus_client writes the format)."""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


class _EngineCollector:
    def __init__(self, engine: Any, http_requests: dict) -> None:
        self.engine, self.http_requests = engine, http_requests

    def collect(self) -> Iterator[Metric]:
        counters = self.engine.counters
        requests = CounterMetricFamily("pyllama_mtp_requests", "Generation requests by outcome",
                                       labels=["outcome"])
        for outcome in ("completed", "failed", "cancelled"):
            requests.add_metric([outcome], counters.requests[outcome])
        requests.add_metric(["rejected"], counters.rejected)
        yield requests
        http = CounterMetricFamily("pyllama_mtp_http_responses", "HTTP responses by path and status",
                                   labels=["path", "status"])
        for (path, status), count in sorted(dict(self.http_requests).items()):
            http.add_metric([path, str(status)], count)
        yield http
        for name, text, value in (
                ("prompt_tokens", "Prompt tokens of requests", counters.prompt_tokens),
                ("prompt_cached_tokens", "Prompt tokens taken from a slot's cache, not decoded",
                 counters.cached_tokens),
                ("completion_tokens", "Tokens generated", counters.completion_tokens),
                ("draft_tokens", "MTP draft tokens verified", counters.drafted),
                ("draft_accepted_tokens", "MTP draft tokens accepted", counters.accepted),
                ("steps", "Batched decoding steps", counters.steps),
                ("engine_busy_seconds", "Seconds the engine thread worked", counters.busy_s),
                ("engine_compute_seconds", "Of those, seconds llama.cpp computed", counters.compute_s)):
            yield CounterMetricFamily(f"pyllama_mtp_{name}", text, value=value)
        acceptance = GaugeMetricFamily("pyllama_mtp_draft_acceptance",
                                       "Acceptance at each draft position (1 = first drafted token)",
                                       labels=["position"])
        for position, (drafted, accepted) in enumerate(list(counters.acceptance_at), start=1):
            acceptance.add_metric([str(position)], accepted / drafted if drafted else 0.0)
        yield acceptance
        yield GaugeMetricFamily("pyllama_mtp_slots_busy", "Sequence slots generating now", value=self.engine.slots_busy)
        yield GaugeMetricFamily("pyllama_mtp_slots", "Sequence slots", value=self.engine.parallel)
        yield GaugeMetricFamily("pyllama_mtp_queue_length", "Requests waiting for a slot", value=self.engine.queue_length)
        yield GaugeMetricFamily("pyllama_mtp_cache_checkpoints", "Recurrent-state checkpoints the slots keep",
                                value=counters.checkpoints)
        yield GaugeMetricFamily("pyllama_mtp_cache_checkpoint_bytes", "Memory of those checkpoints",
                                value=counters.checkpoint_bytes)


def render_metrics(engine: Any, http_requests: dict) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_EngineCollector(engine, http_requests))
    return generate_latest(registry), CONTENT_TYPE_LATEST
