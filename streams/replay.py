"""Replay an events file through the service and collect the decisions.

Events are ``{"topic", "key", "value"}`` lines in event-time order (the shape
``refundguard simulate`` and the shared case generator write). Requests inside one
event-time window are sent together; before the next window, every request
sent so far must have its decision. An outcome waits for all earlier
requests, then for the worker to confirm it applied it. So cross-partition
effects (a taint, an earlier claim, a reused photo) land before the requests
that follow them in event time, and two replays of the same events on fresh
state give identical decisions. ``--window 0`` sends one request at a time.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from streams.settings import Settings


class ReplayError(RuntimeError):
    pass


@dataclass(frozen=True)
class Event:
    topic: str  # "refund.requests" or "refund.outcomes" (or the configured names)
    key: str
    value: dict[str, Any] | str  # a str is sent as-is (for malformed-input tests)
    at: datetime | None

    @property
    def is_request(self) -> bool:
        return self.topic == "requests"


def read_events(path: Path) -> list[Event]:
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise ReplayError(f"cannot read events file {path}: {exc.strerror or exc}") from exc
    events = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            topic, key, value = row["topic"], row["key"], row["value"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ReplayError(f"{path}:{n}: not an events line ({{topic, key, value}}): {exc}") from exc
        kind = "outcomes" if "outcome" in topic else "requests"
        at = None
        if isinstance(value, dict):
            stamp = value.get("requested_at") if kind == "requests" else value.get("decided_at")
            if isinstance(stamp, str):
                try:
                    at = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
                except ValueError:
                    at = None
        events.append(Event(kind, str(key), value, at))
    return events


@dataclass
class ReplayResult:
    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    duplicates: int = 0
    conflicting: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    seconds: float = 0.0
    sent_requests: int = 0


def _content(decision: dict[str, Any]) -> str:
    return json.dumps(decision, sort_keys=True)


class Replayer:
    def __init__(self, settings: Settings, *, timeout_s: float = 120.0, window: timedelta = timedelta(hours=1),
                 progress: TextIO | None = sys.stderr) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self.window = window
        self.progress = progress
        try:
            self.producer = KafkaProducer(
                bootstrap_servers=settings.bootstrap, acks="all", enable_idempotence=False, linger_ms=5,
                max_request_size=4 * 1024 * 1024, request_timeout_ms=15_000,
            )
        except KafkaError as exc:
            raise ReplayError(f"no Kafka broker at {settings.bootstrap}: start one (refundguard broker) "
                              "or set KAFKA_BOOTSTRAP") from exc
        self.consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False,
                                      max_partition_fetch_bytes=8 * 1024 * 1024, consumer_timeout_ms=200)
        self._watch([settings.topics.decisions, f"{settings.app_id}-outcomes-applied"])
        self.result = ReplayResult()
        self._applied: set[str] = set()
        self._shown: tuple[int, int] | None = None
        self._total = 0

    def _watch(self, topics: list[str]) -> None:
        parts: list[TopicPartition] = []
        deadline = time.monotonic() + 30
        for topic in topics:
            while True:
                found = self.consumer.partitions_for_topic(topic)
                if found:
                    parts += [TopicPartition(topic, p) for p in sorted(found)]
                    break
                if time.monotonic() > deadline:
                    raise ReplayError(f"topic {topic} does not exist: is the worker running against "
                                      f"{self.settings.bootstrap}?")
                self.consumer.poll(timeout_ms=200)
                time.sleep(0.2)
        self.consumer.assign(parts)
        self.consumer.seek_to_end(*parts)
        for tp in parts:  # resolve the lazy seek now, before anything is sent
            self.consumer.position(tp)

    def _drain(self) -> None:
        for records in self.consumer.poll(timeout_ms=100, max_records=5000).values():
            for record in records:
                if record.topic == self.settings.topics.decisions:
                    decision = json.loads(record.value)
                    rid = decision["refund_id"]
                    earlier = self.result.decisions.get(rid)
                    if earlier is not None:
                        self.result.duplicates += 1
                        if _content(earlier) != _content(decision) and rid not in self.result.conflicting:
                            self.result.conflicting.append(rid)
                    else:
                        self.result.decisions[rid] = decision
                else:
                    self._applied.add(record.key.decode())

    def _wait(self, pending: set[str], what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            self._drain()
            pending -= self.result.decisions.keys() if what == "decisions" else self._applied
            self._show(len(self.result.decisions), self._total)
            if not pending:
                return
            if time.monotonic() > deadline:
                self.result.missing.extend(sorted(pending))
                return

    def _show(self, done: int, total: int) -> None:
        """A progress bar on a terminal; in a log (not a TTY), a line at each tenth of the way."""
        if self.progress is None or total == 0:
            return
        tty = self.progress.isatty()
        shown = (done, total) if tty else (10 * done // total, total)
        if shown == self._shown:
            return
        self._shown = shown
        if tty:
            filled = int(30 * done / total)
            self.progress.write(f"\r  decisions [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}")
        else:
            self.progress.write(f"  decisions {done}/{total}\n")
        self.progress.flush()

    def _send(self, event: Event) -> None:
        topic = self.settings.topics.requests if event.is_request else self.settings.topics.outcomes
        value = event.value if isinstance(event.value, str) else json.dumps(event.value, ensure_ascii=False)
        try:
            self.producer.send(topic, key=event.key.encode(), value=value.encode("utf-8"))
        except KafkaError as exc:
            raise ReplayError(f"cannot send to {topic}: {exc}") from exc

    def run(self, events: list[Event]) -> ReplayResult:
        started = time.monotonic()
        self._total = sum(1 for e in events if e.is_request)
        sent: set[str] = set()
        window_start: datetime | None = None
        for event in events:
            if event.is_request:
                new_window = (window_start is None or event.at is None or self.window == timedelta(0)
                              or event.at - window_start >= self.window)
                if new_window:
                    self.producer.flush()
                    self._wait(set(sent), "decisions")
                    window_start = event.at
                self._send(event)
                sent.add(event.key)
            else:
                self.producer.flush()
                self._wait(set(sent), "decisions")
                self._send(event)
                self.producer.flush()
                self._wait({event.key}, "outcomes")
        self.producer.flush()
        self._wait(set(sent), "decisions")
        if self.progress is not None and self.progress.isatty():
            self.progress.write("\n")
        self.result.sent_requests = len(sent)
        self.result.missing = sorted(set(self.result.missing) - self.result.decisions.keys())
        self.result.seconds = time.monotonic() - started
        return self.result

    def close(self) -> None:
        self.producer.close(timeout=5)
        self.consumer.close()


def write_decisions(decisions: Iterable[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for d in decisions:
            f.write(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n")


def summarize(decisions: Iterable[dict[str, Any]]) -> Iterator[str]:
    by_outcome: dict[str, int] = {}
    by_reason: dict[str, int] = {}
    for d in decisions:
        by_outcome[d["decision"]] = by_outcome.get(d["decision"], 0) + 1
        for r in d.get("reasons", [])[:1]:
            by_reason[r["code"]] = by_reason.get(r["code"], 0) + 1
    yield "decisions by outcome: " + ", ".join(f"{k} {v}" for k, v in sorted(by_outcome.items()))
    yield "holds by leading reason:"
    for code, n in sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0])):
        yield f"  {code:32s} {n:5d}"
