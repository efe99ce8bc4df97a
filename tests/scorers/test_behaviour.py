"""The behaviour scorers: pure functions of the request and the looked-up buyer features."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scorers.base import BuyerFeatures, FraudLink, RequestFacts, ScoreResult, ScoringInput
from scorers.behaviour import (
    BEHAVIOUR_SCORERS,
    AccountScorer,
    AmountScorer,
    LinkedAccountScorer,
    VelocityScorer,
)
from scorers.policy import decide, load_policy

NOW = datetime(2026, 10, 5, 12, 0, tzinfo=UTC)
POLICY = load_policy()


def request(**changes: object) -> RequestFacts:
    base = RequestFacts(
        refund_id="RF-000100",
        order_id="OD-000100",
        buyer_id="BY-me",
        merchant_id="MC-001",
        requested_at=NOW,
        kind="refund_only",
        reason="damaged",
        amount=Decimal("129.90"),
        currency="CNY",
        placed_at=NOW - timedelta(days=6),
        delivered_at=NOW - timedelta(days=2),
        account_created_at=NOW - timedelta(days=400),
    )
    return replace(base, **changes)


def scoring(features: BuyerFeatures | None = None, **request_changes: object) -> ScoringInput:
    return ScoringInput(request=request(**request_changes), features=features or BuyerFeatures())


def threshold(name: str) -> float:
    return POLICY.scorers[name].threshold


def codes(result: ScoreResult) -> list[str]:
    return [r.code for r in result.reasons]


def history(earlier_in_10d: int, *, earlier_in_30d: int | None = None, merchants: int = 1,
            legit: int = 0, fraud: int = 0) -> BuyerFeatures:
    """Features of a buyer whose earlier claims were all spaced over more than a day."""
    in_30d = earlier_in_10d if earlier_in_30d is None else earlier_in_30d
    return BuyerFeatures(
        claims_24h=min(earlier_in_10d, 1),
        claims_7d=earlier_in_10d,
        claims_10d=earlier_in_10d,
        claims_30d=in_30d,
        refund_only_claims_30d=in_30d,
        distinct_merchants_30d=min(merchants, in_30d),
        legitimate_verdicts=legit,
        fraud_verdicts=fraud,
    )


# ------------------------------------------------------------------ velocity


def test_first_claim_has_no_velocity() -> None:
    result = VelocityScorer().score(scoring())
    assert result.score == 0.0
    assert result.reasons == ()


@pytest.mark.parametrize("earlier", [0, 1, 2])
def test_fourth_claim_in_ten_days_holds_and_earlier_ones_do_not(earlier: int) -> None:
    line = threshold("behaviour.velocity")
    below = VelocityScorer().score(scoring(history(earlier, merchants=earlier)))
    assert below.score < line
    fourth = VelocityScorer().score(scoring(history(3, merchants=1)))
    assert fourth.score >= line
    assert codes(fourth) == ["CLAIM_VELOCITY_HIGH"]
    assert fourth.reasons[0].score >= line


def test_genuine_buyer_with_one_or_two_claims_a_month_stays_well_under() -> None:
    line = threshold("behaviour.velocity")
    for earlier in (1, 2):
        # Earlier claims spread across the month, even both inside the last 10 days.
        spread = VelocityScorer().score(scoring(history(0, earlier_in_30d=earlier)))
        recent = VelocityScorer().score(scoring(history(earlier)))
        assert spread.score < line - 0.2
        assert recent.score < line - 0.2


def test_burst_in_one_day_holds() -> None:
    burst = BuyerFeatures(claims_24h=2, claims_7d=2, claims_10d=2, claims_30d=2, distinct_merchants_30d=2)
    assert VelocityScorer().score(scoring(burst)).score >= threshold("behaviour.velocity")


def test_sustained_pace_over_thirty_days_holds() -> None:
    slow = history(1, earlier_in_30d=5)  # the sixth claim in a month, only two of them in 10 days
    assert VelocityScorer().score(scoring(slow)).score >= threshold("behaviour.velocity")
    assert VelocityScorer().score(scoring(history(1, earlier_in_30d=3))).score < threshold("behaviour.velocity")


def test_velocity_evidence_names_the_counts() -> None:
    features = BuyerFeatures(claims_24h=1, claims_7d=3, claims_10d=4, claims_30d=6, distinct_merchants_30d=5)
    reason = VelocityScorer().score(scoring(features)).reasons[0]
    assert {k: reason.evidence[k] for k in ("claims_24h", "claims_7d", "claims_10d", "claims_30d",
                                             "distinct_merchants_30d")} == {
        "claims_24h": 1, "claims_7d": 3, "claims_10d": 4, "claims_30d": 6, "distinct_merchants_30d": 5}
    assert "5 merchant" in reason.message


def test_velocity_rises_with_claims() -> None:
    scores = [VelocityScorer().score(scoring(history(n))).score for n in range(0, 12)]
    assert scores == sorted(scores)
    assert scores[-1] > scores[4] > scores[3]  # keeps rising past the line


@settings(max_examples=200, deadline=None)
@given(
    a=st.tuples(*[st.integers(0, 40)] * 5),
    bump=st.sampled_from(["claims_24h", "claims_7d", "claims_10d", "claims_30d", "distinct_merchants_30d",
                          "fraud_verdicts"]),
    legit=st.integers(0, 5),
    kind=st.sampled_from(["refund_only", "return_and_refund"]),
)
def test_velocity_never_drops_when_a_count_grows(a: tuple[int, ...], bump: str, legit: int, kind: str) -> None:
    h24, d7, d10, d30, merchants = a
    features = BuyerFeatures(claims_24h=h24, claims_7d=d7, claims_10d=d10, claims_30d=d30,
                             distinct_merchants_30d=merchants, legitimate_verdicts=legit)
    more = replace(features, **{bump: getattr(features, bump) + 1})
    low = VelocityScorer().score(scoring(features, kind=kind)).score
    high = VelocityScorer().score(scoring(more, kind=kind)).score
    assert 0.0 <= low <= high <= 1.0


def test_verdicts_adjust_velocity_a_little() -> None:
    base = VelocityScorer().score(scoring(history(3))).score
    honest = VelocityScorer().score(scoring(history(3, legit=1))).score
    caught = VelocityScorer().score(scoring(history(3, fraud=1))).score
    assert honest < base < caught
    assert base - honest < 0.1


def test_returns_lower_velocity() -> None:
    features = history(4)
    refund_only = VelocityScorer().score(scoring(features)).score
    returning = VelocityScorer().score(scoring(features, kind="return_and_refund"))
    assert returning.score < refund_only
    assert returning.score < threshold("behaviour.velocity")
    assert "returns the goods" in returning.reasons[0].message


def test_velocity_hold_goes_through_the_policy() -> None:
    data = scoring(history(3, merchants=3))
    verdict = decide(POLICY, data.request, {"behaviour.velocity": VelocityScorer().score(data)})
    assert verdict.decision == "hold"
    assert verdict.reasons[0].code == "CLAIM_VELOCITY_HIGH"
    assert verdict.review is not None and verdict.review.queue == "abuse"


# ------------------------------------------------------------------ account


def test_old_account_claim_after_delivery_is_clean() -> None:
    result = AccountScorer().score(scoring())
    assert result.score == 0.0 and result.reasons == ()


@pytest.mark.parametrize(("age", "expected"), [
    (timedelta(hours=3), 0.5),
    (timedelta(days=1, hours=23), 0.5),
    (timedelta(days=2, hours=1), 0.3),
    (timedelta(days=6, hours=23), 0.3),
    (timedelta(days=7, hours=1), 0.0),
])
def test_new_account_levels(age: timedelta, expected: float) -> None:
    result = AccountScorer().score(scoring(account_created_at=NOW - age))
    assert result.score == pytest.approx(expected)
    assert codes(result) == (["ACCOUNT_NEW"] if expected else [])


def test_account_age_never_lowers_as_the_account_gets_younger() -> None:
    ages = [timedelta(days=d) for d in (30, 10, 7, 6, 3, 2, 1, 0.1)]
    scores = [AccountScorer().score(scoring(account_created_at=NOW - a)).score for a in ages]
    assert scores == sorted(scores)


def test_damage_claim_before_delivery_is_flagged() -> None:
    result = AccountScorer().score(scoring(delivered_at=NOW + timedelta(days=1)))
    assert codes(result) == ["CLAIM_BEFORE_DELIVERY"]
    assert result.reasons[0].evidence["hours_before_delivery"] == pytest.approx(24.0)
    assert 0.3 <= result.score < threshold("behaviour.account")


def test_late_carrier_scan_is_not_a_claim_before_delivery() -> None:
    result = AccountScorer().score(scoring(delivered_at=NOW + timedelta(minutes=40)))
    assert result.score == 0.0


def test_not_received_is_never_a_claim_before_delivery() -> None:
    early = AccountScorer().score(scoring(reason="not_received", delivered_at=NOW + timedelta(days=2)))
    assert early.score == 0.0
    # delivered_at set and the buyer says it never came: normal, not a signal by itself.
    late = AccountScorer().score(scoring(reason="not_received", delivered_at=NOW - timedelta(days=3)))
    assert late.score == 0.0


def test_no_delivery_time_is_not_a_signal() -> None:
    assert AccountScorer().score(scoring(delivered_at=None)).score == 0.0


def test_new_account_and_early_claim_give_both_reasons_strongest_first() -> None:
    result = AccountScorer().score(scoring(account_created_at=NOW - timedelta(hours=5),
                                           delivered_at=NOW + timedelta(days=1)))
    assert sorted(codes(result)) == ["ACCOUNT_NEW", "CLAIM_BEFORE_DELIVERY"]
    assert [r.score for r in result.reasons] == sorted((r.score for r in result.reasons), reverse=True)
    assert result.score == max(r.score for r in result.reasons)


def test_account_signal_never_holds_alone() -> None:
    data = scoring(account_created_at=NOW - timedelta(hours=1), delivered_at=NOW + timedelta(days=3))
    verdict = decide(POLICY, data.request, {"behaviour.account": AccountScorer().score(data)})
    assert verdict.decision == "approve"


# ------------------------------------------------------------------ amount


def amounts(count: int, median: str) -> BuyerFeatures:
    return BuyerFeatures(amount_history_count=count, amount_history_median=Decimal(median))


@pytest.mark.parametrize(("amount", "flagged"), [("100", False), ("499.99", False), ("500", True), ("4000", True)])
def test_amount_ratio_line(amount: str, flagged: bool) -> None:
    result = AmountScorer().score(scoring(amounts(5, "100"), amount=Decimal(amount)))
    assert (result.score > 0) is flagged
    assert codes(result) == (["AMOUNT_UNUSUAL_FOR_BUYER"] if flagged else [])
    if flagged:
        assert 0.5 <= result.score <= 0.8
        assert result.reasons[0].evidence["history_median"] == "100"


def test_amount_score_rises_with_ratio() -> None:
    scores = [AmountScorer().score(scoring(amounts(4, "50"), amount=Decimal(a))).score
              for a in ("200", "250", "400", "800", "1000", "5000")]
    assert scores == sorted(scores)
    assert scores[1] == pytest.approx(0.5)
    assert scores[-1] == pytest.approx(0.8)


def test_amount_needs_history() -> None:
    assert AmountScorer().score(scoring(amounts(2, "10"), amount=Decimal("999"))).score == 0.0
    assert AmountScorer().score(scoring(BuyerFeatures(amount_history_count=5), amount=Decimal("999"))).score == 0.0
    assert AmountScorer().score(scoring(amounts(5, "0"), amount=Decimal("999"))).score == 0.0


# ------------------------------------------------------------------ linked accounts


def link(kind: str, refund: str = "RF-000007", buyer: str = "BY-bad", fingerprint: str = "dv-0123456789abcdef",
         decided: datetime = NOW - timedelta(days=2)) -> FraudLink:
    return FraudLink(kind, fingerprint, refund, buyer, decided)


def test_no_links_no_score() -> None:
    assert LinkedAccountScorer().score(scoring()).score == 0.0


@pytest.mark.parametrize(("kind", "expected"), [("device", 0.95), ("payment", 0.95), ("address", 0.8)])
def test_link_scores_and_holds(kind: str, expected: float) -> None:
    data = scoring(BuyerFeatures(tainted_links=(link(kind),)))
    result = LinkedAccountScorer().score(data)
    assert result.score == pytest.approx(expected)
    assert result.score >= threshold("behaviour.linked")
    reason = result.reasons[0]
    assert reason.code == "LINKED_TO_CONFIRMED_FRAUD"
    assert reason.evidence == {
        "fingerprint_kind": kind,
        "fingerprint_prefix": "dv-012",
        "linked_refund_id": "RF-000007",
        "linked_buyer_id": "BY-bad",
        "confirmed_at": "2026-10-03T12:00:00Z",
    }
    assert "RF-000007" in reason.message and "BY-bad" in reason.message
    verdict = decide(POLICY, data.request, {"behaviour.linked": result})
    assert verdict.decision == "hold" and verdict.review is not None and verdict.review.queue == "fraud-ring"


def test_message_never_carries_the_fingerprint() -> None:
    secret = "pm-9f8e7d6c5b4a39281706"
    result = LinkedAccountScorer().score(scoring(BuyerFeatures(tainted_links=(link("payment", fingerprint=secret),))))
    reason = result.reasons[0]
    assert secret not in reason.message and secret[:6] not in reason.message
    assert secret not in str(reason.evidence)
    assert reason.evidence["fingerprint_prefix"] == secret[:6]


def test_one_reason_per_link_strongest_first() -> None:
    links = (link("address", refund="RF-000001"), link("payment", refund="RF-000002"),
             link("device", refund="RF-000003"), link("device", refund="RF-000003"))  # last one repeated
    result = LinkedAccountScorer().score(scoring(BuyerFeatures(tainted_links=links)))
    kinds = [r.evidence["fingerprint_kind"] for r in result.reasons]
    assert sorted(kinds[:2]) == ["device", "payment"] and kinds[2] == "address"
    assert len(result.reasons) == 3
    assert result.score == pytest.approx(0.95)


def test_own_earlier_fraud_links_too_but_this_refund_does_not() -> None:
    own = LinkedAccountScorer().score(scoring(BuyerFeatures(tainted_links=(link("device", buyer="BY-me"),))))
    assert own.score == pytest.approx(0.95)
    assert "This buyer's device" in own.reasons[0].message
    itself = LinkedAccountScorer().score(scoring(BuyerFeatures(tainted_links=(link("device", refund="RF-000100"),))))
    assert itself.score == 0.0


def test_unknown_fingerprint_kind_still_links() -> None:
    result = LinkedAccountScorer().score(scoring(BuyerFeatures(tainted_links=(link("phone"),))))
    assert 0.6 <= result.score < 0.95
    assert result.reasons[0].evidence["fingerprint_kind"] == "phone"


# ------------------------------------------------------------------ all of them


def test_behaviour_scorers_export() -> None:
    assert {s.name for s in BEHAVIOUR_SCORERS} == {
        "behaviour.velocity", "behaviour.account", "behaviour.amount", "behaviour.linked"}
    assert all(s.kind == "behaviour" for s in BEHAVIOUR_SCORERS)
    assert all(name in POLICY.scorers for name in (s.name for s in BEHAVIOUR_SCORERS))


counts = st.integers(0, 10_000)
moments = st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC))


@settings(max_examples=200, deadline=None)
@given(
    c=st.tuples(counts, counts, counts, counts, counts, counts, counts),
    median=st.one_of(st.none(), st.decimals(min_value=0, max_value=10**6, places=2)),
    amount=st.decimals(min_value=Decimal("0.01"), max_value=10**7, places=2),
    created=moments, delivered=st.one_of(st.none(), moments),
    kinds=st.lists(st.sampled_from(["device", "payment", "address", "other"]), max_size=4),
    kind=st.sampled_from(["refund_only", "return_and_refund"]),
    reason=st.sampled_from(["damaged", "not_received", "other"]),
)
def test_scores_always_in_unit_interval(c, median, amount, created, delivered, kinds, kind, reason) -> None:
    features = BuyerFeatures(
        claims_24h=c[0], claims_7d=c[1], claims_10d=c[2], claims_30d=c[3], distinct_merchants_30d=c[4],
        legitimate_verdicts=c[5], fraud_verdicts=c[6], amount_history_count=c[4],
        amount_history_median=median, tainted_links=tuple(link(k, refund=f"RF-{i}") for i, k in enumerate(kinds)),
    )
    data = scoring(features, amount=amount, account_created_at=created, delivered_at=delivered, kind=kind,
                   reason=reason)
    for scorer in BEHAVIOUR_SCORERS:
        result = scorer.score(data)
        assert 0.0 <= result.score <= 1.0
        assert all(0.0 <= r.score <= result.score for r in result.reasons)
        assert (result.score > 0) == bool(result.reasons)
