"""The pure parts of ``refundguard bench``: percentiles, rates, the JSON comparison, the CPU
figures (on a few tiny generated images, in-process) and the request cloning. No broker."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from streams import bench
from streams.bench import JobCpu, compare, cpu_figures, percentile, sustained_rate


def test_percentile_matches_numpy_linear_interpolation():
    rng = random.Random(3)
    for size in (1, 2, 7, 100):
        values = [rng.uniform(0, 50) for _ in range(size)]
        for q in (0, 12.5, 50, 95, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges():
    assert math.isnan(percentile([], 50))
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5  # order of input does not matter
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_sustained_rate_leaves_out_start_and_tail():
    steady = [i / 200 for i in range(1000)]  # 200/s for 5 s
    slow_start = [-10.0, -5.0]  # two stragglers far before: inside the trimmed 10 %
    assert sustained_rate(steady) == pytest.approx(200, rel=0.01)
    assert sustained_rate(slow_start + steady) == pytest.approx(200, rel=0.02)
    assert math.isnan(sustained_rate([1.0]))


def _result(**figures: tuple[float | None, bool | None]) -> dict[str, Any]:
    return {"figures": {k: {"value": v, "higher_is_better": h} for k, (v, h) in figures.items()}}


def test_compare_reports_direction_and_new_figures():
    previous = _result(rate=(100.0, True), latency=(200.0, False), same=(5.0, None), gone=(1.0, True))
    current = _result(rate=(110.0, True), latency=(250.0, False), same=(5.0, None), fresh=(3.0, True),
                      missing=(None, True))
    previous["figures"]["missing"] = {"value": 7.0, "higher_is_better": True}
    changes = compare(previous, current)
    assert changes["rate"] == "+10.0% better"
    assert changes["latency"] == "+25.0% worse"
    assert changes["same"] == "="
    assert changes["fresh"] == "new"
    assert changes["missing"] == "n/a"
    assert "gone" not in changes
    assert compare(None, current)["rate"] == ""  # a first run has nothing to compare with


def test_compare_round_trips_through_json(tmp_path: Path):
    figure = bench.Figure("x.rate", "x", 12.34567, "/s", ">= 10", True, True)
    saved = {"figures": {figure.key: figure.as_json()}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(saved))
    again = json.loads(path.read_text())
    assert again["figures"]["x.rate"]["value"] == pytest.approx(12.3457)
    assert compare(again, {"figures": {"x.rate": {**figure.as_json(), "value": 6.17285}}})["x.rate"] == \
        "-50.0% worse"


def test_cpu_figures_split_job_time_over_evidence_images():
    jobs = [
        JobCpu({"prepare": 0.020, "image.reference": 0.010}, evidence_images=1, evidence_megapixels=1.0),
        JobCpu({"prepare": 0.060, "image.reference": 0.040}, evidence_images=2, evidence_megapixels=1.5),
        JobCpu({"prepare": 0.005, "image.reference": 0.0}, evidence_images=0, evidence_megapixels=0.0),
        JobCpu({"prepare": 0.500, "image.reference": 0.500}, evidence_images=1, evidence_megapixels=12.0),
    ]
    within = cpu_figures(jobs, max_megapixels=2.0)
    assert within["prepare"]["n"] == 2  # the job without evidence and the 12 MP one are left out
    assert within["prepare"]["median_ms"] == pytest.approx(25.0)  # 20 ms and 60/2 ms
    assert within["image.reference"]["median_ms"] == pytest.approx(15.0)
    assert within[bench.TOTAL]["median_ms"] == pytest.approx(40.0)  # (30 + 50) / 2
    every = cpu_figures(jobs)
    assert every[bench.TOTAL]["n"] == 3
    assert every[bench.TOTAL]["p95_ms"] > within[bench.TOTAL]["p95_ms"]


def _photo(path: Path, seed: int, size: int = 96) -> None:
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, size, dtype=np.float32)
    pixels = np.stack([np.add.outer(gradient, gradient) / 2] * 3, axis=-1)
    pixels += rng.normal(0, 12, pixels.shape)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)


def _request(refund_id: str, evidence: list[str], references: list[str], base: str) -> dict[str, Any]:
    return {
        "schema": "refund-request/v1", "refund_id": refund_id, "order_id": f"OD-{refund_id}",
        "buyer_id": "BY-1", "merchant_id": "MC-1", "requested_at": "2026-10-02T10:00:00Z",
        "kind": "refund_only", "reason": "damaged", "amount": {"value": "120.00", "currency": "CNY"},
        "item": {"sku": "SKU-1", "title": "mug"}, "order": {"placed_at": "2026-09-28T10:00:00Z"},
        "evidence": [{"image_id": i, "url": f"{base}/images/{i}.jpg"} for i in evidence],
        "reference_images": [{"image_id": i, "url": f"{base}/images/{i}.jpg", "source": "listing"}
                             for i in references],
        "buyer": {"account_created_at": "2025-01-01T00:00:00Z"},
    }


@pytest.fixture
def tiny_traffic(tmp_path: Path) -> bench.Traffic:
    (tmp_path / "images").mkdir()
    for n, name in enumerate(("EV-1", "LS-1", "EV-2")):
        _photo(tmp_path / "images" / f"{name}.jpg", n)
    whole = (tmp_path / "images" / "EV-2.jpg").read_bytes()
    (tmp_path / "images" / "EV-BAD.jpg").write_bytes(whole[: len(whole) // 3])  # truncated: undecodable
    base = "http://127.0.0.1:8765"
    rows = [_request("RF-1", ["EV-1"], ["LS-1"], base), _request("RF-2", [], ["LS-1"], base),
            _request("RF-3", ["EV-2", "EV-MISSING"], [], base), _request("RF-4", ["EV-BAD"], ["LS-1"], base)]
    lines = [json.dumps({"topic": "refund.requests", "key": r["refund_id"], "value": r}) for r in rows]
    lines.append(json.dumps({"topic": "refund.outcomes", "key": "RF-1", "value": {"refund_id": "RF-1"}}))
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n")
    return bench.load_traffic(tmp_path, "tiny")


def test_measure_image_cpu_on_tiny_images(tiny_traffic: bench.Traffic):
    assert len(tiny_traffic.requests) == 4  # the outcome is not a request
    jobs, problems = bench.measure_image_cpu(tiny_traffic)
    # a missing file is left out, as a failed fetch; an undecodable one is not an evidence image
    assert [j.evidence_images for j in jobs] == [1, 0, 1, 0]
    assert problems == {"IMAGE_CORRUPT": 1}
    from scorers.registry import load_scorers

    stages = {"prepare", "fingerprint", *(s.name for s in load_scorers(kind="image"))}
    for job in jobs:
        assert set(job.seconds) == stages
        assert all(seconds >= 0 for seconds in job.seconds.values())
    assert jobs[0].evidence_megapixels == pytest.approx(96 * 96 / 1e6)
    figures = cpu_figures(jobs, bench.TARGET_MAX_MEGAPIXELS)
    assert figures[bench.TOTAL]["n"] == 2
    assert figures[bench.TOTAL]["median_ms"] == pytest.approx(
        float(np.median([sum(j.seconds.values()) * 1000 for j in jobs if j.evidence_images])))


def test_clone_requests_fresh_ids_and_rebased_urls(tiny_traffic: bench.Traffic):
    messages = bench.clone_requests(tiny_traffic.requests, 9, "t", "http://127.0.0.1:9999")
    assert len(messages) == 9
    values = [json.loads(v) for _, v in messages]
    assert len({v["refund_id"] for v in values}) == 9
    assert [k.decode() for k, _ in messages] == [v["refund_id"] for v in values]
    # within a copy a buyer keeps one id (its history holds); copies do not share buyers
    assert values[0]["buyer_id"] == values[1]["buyer_id"] != values[4]["buyer_id"]
    assert values[0]["evidence"][0]["url"] == "http://127.0.0.1:9999/images/EV-1.jpg"
    assert values[0]["reference_images"][0]["source"] == "listing"
    untouched = bench.clone_requests(tiny_traffic.requests, 1, "u", None)
    assert json.loads(untouched[0][1])["evidence"] == tiny_traffic.requests[0]["evidence"]


def test_local_path_maps_image_urls_into_the_directory(tmp_path: Path):
    assert bench.local_path(tmp_path, "http://127.0.0.1:8765/images/IMG-00001.jpg") == \
        tmp_path / "images" / "IMG-00001.jpg"
    assert bench.local_path(tmp_path, "http://127.0.0.1:8765/other/x.jpg") is None


def test_peak_rss_of_this_process_is_positive():
    import os

    rss = bench.peak_rss_mb(os.getpid())
    assert rss["worker_mb"] > 10
    assert rss["total_mb"] >= rss["worker_mb"]
