"""Behaviour scorers: the buyer's history and links, not the photos.

Each is pure arithmetic on :class:`~scorers.base.RequestFacts` and
:class:`~scorers.base.BuyerFeatures` (whose counts exclude the request being
scored), so they run inline on the event loop. Time is event time: every age
is measured from ``requested_at``.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from scorers.base import FraudLink, Reason, ScoreResult, ScorerKind, ScoringInput, clamp01

# What a velocity window scores at its line: over the policy threshold (0.6 in
# default.toml) by a margin, not by float luck.
LINE_SCORE = 0.62

# ------------------------------------------------------------------ velocity

# Window -> the claim count (this request included) at which the window alone
# reaches LINE_SCORE. The 10-day line is the case definition of a serial abuser
# ("from the fourth claim in 10 days"). Three in one day is a burst no genuine
# buyer needs; the 30-day line catches a slower but sustained pace.
VELOCITY_LINES: dict[str, tuple[timedelta, int]] = {
    "24h": (timedelta(hours=24), 3),
    "7d": (timedelta(days=7), 4),
    "10d": (timedelta(days=10), 4),
    "30d": (timedelta(days=30), 6),
}
MERCHANT_SPREAD = 3  # claims against this many merchants in 30 days add SPREAD_BONUS
SPREAD_BONUS = 0.05
LEGITIMATE_SOFTENING = 0.05  # per verdict, at most two: a reviewed honest history is worth a little
FRAUD_RAISE = 0.10  # per verdict, at most two
RETURN_FACTOR = 0.6  # a return costs the buyer the goods: repeated returns are not refund-only abuse


def velocity_curve(count: int, line: int) -> float:
    """Score of ``count`` claims in a window whose hold line is ``line`` claims.

    0 for a single claim, convex below the line so one or two claims stay low,
    LINE_SCORE at the line, then rising towards 1 (never reaching it).
    """
    if count <= 1:
        return 0.0
    if count <= line:
        return LINE_SCORE * ((count - 1) / (line - 1)) ** 1.5
    return 1.0 - (1.0 - LINE_SCORE) * 0.75 ** (count - line)


class VelocityScorer:
    """Many refund-only claims in a short time: the serial abuser's pattern."""

    name = "behaviour.velocity"
    kind: ScorerKind = "behaviour"

    def score(self, data: ScoringInput) -> ScoreResult:
        f = data.features
        earlier = {"24h": f.claims_24h, "7d": f.claims_7d, "10d": f.claims_10d, "30d": f.claims_30d}
        if max(earlier.values()) <= 0:
            return ScoreResult(0.0)
        # This request counts too: the 4th claim in 10 days has 3 earlier ones.
        window_scores = {w: velocity_curve(n + 1, VELOCITY_LINES[w][1]) for w, n in earlier.items()}
        window = max(window_scores, key=lambda w: (window_scores[w], -VELOCITY_LINES[w][0]))
        score = window_scores[window]
        if f.distinct_merchants_30d >= MERCHANT_SPREAD:
            score += SPREAD_BONUS
        score *= 1.0 - LEGITIMATE_SOFTENING * min(max(f.legitimate_verdicts, 0), 2)
        score += FRAUD_RAISE * min(max(f.fraud_verdicts, 0), 2)
        returning = data.request.kind == "return_and_refund"
        if returning:
            score *= RETURN_FACTOR
        score = clamp01(score)

        parts = [f"{n} earlier refund-only claim(s) in {w}" for w, n in earlier.items() if n > 0]
        message = (
            f"Claim number {earlier[window] + 1} in {window}: " + ", ".join(parts)
            + f", against {f.distinct_merchants_30d} merchant(s) in 30d"
        )
        if f.fraud_verdicts > 0:
            message += f"; {f.fraud_verdicts} earlier claim(s) confirmed as fraud"
        if f.legitimate_verdicts > 0:
            message += f"; {f.legitimate_verdicts} earlier claim(s) confirmed legitimate"
        if returning:
            message += "; this one returns the goods"
        evidence = {
            "claims_24h": f.claims_24h,
            "claims_7d": f.claims_7d,
            "claims_10d": f.claims_10d,
            "claims_30d": f.claims_30d,
            "distinct_merchants_30d": f.distinct_merchants_30d,
            "legitimate_verdicts": f.legitimate_verdicts,
            "fraud_verdicts": f.fraud_verdicts,
        }
        return ScoreResult(score, (Reason("CLAIM_VELOCITY_HIGH", message, score, evidence),))


# ------------------------------------------------------------------ account

NEW_ACCOUNT_DAYS = ((timedelta(days=2), 0.5), (timedelta(days=7), 0.3))  # age below -> score
DELIVERY_CLOCK_SLACK = timedelta(hours=3)  # carrier scans are often uploaded late
CLAIM_BEFORE_DELIVERY_SCORE = 0.5
# Reasons a buyer can give before the parcel is in their hands.
PRE_DELIVERY_REASONS = frozenset({"not_received"})


class AccountScorer:
    """A brand-new account, or a damage claim made before the parcel was delivered. A weak signal."""

    name = "behaviour.account"
    kind: ScorerKind = "behaviour"

    def score(self, data: ScoringInput) -> ScoreResult:
        r = data.request
        reasons: list[Reason] = []
        age = r.requested_at - r.account_created_at
        for limit, level in NEW_ACCOUNT_DAYS:
            if age < limit:
                reasons.append(Reason(
                    "ACCOUNT_NEW",
                    f"The account was created {_duration(age)} before this claim (under {limit.days} days)",
                    level,
                    {"account_age_hours": round(age.total_seconds() / 3600, 1)},
                ))
                break
        if r.delivered_at is not None and r.reason not in PRE_DELIVERY_REASONS:
            early = r.delivered_at - r.requested_at
            if early > DELIVERY_CLOCK_SLACK:
                reasons.append(Reason(
                    "CLAIM_BEFORE_DELIVERY",
                    f"A '{r.reason}' claim was made {_duration(early)} before the parcel was delivered",
                    CLAIM_BEFORE_DELIVERY_SCORE,
                    {"hours_before_delivery": round(early.total_seconds() / 3600, 1), "reason": r.reason},
                ))
        reasons.sort(key=lambda x: (-x.score, x.code))
        return ScoreResult(max((x.score for x in reasons), default=0.0), tuple(reasons))


def _duration(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours:.1f} hours" if abs(hours) < 48 else f"{hours / 24:.1f} days"


# ------------------------------------------------------------------ amount

AMOUNT_MIN_HISTORY = 3
AMOUNT_RATIO_LOW, AMOUNT_RATIO_HIGH = Decimal(5), Decimal(20)  # ratio -> score 0.5 .. 0.8
AMOUNT_SCORE_LOW, AMOUNT_SCORE_HIGH = 0.5, 0.8


class AmountScorer:
    """An amount far above what this buyer usually claims. A weak signal: people do buy expensive things."""

    name = "behaviour.amount"
    kind: ScorerKind = "behaviour"

    def score(self, data: ScoringInput) -> ScoreResult:
        f = data.features
        median = f.amount_history_median
        if f.amount_history_count < AMOUNT_MIN_HISTORY or median is None or median <= 0:
            return ScoreResult(0.0)
        amount = data.request.amount
        ratio = amount / median
        if ratio < AMOUNT_RATIO_LOW:
            return ScoreResult(0.0)
        # Log scale between the two ratios: 5x -> 0.5, 10x -> 0.65, 20x and above -> 0.8.
        span = math.log(float(ratio / AMOUNT_RATIO_LOW)) / math.log(float(AMOUNT_RATIO_HIGH / AMOUNT_RATIO_LOW))
        score = clamp01(AMOUNT_SCORE_LOW + (AMOUNT_SCORE_HIGH - AMOUNT_SCORE_LOW) * min(1.0, span))
        message = (
            f"{amount} {data.request.currency} is {ratio:.1f}x the median {median} of this buyer's "
            f"{f.amount_history_count} earlier claims"
        )
        evidence = {
            "amount": str(amount),
            "currency": data.request.currency,
            "history_median": str(median),
            "history_count": f.amount_history_count,
            "ratio": round(float(ratio), 2),
        }
        return ScoreResult(score, (Reason("AMOUNT_UNUSUAL_FOR_BUYER", message, score, evidence),))


# ------------------------------------------------------------------ linked accounts

# A device or a payment instrument is one person's (or one fraud shop's); an
# address is shared by whole dorms, offices, families and parcel lockers, so a
# link through it alone is weaker, though still worth a review.
LINK_SCORES = {"device": 0.95, "payment": 0.95, "address": 0.8}
UNKNOWN_LINK_SCORE = 0.8  # a fingerprint kind added later: a link, but not known to be personal
LINK_NOUNS = {"device": "device", "payment": "payment instrument", "address": "delivery address"}
FINGERPRINT_PREFIX = 6  # characters of the fingerprint shown in evidence; the value itself is never shown


class LinkedAccountScorer:
    """The buyer shares a device, payment instrument or address with a confirmed fraudster."""

    name = "behaviour.linked"
    kind: ScorerKind = "behaviour"

    def score(self, data: ScoringInput) -> ScoreResult:
        r = data.request
        seen: set[tuple[str, str, str]] = set()
        scored: list[tuple[float, FraudLink]] = []
        for link in data.features.tainted_links:
            # A verdict on this very refund is not a link to someone else's fraud.
            if link.refund_id == r.refund_id:
                continue
            key = (link.fingerprint_kind, link.fingerprint, link.refund_id)
            if key in seen:
                continue
            seen.add(key)
            scored.append((LINK_SCORES.get(link.fingerprint_kind, UNKNOWN_LINK_SCORE), link))
        scored.sort(key=lambda sl: (-sl[0], _sortable(sl[1].decided_at), sl[1].fingerprint_kind, sl[1].refund_id))
        reasons = tuple(self._reason(score, link, r.buyer_id) for score, link in scored)
        return ScoreResult(max((x.score for x in reasons), default=0.0), reasons)

    @staticmethod
    def _reason(score: float, link: FraudLink, buyer_id: str) -> Reason:
        noun = LINK_NOUNS.get(link.fingerprint_kind, f"{link.fingerprint_kind} fingerprint")
        confirmed = _iso(link.decided_at)
        if link.buyer_id == buyer_id:
            message = f"This buyer's {noun} was used in refund {link.refund_id}, confirmed as fraud on {confirmed}"
        else:
            message = (f"Shares a {noun} with buyer {link.buyer_id}, whose refund {link.refund_id} "
                       f"was confirmed as fraud on {confirmed}")
        return Reason("LINKED_TO_CONFIRMED_FRAUD", message, score, _link_evidence(link, confirmed))


def _link_evidence(link: FraudLink, confirmed: str) -> dict[str, str]:
    return {
        "fingerprint_kind": link.fingerprint_kind,
        "fingerprint_prefix": link.fingerprint[:FINGERPRINT_PREFIX],
        "linked_refund_id": link.refund_id,
        "linked_buyer_id": link.buyer_id,
        "confirmed_at": confirmed,
    }


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        return moment.isoformat()
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _sortable(moment: datetime) -> datetime:
    """Naive datetimes are taken as UTC so that mixed inputs still sort (earliest confirmation first)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


BEHAVIOUR_SCORERS: tuple[VelocityScorer | AccountScorer | AmountScorer | LinkedAccountScorer, ...] = (
    VelocityScorer(),
    AccountScorer(),
    AmountScorer(),
    LinkedAccountScorer(),
)
