"""The decision policy: a versioned config file plus one small pure function.

:func:`load_policy` reads and validates a TOML file (clear errors naming the
field); :func:`decide` turns scorer results into approve/hold with reasons.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from scorers.base import Reason, RequestFacts, ScoreResult

Priority = Literal["normal", "high"]
Outcome = Literal["approve", "hold"]


class PolicyError(ValueError):
    """The policy file is missing, unreadable or invalid. The message says where."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReviewConfig(_Strict):
    merchant_response_hours: float = Field(72, gt=0, le=24 * 90)
    default_queue: str = Field("general", min_length=1)


class HighValueConfig(_Strict):
    queue: str = Field("high-value", min_length=1)
    priority: Priority = "high"
    lines: dict[str, Decimal] = Field(default_factory=lambda: {"CNY": Decimal("3000")})

    @field_validator("lines")
    @classmethod
    def _positive(cls, lines: dict[str, Decimal]) -> dict[str, Decimal]:
        for currency, line in lines.items():
            if len(currency) != 3 or not currency.isupper():
                raise ValueError(f"currency {currency!r} must be an ISO 4217 code such as CNY")
            if line <= 0:
                raise ValueError(f"high-value line for {currency} must be positive")
        return lines


class UnverifiableConfig(_Strict):
    queue: str = Field("unverifiable", min_length=1)
    priority: Priority = "normal"


class ScorerRule(_Strict):
    threshold: float = Field(ge=0.0, le=1.0)
    weight: float = Field(1.0, ge=0.0, le=1.0)
    queue: str = Field(min_length=1)
    priority: Priority = "normal"
    high_priority_at: float | None = Field(None, ge=0.0, le=1.0)
    can_hold: bool = True


class Policy(_Strict):
    version: str = Field(min_length=1, max_length=64)
    review: ReviewConfig = ReviewConfig()
    high_value: HighValueConfig = HighValueConfig()
    unverifiable: UnverifiableConfig = UnverifiableConfig()
    scorers: dict[str, ScorerRule] = Field(default_factory=dict)


DEFAULT_POLICY_FILE = "default.toml"


def load_policy(path: str | Path | None = None) -> Policy:
    """Load a policy file; ``None`` loads the one shipped with the package."""
    try:
        if path is None:
            text = resources.files("scorers.policies").joinpath(DEFAULT_POLICY_FILE).read_text("utf-8")
            where = f"built-in policy {DEFAULT_POLICY_FILE}"
        else:
            where = str(path)
            text = Path(path).read_text("utf-8")
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{where}: not valid TOML: {exc}") from exc
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()
        )
        raise PolicyError(f"{where}: invalid policy: {problems}") from exc


@dataclass(frozen=True)
class ScorerFailure:
    """A scorer that could not give a score: it raised, timed out or lacked input."""

    code: str  # SCORER_FAILED, SCORER_TIMEOUT, ...
    message: str


@dataclass(frozen=True)
class DecisionReason:
    code: str
    scorer: str
    message: str
    score: float | None
    evidence: dict[str, object]
    weight: float  # ordering key: strongest first


@dataclass(frozen=True)
class Review:
    queue: str
    priority: Priority
    merchant_response_by: datetime


@dataclass(frozen=True)
class Verdict:
    decision: Outcome
    risk: float
    reasons: tuple[DecisionReason, ...]
    scores: dict[str, float | None]
    policy_version: str
    review: Review | None


# Reasons the pipeline itself raises (not a scorer): they hold with the unverifiable queue.
PIPELINE = "pipeline"


def decide(
    policy: Policy,
    request: RequestFacts,
    results: dict[str, ScoreResult | ScorerFailure],
    input_problems: tuple[Reason, ...] = (),
) -> Verdict:
    """Approve only when every check ran and none reached its threshold.

    Holds come from: input problems (an image that could not be fetched or
    read), scorer failures and time-outs, any scorer whose score reaches its
    threshold, and an amount at or above the high-value line. The risk is the
    strongest weighted score, so a single decisive signal is never diluted.
    """
    holds: list[tuple[DecisionReason, str, Priority]] = []
    scores: dict[str, float | None] = {}
    risk = 0.0

    for problem in input_problems:
        holds.append((
            DecisionReason(problem.code, PIPELINE, problem.message, problem.score, dict(problem.evidence), 1.0),
            policy.unverifiable.queue,
            policy.unverifiable.priority,
        ))

    for name in sorted(results):
        result = results[name]
        rule = policy.scorers.get(name)
        if isinstance(result, ScorerFailure):
            scores[name] = None
            holds.append((
                DecisionReason(result.code, name, result.message, None, {}, 1.0),
                policy.unverifiable.queue,
                policy.unverifiable.priority,
            ))
            continue
        scores[name] = round(result.score, 4)
        weight = rule.weight if rule else 1.0
        weighted = result.score * weight
        risk = max(risk, weighted)
        if rule is None or not rule.can_hold or result.score < rule.threshold:
            continue
        priority: Priority = rule.priority
        if rule.high_priority_at is not None and weighted >= rule.high_priority_at:
            priority = "high"
        fired = [r for r in result.reasons if r.score >= rule.threshold] or list(result.reasons)
        if not fired:
            fired = [Reason(_default_code(name), f"{name} scored {result.score:.2f}", result.score)]
        for reason in fired:
            holds.append((
                DecisionReason(reason.code, name, reason.message, round(reason.score, 4),
                               dict(reason.evidence), reason.score * weight),
                rule.queue,
                priority,
            ))

    line = policy.high_value.lines.get(request.currency)
    if line is None:
        holds.append((
            DecisionReason("CURRENCY_UNSUPPORTED", PIPELINE,
                           f"No high-value line is configured for {request.currency}; the amount cannot be checked",
                           None, {"currency": request.currency}, 1.0),
            policy.unverifiable.queue, policy.unverifiable.priority,
        ))
    elif request.amount >= line:
        holds.append((
            DecisionReason("HIGH_VALUE", PIPELINE,
                           f"Amount {request.amount} {request.currency} is at or above the review line {line}",
                           None, {"amount": str(request.amount), "line": str(line),
                                  "currency": request.currency}, 1.0),
            policy.high_value.queue, policy.high_value.priority,
        ))

    if not holds:
        return Verdict("approve", round(risk, 4), (), scores, policy.version, None)

    # Strongest first; ties broken by code and scorer so the order is stable.
    holds.sort(key=lambda h: (-h[0].weight, h[0].code, h[0].scorer))
    strongest = holds[0]
    priority = "high" if any(p == "high" for _, _, p in holds) else "normal"
    review = Review(
        queue=strongest[1],
        priority=priority,
        merchant_response_by=request.requested_at + timedelta(hours=policy.review.merchant_response_hours),
    )
    return Verdict("hold", round(risk, 4), tuple(h[0] for h in holds), scores, policy.version, review)


def _default_code(scorer_name: str) -> str:
    return scorer_name.upper().replace(".", "_") + "_HIGH"
