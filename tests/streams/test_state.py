"""State functions: event time only, idempotent, bounded."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from streams import state as st

T0 = datetime(2026, 10, 1, 12, tzinfo=UTC)


def claim(state: st.BuyerState | None, n: int, at: datetime, merchant: str = "MC-1", kind: str = "refund_only",
          amount: str = "50") -> st.BuyerState:
    return st.record_claim(state, refund_id=f"RF-{n}", order_id=f"OD-{n}", requested_at=at, merchant_id=merchant,
                           amount=Decimal(amount), currency="CNY", kind=kind, fingerprints={"device": "d1"})


def test_features_count_only_strictly_earlier_claims_and_never_the_request_itself() -> None:
    state = None
    for n, hours in enumerate([0, 10, 30, 100, 200]):
        state = claim(state, n, T0 + timedelta(hours=hours), merchant=f"MC-{n % 2}")
    at = T0 + timedelta(hours=100)
    f = st.buyer_features(state, refund_id="RF-3", requested_at=at, currency="CNY")
    assert (f.claims_24h, f.claims_7d, f.claims_10d, f.claims_30d) == (0, 3, 3, 3)
    assert f.distinct_merchants_30d == 2
    # A redelivery of an earlier request sees the same history as the first time, whatever came later.
    first = st.buyer_features(claim(None, 0, T0), refund_id="RF-1", requested_at=T0 + timedelta(hours=10),
                              currency="CNY")
    again = st.buyer_features(state, refund_id="RF-1", requested_at=T0 + timedelta(hours=10), currency="CNY")
    assert first == again


def test_record_claim_is_idempotent_and_bounded() -> None:
    state = claim(None, 1, T0)
    assert claim(state, 1, T0) == state
    for n in range(2, 400):
        state = claim(state, n, T0 + timedelta(hours=n))
    assert len(state["claims"]) <= st.MAX_CLAIMS
    newest = datetime.fromisoformat(state["claims"][-1]["t"])
    oldest = datetime.fromisoformat(state["claims"][0]["t"])
    assert newest - oldest <= st.CLAIM_HORIZON


def test_return_and_refund_claims_do_not_count_towards_velocity_but_towards_amounts() -> None:
    state = claim(None, 1, T0, kind="return_and_refund", amount="100")
    state = claim(state, 2, T0 + timedelta(hours=1), amount="300")
    f = st.buyer_features(state, refund_id="RF-9", requested_at=T0 + timedelta(hours=2), currency="CNY")
    assert f.claims_24h == 1 and f.amount_history_count == 2 and f.amount_history_median == Decimal("200")


def test_verdicts_and_taints_apply_only_after_they_were_decided() -> None:
    state = st.record_verdict(None, refund_id="RF-1", verdict="legitimate", decided_at=T0)
    before = st.buyer_features(state, refund_id="RF-2", requested_at=T0 - timedelta(hours=1), currency="CNY")
    after = st.buyer_features(state, refund_id="RF-2", requested_at=T0 + timedelta(hours=1), currency="CNY")
    assert (before.legitimate_verdicts, after.legitimate_verdicts) == (0, 1)

    taints = {st.taint_key("device", "d1"): st.taint_value(refund_id="RF-1", buyer_id="BY-F", decided_at=T0)}
    links_after = st.links_for({"device": "d1", "payment": "p9"}, T0 + timedelta(days=1), taints.get)
    links_before = st.links_for({"device": "d1"}, T0 - timedelta(days=1), taints.get)
    assert [(x.fingerprint_kind, x.refund_id) for x in links_after] == [("device", "RF-1")]
    assert links_before == ()


def test_the_earliest_fraud_confirmation_is_kept() -> None:
    late = st.taint_value(refund_id="RF-9", buyer_id="B", decided_at=T0 + timedelta(days=2))
    early = st.taint_value(refund_id="RF-1", buyer_id="A", decided_at=T0)
    assert st.merge_taint(st.merge_taint(None, late), early) == early
    assert st.merge_taint(early, late) == early


def test_evidence_matches_earlier_claims_within_distance_in_first_use_order() -> None:
    def bands(h: int) -> list[str]:
        return [f"b{i}:{(h >> (16 * i)) & 0xFFFF:04x}" for i in range(4)]

    def distance(a: int, b: int) -> int:
        return (a ^ b).bit_count()

    index: dict[str, list[list[object]]] = {}
    photo = 0x0123_4567_89AB_CDEF
    for n, (h, days) in enumerate([(photo, 2), (photo ^ 0b101, 1), (~photo & (2**64 - 1), 0)]):
        entry = st.index_entry(evidence_hash=h, refund_id=f"RF-{n}", buyer_id=f"BY-{n}", order_id=f"OD-{n}",
                               image_id=f"EV-{n}", requested_at=T0 + timedelta(days=days))
        for b in bands(h):
            index[b] = st.add_to_band(index.get(b), entry)
    found = st.evidence_matches({"EV-X": photo ^ 0b1}, refund_id="RF-X", requested_at=T0 + timedelta(days=5),
                                band_keys=bands, distance=distance, max_distance=4, lookup=index.get)
    assert [(m.earlier_refund_id, m.distance) for m in found] == [("RF-1", 1), ("RF-0", 1)]
    # The first claim itself, and anything later in event time, is not a match.
    own = st.evidence_matches({"EV-0": photo}, refund_id="RF-0", requested_at=T0 + timedelta(days=2),
                              band_keys=bands, distance=distance, max_distance=4, lookup=index.get)
    assert [m.earlier_refund_id for m in own] == ["RF-1"]
