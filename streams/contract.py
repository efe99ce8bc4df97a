"""The wire contract as typed models (refund-request/v1, refund-outcome/v1,
refund-decision/v1, dead-letter/v1).

Inbound models mirror the JSON Schemas in ``streams/schemas/`` (copies of the
shared contract) field for field: same required fields, enums, patterns and
lengths, extra fields ignored as the schemas allow. Tests check that these
models and the schemas agree on valid and mutated events. Outbound models are
built only by this service and validated against the schema in tests.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from scorers.base import RequestFacts

RefundId = Annotated[str, StringConstraints(min_length=1, max_length=128)]

# Windows, ages and deadlines are computed from these; a year like 9999 would overflow
# that arithmetic, so anything outside this range is treated as malformed.
EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)


def _plausible(moment: datetime) -> datetime:
    if not EARLIEST <= moment < LATEST:
        raise ValueError("timestamp outside the supported range 1900-01-01 .. 8999-12-31")
    return moment


Timestamp = Annotated[AwareDatetime, AfterValidator(_plausible)]
Fingerprint = Annotated[str, StringConstraints(max_length=128)]


class _In(BaseModel):
    # The schemas do not forbid extra properties, so neither do we. Strict: no
    # coercion of numbers into strings or similar. An optional field the schema
    # does not make nullable is typed without None and defaults to None: pydantic
    # does not validate defaults, so it may be absent but not null.
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class Money(_In):
    value: Annotated[str, StringConstraints(pattern=r"^[0-9]{1,12}(\.[0-9]{1,4})?$")]
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]

    @property
    def amount(self) -> Decimal:
        return Decimal(self.value)


class Item(_In):
    sku: RefundId
    title: Annotated[str, StringConstraints(max_length=500)]
    category: Annotated[str, StringConstraints(max_length=200)] = None  # type: ignore[assignment]
    unit_price: Money = None  # type: ignore[assignment]


class Order(_In):
    placed_at: Timestamp
    delivered_at: Timestamp | None = None


class ImageRef(_In):
    image_id: RefundId
    url: Annotated[str, StringConstraints(max_length=2048)] = None  # type: ignore[assignment]
    data: Annotated[str, StringConstraints(max_length=700_000)] = None  # type: ignore[assignment]
    source: Literal["listing", "shipment"] = None  # type: ignore[assignment]

    @model_validator(mode="after")
    def _one_of_url_or_data(self) -> ImageRef:
        if (self.url is None) == (self.data is None):
            raise ValueError("an image needs exactly one of 'url' or 'data'")
        return self


class ReferenceImage(ImageRef):
    source: Literal["listing", "shipment"]  # type: ignore[assignment]  # required here


class Buyer(_In):
    account_created_at: Timestamp
    device_fingerprint: Fingerprint = None  # type: ignore[assignment]
    payment_fingerprint: Fingerprint = None  # type: ignore[assignment]
    address_fingerprint: Fingerprint = None  # type: ignore[assignment]

    def fingerprints(self) -> dict[str, str]:
        found = {
            "device": self.device_fingerprint,
            "payment": self.payment_fingerprint,
            "address": self.address_fingerprint,
        }
        return {kind: value for kind, value in found.items() if value}


RefundReason = Literal[
    "damaged", "defective", "wrong_item", "not_as_described", "missing_parts", "not_received", "other"
]


class RefundRequest(_In):
    schema_: Literal["refund-request/v1"] = Field(alias="schema")
    refund_id: RefundId
    order_id: RefundId
    buyer_id: RefundId
    merchant_id: RefundId
    requested_at: Timestamp
    kind: Literal["refund_only", "return_and_refund"]
    reason: RefundReason
    description: Annotated[str, StringConstraints(max_length=2000)] = None  # type: ignore[assignment]
    amount: Money
    item: Item
    order: Order
    evidence: Annotated[list[ImageRef], Field(max_length=9)]
    reference_images: Annotated[list[ReferenceImage], Field(max_length=20)] = []
    buyer: Buyer

    def facts(self) -> RequestFacts:
        return RequestFacts(
            refund_id=self.refund_id,
            order_id=self.order_id,
            buyer_id=self.buyer_id,
            merchant_id=self.merchant_id,
            requested_at=self.requested_at,
            kind=self.kind,
            reason=self.reason,
            amount=self.amount.amount,
            currency=self.amount.currency,
            placed_at=self.order.placed_at,
            delivered_at=self.order.delivered_at,
            account_created_at=self.buyer.account_created_at,
            category=self.item.category,
        )


class RefundOutcome(_In):
    schema_: Literal["refund-outcome/v1"] = Field(alias="schema")
    refund_id: RefundId
    buyer_id: RefundId
    merchant_id: RefundId
    verdict: Literal["fraud", "legitimate"]
    decided_at: Timestamp
    source: Literal["review", "chargeback", "merchant_appeal"]
    note: Annotated[str, StringConstraints(max_length=2000)] = None  # type: ignore[assignment]


# ---------------------------------------------------------------- outbound


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DecisionReasonOut(_Out):
    code: Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Z0-9_]*$")]
    scorer: str
    score: Annotated[float, Field(ge=0, le=1)] | None = None
    message: str
    evidence: dict[str, Any] | None = None


class ReviewOut(_Out):
    queue: str
    priority: Literal["normal", "high"]
    merchant_response_by: str


class RefundDecision(_Out):
    schema_: Literal["refund-decision/v1"] = Field("refund-decision/v1", alias="schema")
    refund_id: str
    order_id: str
    buyer_id: str
    merchant_id: str
    decision: Literal["approve", "hold"]
    risk: Annotated[float, Field(ge=0, le=1)]
    reasons: list[DecisionReasonOut]
    scores: dict[str, Annotated[float, Field(ge=0, le=1)] | None]
    policy_version: str
    decided_at: str
    review: ReviewOut | None = None
    # Optional fields of ours (the contract allows additions):
    shadow: bool | None = None  # true on the shadow topic

    def to_json(self) -> bytes:
        data = self.model_dump(by_alias=True, exclude_none=True)
        for reason in data["reasons"]:
            reason.setdefault("evidence", None)
            if reason["evidence"] is None:
                del reason["evidence"]
        return json.dumps(data, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8")


class SourcePosition(_Out):
    topic: str
    partition: int
    offset: int


class DeadLetter(_Out):
    schema_: Literal["dead-letter/v1"] = Field("dead-letter/v1", alias="schema")
    error: str
    source: SourcePosition
    key: str | None = None
    value_base64: str
    failed_at: str
    # Ours: a value too big to copy whole is truncated; these say what it was.
    value_size: int
    value_sha256: str
    value_truncated: bool = False
    error_kind: str  # not_json | schema | oversized | not_utf8

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(by_alias=True), separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def iso_z(moment: datetime) -> str:
    """RFC 3339 in UTC with a Z, milliseconds only when present."""
    moment = moment.astimezone(UTC)
    if moment.microsecond:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def dead_letter(
    *,
    error: str,
    error_kind: str,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes,
    failed_at: datetime,
    max_value_bytes: int,
) -> DeadLetter:
    kept = value[:max_value_bytes]
    key_text: str | None
    try:
        key_text = key.decode("utf-8") if key is not None else None
    except UnicodeDecodeError:
        key_text = "base64:" + base64.b64encode(key).decode("ascii") if key is not None else None
    return DeadLetter(
        error=error[:2000],
        error_kind=error_kind,
        source=SourcePosition(topic=topic, partition=partition, offset=offset),
        key=key_text,
        value_base64=base64.b64encode(kept).decode("ascii"),
        failed_at=iso_z(failed_at),
        value_size=len(value),
        value_sha256=hashlib.sha256(value).hexdigest(),
        value_truncated=len(kept) < len(value),
    )


_ModelT = TypeVar("_ModelT", bound=BaseModel)


class ContractError(ValueError):
    """A message that does not match the contract; ``kind`` names the cause for the DLQ."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _explain(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(top)"
        parts.append(f"{loc}: {err['msg']}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _validate(model: type[_ModelT], raw: bytes, max_bytes: int) -> _ModelT:
    """Size, encoding, JSON syntax, then schema: each failure with its own cause."""
    if len(raw) > max_bytes:
        raise ContractError("oversized", f"message of {len(raw)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ContractError("not_utf8", f"value is not UTF-8: {exc.reason} at byte {exc.start}") from exc
    try:
        # Strict JSON-mode validation: timestamps must be RFC 3339 strings with
        # an offset, strings are never coerced from numbers.
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        errors = exc.errors()
        if errors and errors[0]["type"] == "json_invalid":
            raise ContractError("not_json", f"value is not JSON: {errors[0]['msg'][:200]}") from exc
        title = model.model_fields["schema_"].annotation.__args__[0]  # type: ignore[union-attr]
        raise ContractError("schema", f"{title}: " + _explain(exc)) from exc


def parse_request(raw: bytes, max_bytes: int) -> RefundRequest:
    return _validate(RefundRequest, raw, max_bytes)


def parse_outcome(raw: bytes, max_bytes: int) -> RefundOutcome:
    return _validate(RefundOutcome, raw, max_bytes)
