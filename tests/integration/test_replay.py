"""Replays of sample traffic: every refund decided, as labelled, and identical on fresh state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streams.backtest import read_labels
from streams.broker import EmbeddedBroker
from streams.replay import Replayer, read_events
from streams.settings import Settings
from streams.simulate.traffic import generate, serve_directory
from tests.integration.conftest import start_worker

pytestmark = pytest.mark.integration


def replay_once(events_path: Path, work: Path) -> dict[str, dict]:
    with EmbeddedBroker(log_path=work / "broker.log") as broker:
        worker = start_worker(broker.bootstrap, work)
        try:
            replayer = Replayer(Settings(bootstrap=broker.bootstrap), timeout_s=60, progress=None)
            try:
                result = replayer.run(read_events(events_path))
            finally:
                replayer.close()
        finally:
            worker.stop()
    assert result.missing == [] and result.conflicting == []
    return result.decisions


def test_two_replays_on_fresh_state_decide_identically_and_as_labelled(tmp_path: Path) -> None:
    from streams.broker import free_port

    port = free_port()
    generate(tmp_path / "cases", refunds=16, seed=11, image_base=f"http://127.0.0.1:{port}")
    server = serve_directory(tmp_path / "cases", "127.0.0.1", port)
    try:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        first = replay_once(tmp_path / "cases" / "events.jsonl", tmp_path / "a")
        second = replay_once(tmp_path / "cases" / "events.jsonl", tmp_path / "b")
    finally:
        server.shutdown()
    labels = read_labels(tmp_path / "cases" / "labels.jsonl")
    assert set(first) == {label["refund_id"] for label in labels}
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    wrong = [(label["kind"], first[label["refund_id"]]["decision"], [r["code"] for r in
             first[label["refund_id"]]["reasons"]]) for label in labels
             if first[label["refund_id"]]["decision"] != label["expected"]]
    assert wrong == []
