"""The CLI's errors are clear, one line, exit code 1, and never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_unreadable_events_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = run(capsys, "replay", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "d.jsonl"))
    assert code == 1 and "cannot read events file" in err and "Traceback" not in err


def test_malformed_events_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    events = tmp_path / "e.jsonl"
    events.write_text('{"topic": "refund.requests", "key": "RF-1", "value": {}}\nnot json\n')
    code, err = run(capsys, "replay", str(events), "--out", str(tmp_path / "d.jsonl"))
    assert code == 1 and "e.jsonl:2" in err


def test_missing_broker(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = tmp_path / "e.jsonl"
    events.write_text('{"topic": "refund.requests", "key": "RF-1", "value": {}}\n')
    monkeypatch.setenv("KAFKA_BOOTSTRAP", "127.0.0.1:1")
    code, err = run(capsys, "replay", str(events), "--out", str(tmp_path / "d.jsonl"))
    assert code == 1 and "no Kafka broker answers at 127.0.0.1:1" in err


def test_bad_configuration(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFUNDGUARD_WEB_PORT", "not-a-port")
    code, err = run(capsys, "worker")
    assert code == 1 and "bad configuration" in err and "web_port" in err
    monkeypatch.delenv("REFUNDGUARD_WEB_PORT")
    monkeypatch.setenv("KAFKA_BOOTSTRAP", "no-port-here")
    code, err = run(capsys, "worker")
    assert code == 1 and "not host:port" in err


def test_bad_policy_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('version = "x"\n[high_value.lines]\nCNY = "-5"\n')
    code, err = run(capsys, "worker", "--policy", str(policy))
    assert code == 1 and "high_value.lines" in err
    code, err = run(capsys, "replay", str(policy), "--out", str(tmp_path / "d"), "--policy", str(policy))
    assert code == 1 and "--policy needs --embedded" in err
