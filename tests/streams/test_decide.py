"""The decide step without a broker: state, behaviour, reuse, taints, shadow policy, redelivery.

Tables are plain dicts, topics capture what is sent, the image pool runs in-process.
"""

from __future__ import annotations

import base64
import copy
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scorers.policy import load_policy
from streams.app import DecideStep, RefundGuard, build
from streams.image_pool import ImageJob, ImageJobResult, _init_child, run_image_job
from streams.settings import Settings
from streams.simulate import images as sim

T0 = datetime(2026, 10, 1, 9, tzinfo=UTC)


@dataclass
class Message:
    value: bytes
    topic: str = "refundguard-by-buyer"
    partition: int = 0
    offset: int = 0
    key: bytes | None = b"BY-1"


@dataclass(eq=False)
class Event:
    message: Message


class Topic:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, dict[str, Any]]] = []

    async def send(self, key: bytes, value: bytes) -> None:
        self.sent.append((key, json.loads(value)))


class InlinePool:
    async def run(self, job: ImageJob) -> ImageJobResult:
        return run_image_job(job)


@pytest.fixture
def step(tmp_path: Path) -> DecideStep:
    _init_child((), ())
    shadow = tmp_path / "shadow.toml"
    shadow.write_text(
        (Path(__file__).parents[2] / "scorers" / "policies" / "default.toml").read_text()
        .replace('version = "2026-11-23.1"', 'version = "shadow-1"').replace('CNY = "3000"', 'CNY = "50"')
    )
    g: RefundGuard = build(Settings(store="memory", data_dir=tmp_path, shadow_policy_file=shadow), start_pool=False)
    d = g.decider
    d.buyers, d.taints, d.evidence_index = {}, {}, {}
    d.decisions_topic, d.shadow_topic, d.applied_topic, d.dlq_topic = Topic(), Topic(), Topic(), Topic()
    d.scorer.pool = InlinePool()  # type: ignore[assignment]
    return d


def request(example: dict[str, Any], n: int, *, buyer: str, at: datetime, device: str = "dev-1",
            evidence: list[dict[str, str]] | None = None) -> dict[str, Any]:
    r = copy.deepcopy(example)
    r.update(refund_id=f"RF-{n}", order_id=f"OD-{n}", buyer_id=buyer, requested_at=at.isoformat(),
             evidence=evidence or [], reference_images=[])
    r["order"] = {"placed_at": (at - timedelta(days=4)).isoformat(),
                  "delivered_at": (at - timedelta(days=1)).isoformat()}
    r["buyer"] = {"account_created_at": "2024-01-01T00:00:00Z", "device_fingerprint": device,
                  "payment_fingerprint": f"pay-{buyer}", "address_fingerprint": f"adr-{buyer}"}
    return r


async def feed(step: DecideStep, *envelopes: dict[str, Any]) -> None:
    events = [Event(Message(json.dumps(e).encode(), offset=i)) for i, e in enumerate(envelopes)]
    await step.handle_batch(events)  # type: ignore[arg-type]


def req(value: dict[str, Any]) -> dict[str, Any]:
    return {"type": "request", "ts": None, "value": value}


def decisions(step: DecideStep) -> dict[str, dict[str, Any]]:
    return {k.decode(): v for k, v in step.decisions_topic.sent}  # type: ignore[attr-defined]


def codes(d: dict[str, Any]) -> list[str]:
    return [r["code"] for r in d["reasons"]]


async def test_serial_claims_are_held_from_the_fourth_in_ten_days(step: DecideStep, example_request: dict) -> None:
    claims = [req(request(example_request, n, buyer="BY-S", at=T0 + timedelta(hours=20 * n))) for n in range(5)]
    await feed(step, *claims[:2])  # one batch, in order: the second sees the first
    await feed(step, *claims[2:])
    got = decisions(step)
    assert [got[f"RF-{n}"]["decision"] for n in range(5)] == ["approve", "approve", "approve", "hold", "hold"]
    assert codes(got["RF-3"])[0] == "CLAIM_VELOCITY_HIGH"
    # Redelivery of an early claim after later ones: same content as the first time.
    first = step.decisions_topic.sent[1][1]  # type: ignore[attr-defined]
    await feed(step, claims[1])
    assert step.decisions_topic.sent[-1][1] == first  # type: ignore[attr-defined]


async def test_a_fraud_verdict_taints_fingerprints_for_later_accounts(step: DecideStep, example_request: dict,
                                                                     example_outcome: dict) -> None:
    bad = request(example_request, 1, buyer="BY-F", at=T0, device="dev-shared")
    outcome = {**example_outcome, "refund_id": "RF-1", "buyer_id": "BY-F",
               "decided_at": (T0 + timedelta(hours=5)).isoformat()}
    twin_before = request(example_request, 2, buyer="BY-N1", at=T0 + timedelta(hours=2), device="dev-shared")
    twin_after = request(example_request, 3, buyer="BY-N2", at=T0 + timedelta(days=2), device="dev-shared")
    await feed(step, req(bad), req(twin_before))
    await feed(step, {"type": "outcome", "ts": None, "value": outcome})
    await feed(step, req(twin_after))
    got = decisions(step)
    assert got["RF-2"]["decision"] == "approve"  # asked before the verdict: event time decides
    assert got["RF-3"]["decision"] == "hold" and codes(got["RF-3"])[0] == "LINKED_TO_CONFIRMED_FRAUD"
    assert got["RF-3"]["reasons"][0]["evidence"]["linked_refund_id"] == "RF-1"
    assert step.applied_topic.sent[0][0] == b"RF-1"  # type: ignore[attr-defined]


async def test_a_photo_reused_by_another_buyer_is_held_naming_the_first_claim(step: DecideStep,
                                                                               example_request: dict) -> None:
    rng = np.random.default_rng(3)
    photo = sim.buyer_photo(sim.make_product(rng, 2), rng, "stain")
    original = base64.b64encode(sim.encode(photo, "JPEG", 90)).decode()
    smaller = photo.resize((int(photo.width * 0.85), int(photo.height * 0.9)))
    copy_ = base64.b64encode(sim.encode(smaller, "WEBP", 80)).decode()
    other = base64.b64encode(sim.encode(sim.buyer_photo(sim.make_product(rng, 2), rng, "stain"), "JPEG")).decode()
    first = request(example_request, 1, buyer="BY-A", at=T0, evidence=[{"image_id": "EV-1", "data": original}])
    reuse = request(example_request, 2, buyer="BY-B", at=T0 + timedelta(days=1),
                    evidence=[{"image_id": "EV-2", "data": copy_}])
    fresh = request(example_request, 3, buyer="BY-C", at=T0 + timedelta(days=1),
                    evidence=[{"image_id": "EV-3", "data": other}])
    await feed(step, req(first))
    await feed(step, req(reuse), req(fresh))
    got = decisions(step)
    assert got["RF-1"]["decision"] == "approve" and got["RF-3"]["decision"] == "approve"
    assert got["RF-2"]["decision"] == "hold" and codes(got["RF-2"])[0] == "EVIDENCE_REUSED"
    assert got["RF-2"]["reasons"][0]["evidence"]["first_refund_id"] == "RF-1"


async def test_edits_of_one_listing_photo_by_two_buyers_are_not_reuse(step: DecideStep,
                                                                      example_request: dict) -> None:
    """Both claims are the merchant's photo with damage painted in: each is held as edited from
    the listing, and the second is not called a reuse of the first (the listing photo is not
    either buyer's evidence, so it is neither indexed nor looked up)."""
    rng = np.random.default_rng(5)
    product = sim.make_product(rng, 1)
    listing = sim.listing_photo(product, rng)
    listing_ref = [{"image_id": "LS-1", "source": "listing",
                    "data": base64.b64encode(sim.encode(listing, "JPEG", 92)).decode()}]
    claims = []
    for n, (buyer, damage) in enumerate([("BY-P", "crack"), ("BY-Q", "stain")], start=1):
        edited, _ = sim.edit_listing(listing, product, rng, damage)
        data = base64.b64encode(sim.encode(edited, "JPEG", 88)).decode()
        r = request(example_request, n, buyer=buyer, at=T0 + timedelta(days=n),
                    evidence=[{"image_id": f"EV-{n}", "data": data}])
        r["reference_images"] = listing_ref
        claims.append(r)
    await feed(step, req(claims[0]))
    await feed(step, req(claims[1]))
    got = decisions(step)
    for rid in ("RF-1", "RF-2"):
        assert got[rid]["decision"] == "hold" and codes(got[rid])[0] == "EVIDENCE_EDITED_FROM_LISTING", codes(got[rid])
        assert "EVIDENCE_REUSED" not in codes(got[rid])
    assert step.evidence_index == {}


async def test_shadow_policy_decides_the_same_scores_separately(step: DecideStep, example_request: dict) -> None:
    await feed(step, req(request(example_request, 1, buyer="BY-X", at=T0)))
    live = decisions(step)["RF-1"]
    ((_, shadow),) = step.shadow_topic.sent  # type: ignore[attr-defined]
    assert live["decision"] == "approve" and "shadow" not in live
    assert shadow["shadow"] is True and shadow["policy_version"] == "shadow-1"
    assert shadow["decision"] == "hold" and codes(shadow) == ["HIGH_VALUE"]  # its line is 50 CNY
    assert shadow["scores"] == live["scores"]
    assert load_policy().version == live["policy_version"]


async def test_a_broken_internal_message_is_dead_lettered_and_the_batch_goes_on(step: DecideStep,
                                                                                example_request: dict) -> None:
    good = req(request(example_request, 1, buyer="BY-Y", at=T0))
    events = [Event(Message(b"{broken", offset=7)), Event(Message(json.dumps(good).encode()))]
    await step.handle_batch(events)  # type: ignore[arg-type]
    assert list(decisions(step)) == ["RF-1"]
    ((_, letter),) = step.dlq_topic.sent  # type: ignore[attr-defined]
    assert letter["error_kind"] == "internal" and letter["source"]["offset"] == 7


async def test_when_even_the_fallback_hold_fails_the_request_is_dead_lettered(
    step: DecideStep, example_request: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise OverflowError("date value out of range")

    monkeypatch.setattr("streams.app.decide", broken)
    await feed(step, req(request(example_request, 1, buyer="BY-Z", at=T0)))
    assert decisions(step) == {}
    ((_, letter),) = step.dlq_topic.sent  # type: ignore[attr-defined]
    assert letter["error_kind"] == "processing" and "OverflowError" in letter["error"]
