"""From a policy verdict to the refund-decision/v1 message."""

from __future__ import annotations

from scorers.policy import Verdict
from streams.contract import DecisionReasonOut, RefundDecision, RefundRequest, ReviewOut, iso_z


def to_decision(request: RefundRequest, verdict: Verdict, *, shadow: bool = False) -> RefundDecision:
    """``decided_at`` is the request's event time, so a redelivered request carries identical content."""
    return RefundDecision(
        refund_id=request.refund_id,
        order_id=request.order_id,
        buyer_id=request.buyer_id,
        merchant_id=request.merchant_id,
        decision=verdict.decision,
        risk=verdict.risk,
        reasons=[
            DecisionReasonOut(
                code=r.code, scorer=r.scorer, score=r.score, message=r.message, evidence=r.evidence or None
            )
            for r in verdict.reasons
        ],
        scores=verdict.scores,
        policy_version=verdict.policy_version,
        decided_at=iso_z(request.requested_at),
        review=ReviewOut(
            queue=verdict.review.queue,
            priority=verdict.review.priority,
            merchant_response_by=iso_z(verdict.review.merchant_response_by),
        ) if verdict.review else None,
        shadow=True if shadow else None,
    )
