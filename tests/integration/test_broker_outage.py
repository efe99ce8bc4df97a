"""Stop the broker in the middle of processing and start it again, empty, on the same port.

The embedded broker keeps nothing, so this is a broker that lost all its data: topics,
changelogs, committed offsets. The platform re-creates its topics and re-sends the refunds
it saw no decision for, as a real one would. The worker must carry on without a restart:
same process, ready again, every refund sent afterwards decided (a refund decided twice
with identical content), its local RocksDB state kept (a buyer's 4th claim in 10 days is
held) and written back to the new changelogs (a fresh worker with an empty data dir knows
claims made, and frauds confirmed, before the outage).

Checked it fails without the protection (streams/kafka_compat.py), one patch disabled at a time:
- without ``_recover_from_lost_changelogs`` the rejoin fails with Faust's ConsistencyError (the
  table's persisted changelog offset is past the new changelog's end): nothing sent after the
  outage is decided;
- without ``_recreate_lost_topics`` nothing re-creates ``refundguard-by-buyer``, the changelogs
  and ``-outcomes-applied`` (the worker's clients no longer auto-create them): nothing sent after
  the outage is decided;
- without ``_republish`` (re-publishing the local state) the fresh worker approves the quiet
  buyers' 4th claims: the new changelog only had what was written after the outage;
- without ``_republish_global_tables`` the fresh worker approves a new account on the device a
  confirmed fraud tainted before the outage (the taints table lives in memory and its
  changelog was lost with the broker);
- with both ``_no_commits_without_membership`` and ``_no_committed_offsets_past_the_end`` off,
  one of two runs stalled (offsets of the old log committed into the empty broker, so the
  rejoined group skipped the new records); with either one off alone, runs passed: they
  guard the same race twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from streams.broker import EmbeddedBroker, create_topics
from tests.integration.conftest import Kafka, Worker
from tests.integration.test_recovery import claim, codes, kill_hard

pytestmark = pytest.mark.integration

WORKER_ENV = {"REFUNDGUARD_SCORING_DISABLED": '["image.reference", "image.provenance", "image.capture"]'}
DECISIONS = "refund.decisions"
# The platform's topics; the worker's own (by-buyer, changelogs, outcomes-applied) are its job.
CONTRACT_TOPICS = ["refund.requests", "refund.outcomes", DECISIONS, "refund.requests.dlq"]
PARTITIONS = 4  # as the worker fixture configures
# Every buyer claims on days 10, 11 and 12 before the outage and on day 13 after it: the
# 4th claim in 10 days is held, but only by a worker that still knows the first three.
ACTIVE = range(0, 200)  # their claims are in flight when the broker stops
QUIET = range(200, 300)  # theirs were all decided before; they claim again only at the end
FRAUD_DEVICE = "d-bo-fraud"
STOP_AFTER = 100  # active buyers' decisions seen before the broker stops: the rest (~500) in flight


def held_for(decision: dict[str, Any], code: str) -> bool:
    return decision["decision"] == "hold" and code in codes(decision)


def test_broker_restarts_empty(broker: EmbeddedBroker, worker_factory: Callable[..., Worker],
                               kafka_factory: Callable[[list[str]], Kafka],
                               example_request: dict[str, Any]) -> None:
    started = time.monotonic()
    worker = worker_factory("outage", **WORKER_ENV)
    pid = worker.process.pid
    kafka = kafka_factory([DECISIONS])
    seen: dict[str, list[str]] = {}

    def drain(k: Kafka, timeout_ms: int = 100) -> None:
        for records in k.consumer.poll(timeout_ms=timeout_ms).values():
            for r in records:
                seen.setdefault(r.key.decode(), []).append(json.dumps(json.loads(r.value), sort_keys=True))

    def send(k: Kafka, requests: dict[str, dict[str, Any]]) -> None:
        for rid, value in requests.items():
            k.producer.send("refund.requests", key=rid.encode(), value=json.dumps(value).encode())
        k.producer.flush()

    def claims(buyers: range, days: tuple[int, ...]) -> dict[str, dict[str, Any]]:
        """In event-time order: every buyer's claim of the first day, then of the next..."""
        return {f"RF-BO-{b:03d}-{day}": claim(example_request, f"RF-BO-{b:03d}-{day}", f"BY-BO-{b:03d}", day,
                                              f"d-bo-{b:03d}") for day in days for b in buyers}

    def wait_for(rids: set[str], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not rids <= set(seen) and time.monotonic() < deadline:
            drain(kafka, 200)

    # The quiet buyers claim three times, all decided well before the outage; nothing of
    # theirs is written after it, so only re-publishing brings them into the new changelog.
    quiet_before = claims(QUIET, (10, 11, 12))
    quiet_before["RF-BO-F1"] = claim(example_request, "RF-BO-F1", "BY-BO-FRAUD", 10, FRAUD_DEVICE)
    send(kafka, quiet_before)
    wait_for(set(quiet_before), 30)
    assert set(quiet_before) <= set(seen), "the quiet buyers' claims were not decided"
    # A confirmed fraud taints its device (a global table); a new account on it is held.
    kafka.send("refund.outcomes", "RF-BO-F1", {
        "schema": "refund-outcome/v1", "refund_id": "RF-BO-F1", "buyer_id": "BY-BO-FRAUD", "merchant_id": "MC-901",
        "verdict": "fraud", "decided_at": "2026-11-10T12:00:00Z", "source": "review"})
    applied = kafka_factory(["refundguard-outcomes-applied"])
    applied.collect("refundguard-outcomes-applied", lambda rs: any(r.key == b"RF-BO-F1" for r in rs), 30)
    twin = {"RF-BO-T1": claim(example_request, "RF-BO-T1", "BY-BO-TWIN1", 11, FRAUD_DEVICE)}
    send(kafka, twin)
    wait_for(set(twin), 30)
    assert held_for(json.loads(seen["RF-BO-T1"][0]), "LINKED_TO_CONFIRMED_FRAUD"), \
        "the taint was not in place before the outage"
    # The active buyers' claims all at once, so that a backlog is in flight when the broker
    # stops (the worker decides about a thousand a second here).
    active_before = claims(ACTIVE, (10, 11, 12))
    send(kafka, active_before)
    deadline = time.monotonic() + 30
    while len(seen) < len(quiet_before) + STOP_AFTER and time.monotonic() < deadline:
        drain(kafka, 20)
    assert len(seen) < len(quiet_before) + len(active_before), f"the stop came too late: {len(seen)} decided"
    before = quiet_before | active_before

    broker.stop()  # mid-processing: requests are in flight between intake, by-buyer and decide
    decided_before = len(seen)
    # Readiness follows the broker: not ready while it is gone.
    deadline = time.monotonic() + 20
    while worker.get("/health/ready")[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    not_ready = worker.get("/health/ready")[0]
    time.sleep(1)

    broker.start()  # the same port, nothing in it
    create_topics(broker.bootstrap, CONTRACT_TOPICS, PARTITIONS)  # as `refundguard worker` does at start
    kafka = kafka_factory([DECISIONS])  # positioned at the start of the new, empty log
    # Re-send (in event-time order) what had no decision, then the 4th claims.
    resent = {rid: value for rid, value in before.items() if rid not in seen}
    after = claims(ACTIVE, (13,))
    send(kafka, resent)
    send(kafka, after)
    expected = set(resent) | set(after)
    wait_for(expected, 60)

    log = worker.log_tail()
    missing = sorted(expected - set(seen))
    assert not missing, f"{len(missing)} refunds sent after the outage never decided, e.g. {missing[:5]}\n{log}"
    assert worker.process.poll() is None and worker.process.pid == pid, f"the worker did not survive:\n{log}"
    conflicting = [rid for rid, contents in seen.items() if len(set(contents)) > 1]
    assert not conflicting, f"decided twice with different content: {conflicting[:5]}"
    # The local state outlived the broker: each 4th claim counts the three before it.
    fourth = {rid: json.loads(seen[rid][0]) for rid in after}
    not_held = sorted(rid for rid, d in fourth.items() if not held_for(d, "CLAIM_VELOCITY_HIGH"))
    assert not not_held, f"4th claims not held for velocity: {not_held[:5]}"
    assert all(json.loads(seen[rid][0])["decision"] == "approve" for rid in before), "a 1st-3rd claim was held"
    assert worker.get("/health/ready")[0] == 200, "not ready again after the outage"
    assert not_ready == 503, "still ready while the broker was down"
    assert "the broker lost" in worker.log.read_text(errors="replace")

    # The new changelog holds the state from before the outage too: a worker with an empty
    # data dir rebuilds the quiet buyers (no write since the outage) from it.
    kill_hard(worker)
    worker_factory("fresh", **WORKER_ENV)
    quiet = claims(QUIET, (13,))
    quiet["RF-BO-T2"] = claim(example_request, "RF-BO-T2", "BY-BO-TWIN2", 13, FRAUD_DEVICE)
    send(kafka, quiet)
    wait_for(set(quiet), 45)
    assert held_for(json.loads(seen["RF-BO-T2"][0]), "LINKED_TO_CONFIRMED_FRAUD"), \
        "the fresh worker lost the taint from before the outage"
    del quiet["RF-BO-T2"]
    assert set(quiet) <= set(seen), f"the fresh worker decided {len(set(quiet) & set(seen))}/{len(quiet)}"
    approved = sorted(rid for rid in quiet if not held_for(json.loads(seen[rid][0]), "CLAIM_VELOCITY_HIGH"))
    assert not approved, f"the fresh worker lost pre-outage claims: {approved[:5]}"
    print(f"decided before the stop: {decided_before}; re-sent {len(resent)}; "
          f"{time.monotonic() - started:.1f} s")
