"""The scorer interface: prepared inputs in, a score in [0, 1] with reasons out.

A scorer is pure: no Kafka, no HTTP, no clock. Everything it may look at is in
:class:`ScoringInput` — decoded images and looked-up feature values — so a unit
test builds one by hand and calls :meth:`Scorer.score`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

ImageRole = Literal["evidence", "listing", "shipment"]
ScorerKind = Literal["image", "behaviour"]

_CODE = re.compile(r"^[A-Z][A-Z0-9_]*$")

# A reason's evidence key: the evidence image it names (``image_id``) is a copy, edited or
# not, of one of the request's reference photos. That image is the merchant's photo, not the
# buyer's: it is neither indexed nor looked up as evidence for reuse.
COPY_OF_REFERENCE = "copy_of_reference"


@dataclass(frozen=True)
class PreparedImage:
    """One decoded image, ready for scoring.

    ``pixels`` is RGB uint8 (H, W, 3) with the EXIF orientation applied, scaled
    down so its longer side is at most the preparer's working size. ``raw`` is
    the file exactly as fetched: provenance scorers parse metadata from it.
    """

    image_id: str
    role: ImageRole
    raw: bytes
    pixels: np.ndarray
    format: str  # Pillow's format name: JPEG, PNG, WEBP, ...
    width: int  # of the file, before any scaling
    height: int
    exif_orientation: int = 1
    cache_key: str = ""  # stable identity for caching derived features (url + content hash)


@dataclass(frozen=True)
class BuyerFeatures:
    """What the service knew about the buyer and their fingerprints when the request arrived.

    Filled in by the stream from state tables; counts exclude the request itself.
    """

    claims_24h: int = 0
    claims_7d: int = 0
    claims_30d: int = 0
    claims_10d: int = 0
    distinct_merchants_30d: int = 0
    refund_only_claims_30d: int = 0
    amount_history_count: int = 0
    amount_history_median: Decimal | None = None
    legitimate_verdicts: int = 0
    fraud_verdicts: int = 0
    # fingerprint kind ("device", "payment", "address") -> the fraud that tainted it
    tainted_links: tuple[FraudLink, ...] = ()
    # earlier claims whose evidence matches this request's evidence
    evidence_matches: tuple[EvidenceMatch, ...] = ()


@dataclass(frozen=True)
class FraudLink:
    fingerprint_kind: str  # device | payment | address
    fingerprint: str
    refund_id: str  # the refund whose fraud verdict tainted it
    buyer_id: str
    decided_at: datetime


@dataclass(frozen=True)
class EvidenceMatch:
    image_id: str  # this request's evidence image
    earlier_refund_id: str
    earlier_buyer_id: str
    earlier_order_id: str
    earlier_image_id: str
    distance: int  # hamming distance of the perceptual hashes


@dataclass(frozen=True)
class RequestFacts:
    """The fields of a refund request that scorers may use, without wire types."""

    refund_id: str
    order_id: str
    buyer_id: str
    merchant_id: str
    requested_at: datetime
    kind: str
    reason: str
    amount: Decimal
    currency: str
    placed_at: datetime
    delivered_at: datetime | None
    account_created_at: datetime
    category: str | None = None


@dataclass(frozen=True)
class ScoringInput:
    request: RequestFacts
    evidence: tuple[PreparedImage, ...] = ()
    references: tuple[PreparedImage, ...] = ()
    features: BuyerFeatures = field(default_factory=BuyerFeatures)


@dataclass(frozen=True)
class Reason:
    """Why a scorer gave its score. ``code`` is stable; the README lists every code."""

    code: str
    message: str
    score: float
    evidence: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _CODE.match(self.code):
            raise ValueError(f"reason code {self.code!r} must match {_CODE.pattern}")
        _check_unit(self.score, f"reason {self.code} score")


@dataclass(frozen=True)
class ScoreResult:
    score: float
    reasons: tuple[Reason, ...] = ()

    def __post_init__(self) -> None:
        _check_unit(self.score, "score")


@runtime_checkable
class Scorer(Protocol):
    """A named, pure scoring function.

    ``kind`` decides where it runs: image scorers in the process pool next to
    the decoded pixels, behaviour scorers inline on the event loop (they are
    cheap arithmetic on looked-up features).

    An image scorer may also say how many pixels it looks at: ``pixels_side``, the longest
    side it works at (0 if it reads only the file's bytes). The pool then decodes no larger
    than the largest of these; without it, images are decoded at the full working size.
    """

    name: str
    kind: ScorerKind

    def score(self, data: ScoringInput) -> ScoreResult: ...


def reference_copies(results: Mapping[str, object]) -> frozenset[str]:
    """The evidence image ids that some scorer's reasons mark as copies of a reference photo."""
    return frozenset(
        str(reason.evidence["image_id"])
        for result in results.values() if isinstance(result, ScoreResult)
        for reason in result.reasons
        if reason.evidence.get(COPY_OF_REFERENCE) and "image_id" in reason.evidence
    )


def _check_unit(value: float, what: str) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{what} must be a finite number in [0, 1], got {value!r}")


def clamp01(value: float) -> float:
    """Clamp into [0, 1]; NaN becomes 1.0 so a broken computation never reads as safe."""
    if value != value:  # NaN
        return 1.0
    return min(1.0, max(0.0, float(value)))
