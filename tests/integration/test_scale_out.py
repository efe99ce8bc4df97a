"""Two workers in one consumer group split the partitions: every refund is decided, none twice
with different content, and a buyer's history follows its partition to the worker that takes it."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.conftest import Kafka, Worker
from tests.integration.test_recovery import claim, partition_of

pytestmark = pytest.mark.integration

WORKER_ENV = {"REFUNDGUARD_SCORING_DISABLED": '["image.reference", "image.provenance", "image.capture"]'}
PARTITIONS = 4  # as the worker fixture configures
BY_BUYER = "refundguard-by-buyer"
APPLIED = "refundguard-outcomes-applied"
REQUESTS = 100
LAG_LABELS = re.compile(r'refundguard_consumer_lag_messages\{partition="(\d+)",topic="([^"]+)"\}')


def owned_partitions(worker: Worker) -> set[int] | None:
    """The by-buyer partitions a ready worker reports lag for (its assignment), None if not ready."""
    with contextlib.suppress(OSError):
        if worker.get("/health/ready")[0] != 200:
            return None
        status, body = worker.get("/metrics")
        if status == 200:
            return {int(p) for p, topic in LAG_LABELS.findall(body.decode()) if topic == BY_BUYER}
    return None


def decided_ids(worker: Worker) -> set[str]:
    found = set()
    for line in worker.log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("message", "").startswith("decided ") and "refund_id" in entry:
                found.add(entry["refund_id"])
    return found


def decision_for(kafka: Kafka, refund_id: str) -> dict[str, Any]:
    key = refund_id.encode()
    records = kafka.collect("refund.decisions", lambda rs: any(r.key == key for r in rs), 30)
    return dict(json.loads(next(r.value for r in records if r.key == key)))


# Checked it fails without the protection: with the tables' keys JSON-decoded again (the bug fixed in
# streams/app.py) the second worker never finishes recovering the partitions it takes over.
def test_two_workers_split_the_partitions(worker_factory: Callable[..., Worker],
                                          kafka_factory: Callable[[list[str]], Kafka],
                                          example_request: dict[str, Any]) -> None:
    first = worker_factory("one", **WORKER_ENV)
    kafka = kafka_factory(["refund.decisions", APPLIED])
    # One serial buyer per partition: three claims with only the first worker running.
    serial: dict[int, str] = {}
    for n in range(200):
        serial.setdefault(partition_of(f"BY-SO-SERIAL-{n}", PARTITIONS), f"BY-SO-SERIAL-{n}")
    assert len(serial) == PARTITIONS
    early = {f"RF-SO-{b}-{day}": claim(example_request, f"RF-SO-{b}-{day}", b, day, f"d-{b}")
             for b in serial.values() for day in (10, 11, 12)}
    for rid, value in early.items():
        kafka.producer.send("refund.requests", key=rid.encode(), value=json.dumps(value).encode())
    kafka.producer.flush()
    kafka.collect("refund.decisions", lambda rs: set(early) <= {r.key.decode() for r in rs}, 60)

    second = worker_factory("two", **WORKER_ENV)
    deadline = time.monotonic() + 60
    while True:
        mine, theirs = owned_partitions(first), owned_partitions(second)
        if mine and theirs and not mine & theirs and mine | theirs == set(range(PARTITIONS)):
            break
        assert time.monotonic() < deadline, f"no split of the partitions: {mine} / {theirs}"
        time.sleep(0.5)

    # A fraud verdict applied by one worker taints a device for the other: the global table
    # reaches every worker through its changelog, eventually (each probe is a new account).
    fraudster = next(f"BY-SO-FRAUD-{n}" for n in range(200) if partition_of(f"BY-SO-FRAUD-{n}", PARTITIONS) in mine)
    kafka.send("refund.requests", "RF-SO-FRAUD", claim(example_request, "RF-SO-FRAUD", fraudster, 11, "d-so-shared"))
    decision_for(kafka, "RF-SO-FRAUD")
    kafka.send("refund.outcomes", "RF-SO-FRAUD", {
        "schema": "refund-outcome/v1", "refund_id": "RF-SO-FRAUD", "buyer_id": fraudster, "merchant_id": "MC-901",
        "verdict": "fraud", "decided_at": "2026-11-12T10:00:00Z", "source": "review",
    })
    kafka.collect(APPLIED, lambda rs: any(r.key == b"RF-SO-FRAUD" for r in rs), 30)  # by its owner
    linked: dict[str, Any] | None = None
    probes = (f"BY-SO-LINK-{n}" for n in range(1000) if partition_of(f"BY-SO-LINK-{n}", PARTITIONS) in theirs)
    deadline = time.monotonic() + 15
    while linked is None and time.monotonic() < deadline:
        buyer = next(probes)
        kafka.send("refund.requests", f"RF-{buyer}", claim(example_request, f"RF-{buyer}", buyer, 14, "d-so-shared"))
        probe = decision_for(kafka, f"RF-{buyer}")
        if "LINKED_TO_CONFIRMED_FRAUD" in [r["code"] for r in probe["reasons"]]:
            linked = probe
        time.sleep(0.2)
    assert linked is not None and linked["decision"] == "hold", "the other worker never saw the taint"
    assert decided_ids(second) >= {linked["refund_id"]}

    plain = {f"RF-SO-{n:03d}": claim(example_request, f"RF-SO-{n:03d}", f"BY-SO-{n:03d}", 13, f"d-so-{n:03d}")
             for n in range(REQUESTS)}
    fourth = {f"RF-SO-{b}-13": claim(example_request, f"RF-SO-{b}-13", b, 13, f"d-{b}") for b in serial.values()}
    late = plain | fourth
    for rid, value in late.items():
        kafka.producer.send("refund.requests", key=rid.encode(), value=json.dumps(value).encode())
    kafka.producer.flush()
    records = kafka.collect("refund.decisions", lambda rs: set(late) <= {r.key.decode() for r in rs}, 60)

    contents: dict[str, set[str]] = {}
    for r in records:
        contents.setdefault(r.key.decode(), set()).add(json.dumps(json.loads(r.value), sort_keys=True))
    assert set(early) | set(late) <= set(contents)
    assert not [rid for rid, c in contents.items() if len(c) > 1], "a refund decided twice with different content"
    decisions = {rid: json.loads(next(iter(c))) for rid, c in contents.items()}
    for rid in fourth:  # decided by whichever worker now owns the buyer's partition
        d = decisions[rid]
        assert d["decision"] == "hold" and "CLAIM_VELOCITY_HIGH" in [r["code"] for r in d["reasons"]], d
    assert {decisions[rid]["decision"] for rid in plain} == {"approve"}
    by_first, by_second = decided_ids(first) & set(late), decided_ids(second) & set(late)
    assert by_first and by_second, f"one worker decided everything: {len(by_first)} / {len(by_second)}"
    assert by_first | by_second == set(late)
