"""image.reference: is the evidence the shop's own photo (edited or not), and where was it changed?

Every image comes from streams.simulate.images (our own renderer), decoded through the
production preparer, so the scorer sees what it sees in the service.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scorers.base import PreparedImage, RequestFacts, ScoringInput
from scorers.image_reference import COPY_CODE, EDITED_CODE, ReferenceMatchScorer
from scorers.policy import decide, load_policy
from scorers.prepare import prepare_image
from streams.simulate import images as sim

HOLD_THRESHOLD = 0.6  # image.reference's threshold in the default policy
NOW = datetime(2026, 10, 1, tzinfo=UTC)
FACTS = RequestFacts(
    refund_id="RF-T1", order_id="OD-T1", buyer_id="BY-T1", merchant_id="MC-T1", requested_at=NOW,
    kind="refund_only", reason="damaged", amount=Decimal("59.90"), currency="CNY",
    placed_at=NOW, delivered_at=NOW, account_created_at=NOW,
)
FORMATS = (("JPEG", 92), ("WEBP", 80), ("PNG", 0), ("JPEG", 60), ("WEBP", 50), ("JPEG", 35))


def prepared(img: Image.Image, image_id: str, role: str = "evidence", fmt: str = "JPEG", quality: int = 90,
             exif: Image.Exif | None = None) -> PreparedImage:
    raw = sim.encode(img, fmt, quality, exif=exif)
    return prepare_image(raw, image_id=image_id, role=role, cache_key=f"test:{image_id}")  # type: ignore[arg-type]


def iou(a: list[int] | tuple[int, ...], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


@dataclass
class Shop:
    product: sim.Product
    listings: tuple[Image.Image, Image.Image]
    references: tuple[PreparedImage, PreparedImage]


def make_shop(seed: int) -> Shop:
    rng = np.random.default_rng(seed)
    product = sim.make_product(rng, seed)
    listings = (sim.listing_photo(product, rng, 0), sim.listing_photo(product, rng, 1))
    references = tuple(
        prepared(img, f"L{seed}-{i}", "listing", "PNG" if i else "JPEG") for i, img in enumerate(listings)
    )
    return Shop(product, listings, references)  # type: ignore[arg-type]


SEEDS = tuple(range(6))


@pytest.fixture(scope="module")
def shops() -> dict[int, Shop]:
    return {seed: make_shop(seed) for seed in SEEDS}


@pytest.fixture(scope="module")
def scorer() -> ReferenceMatchScorer:
    return ReferenceMatchScorer()


@pytest.fixture(scope="module")
def edited_cases(shops: dict[int, Shop]) -> list[tuple[str, PreparedImage, tuple[int, int, int, int], Shop]]:
    """Every damage kind on every shop, each put through what fraudsters do before uploading."""
    cases = []
    for seed, shop in shops.items():
        rng = np.random.default_rng(1000 + seed)
        for k, damage in enumerate(sim.DAMAGE_KINDS):
            source = shop.listings[(seed + k) % 2]
            edited, box = sim.edit_listing(source, shop.product, rng, damage)
            edited, box = sim.postprocess(
                edited, box, rng,
                resize=float(rng.choice([0.5, 0.75, 1.0, 1.4, 2.0])),
                crop=float(rng.uniform(0.0, 0.15)),
                mirror=bool(rng.random() < 0.4),
                rotate_deg=float(rng.uniform(-10, 10)),
                gamma=float(rng.uniform(0.75, 1.35)),
                colour_gain=tuple(float(g) for g in rng.uniform(0.92, 1.08, 3)),  # type: ignore[arg-type]
            )
            fmt, quality = FORMATS[(seed + k) % len(FORMATS)]
            name = f"E{seed}-{damage}"
            cases.append((name, prepared(edited, name, fmt=fmt, quality=quality), box, shop))
    return cases


def score_one(scorer: ReferenceMatchScorer, evidence: PreparedImage, references: tuple[PreparedImage, ...]):
    return scorer.score(ScoringInput(FACTS, (evidence,), references))


def test_edited_listings_are_held_with_the_changed_region_located(scorer, edited_cases):
    overlaps = []
    for name, evidence, true_box, shop in edited_cases:
        result = score_one(scorer, evidence, shop.references)
        assert result.score >= HOLD_THRESHOLD, name
        assert [r.code for r in result.reasons] == [EDITED_CODE], name
        facts = result.reasons[0].evidence
        assert facts["image_id"] == evidence.image_id
        assert facts["reference_id"] in {ref.image_id for ref in shop.references}
        x0, y0, x1, y1 = facts["changed_region"]
        assert 0 <= x0 < x1 <= evidence.width and 0 <= y0 < y1 <= evidence.height, name
        assert 0 < facts["changed_fraction"] < 0.2, name
        overlaps.append(iou(facts["changed_region"], true_box))
    overlaps_arr = np.array(overlaps)
    # Every damage kind under every transformation: the reported box mostly lands on the painted
    # one (measured: 20 of 24; the misses are faint scratches and cracks found in part).
    assert (overlaps_arr >= 0.5).mean() >= 0.75, overlaps
    assert np.median(overlaps_arr) >= 0.6, overlaps


def test_confident_edits_score_at_least_point_nine(scorer, edited_cases):
    scores = [score_one(scorer, evidence, shop.references).score for _, evidence, _, shop in edited_cases]
    assert np.median(scores) >= 0.9


def test_each_damage_kind_is_found(scorer, edited_cases):
    found = Counter()
    for name, evidence, true_box, shop in edited_cases:
        result = score_one(scorer, evidence, shop.references)
        reason = result.reasons[0] if result.reasons else None
        if reason and reason.code == EDITED_CODE and iou(reason.evidence["changed_region"], true_box) >= 0.5:
            found[name.split("-")[1]] += 1
    for damage in sim.DAMAGE_KINDS:
        assert found[damage] >= len(SEEDS) // 2, (damage, found)


@pytest.mark.parametrize("damage", [None, *sim.DAMAGE_KINDS])
def test_genuine_photos_of_the_same_item_are_not_derived(scorer, shops, damage):
    for seed, shop in shops.items():
        rng = np.random.default_rng(2000 + seed)
        photo = sim.buyer_photo(shop.product, rng, damage)
        result = score_one(scorer, prepared(photo, f"B{seed}-{damage}"), shop.references)
        assert result.score < HOLD_THRESHOLD, (seed, damage, result)
        assert result.reasons == (), (seed, damage)


def test_second_listing_shot_is_not_a_copy_of_the_first(scorer, shops):
    """The other listing shot shows the same item turned and re-lit: alike, not derived."""
    for seed, shop in shops.items():
        evidence = prepared(shop.listings[1], f"V{seed}")
        result = score_one(scorer, evidence, shop.references[:1])
        assert result.score < HOLD_THRESHOLD and result.reasons == (), seed


def test_unrelated_images_score_low(scorer, shops):
    for seed, shop in shops.items():
        other = shops[(seed + 1) % len(shops)]
        rng = np.random.default_rng(3000 + seed)
        for name, img in (("listing", other.listings[0]), ("photo", sim.buyer_photo(other.product, rng, "stain"))):
            result = score_one(scorer, prepared(img, f"U{seed}-{name}"), shop.references)
            assert result.score < 0.3 and result.reasons == (), (seed, name)


def test_the_listing_photo_itself_is_named_as_such(scorer, shops):
    for seed, shop in shops.items():
        rng = np.random.default_rng(4000 + seed)
        copy, _ = sim.postprocess(shop.listings[0], (0, 0, 1, 1), rng, resize=0.8, crop=0.05, rotate_deg=2.0,
                                  gamma=1.1)
        result = score_one(scorer, prepared(copy, f"C{seed}", quality=75), shop.references)
        assert [r.code for r in result.reasons] == [COPY_CODE], (seed, result)
        assert 0.7 <= result.score < 0.9
        assert result.reasons[0].evidence["reference_id"] == shop.references[0].image_id


def test_edited_shipment_photo_is_held_and_names_the_shipment(scorer, shops):
    shop = shops[0]
    rng = np.random.default_rng(5000)
    shipment = sim.buyer_photo(shop.product, rng)
    reference = prepared(shipment, "S0", "shipment")
    edited, box = sim.edit_listing(shipment, shop.product, rng, "crack")
    result = score_one(scorer, prepared(edited, "ES0", quality=85), (*shop.references, reference))
    assert [r.code for r in result.reasons] == [EDITED_CODE]
    facts = result.reasons[0].evidence
    assert facts["reference_id"] == "S0" and facts["reference_role"] == "shipment"
    assert iou(facts["changed_region"], box) >= 0.5


def test_box_is_in_the_files_displayed_pixels_when_exif_rotates_it(scorer, shops):
    """A phone stores the photo on its side with EXIF orientation 6; the box is in upright pixels."""
    shop = shops[1]
    rng = np.random.default_rng(6000)
    edited, box = sim.edit_listing(shop.listings[0], shop.product, rng, "stain")
    stored = edited.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    evidence = prepared(stored, "R1", exif=exif)
    assert evidence.exif_orientation == 6 and (evidence.width, evidence.height) == stored.size
    result = score_one(scorer, evidence, shop.references)
    assert [r.code for r in result.reasons] == [EDITED_CODE]
    assert iou(result.reasons[0].evidence["changed_region"], box) >= 0.5


def test_any_derived_evidence_among_several_is_reported_and_scored(scorer, shops, edited_cases):
    _, evidence, _, shop = edited_cases[0]
    genuine = prepared(sim.buyer_photo(shop.product, np.random.default_rng(7000)), "G")
    result = scorer.score(ScoringInput(FACTS, (genuine, evidence), shop.references))
    assert [r.evidence["image_id"] for r in result.reasons] == [evidence.image_id]
    assert result.score == max(r.score for r in result.reasons)


def test_nothing_to_compare_scores_zero(scorer, shops, edited_cases):
    _, evidence, _, shop = edited_cases[0]
    assert scorer.score(ScoringInput(FACTS, (evidence,), ())).score == 0.0
    assert scorer.score(ScoringInput(FACTS, (evidence,), ())).reasons == ()
    assert scorer.score(ScoringInput(FACTS, (), shop.references)).reasons == ()


def test_featureless_evidence_is_not_an_error(scorer, shops):
    blank = prepared(Image.new("RGB", (640, 480), (240, 240, 240)), "blank")
    result = score_one(scorer, blank, shops[0].references)
    assert result.score == 0.0 and result.reasons == ()


def test_reason_evidence_is_small_json_with_numbers(scorer, edited_cases):
    _, evidence, _, shop = edited_cases[1]
    reason = score_one(scorer, evidence, shop.references).reasons[0]
    text = json.dumps(reason.evidence)
    assert len(text) < 600
    for key, value in reason.evidence.items():
        assert isinstance(value, int | float | str | list), key
        if isinstance(value, str):
            assert len(value) <= 64
    assert all(isinstance(v, int) for v in reason.evidence["changed_region"])


def test_hold_reason_reaches_the_decision(scorer, edited_cases):
    _, evidence, _, shop = edited_cases[2]
    result = score_one(scorer, evidence, shop.references)
    verdict = decide(load_policy(), FACTS, {scorer.name: result})
    assert verdict.decision == "hold"
    assert verdict.reasons[0].code == EDITED_CODE
    assert verdict.review is not None and verdict.review.queue == "image-fraud"


def test_reference_features_cache_is_bounded(shops, edited_cases):
    small = ReferenceMatchScorer(cache_size=2)
    _, evidence, _, _ = edited_cases[0]
    for shop in list(shops.values())[:3]:
        small.score(ScoringInput(FACTS, (evidence,), shop.references))
    assert len(small._cache) == 2


def test_scorer_identity():
    scorer = ReferenceMatchScorer()
    assert scorer.name == "image.reference" and scorer.kind == "image"


# ---------------------------------------------------------------- labelled cases from ../shared

CASEGEN = Path("/work/shared/casegen")


@pytest.mark.shared
@pytest.mark.skipif(not CASEGEN.exists(), reason="needs /work/shared/casegen")
@pytest.mark.skipif(os.environ.get("REFUNDGUARD_SLOW") != "1", reason="casegen takes minutes: set REFUNDGUARD_SLOW=1")
def test_casegen_edited_listings_are_held_and_genuine_ones_are_not(tmp_path):
    sys.path.insert(0, str(CASEGEN))
    try:
        import casegen  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(CASEGEN))
    casegen.build(tmp_path, 11, 120, "http://127.0.0.1:8765")
    kinds = {}
    for line in (tmp_path / "labels.jsonl").read_text().splitlines():
        label = json.loads(line)
        kinds[label["refund_id"]] = label["kind"]
    scorer = ReferenceMatchScorer()
    held: Counter[str] = Counter()
    total: Counter[str] = Counter()

    def load(item: dict, role: str) -> PreparedImage:
        name = item["url"].rsplit("/", 1)[1]
        return prepare_image((tmp_path / "images" / name).read_bytes(), image_id=item["image_id"], role=role,
                             cache_key=name)

    for line in (tmp_path / "events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["topic"] != "refund.requests":
            continue
        value = event["value"]
        kind = kinds[value["refund_id"]]
        if not value["evidence"]:
            continue
        result = scorer.score(ScoringInput(
            FACTS,
            tuple(load(x, "evidence") for x in value["evidence"]),
            tuple(load(x, x["source"]) for x in value["reference_images"]),
        ))
        total[kind] += 1
        held[kind] += result.score >= HOLD_THRESHOLD and any(r.code == EDITED_CODE for r in result.reasons)
    assert held["edited_listing"] >= 0.95 * total["edited_listing"]
    for kind in ("genuine_damage", "genuine_photo", "high_value"):
        assert held[kind] <= 0.02 * total[kind] + 0.5, kind
