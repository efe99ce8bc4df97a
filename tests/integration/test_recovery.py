"""Kill -9 the worker after it built up state, start it again: counts, taints and the evidence
index survive, from the RocksDB directory it left or, with a fresh one, from the changelogs."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka import KafkaProducer
from kafka.partitioner.default import murmur2

from streams import state as st
from streams.broker import EmbeddedBroker, create_topics
from streams.contract import parse_request
from streams.simulate import images as sim
from tests.integration.conftest import Kafka, Worker

pytestmark = pytest.mark.integration

# image.capture stays on (it cannot hold) so the pool runs and hashes the evidence for the index.
WORKER_ENV = {"REFUNDGUARD_SCORING_DISABLED": '["image.reference", "image.provenance"]'}
DECISIONS = "refund.decisions"
APPLIED = "refundguard-outcomes-applied"
BUYERS_CHANGELOG = "refundguard-buyers-changelog"
TAINTS_CHANGELOG = "refundguard-taints-changelog"
INDEX_CHANGELOG = "refundguard-evidence-index-changelog"
FRAUD_DEVICE = "d-rc-fraud-device"


def claim(example: dict[str, Any], refund_id: str, buyer_id: str, day: int, device: str,
          evidence: Iterable[dict[str, str]] = ()) -> dict[str, Any]:
    r = copy.deepcopy(example)
    r.update(refund_id=refund_id, order_id=f"OD-{refund_id}", buyer_id=buyer_id,
             requested_at=f"2026-11-{day:02d}T09:00:00Z", evidence=list(evidence), reference_images=[])
    r["order"] = {"placed_at": "2026-11-01T12:00:00Z", "delivered_at": "2026-11-02T12:00:00Z"}
    r["buyer"] = {"account_created_at": "2024-02-01T08:00:00Z", "device_fingerprint": device,
                  "payment_fingerprint": f"p-{buyer_id}", "address_fingerprint": f"a-{buyer_id}"}
    return r


def decided(kafka: Kafka, refund_ids: set[str], timeout_s: float = 60.0) -> dict[str, dict[str, Any]]:
    records = kafka.collect(DECISIONS, lambda rs: refund_ids <= {r.key.decode() for r in rs}, timeout_s)
    return {r.key.decode(): json.loads(r.value) for r in records if r.key.decode() in refund_ids}


def codes(decision: dict[str, Any]) -> list[str]:
    return [r["code"] for r in decision["reasons"]]


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in map(int, children.read_text().split()):
                found += [child, *descendants(child)]
    return found


def kill_hard(worker: Worker) -> None:
    """SIGKILL the worker. Its image-pool children outlive it (nothing ties them to their
    parent), so they are killed too rather than left idle on the machine."""
    orphans = descendants(worker.process.pid)
    worker.stop(signal.SIGKILL)
    assert worker.process.returncode == -signal.SIGKILL
    for pid in orphans:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# Checked it fails without the protection: with the tables' keys JSON-decoded again (the bug fixed
# in streams/app.py), no changelog record is ever applied and both restarts stay not ready.
@pytest.mark.parametrize("restart_as", ["same-data-dir", "fresh-data-dir"])
def test_state_survives_kill(
    restart_as: str, worker_factory: Callable[..., Worker], kafka_factory: Callable[[list[str]], Kafka],
    image_server: tuple[str, Path], example_request: dict[str, Any],
) -> None:
    base, root = image_server
    rng = np.random.default_rng(11)
    photo = sim.encode(sim.buyer_photo(sim.make_product(rng, 0), rng, "crack"), "JPEG")
    (root / "images" / "first.jpg").write_bytes(photo)
    (root / "images" / "again.jpg").write_bytes(photo)  # the same photo, sent again under another URL

    worker = worker_factory("first", **WORKER_ENV)
    kafka = kafka_factory([DECISIONS, APPLIED, BUYERS_CHANGELOG, TAINTS_CHANGELOG, INDEX_CHANGELOG])
    before = {
        # A serial claimant's first three claims in three days: each alone is fine.
        "RF-RC-S1": claim(example_request, "RF-RC-S1", "BY-RC-SERIAL", 10, "d-rc-serial"),
        "RF-RC-S2": claim(example_request, "RF-RC-S2", "BY-RC-SERIAL", 11, "d-rc-serial"),
        "RF-RC-S3": claim(example_request, "RF-RC-S3", "BY-RC-SERIAL", 12, "d-rc-serial"),
        # Later confirmed as fraud: taints its device.
        "RF-RC-F1": claim(example_request, "RF-RC-F1", "BY-RC-FRAUD", 11, FRAUD_DEVICE),
        # Its photo goes into the evidence index.
        "RF-RC-P1": claim(example_request, "RF-RC-P1", "BY-RC-PHOTO", 12, "d-rc-photo",
                          [{"image_id": "EV-P1", "url": f"{base}/images/first.jpg"}]),
    }
    # One burst: decided as one batch, so the changelog gets multi-record producer batches,
    # whose end offset Tansu misreports (see streams/kafka_compat.py, _fetched_highwaters).
    for rid, value in before.items():
        kafka.producer.send("refund.requests", key=rid.encode(), value=json.dumps(value).encode())
    kafka.producer.flush()
    first = decided(kafka, set(before))
    assert {rid: d["decision"] for rid, d in first.items()} == dict.fromkeys(before, "approve"), \
        {rid: codes(d) for rid, d in first.items()}
    kafka.send("refund.outcomes", "RF-RC-F1", {
        "schema": "refund-outcome/v1", "refund_id": "RF-RC-F1", "buyer_id": "BY-RC-FRAUD", "merchant_id": "MC-901",
        "verdict": "fraud", "decided_at": "2026-11-12T10:00:00Z", "source": "review",
    })
    kafka.collect(APPLIED, lambda rs: any(r.key == b"RF-RC-F1" for r in rs), 30)
    # Kill only once the state is in the changelogs: 5 claims + 1 verdict, 3 fingerprints, 5 bands.
    kafka.collect(BUYERS_CHANGELOG, lambda rs: len(rs) >= 6, 30)
    kafka.collect(TAINTS_CHANGELOG, lambda rs: len(rs) >= 3, 30)
    kafka.collect(INDEX_CHANGELOG, lambda rs: len(rs) >= 5, 30)
    kill_hard(worker)

    # Same name: the RocksDB directory the killed worker left. Another name: an empty one.
    worker_factory("first" if restart_as == "same-data-dir" else "second", **WORKER_ENV)
    after = {
        "RF-RC-S4": claim(example_request, "RF-RC-S4", "BY-RC-SERIAL", 13, "d-rc-serial"),
        "RF-RC-N1": claim(example_request, "RF-RC-N1", "BY-RC-NEW", 14, FRAUD_DEVICE),
        "RF-RC-R1": claim(example_request, "RF-RC-R1", "BY-RC-REUSER", 14, "d-rc-reuser",
                          [{"image_id": "EV-R1", "url": f"{base}/images/again.jpg"}]),
        "RF-RC-C1": claim(example_request, "RF-RC-C1", "BY-RC-CONTROL", 14, "d-rc-control"),
    }
    for rid, value in after.items():
        kafka.send("refund.requests", rid, value)
    second = decided(kafka, set(after))
    found = {rid: codes(d) for rid, d in second.items()}

    assert second["RF-RC-S4"]["decision"] == "hold" and "CLAIM_VELOCITY_HIGH" in found["RF-RC-S4"], found
    assert second["RF-RC-N1"]["decision"] == "hold" and "LINKED_TO_CONFIRMED_FRAUD" in found["RF-RC-N1"], found
    assert second["RF-RC-R1"]["decision"] == "hold" and "EVIDENCE_REUSED" in found["RF-RC-R1"], found
    assert second["RF-RC-C1"]["decision"] == "approve", found


def partition_of(key: str, partitions: int) -> int:
    """The producers' default (murmur2) partitioner, which the by-buyer topic and the changelog share."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def seed_claims(bootstrap: str, example: dict[str, Any], buyer_id: str, days: list[int]) -> None:
    """Write a buyer's state after each claim to the changelog: the first alone, the others as ONE
    producer batch, as a worker's producer sends them under load. Tansu then lists the end offset
    as that batch's base offset + 1 (here 2, not 3). Faust skips its consistency check at 0."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=500, enable_idempotence=False)
    state: st.BuyerState | None = None
    for day in days:
        r = parse_request(json.dumps(claim(example, f"RF-{buyer_id}-{day}", buyer_id, day, f"d-{buyer_id}")).encode(),
                          1 << 20)
        state = st.record_claim(state, refund_id=r.refund_id, order_id=r.order_id, requested_at=r.requested_at,
                                merchant_id=r.merchant_id, amount=r.amount.amount, currency=r.amount.currency,
                                kind=r.kind, fingerprints=r.buyer.fingerprints())
        producer.send(BUYERS_CHANGELOG, key=buyer_id.encode(), value=json.dumps(state).encode())
        if day == days[0]:
            producer.flush()
    producer.flush()
    producer.close()


# Checked it fails without the protection: with the high-watermark fix switched off, the fresh
# worker stops reading after the batch's first record (BY-RB-A's 4th claim is approved), and with
# it off for the restart only, the restart on the same data dir dies with ConsistencyError.
def test_recovery_reads_a_changelog_to_its_true_end(
    broker: EmbeddedBroker, worker_factory: Callable[..., Worker], kafka_factory: Callable[[list[str]], Kafka],
    example_request: dict[str, Any],
) -> None:
    partitions = 4  # as the worker fixture configures
    other = next(f"BY-RB-{n}" for n in range(40)
                 if partition_of(f"BY-RB-{n}", partitions) != partition_of("BY-RB-A", partitions))
    buyers = ["BY-RB-A", other]
    create_topics(broker.bootstrap, [BUYERS_CHANGELOG], partitions)
    for buyer in buyers:
        seed_claims(broker.bootstrap, example_request, buyer, [10, 11, 12])

    worker = worker_factory("batch", **WORKER_ENV)  # empty data dir: everything comes from the changelog
    kafka = kafka_factory([DECISIONS])
    kafka.send("refund.requests", "RF-RB-A4", claim(example_request, "RF-RB-A4", buyers[0], 13, "d-rb-a"))
    first = decided(kafka, {"RF-RB-A4"})["RF-RB-A4"]
    assert first["decision"] == "hold" and "CLAIM_VELOCITY_HIGH" in codes(first), codes(first)

    # The other buyer's partition still ends in the seeded batch, now all in this RocksDB dir.
    kill_hard(worker)
    worker_factory("batch", **WORKER_ENV)
    kafka.send("refund.requests", "RF-RB-B4", claim(example_request, "RF-RB-B4", buyers[1], 13, "d-rb-b"))
    second = decided(kafka, {"RF-RB-B4"})["RF-RB-B4"]
    assert second["decision"] == "hold" and "CLAIM_VELOCITY_HIGH" in codes(second), codes(second)
