"""Agent tests with Faust's ``agent.test_context()``: the intake step routes and dead-letters
without a broker; the sends to other topics are captured."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from unittest.mock import AsyncMock

import pytest

from streams.app import RefundGuard, build
from streams.settings import Settings


@pytest.fixture
def guard(tmp_path: Any) -> Iterator[RefundGuard]:
    g = build(Settings(store="memory", data_dir=tmp_path), start_pool=False)
    g.by_buyer_topic.send = AsyncMock()  # type: ignore[method-assign]
    g.dlq_topic.send = AsyncMock()  # type: ignore[method-assign]
    yield g
    if g.pool is not None:
        g.pool.close()


async def test_valid_request_is_rekeyed_by_buyer(guard: RefundGuard, example_request: dict[str, Any]) -> None:
    async with guard.intake_requests.test_context() as agent:
        await agent.put(key=b"RF-20261123-000123", value=json.dumps(example_request).encode())
    guard.dlq_topic.send.assert_not_awaited()
    (call,) = guard.by_buyer_topic.send.await_args_list
    assert call.kwargs["key"] == b"BY-5521"
    envelope = json.loads(call.kwargs["value"])
    assert envelope["type"] == "request" and envelope["value"] == example_request
    assert guard.metrics.requests_consumed._value.get() == 1


@pytest.mark.parametrize(("value", "cause"), [
    (b"not json at all", "not_json"),
    (b'{"schema": "refund-request/v1"}', "schema"),
    (b"\xc3\x28", "not_utf8"),
])
async def test_malformed_request_is_dead_lettered_and_the_next_one_still_flows(
    guard: RefundGuard, example_request: dict[str, Any], value: bytes, cause: str
) -> None:
    async with guard.intake_requests.test_context() as agent:
        await agent.put(key=b"BAD-1", value=value)
        await agent.put(key=b"RF-20261123-000123", value=json.dumps(example_request).encode())
    (dead,) = guard.dlq_topic.send.await_args_list
    record = json.loads(dead.kwargs["value"])
    assert dead.kwargs["key"] == b"BAD-1"
    assert record["schema"] == "dead-letter/v1" and record["error_kind"] == cause and record["error"]
    assert guard.by_buyer_topic.send.await_count == 1
    assert guard.metrics.dead_letters.labels(cause)._value.get() == 1


async def test_outcome_is_routed_to_its_buyer(guard: RefundGuard, example_outcome: dict[str, Any]) -> None:
    async with guard.intake_outcomes.test_context() as agent:
        await agent.put(key=b"RF-20261123-000123", value=json.dumps(example_outcome).encode())
        await agent.put(key=b"RF-x", value=json.dumps({**example_outcome, "verdict": "maybe"}).encode())
    (routed,) = guard.by_buyer_topic.send.await_args_list
    assert routed.kwargs["key"] == b"BY-5521"
    assert json.loads(routed.kwargs["value"])["type"] == "outcome"
    (dead,) = guard.dlq_topic.send.await_args_list
    assert json.loads(dead.kwargs["value"])["error_kind"] == "schema"
