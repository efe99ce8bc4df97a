"""The sample traffic generator writes valid events, matching labels and every image they use."""

from __future__ import annotations

import json
from pathlib import Path

from streams.contract import parse_outcome, parse_request
from streams.simulate.traffic import generate


def test_generated_traffic_is_valid_and_complete(tmp_path: Path) -> None:
    summary = generate(tmp_path, refunds=14, seed=3, image_base="http://127.0.0.1:9")
    lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    labels = [json.loads(x) for x in (tmp_path / "labels.jsonl").read_text().splitlines()]
    requests = [e for e in lines if e["topic"] == "refund.requests"]
    assert len(requests) == len(labels) == summary["refunds"] >= 14
    times = []
    for event in lines:
        raw = json.dumps(event["value"]).encode()
        if event["topic"] == "refund.requests":
            parsed = parse_request(raw, 1 << 20)
            times.append(parsed.requested_at)
            for image in [*parsed.evidence, *parsed.reference_images]:
                name = image.url.rsplit("/", 1)[1]
                assert (tmp_path / "images" / name).exists() or "does-not-exist" in name
        else:
            times.append(parse_outcome(raw, 1 << 20).decided_at)
    assert times == sorted(times)  # event-time order
    assert {"edited_listing", "genuine_damage", "serial_abuser_early", "linked_to_fraudster"} <= set(summary["kinds"])
    again = generate(tmp_path / "again", refunds=14, seed=3, image_base="http://127.0.0.1:9")
    assert again == summary
    assert (tmp_path / "again" / "events.jsonl").read_text() == (tmp_path / "events.jsonl").read_text()
