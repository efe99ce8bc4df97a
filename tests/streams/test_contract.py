"""The typed models accept exactly what the JSON Schemas accept, and produce what they require."""

from __future__ import annotations

import base64
import copy
import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scorers.policy import decide, load_policy
from streams.contract import ContractError, dead_letter, parse_outcome, parse_request
from streams.decision import to_decision
from tests.conftest import DATA, SHARED, requires_shared, schema

FORMAT = jsonschema.Draft202012Validator.FORMAT_CHECKER
REQUEST = jsonschema.Draft202012Validator(schema("refund-request"), format_checker=FORMAT)
DECISION = jsonschema.Draft202012Validator(schema("refund-decision"), format_checker=FORMAT)
DEAD_LETTER = jsonschema.Draft202012Validator(schema("dead-letter"), format_checker=FORMAT)


def raw(value: Any) -> bytes:
    return json.dumps(value).encode()


@requires_shared
def test_bundled_schemas_are_the_shared_contract() -> None:
    for path in (SHARED / "contract").glob("*.schema.json"):
        bundled = DATA.parent.parent / "streams" / "schemas" / path.name
        assert json.loads(bundled.read_text()) == json.loads(path.read_text()), path.name


def test_example_request_parses_with_decimal_money(example_request: dict[str, Any]) -> None:
    request = parse_request(raw(example_request), 1 << 20)
    assert request.amount.amount == Decimal("59.90")
    assert request.requested_at == datetime(2026, 11, 23, 9, 41, 7, tzinfo=UTC)
    assert request.buyer.fingerprints() == {"device": "d-7f3a", "payment": "p-19c2", "address": "a-55e0"}


def test_example_outcome_parses(example_outcome: dict[str, Any]) -> None:
    assert parse_outcome(raw(example_outcome), 1 << 20).verdict == "fraud"


@pytest.mark.parametrize(
    ("mutate", "kind"),
    [
        (lambda r: r.update(kind="refund_maybe"), "schema"),  # unknown enum
        (lambda r: r.pop("buyer_id"), "schema"),
        (lambda r: r["amount"].update(value=59.9), "schema"),  # money as a float
        (lambda r: r["amount"].update(value="59.90001"), "schema"),
        (lambda r: r["amount"].update(currency="cny"), "schema"),
        (lambda r: r.update(requested_at="2026-11-23 yesterday"), "schema"),
        (lambda r: r.update(requested_at="2026-11-23T09:41:07"), "schema"),  # no offset
        (lambda r: r["evidence"][0].update(data="aGVsbG8="), "schema"),  # both url and data
        (lambda r: r["evidence"][0].pop("url"), "schema"),  # neither
        (lambda r: r.update(evidence=[r["evidence"][0]] * 10), "schema"),
        (lambda r: r["reference_images"][0].pop("source"), "schema"),
        (lambda r: r.update(refund_id=""), "schema"),
        (lambda r: r.update(refund_id="x" * 129), "schema"),
        (lambda r: r.update(schema="refund-request/v2"), "schema"),
    ],
)
def test_schema_violations_are_rejected_like_the_json_schema(
    example_request: dict[str, Any], mutate: Any, kind: str
) -> None:
    bad = copy.deepcopy(example_request)
    mutate(bad)
    assert not REQUEST.is_valid(bad)
    with pytest.raises(ContractError) as caught:
        parse_request(raw(bad), 1 << 20)
    assert caught.value.kind == kind


def test_not_json_not_utf8_and_oversized_have_their_own_causes(example_request: dict[str, Any]) -> None:
    with pytest.raises(ContractError, match="not JSON") as e1:
        parse_request(b"{not json", 1 << 20)
    assert e1.value.kind == "not_json"
    with pytest.raises(ContractError) as e2:
        parse_request(b"\xff\xfe\x00", 1 << 20)
    assert e2.value.kind == "not_utf8"
    with pytest.raises(ContractError, match="exceeds the limit") as e3:
        parse_request(b" " * 2_000_000 + raw(example_request), 1 << 20)
    assert e3.value.kind == "oversized"
    with pytest.raises(ContractError) as e4:
        parse_request(b"[1, 2]", 1 << 20)
    assert e4.value.kind == "schema"


def test_extra_fields_are_allowed_as_the_schema_allows(example_request: dict[str, Any]) -> None:
    example_request["platform_extra"] = {"anything": [1, 2]}
    assert REQUEST.is_valid(example_request)
    assert parse_request(raw(example_request), 1 << 20).refund_id == example_request["refund_id"]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(path=st.sampled_from([
    ("refund_id",), ("kind",), ("reason",), ("requested_at",), ("amount", "value"), ("amount", "currency"),
    ("item", "sku"), ("item", "title"), ("order", "placed_at"), ("order", "delivered_at"), ("buyer",),
    ("buyer", "account_created_at"), ("buyer", "device_fingerprint"), ("evidence",), ("description",),
    ("reference_images",),
]), value=_json)
def test_models_and_schema_agree_on_mutated_requests(
    example_request: dict[str, Any], path: tuple[str, ...], value: Any
) -> None:
    bad = copy.deepcopy(example_request)
    target = bad
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    schema_ok = REQUEST.is_valid(bad)
    try:
        parse_request(raw(bad), 1 << 20)
        model_ok = True
    except ContractError:
        model_ok = False
    assert model_ok == schema_ok, (path, value)


def test_decisions_validate_against_the_schema(example_request: dict[str, Any]) -> None:
    request = parse_request(raw(example_request), 1 << 20)
    policy = load_policy()
    for amount in ("59.90", "3000.00"):
        r = request.model_copy(update={"amount": request.amount.model_copy(update={"value": amount})})
        decision = json.loads(to_decision(r, decide(policy, r.facts(), {})).to_json())
        assert DECISION.is_valid(decision), list(DECISION.iter_errors(decision))
        assert decision["decision"] == ("hold" if amount == "3000.00" else "approve")
        assert decision["decided_at"] == "2026-11-23T09:41:07Z"


def test_dead_letters_validate_and_keep_the_bytes() -> None:
    value = b"\x00garbage" * 10
    record = dead_letter(error="value is not JSON", error_kind="not_json", topic="refund.requests", partition=3,
                         offset=17, key=b"RF-1", value=value, failed_at=datetime.now(UTC), max_value_bytes=1024)
    data = json.loads(record.to_json())
    assert DEAD_LETTER.is_valid(data), list(DEAD_LETTER.iter_errors(data))
    assert base64.b64decode(data["value_base64"]) == value
    assert data["source"] == {"topic": "refund.requests", "partition": 3, "offset": 17}
    big = dead_letter(error="too big", error_kind="oversized", topic="t", partition=0, offset=0, key=None,
                      value=b"x" * 5000, failed_at=datetime.now(UTC), max_value_bytes=1000)
    assert big.value_truncated and big.value_size == 5000 and len(base64.b64decode(big.value_base64)) == 1000


@pytest.mark.parametrize("stamp", ["9999-12-31T23:59:59Z", "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+14:00"])
def test_timestamps_that_would_overflow_date_arithmetic_are_rejected(
    example_request: dict[str, Any], stamp: str
) -> None:
    example_request["requested_at"] = stamp
    with pytest.raises(ContractError, match="supported range") as caught:
        parse_request(raw(example_request), 1 << 20)
    assert caught.value.kind == "schema"
