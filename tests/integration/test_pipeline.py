"""Through the real broker: valid and malformed requests in, decisions and dead letters out."""

from __future__ import annotations

import base64
import copy
import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from streams.simulate import images as sim
from tests.conftest import schema
from tests.integration.conftest import Kafka, Worker

pytestmark = pytest.mark.integration

FORMAT = jsonschema.Draft202012Validator.FORMAT_CHECKER
DECISION = jsonschema.Draft202012Validator(schema("refund-decision"), format_checker=FORMAT)
DEAD_LETTER = jsonschema.Draft202012Validator(schema("dead-letter"), format_checker=FORMAT)
TOPICS = ["refund.decisions", "refund.requests.dlq"]


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections and never answers: the fetch must time out."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
                held.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    for c in held:
        c.close()
    sock.close()


def request(example: dict[str, Any], n: int, evidence: list[dict[str, str]], refs: list[dict[str, str]],
            amount: str = "59.90") -> dict[str, Any]:
    r = copy.deepcopy(example)
    r.update(refund_id=f"RF-IT-{n}", order_id=f"OD-IT-{n}", buyer_id=f"BY-IT-{n}", evidence=evidence,
             reference_images=refs)
    r["amount"]["value"] = amount
    return r


def by_id(records: list[Any]) -> dict[str, dict[str, Any]]:
    return {r.key.decode(): json.loads(r.value) for r in records}


def test_decisions_and_dead_letters(
    worker_factory: Callable[..., Worker], kafka_factory: Callable[[list[str]], Kafka],
    image_server: tuple[str, Path], silent_server: str, example_request: dict[str, Any],
) -> None:
    base, root = image_server
    rng = np.random.default_rng(5)
    product = sim.make_product(rng, 0)
    listing = sim.listing_photo(product, rng)
    (root / "images" / "listing.jpg").write_bytes(sim.encode(listing, "JPEG"))
    genuine = sim.encode(sim.buyer_photo(product, rng, "crack"), "JPEG")
    (root / "images" / "genuine.jpg").write_bytes(genuine)
    (root / "images" / "truncated.jpg").write_bytes(genuine[: len(genuine) // 3])
    refs = [{"image_id": "LS-1", "url": f"{base}/images/listing.jpg", "source": "listing"}]

    worker = worker_factory(REFUNDGUARD_FETCH_READ_TIMEOUT_S="2")
    kafka = kafka_factory(TOPICS)
    valid = {
        "RF-IT-1": request(example_request, 1, [{"image_id": "EV-1", "url": f"{base}/images/genuine.jpg"}], refs),
        "RF-IT-2": request(example_request, 2, [{"image_id": "EV-2", "url": f"{base}/images/missing.jpg"}], refs),
        "RF-IT-3": request(example_request, 3, [{"image_id": "EV-3", "url": f"{base}/images/truncated.jpg"}], refs),
        "RF-IT-4": request(example_request, 4, [{"image_id": "EV-4", "url": f"{silent_server}/x.jpg"}], refs),
        "RF-IT-5": request(example_request, 5, [{"image_id": "EV-5", "url": f"{base}/images/genuine.jpg"}], refs,
                           amount="4200.00"),
        "RF-IT-6": request(example_request, 6, [{"image_id": "EV-6", "data": base64.b64encode(genuine).decode()}],
                           refs),
    }
    garbage: list[tuple[str, bytes, str]] = [
        ("G-1", b"this is not json", "not_json"),
        ("G-2", json.dumps({"schema": "refund-request/v1", "refund_id": "x"}).encode(), "schema"),
        ("G-3", b"{" + b" " * (2 * 1024 * 1024) + b"}", "oversized"),
        ("G-4", json.dumps({**example_request, "kind": "refund_please"}).encode(), "schema"),
        ("G-5", b"\xff\xfe\xfd", "not_utf8"),
    ]
    for key, value, _ in garbage:
        kafka.send("refund.requests", key, value)
    for key, value in valid.items():
        kafka.send("refund.requests", key, value)

    decisions = by_id(kafka.collect("refund.decisions", lambda rs: len(by_id(rs)) >= len(valid), 120))
    dlq = kafka.collect("refund.requests.dlq", lambda rs: len(rs) >= len(garbage), 30)

    assert set(decisions) == set(valid)
    for d in decisions.values():
        assert DECISION.is_valid(d), list(DECISION.iter_errors(d))
    codes = {rid: [r["code"] for r in d["reasons"]] for rid, d in decisions.items()}
    assert decisions["RF-IT-1"]["decision"] == "approve", codes["RF-IT-1"]
    assert decisions["RF-IT-6"]["decision"] == "approve", codes["RF-IT-6"]
    assert decisions["RF-IT-2"]["decision"] == "hold" and "IMAGE_NOT_FOUND" in codes["RF-IT-2"]
    assert decisions["RF-IT-3"]["decision"] == "hold" and "IMAGE_CORRUPT" in codes["RF-IT-3"]
    assert decisions["RF-IT-4"]["decision"] == "hold" and "IMAGE_FETCH_TIMEOUT" in codes["RF-IT-4"]
    assert decisions["RF-IT-5"]["decision"] == "hold" and codes["RF-IT-5"] == ["HIGH_VALUE"]

    letters = {r.key.decode(): json.loads(r.value) for r in dlq}
    for key, value, cause in garbage:
        letter = letters[key]
        assert DEAD_LETTER.is_valid(letter), list(DEAD_LETTER.iter_errors(letter))
        assert letter["error_kind"] == cause, letter["error"]
        assert letter["source"]["topic"] == "refund.requests"
        kept = base64.b64decode(letter["value_base64"])
        assert kept == value[: len(kept)] and letter["value_size"] == len(value)

    # What an SRE sees: the live scrape names every decision and dead letter, and is valid.
    assert worker.get("/health/live")[0] == 200 and worker.get("/health/ready")[0] == 200
    status, body = worker.get("/metrics")
    text = body.decode()
    assert status == 200
    for cause in {c for _, _, c in garbage}:
        n = sum(c == cause for _, _, c in garbage)
        assert f'refundguard_dead_letters_total{{cause="{cause}"}} {n:.1f}' in text
    assert 'refundguard_decisions_total{decision="hold",policy_version="2026-11-23.1",reason="HIGH_VALUE"} 1.0' in text
    assert "refundguard_image_fetch_failures_total{code=\"IMAGE_NOT_FOUND\"}" in text
    assert "refundguard_end_to_end_latency_seconds_count 6.0" in text
    assert "process_resident_memory_bytes" in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (CI installs Debian's prometheus package)")
    checked = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
