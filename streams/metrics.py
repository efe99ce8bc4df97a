"""Prometheus metrics of the worker. Names and units follow Prometheus conventions.

All metrics live in one registry object so tests and the bench can make a fresh
one. Work done in the process pool is timed here, in the parent, around each call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
)

# Fit the targets: p99 <= 1 s end to end at half load; image scoring tens of ms.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SCORER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 20.0)
BYTES_BUCKETS = (1e3, 1e4, 5e4, 1e5, 2.5e5, 5e5, 1e6, 2.5e6, 5e6, 1e7, 2e7)

PREFIX = "refundguard"


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        r = self.registry
        # The standard process_*, python_gc_* and python_info series, as a default registry has.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)
        p = PREFIX
        self.requests_consumed = Counter(
            f"{p}_requests_consumed", "Refund requests read from the requests topic.", registry=r)
        self.outcomes_consumed = Counter(
            f"{p}_outcomes_consumed", "Outcome messages read, by result.", ["result"], registry=r)
        self.dead_letters = Counter(
            f"{p}_dead_letters", "Messages sent to the dead-letter topic, by cause.", ["cause"], registry=r)
        self.decisions = Counter(
            f"{p}_decisions", "Decisions published, by outcome, leading reason code and policy version.",
            ["decision", "reason", "policy_version"], registry=r)
        self.decision_reasons = Counter(
            f"{p}_decision_reasons", "Every reason carried by a published decision.", ["reason"], registry=r)
        self.shadow_decisions = Counter(
            f"{p}_shadow_decisions", "Shadow-policy decisions published.", ["decision", "policy_version"], registry=r)
        self.end_to_end_latency = Histogram(
            f"{p}_end_to_end_latency_seconds",
            "From the request's Kafka timestamp to its decision being handed to the producer.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.scoring_latency = Histogram(
            f"{p}_scoring_latency_seconds", "Time to score one request (fetch, image and behaviour scorers).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.scorer_latency = Histogram(
            f"{p}_scorer_latency_seconds", "Time in one scorer for one request.", ["scorer"],
            buckets=SCORER_BUCKETS, registry=r)
        self.scorer_errors = Counter(
            f"{p}_scorer_errors", "Scorer failures, by scorer and kind (error, timeout).", ["scorer", "kind"],
            registry=r)
        self.image_fetches = Counter(
            f"{p}_image_fetches", "Image fetches, by outcome (ok, cached, or the failure code).", ["outcome"],
            registry=r)
        self.image_fetch_failures = Counter(
            f"{p}_image_fetch_failures", "Image fetches that failed, by failure code.", ["code"], registry=r)
        self.image_bytes = Histogram(
            f"{p}_image_fetch_bytes", "Size of fetched images.", buckets=BYTES_BUCKETS, registry=r)
        self.holds_ratio = Gauge(
            f"{p}_hold_ratio", "Share of holds among the last 1,000 decisions.", registry=r)
        self.consumer_lag = Gauge(
            f"{p}_consumer_lag_messages", "End offset minus committed offset, per assigned partition.",
            ["topic", "partition"], registry=r)
        self.ready = Gauge(f"{p}_ready", "1 when the worker is assigned, recovered and processing.", registry=r)
        self.info = Info(f"{p}_worker", "Worker build and configuration.", registry=r)
        self._recent: list[bool] = []

    def observe_decision(self, decision: str, reasons: list[str], policy_version: str) -> None:
        self.decisions.labels(decision, reasons[0] if reasons else "NONE", policy_version).inc()
        for code in reasons:
            self.decision_reasons.labels(code).inc()
        self._recent.append(decision == "hold")
        if len(self._recent) > 1000:
            del self._recent[:-1000]
        self.holds_ratio.set(sum(self._recent) / len(self._recent))
