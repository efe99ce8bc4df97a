"""Evidence reuse: the perceptual fingerprint, its band keys and the scorer of looked-up matches."""

from __future__ import annotations

import io
import itertools
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFilter

from scorers.base import BuyerFeatures, EvidenceMatch, RequestFacts, ScoringInput
from scorers.policy import decide, load_policy
from scorers.reuse import (
    BANDS,
    HASH_BITS,
    MATCH_DISTANCE,
    EvidenceReuseScorer,
    band_keys,
    evidence_hash,
    hamming,
)

POLICY = load_policy()
THRESHOLD = POLICY.scorers["image.reuse"].threshold


# ------------------------------------------------------------------ synthetic photos


def background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A table or floor: smooth colour blotches plus grain."""
    coarse = rng.uniform(40, 220, size=(6, 8, 3)).astype(np.uint8)
    return Image.fromarray(coarse, "RGB").resize(size, Image.Resampling.BICUBIC)


def finish(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Lens blur and sensor noise, as a phone leaves them."""
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(1.0))).astype(np.float32)
    arr += rng.normal(0, 6, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def photo(seed: int, size: tuple[int, int] = (800, 600)) -> Image.Image:
    """A textured scene: a background with a dozen coloured shapes on it."""
    rng = np.random.default_rng(seed)
    img = background(rng, size)
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(12):
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(30, 200))
        fill = tuple(int(v) for v in rng.integers(0, 255, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x - r, y - r // 2, x + r, y + r // 2), fill=fill)
    return finish(img, rng)


def product_shot(seed: int) -> Image.Image:
    """The same product (a labelled box) on the same table, placed and framed differently each time.

    The hard case for a fingerprint: only the object's position, size and angle differ.
    """
    item = Image.new("RGBA", (420, 300), (0, 0, 0, 0))
    draw = ImageDraw.Draw(item)
    draw.rectangle((0, 0, 419, 299), fill=(180, 40, 40, 255))
    draw.rectangle((40, 100, 380, 190), fill=(240, 235, 220, 255))
    for i in range(3):
        draw.line((60, 120 + 25 * i, 330 - 40 * i, 120 + 25 * i), fill=(40, 40, 90, 255), width=6)
    rng = np.random.default_rng(seed)
    img = background(np.random.default_rng(99), (1200, 900))
    scale = rng.uniform(0.9, 1.6)
    placed = item.resize((int(420 * scale), int(300 * scale))).rotate(float(rng.uniform(-20, 20)), expand=True)
    img.paste(placed, (int(rng.integers(0, 1200 - placed.width)), int(rng.integers(0, 900 - placed.height))), placed)
    return finish(img, rng)


def reencode(img: Image.Image, fmt: str, quality: int = 75) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, fmt, quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def fingerprint(img: Image.Image) -> int:
    return evidence_hash(np.asarray(img.convert("RGB")))


PHOTOS = [photo(seed) for seed in range(8)]
HASHES = [fingerprint(p) for p in PHOTOS]


# ------------------------------------------------------------------ the fingerprint


def test_hash_is_a_deterministic_64_bit_int() -> None:
    h = HASHES[0]
    assert isinstance(h, int) and 0 <= h < 1 << HASH_BITS
    assert fingerprint(PHOTOS[0]) == h
    assert evidence_hash(np.asarray(PHOTOS[0]).copy()) == h


@pytest.mark.parametrize(("fx", "fy"), [(1.0, 1.0), (0.8, 1.0), (1.0, 0.8), (0.85, 0.93), (0.5, 0.5)])
@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "PNG"])
def test_resized_and_recompressed_copy_matches(fx: float, fy: float, fmt: str) -> None:
    for original, h in zip(PHOTOS[:4], HASHES[:4], strict=True):
        w, hh = original.size
        copy = reencode(original.resize((int(w * fx), int(hh * fy)), Image.Resampling.BICUBIC), fmt, quality=70)
        assert hamming(h, fingerprint(copy)) <= MATCH_DISTANCE


def test_trimmed_edges_match() -> None:
    for original, h in zip(PHOTOS, HASHES, strict=True):
        w, hh = original.size
        cx, cy = int(w * 0.005), int(hh * 0.005)  # 0.5 % off every side, then resized and re-saved
        copy = original.crop((cx, cy, w - cx, hh - cy)).resize((int(w * 0.9), int(hh * 0.9)))
        assert hamming(h, fingerprint(reencode(copy, "JPEG"))) <= MATCH_DISTANCE


def test_one_sided_crop_mostly_matches() -> None:
    # A crop that shifts the scene moves a DCT hash more than one that only scales it:
    # 1 % off the top and left keeps most copies (not all) within the match distance.
    matched = 0
    for original, h in zip(PHOTOS, HASHES, strict=True):
        w, hh = original.size
        copy = reencode(original.crop((int(w * 0.01), int(hh * 0.01), w, hh)), "JPEG")
        matched += hamming(h, fingerprint(copy)) <= MATCH_DISTANCE
    assert matched >= 0.75 * len(PHOTOS)


def test_distinct_photos_are_far_apart() -> None:
    for a, b in itertools.combinations(HASHES, 2):
        assert hamming(a, b) > 3 * MATCH_DISTANCE


def test_other_shots_of_the_same_product_on_the_same_table_do_not_match() -> None:
    shots = [fingerprint(product_shot(seed)) for seed in range(6)]
    for a, b in itertools.combinations(shots, 2):
        assert hamming(a, b) > MATCH_DISTANCE


def test_small_and_flat_images_hash_without_error() -> None:
    flat = np.full((40, 30, 3), 128, np.uint8)
    tiny = np.asarray(PHOTOS[0].resize((16, 12)))
    for pixels in (flat, tiny):
        h = evidence_hash(pixels)
        assert 0 <= h < 1 << HASH_BITS


@pytest.mark.parametrize("bad", [
    np.zeros((10, 10), np.uint8),
    np.zeros((10, 10, 4), np.uint8),
    np.zeros((10, 10, 3), np.float32),
    np.zeros((0, 10, 3), np.uint8),
])
def test_rejects_what_is_not_rgb_uint8(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="evidence_hash"):
        evidence_hash(bad)


# ------------------------------------------------------------------ band keys

hashes = st.integers(min_value=0, max_value=(1 << HASH_BITS) - 1)


def flip(h: int, positions: set[int]) -> int:
    for p in positions:
        h ^= 1 << p
    return h


@settings(max_examples=500, deadline=None)
@given(h=hashes, positions=st.sets(st.integers(0, HASH_BITS - 1), max_size=MATCH_DISTANCE))
def test_hashes_within_match_distance_share_a_band(h: int, positions: set[int]) -> None:
    other = flip(h, positions)
    assert hamming(h, other) == len(positions) <= MATCH_DISTANCE
    assert set(band_keys(h)) & set(band_keys(other))


@settings(max_examples=300, deadline=None)
@given(h=hashes, bands=st.integers(1, 16), data=st.data())
def test_pigeonhole_for_any_band_count(h: int, bands: int, data: st.DataObject) -> None:
    positions = data.draw(st.sets(st.integers(0, HASH_BITS - 1), max_size=bands - 1))
    assert set(band_keys(h, bands)) & set(band_keys(flip(h, positions), bands))


@settings(max_examples=200, deadline=None)
@given(h=hashes, bands=st.integers(1, HASH_BITS))
def test_bands_cover_every_bit_in_nearly_equal_runs(h: int, bands: int) -> None:
    keys = band_keys(h, bands)
    assert len(keys) == len(set(keys)) == bands
    widths, rebuilt = [], 0
    for key in keys:
        _, position, value = key.split(":")
        assert position.endswith(f".{len(widths)}")
        width = HASH_BITS // bands + (1 if len(widths) < HASH_BITS % bands else 0)
        widths.append(width)
        rebuilt = (rebuilt << width) | int(value, 16)
    assert sum(widths) == HASH_BITS and max(widths) - min(widths) <= 1
    assert rebuilt == h


def test_guarantee_is_tight_one_flip_per_band_shares_nothing() -> None:
    h = HASHES[0]
    starts = [0]
    for index in range(BANDS - 1):
        starts.append(starts[-1] + HASH_BITS // BANDS + (1 if index < HASH_BITS % BANDS else 0))
    other = flip(h, {HASH_BITS - 1 - s for s in starts})  # the top bit of every band
    assert hamming(h, other) == BANDS
    assert not set(band_keys(h)) & set(band_keys(other))


def test_equal_bits_in_different_bands_are_different_keys() -> None:
    keys = band_keys(0)
    assert len(set(keys)) == BANDS


def test_band_keys_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        band_keys(1 << HASH_BITS)
    with pytest.raises(ValueError):
        band_keys(-1)
    with pytest.raises(ValueError):
        band_keys(5, 0)


def test_real_copies_are_found_through_the_bands() -> None:
    w, h = PHOTOS[1].size
    copy = reencode(PHOTOS[1].resize((int(w * 0.8), int(h * 0.95))), "WEBP")
    assert set(band_keys(HASHES[1])) & set(band_keys(fingerprint(copy)))


# ------------------------------------------------------------------ the scorer

NOW = datetime(2026, 10, 5, 12, 0, tzinfo=UTC)
REQUEST = RequestFacts(
    refund_id="RF-000300", order_id="OD-000300", buyer_id="BY-me", merchant_id="MC-001", requested_at=NOW,
    kind="refund_only", reason="damaged", amount=Decimal("89.90"), currency="CNY",
    placed_at=NOW - timedelta(days=5), delivered_at=NOW - timedelta(days=1),
    account_created_at=NOW - timedelta(days=300),
)


def match(refund: str = "RF-000100", buyer: str = "BY-other", order: str = "OD-000100", distance: int = 0,
          image: str = "IMG-9", earlier_image: str = "IMG-1") -> EvidenceMatch:
    return EvidenceMatch(image, refund, buyer, order, earlier_image, distance)


def score(*matches: EvidenceMatch, request: RequestFacts = REQUEST):
    data = ScoringInput(request=request, features=BuyerFeatures(evidence_matches=matches))
    return EvidenceReuseScorer().score(data)


def test_no_matches_no_score() -> None:
    result = score()
    assert result.score == 0.0 and result.reasons == ()


def test_another_buyers_photo_is_reused_evidence_and_holds() -> None:
    result = score(match())
    assert result.score == pytest.approx(0.95)
    reason = result.reasons[0]
    assert reason.code == "EVIDENCE_REUSED"
    assert reason.evidence == {"image_id": "IMG-9", "first_refund_id": "RF-000100", "first_buyer_id": "BY-other",
                               "first_image_id": "IMG-1", "distance": 0, "earlier_uses": 1}
    assert "RF-000100" in reason.message
    verdict = decide(POLICY, REQUEST, {"image.reuse": result})
    assert verdict.decision == "hold"
    assert verdict.review is not None and verdict.review.queue == "fraud-ring" and verdict.review.priority == "high"


def test_same_buyer_on_another_order_is_its_own_code() -> None:
    result = score(match(buyer="BY-me", order="OD-000050"))
    assert [r.code for r in result.reasons] == ["EVIDENCE_REUSED_SAME_BUYER"]
    assert result.score == pytest.approx(0.85)
    assert result.score >= THRESHOLD
    assert "OD-000050" in result.reasons[0].message


@pytest.mark.parametrize("same", ["refund", "order"])
def test_same_claim_or_order_is_not_a_signal(same: str) -> None:
    m = match(refund="RF-000300") if same == "refund" else match(order="OD-000300", refund="RF-000200")
    assert score(m).score == 0.0
    assert score(replace(m, earlier_buyer_id="BY-me")).score == 0.0


def test_closer_is_higher_and_all_within_distance_hold() -> None:
    scores = [score(match(distance=d)).score for d in range(MATCH_DISTANCE + 1)]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1]
    assert min(scores) >= 0.8
    same_buyer = [score(match(buyer="BY-me", distance=d)).score for d in range(MATCH_DISTANCE + 1)]
    assert same_buyer == sorted(same_buyer, reverse=True) and min(same_buyer) >= THRESHOLD
    assert all(o > s for o, s in zip(scores, same_buyer, strict=True))


def test_match_beyond_the_distance_is_ignored() -> None:
    assert score(match(distance=MATCH_DISTANCE + 1)).score == 0.0


def test_names_the_first_use() -> None:
    result = score(match(refund="RF-000010", buyer="BY-a", distance=2),
                   match(refund="RF-000020", buyer="BY-b", order="OD-000020", distance=0))
    reason = result.reasons[0]
    assert reason.evidence["first_refund_id"] == "RF-000010"
    assert reason.evidence["first_buyer_id"] == "BY-a"
    assert reason.evidence["earlier_uses"] == 2
    assert reason.evidence["distance"] == 0  # the closest of the uses decides how sure we are
    assert "RF-000010" in reason.message
    assert len(result.reasons) == 1


def test_another_buyers_use_wins_over_own_earlier_use() -> None:
    result = score(match(refund="RF-000010", buyer="BY-me", order="OD-000010"),
                   match(refund="RF-000020", buyer="BY-b", order="OD-000020"))
    assert [r.code for r in result.reasons] == ["EVIDENCE_REUSED"]
    assert result.reasons[0].evidence["first_refund_id"] == "RF-000020"


def test_one_reason_per_evidence_image_strongest_first() -> None:
    result = score(match(image="IMG-A", buyer="BY-me", order="OD-1", refund="RF-1"),
                   match(image="IMG-B", buyer="BY-x", order="OD-2", refund="RF-2", distance=2))
    assert [r.evidence["image_id"] for r in result.reasons] == ["IMG-B", "IMG-A"]
    assert [r.code for r in result.reasons] == ["EVIDENCE_REUSED", "EVIDENCE_REUSED_SAME_BUYER"]
    assert result.score == result.reasons[0].score


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["IMG-A", "IMG-B"]), st.sampled_from(["RF-1", "RF-2", "RF-000300"]),
                          st.sampled_from(["BY-me", "BY-x"]), st.sampled_from(["OD-1", "OD-000300"]),
                          st.integers(-2, HASH_BITS)), max_size=6))
def test_scores_always_in_unit_interval(rows: list[tuple[str, str, str, str, int]]) -> None:
    matches = [EvidenceMatch(image, refund, buyer, order, "IMG-0", d) for image, refund, buyer, order, d in rows]
    result = score(*matches)
    assert 0.0 <= result.score <= 1.0
    assert all(0.0 <= r.score <= result.score for r in result.reasons)
    assert (result.score > 0) == bool(result.reasons)
