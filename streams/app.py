"""The Faust app: topics, tables, agents, web endpoints.

The flow, one step per agent, chained by topics:

    refund.requests  --intake-->  <app>-by-buyer  --decide-->  refund.decisions
    refund.outcomes  --intake-->  <app>-by-buyer                (+ shadow topic)
    malformed        --intake-->  refund.requests.dlq

``intake`` (keyed by refund_id) validates and re-keys by buyer_id, so that the
``decide`` step owns each buyer's state. ``decide`` fetches and scores images
for a batch concurrently, then, in order, looks up state, runs the behaviour
scorers and the policy, publishes, and updates state. Errors never escape an
agent (Faust would skip the message): a request that cannot be scored is held.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import faust
from aiohttp import web
from faust.streams import _current_event
from faust.types import EventT
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import streams
from scorers.base import Reason, reference_copies
from scorers.policy import Policy, ScorerFailure, decide, load_policy
from scorers.reuse import MATCH_DISTANCE, band_keys, hamming
from streams import kafka_compat
from streams import state as st
from streams.contract import (
    ContractError,
    RefundOutcome,
    RefundRequest,
    dead_letter,
    parse_outcome,
    parse_request,
)
from streams.decision import to_decision
from streams.fetch import ImageFetcher
from streams.image_pool import ImagePool
from streams.logs import logging_config
from streams.metrics import Metrics
from streams.scoring import ImagePhase, RequestScorer
from streams.settings import Settings

log = logging.getLogger("refundguard")

HEALTH_LIVE = "/health/live"
HEALTH_READY = "/health/ready"
METRICS = "/metrics"
GLOBAL_TABLE_STORE = "memory:///"


@dataclass
class RefundGuard:
    """Everything one worker runs, built from settings."""

    settings: Settings
    app: faust.App
    policy: Policy
    shadow_policy: Policy | None
    metrics: Metrics
    scorer: RequestScorer
    pool: ImagePool | None
    fetcher: ImageFetcher
    intake_requests: Any
    intake_outcomes: Any
    decide: Any
    by_buyer_topic: Any
    decisions_topic: Any
    dlq_topic: Any
    shadow_topic: Any
    buyers: Any
    taints: Any
    evidence_index: Any
    decider: DecideStep


def build(settings: Settings, *, start_pool: bool = True) -> RefundGuard:
    # Faust/aiokafka workarounds for Tansu and for a broker that comes back empty: see the module.
    kafka_compat.install(settings.app_id, settings.bootstrap, lambda: topic_names(settings), settings.topics.partitions,
                         fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms)
    policy = load_policy(settings.policy_file)
    shadow_policy = load_policy(settings.shadow_policy_file) if settings.shadow_policy_file else None
    metrics = Metrics()
    metrics.info.info({"version": streams.__version__, "policy_version": policy.version,
                       "shadow_policy_version": shadow_policy.version if shadow_policy else ""})
    t = settings.topics

    app = faust.App(
        settings.app_id,
        broker=settings.broker_url,
        store="rocksdb://" if settings.store == "rocksdb" else "memory://",
        datadir=str(settings.data_dir),
        topic_partitions=t.partitions,
        topic_allow_declare=True,
        topic_disable_leader=True,
        web_enabled=True,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        producer_max_request_size=4 * 1024 * 1024,
        # Each decision is three sends (re-key, decision, changelog); with no linger every one
        # is its own produce request. 5 ms more than doubled the images-off rate here.
        producer_linger=settings.producer_linger_ms / 1000,
        consumer_max_fetch_size=8 * 1024 * 1024,
        broker_commit_every=200,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=max(64, settings.scoring.batch_size * 4),
        table_cleanup_interval=60.0,
        # Tansu and at-least-once: no idempotent or transactional producer.
        # The join waits this long for members to (re)join; Tansu waits it out in full.
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_session_timeout=max(settings.rebalance_timeout_s, 10.0),
        consumer_group_instance_id=settings.group_instance_id,
        processing_guarantee="at_least_once",
        producer_acks=-1,
        logging_config=logging_config(settings.log_format, settings.log_level),
        worker_redirect_stdouts=False,
    )
    requests_topic = app.topic(t.requests, key_type=bytes, value_type=bytes, value_serializer="raw",
                               key_serializer="raw", partitions=t.partitions)
    outcomes_topic = app.topic(t.outcomes, key_type=bytes, value_type=bytes, value_serializer="raw",
                               key_serializer="raw", partitions=t.partitions)
    by_buyer_topic = app.topic(f"{settings.app_id}-by-buyer", key_type=bytes, value_type=bytes,
                               value_serializer="raw", key_serializer="raw", partitions=t.partitions,
                               internal=True)
    decisions_topic = app.topic(t.decisions, key_type=bytes, value_type=bytes, value_serializer="raw",
                                key_serializer="raw", partitions=t.partitions)
    dlq_topic = app.topic(t.dlq, key_type=bytes, value_type=bytes, value_serializer="raw",
                          key_serializer="raw", partitions=t.partitions)
    # The decide step confirms each applied outcome here; replay waits on it (its barrier).
    applied_topic = app.topic(applied_topic_name(settings), key_type=bytes, value_type=bytes,
                              value_serializer="raw", key_serializer="raw", partitions=t.partitions)
    shadow_topic = app.topic(t.shadow_decisions, key_type=bytes, value_type=bytes, value_serializer="raw",
                             key_serializer="raw", partitions=t.partitions)

    # key_type=bytes on each table, not a shared Schema: Faust reads a changelog back with the
    # table's own key serializer (json unless key_type says bytes) and mutates a Schema passed
    # to it, so raw keys failed to decode and recovery never applied a record.
    # use_partitioner: batches (take_events) have no current event to take the partition
    # from; the key is the by-buyer topic's key, so the partitioner picks the same partition.
    buyers = app.Table("buyers", default=None, partitions=t.partitions, use_partitioner=True,
                       key_type=bytes)
    # Global: every worker holds all of it; see README "State" for sizes and limits.
    # partitions=1 and recovery_buffer_size=1 avoid Faust's GlobalTable recovery loop with
    # several workers; use_partitioner because writes come from events of other partitions.
    # In memory: rebuilt from the changelog at start (they are small), and the RocksDB store
    # would file writes under the source event's partition, not the table's single one.
    # "memory:///", not "memory://": yarl makes that URL falsy, and Faust then silently
    # used the app's RocksDB store.
    taints = app.GlobalTable("taints", default=None, partitions=1, recovery_buffer_size=1,
                             use_partitioner=True, key_type=bytes, store=GLOBAL_TABLE_STORE)
    evidence_index = app.GlobalTable("evidence-index", default=None, partitions=1, recovery_buffer_size=1,
                                     use_partitioner=True, key_type=bytes, store=GLOBAL_TABLE_STORE)

    fetcher = ImageFetcher(settings.fetch)
    pool = ImagePool(settings.scoring.image_workers, (), tuple(settings.scoring.disabled))
    scorer = RequestScorer(settings.scoring, fetcher, pool, metrics, settings.fetch.max_pixels)
    if not scorer.image_scorer_names:
        pool = None
        scorer.pool = None

    async def to_dlq(event: EventT, error: ContractError) -> None:
        message = event.message
        record = dead_letter(
            error=str(error), error_kind=error.kind, topic=message.topic, partition=message.partition,
            offset=message.offset, key=message.key, value=message.value or b"",
            failed_at=datetime.now(UTC), max_value_bytes=settings.dlq_max_value_bytes,
        )
        await dlq_topic.send(key=message.key, value=record.to_json())
        metrics.dead_letters.labels(error.kind).inc()
        log.warning("dead-lettered %s[%s]@%s: %s", message.topic, message.partition, message.offset, error,
                    extra={"dlq_cause": error.kind})

    async def intake_requests(stream: faust.StreamT) -> AsyncIterator[None]:
        async for event in stream.events():
            raw: bytes = event.message.value or b""
            try:
                request = parse_request(raw, settings.max_message_bytes)
            except ContractError as error:
                await to_dlq(event, error)
                yield None
                continue
            metrics.requests_consumed.inc()
            envelope = {"type": "request", "ts": event.message.timestamp, "value": json.loads(raw)}
            await by_buyer_topic.send(key=request.buyer_id.encode(), value=_dumps(envelope))
            yield None

    async def intake_outcomes(stream: faust.StreamT) -> AsyncIterator[None]:
        async for event in stream.events():
            raw = event.message.value or b""
            try:
                outcome = parse_outcome(raw, settings.max_message_bytes)
            except ContractError as error:
                await to_dlq(event, error)
                metrics.outcomes_consumed.labels("dead_lettered").inc()
                yield None
                continue
            envelope = {"type": "outcome", "ts": event.message.timestamp, "value": json.loads(raw)}
            await by_buyer_topic.send(key=outcome.buyer_id.encode(), value=_dumps(envelope))
            yield None

    async def decide_stream(stream: faust.StreamT) -> AsyncIterator[None]:
        async for events in stream.take_events(settings.scoring.batch_size, within=settings.scoring.batch_within_s):
            await guard.handle_batch(events)
            yield None

    intake_r = app.agent(requests_topic, name="intake-requests")(intake_requests)
    intake_o = app.agent(outcomes_topic, name="intake-outcomes")(intake_outcomes)
    decide_agent = app.agent(by_buyer_topic, name="decide")(decide_stream)

    guard = DecideStep(settings, policy, shadow_policy, metrics, scorer, buyers, taints, evidence_index,
                   decisions_topic, shadow_topic, applied_topic, dlq_topic)

    @app.page(METRICS)
    async def metrics_page(_web: Any, _request: Any) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @app.page(HEALTH_LIVE)
    async def live_page(_web: Any, _request: Any) -> web.Response:
        return web.json_response({"live": True})

    @app.page(HEALTH_READY)
    async def ready_page(_web: Any, _request: Any) -> web.Response:
        ready = _is_ready(app)
        metrics.ready.set(1 if ready else 0)
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    @app.timer(5.0)
    async def observe_lag() -> None:
        metrics.ready.set(1 if _is_ready(app) else 0)
        await _observe_lag(app, metrics, frozenset({t.requests, t.outcomes, by_buyer_topic.get_topic_name()}))

    if pool is not None and start_pool:
        # Spawn the children before the first batch, so it does not pay for their start.
        @app.task
        async def warm_pool() -> None:
            await asyncio.to_thread(pool.start)

    @app.on_before_shutdown.connect
    async def close_fetcher(_app: Any, **_kwargs: Any) -> None:
        await fetcher.close()

    return RefundGuard(settings, app, policy, shadow_policy, metrics, scorer, pool, fetcher, intake_r, intake_o,
                       decide_agent, by_buyer_topic, decisions_topic, dlq_topic, shadow_topic, buyers, taints,
                       evidence_index, guard)


def applied_topic_name(settings: Settings) -> str:
    return f"{settings.app_id}-outcomes-applied"


def topic_names(settings: Settings) -> list[str]:
    """Every topic the worker reads or writes, created before it starts."""
    t = settings.topics
    names = [t.requests, t.outcomes, t.decisions, t.dlq, f"{settings.app_id}-by-buyer",
             applied_topic_name(settings)]
    if settings.shadow_policy_file:
        names.append(t.shadow_decisions)
    return names


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _is_ready(app: faust.App) -> bool:
    try:
        assigned = bool(app.consumer.assignment())
    except Exception:
        return False
    ready = assigned and not app.rebalancing and not getattr(app, "in_recovery", False)
    # A worker keeps its assignment while the broker is gone; it is not serving then.
    return ready and kafka_compat.broker_reachable(app)


async def _observe_lag(app: faust.App, metrics: Metrics, topics: frozenset[str]) -> None:
    """Lag of the topics the agents consume (not changelogs, which are never committed).

    Partitions this worker no longer owns are dropped, so a rebalance leaves no stale series.
    """
    try:
        consumer = app.consumer
        owned = {tp for tp in consumer.assignment() if tp.topic in topics}
        for tp in owned:
            high = consumer.highwater(tp)
            if high is None:
                continue
            committed = consumer._committed_offset.get(tp)  # Faust keeps what it last committed
            metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, high - (committed or 0)))
        for labels in list(metrics.consumer_lag._metrics):
            topic, partition = labels
            if not any(tp.topic == topic and str(tp.partition) == partition for tp in owned):
                metrics.consumer_lag.remove(topic, partition)
    except Exception:  # lag is observability; it must never break the worker
        log.debug("consumer lag not available", exc_info=True)


class DecideStep:
    """The decide step: state lookups, scoring and publishing for a batch of envelopes."""

    def __init__(self, settings: Settings, policy: Policy, shadow_policy: Policy | None, metrics: Metrics,
                 scorer: RequestScorer, buyers: Any, taints: Any, evidence_index: Any, decisions_topic: Any,
                 shadow_topic: Any, applied_topic: Any, dlq_topic: Any) -> None:
        self.settings = settings
        self.policy = policy
        self.shadow_policy = shadow_policy
        self.metrics = metrics
        self.scorer = scorer
        self.buyers = buyers
        self.taints = taints
        self.evidence_index = evidence_index
        self.decisions_topic = decisions_topic
        self.shadow_topic = shadow_topic
        self.applied_topic = applied_topic
        self.dlq_topic = dlq_topic

    async def handle_batch(self, events: list[EventT]) -> None:
        items: list[tuple[EventT, RefundRequest | RefundOutcome, float | None]] = []
        for event in events:
            try:
                envelope = json.loads(event.message.value or b"")
                model = RefundRequest if envelope["type"] == "request" else RefundOutcome
                parsed = model.model_validate_json(_dumps(envelope["value"]), strict=True)
                items.append((event, parsed, envelope.get("ts")))
            except Exception as exc:  # intake validated it, so this is a bug; keep the message
                await self._dead_letter(event, "internal", f"unreadable internal message: {exc}"[:500])
        requests = [(i, m) for i, (_, m, _) in enumerate(items) if isinstance(m, RefundRequest)]
        # Images for the whole batch at once: fetches overlap, the pool runs in parallel.
        phases = await asyncio.gather(*(self._image_phase(r) for _, r in requests))
        phase_of = {i: phase for (i, _), phase in zip(requests, phases, strict=True)}
        # State, behaviour and policy strictly in order: a buyer's second claim sees the first.
        for i, (event, message, ts) in enumerate(items):
            # A batch has no "current event"; Faust's RocksDB store files a write under
            # the current event's partition, so point it at this envelope's event.
            _current_event.set(weakref.ref(event))
            try:
                if isinstance(message, RefundRequest):
                    await self._decide(message, phase_of[i], ts)
                else:
                    self._apply_outcome(message)
                    await self.applied_topic.send(key=message.refund_id.encode(), value=b"{}")
            except Exception as exc:
                log.exception("failed to handle %s", message.refund_id)
                await self._fail_closed(event, message, ts, exc)

    async def _fail_closed(self, event: EventT, message: RefundRequest | RefundOutcome, ts: float | None,
                           error: Exception) -> None:
        """A request that could not be scored is held; if even that fails, it is dead-lettered."""
        try:
            if isinstance(message, RefundRequest):
                await self._hold_unscored(message, ts)
                return
        except Exception as exc:
            log.exception("cannot hold %s either", message.refund_id)
            error = exc
        await self._dead_letter(event, "processing", f"{type(error).__name__}: {error}"[:500])

    async def _dead_letter(self, event: EventT, kind: str, error: str) -> None:
        m = event.message
        record = dead_letter(error=error, error_kind=kind, topic=m.topic, partition=m.partition, offset=m.offset,
                             key=m.key, value=m.value or b"", failed_at=datetime.now(UTC),
                             max_value_bytes=self.settings.dlq_max_value_bytes)
        await self.dlq_topic.send(key=m.key, value=record.to_json())
        self.metrics.dead_letters.labels(kind).inc()

    async def _image_phase(self, request: RefundRequest) -> ImagePhase:
        try:
            return await self.scorer.image_phase(request)
        except Exception as exc:
            log.exception("image phase failed for %s", request.refund_id)
            phase = ImagePhase()
            for name in self.scorer.image_scorer_names:
                phase.results[name] = ScorerFailure("SCORING_INCOMPLETE", f"{name}: {type(exc).__name__}: {exc}"[:300])
            return phase

    async def _decide(self, request: RefundRequest, phase: ImagePhase, ts: float | None) -> None:
        started = time.perf_counter()
        buyer_key = request.buyer_id.encode()
        fingerprints = request.buyer.fingerprints()
        links = st.links_for(fingerprints, request.requested_at, lambda k: self.taints.get(k.encode()))
        # The merchant's own photo (edited or not) is not the buyer's evidence: another claim
        # built on the same listing photo is not a reuse of this one.
        copies = reference_copies(phase.results)
        evidence_hashes = {k: h for k, h in phase.evidence_hashes.items() if k not in copies}
        matches = st.evidence_matches(
            evidence_hashes, refund_id=request.refund_id, requested_at=request.requested_at,
            band_keys=band_keys, distance=hamming, max_distance=MATCH_DISTANCE,
            lookup=lambda k: self.evidence_index.get(k.encode()),
        )
        buyer_state = self.buyers.get(buyer_key)
        features = st.buyer_features(
            buyer_state, refund_id=request.refund_id, requested_at=request.requested_at,
            currency=request.amount.currency, tainted_links=links, evidence_matches=matches,
        )
        results = dict(phase.results)
        results.update(self.scorer.behaviour_phase(request, features))
        facts = request.facts()
        verdict = decide(self.policy, facts, results, tuple(phase.problems))
        decision = to_decision(request, verdict)
        await self.decisions_topic.send(key=request.refund_id.encode(), value=decision.to_json())
        if self.shadow_policy is not None:
            shadow = decide(self.shadow_policy, facts, results, tuple(phase.problems))
            await self.shadow_topic.send(key=request.refund_id.encode(),
                                         value=to_decision(request, shadow, shadow=True).to_json())
            self.metrics.shadow_decisions.labels(shadow.decision, shadow.policy_version).inc()
        # State after publishing: a crash in between re-processes the request from the
        # same state, which gives the same decision.
        self.buyers[buyer_key] = st.record_claim(
            buyer_state, refund_id=request.refund_id, order_id=request.order_id,
            requested_at=request.requested_at, merchant_id=request.merchant_id, amount=request.amount.amount,
            currency=request.amount.currency, kind=request.kind, fingerprints=fingerprints,
        )
        for image_id, h in evidence_hashes.items():
            entry = st.index_entry(evidence_hash=h, refund_id=request.refund_id, buyer_id=request.buyer_id,
                                   order_id=request.order_id, image_id=image_id, requested_at=request.requested_at)
            for band in band_keys(h):
                self.evidence_index[band.encode()] = st.add_to_band(self.evidence_index.get(band.encode()), entry)
        self._observe(request, decision.decision, [r.code for r in verdict.reasons], ts,
                      phase.seconds + time.perf_counter() - started)

    def _observe(self, request: RefundRequest, decision: str, codes: list[str], ts: float | None,
                 seconds: float) -> None:
        self.metrics.observe_decision(decision, codes, self.policy.version)
        self.metrics.scoring_latency.observe(seconds)
        if ts:
            self.metrics.end_to_end_latency.observe(max(0.0, time.time() - ts))
        log.info("decided %s: %s", request.refund_id, decision,
                 extra={"refund_id": request.refund_id, "decision": decision, "reasons": codes,
                        "policy_version": self.policy.version})

    async def _hold_unscored(self, request: RefundRequest, ts: float | None) -> None:
        problem = Reason("SCORING_INCOMPLETE", "Scoring could not be completed; the refund needs a person", 1.0)
        verdict = decide(self.policy, request.facts(), {}, (problem,))
        decision = to_decision(request, verdict)
        await self.decisions_topic.send(key=request.refund_id.encode(), value=decision.to_json())
        self._observe(request, decision.decision, [r.code for r in verdict.reasons], ts, 0.0)

    def _apply_outcome(self, outcome: RefundOutcome) -> None:
        key = outcome.buyer_id.encode()
        state = self.buyers.get(key)
        self.buyers[key] = st.record_verdict(state, refund_id=outcome.refund_id, verdict=outcome.verdict,
                                             decided_at=outcome.decided_at)
        if outcome.verdict != "fraud":
            self.metrics.outcomes_consumed.labels("legitimate").inc()
            return
        fingerprints = st.claim_fingerprints(state, outcome.refund_id)
        if fingerprints is None:
            self.metrics.outcomes_consumed.labels("unknown_refund").inc()
            log.warning("fraud verdict for unknown refund %s: nothing to taint", outcome.refund_id)
            return
        value = st.taint_value(refund_id=outcome.refund_id, buyer_id=outcome.buyer_id,
                               decided_at=outcome.decided_at)
        for kind, fingerprint in fingerprints.items():
            k = st.taint_key(kind, fingerprint).encode()
            self.taints[k] = st.merge_taint(self.taints.get(k), value)
        self.metrics.outcomes_consumed.labels("fraud").inc()
