from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from scorers.base import Reason, RequestFacts, ScoreResult
from scorers.policy import PolicyError, ScorerFailure, decide, load_policy

T0 = datetime(2026, 11, 23, 9, 41, 7, tzinfo=UTC)
FACTS = RequestFacts(
    refund_id="RF-1", order_id="OD-1", buyer_id="BY-1", merchant_id="MC-1", requested_at=T0, kind="refund_only",
    reason="damaged", amount=Decimal("59.90"), currency="CNY", placed_at=T0 - timedelta(days=5),
    delivered_at=T0 - timedelta(days=2), account_created_at=T0 - timedelta(days=400),
)
POLICY = load_policy()


def quiet(score: float = 0.1) -> ScoreResult:
    return ScoreResult(score)


def test_default_policy_is_versioned_and_has_the_high_value_line() -> None:
    assert POLICY.version
    assert POLICY.high_value.lines["CNY"] == Decimal("3000")
    assert POLICY.review.merchant_response_hours == 72


def test_approves_when_every_scorer_is_quiet() -> None:
    verdict = decide(POLICY, FACTS, {"image.reference": quiet(), "behaviour.velocity": quiet(0.3)})
    assert verdict.decision == "approve"
    assert verdict.review is None and verdict.reasons == ()
    assert verdict.scores == {"image.reference": 0.1, "behaviour.velocity": 0.3}


def test_one_decisive_signal_is_not_averaged_away() -> None:
    results = {f"s{i}": quiet(0.0) for i in range(10)}
    results["image.reference"] = ScoreResult(0.95, (Reason("EVIDENCE_EDITED_FROM_LISTING", "edited", 0.95),))
    verdict = decide(POLICY, FACTS, results)
    assert verdict.decision == "hold"
    assert verdict.risk == pytest.approx(0.95)
    assert verdict.reasons[0].code == "EVIDENCE_EDITED_FROM_LISTING"
    assert verdict.review is not None and verdict.review.queue == "image-fraud"
    assert verdict.review.priority == "high"  # 0.95 >= high_priority_at 0.9
    assert verdict.review.merchant_response_by == T0 + timedelta(hours=72)


def test_threshold_is_inclusive_and_signal_only_scorers_never_hold() -> None:
    at = decide(POLICY, FACTS, {"behaviour.velocity": ScoreResult(0.6, (Reason("CLAIM_VELOCITY_HIGH", "m", 0.6),))})
    below = decide(POLICY, FACTS, {"behaviour.velocity": ScoreResult(0.59)})
    capture = decide(POLICY, FACTS, {"image.capture": ScoreResult(1.0, (Reason("CAPTURE_BEFORE_DELIVERY", "m", 1.0),))})
    assert (at.decision, below.decision, capture.decision) == ("hold", "approve", "approve")
    assert capture.scores["image.capture"] == 1.0


@pytest.mark.parametrize(("amount", "held"), [("2999.99", False), ("3000", True), ("3000.00", True), ("9000", True)])
def test_high_value_line(amount: str, held: bool) -> None:
    verdict = decide(POLICY, replace(FACTS, amount=Decimal(amount)), {})
    assert (verdict.decision == "hold") is held
    if held:
        assert [r.code for r in verdict.reasons] == ["HIGH_VALUE"]
        assert verdict.review is not None and verdict.review.queue == "high-value"


def test_unknown_currency_cannot_be_checked_so_it_holds() -> None:
    verdict = decide(POLICY, replace(FACTS, currency="USD"), {})
    assert verdict.decision == "hold" and verdict.reasons[0].code == "CURRENCY_UNSUPPORTED"


def test_failures_and_input_problems_hold_never_approve() -> None:
    failed = decide(POLICY, FACTS, {"image.reference": ScorerFailure("SCORER_TIMEOUT", "slow")})
    assert failed.decision == "hold" and failed.reasons[0].code == "SCORER_TIMEOUT"
    assert failed.scores == {"image.reference": None}
    problem = decide(POLICY, FACTS, {}, (Reason("IMAGE_NOT_FOUND", "EV-1: HTTP 404", 1.0, {"image_id": "EV-1"}),))
    assert problem.decision == "hold" and problem.reasons[0].evidence == {"image_id": "EV-1"}
    assert problem.review is not None and problem.review.queue == "unverifiable"


def test_reasons_are_sorted_strongest_first_and_stable() -> None:
    results = {
        "behaviour.velocity": ScoreResult(0.7, (Reason("CLAIM_VELOCITY_HIGH", "m", 0.7),)),
        "image.provenance": ScoreResult(0.97, (Reason("AI_LABEL_IMPLICIT", "m", 0.97),)),
        "behaviour.linked": ScoreResult(0.95, (Reason("LINKED_TO_CONFIRMED_FRAUD", "m", 0.95),)),
    }
    first = decide(POLICY, FACTS, results)
    second = decide(POLICY, FACTS, dict(reversed(list(results.items()))))
    assert [r.code for r in first.reasons] == ["AI_LABEL_IMPLICIT", "LINKED_TO_CONFIRMED_FRAUD", "CLAIM_VELOCITY_HIGH"]
    assert first == second


def test_policy_file_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("version = \n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(bad)
    bad.write_text('version = "x"\n[scorers."image.reference"]\nthreshold = 1.5\nqueue = "q"\n')
    with pytest.raises(PolicyError, match=r"scorers\.image\.reference\.threshold"):
        load_policy(bad)
    bad.write_text('version = "x"\nthreshhold = 1\n')
    with pytest.raises(PolicyError, match="threshhold"):
        load_policy(bad)
