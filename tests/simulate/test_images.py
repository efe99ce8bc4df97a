"""The synthetic imagery: deterministic, realistic enough to matter, and honest about its edit boxes."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from streams.simulate import images as sim


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def product() -> sim.Product:
    return sim.make_product(rng(11), 3)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_same_generator_state_gives_identical_images():
    def run(seed: int) -> list[np.ndarray]:
        r = rng(seed)
        item = sim.make_product(r, 7)
        listing = sim.listing_photo(item, r, 0)
        edited, box = sim.edit_listing(listing, item, r, "stain")
        moved, _ = sim.postprocess(edited, box, r, resize=0.8, crop=0.1, mirror=True, rotate_deg=4, gamma=1.2)
        return [np.asarray(item.layer), pixels(listing), pixels(sim.listing_photo(item, r, 1)),
                pixels(sim.buyer_photo(item, r, "crack")), pixels(edited), pixels(moved), np.array(box)]

    first, again, other = run(5), run(5), run(6)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(first[1], other[1])


def test_products_are_textured_objects_with_catalogue_fields():
    seen_categories = set()
    for index in range(6):
        item = sim.make_product(rng(index), index)
        seen_categories.add(item.category)
        assert item.sku.startswith("SKU-") and item.title and item.category
        assert float(item.price) > 0 and item.price.count(".") == 1 and len(item.price.split(".")[1]) == 2
        layer = np.asarray(item.layer)
        assert item.layer.mode == "RGBA" and layer.shape[2] == 4
        opaque = layer[..., 3] > 200
        assert 0.1 < opaque.mean() < 0.9  # an object on a transparent canvas
        grey = layer[..., :3].astype(np.float32).mean(axis=2)
        assert grey[opaque].std() > 8  # shaded and printed, not a flat colour
    assert len(seen_categories) >= 4


def test_listing_shots_are_studio_photos_within_size(product):
    for variant in (0, 1):
        shot = sim.listing_photo(product, rng(variant), variant)
        assert max(shot.size) <= 1600 and shot.mode == "RGB"
        corner = pixels(shot)[:20, :20]
        assert corner.mean() > 215 and corner.std() < 6  # plain light background
        assert sim.OBJECT_MASK_KEY in shot.info


def test_second_listing_shot_shows_the_item_differently(product):
    r = rng(1)
    first, second = sim.listing_photo(product, r, 0), sim.listing_photo(product, r, 1)
    small = [np.asarray(img.convert("L").resize((128, 128)), dtype=np.float32) for img in (first, second)]
    assert np.abs(small[0] - small[1]).mean() > 5


@pytest.mark.parametrize("damage", [None, *sim.DAMAGE_KINDS])
def test_buyer_photos_are_phone_photos(product, damage):
    photo = sim.buyer_photo(product, rng(2), damage)
    assert max(photo.size) <= 1600 and photo.size[0] != photo.size[1]
    grey = np.asarray(photo.convert("L"), dtype=np.float32)
    # Grain everywhere (sensor noise, a textured surface), not a clean render.
    fine_detail = grey - cv2.GaussianBlur(grey, (0, 0), 3)
    assert fine_detail.std() > 0.8
    # Uneven light: the frame's quarters differ in brightness more than a studio backdrop would.
    h, w = grey.shape
    quarters = [grey[:h // 2, :w // 2].mean(), grey[:h // 2, w // 2:].mean(),
                grey[h // 2:, :w // 2].mean(), grey[h // 2:, w // 2:].mean()]
    assert max(quarters) - min(quarters) > 4


@pytest.mark.parametrize("damage", sim.DAMAGE_KINDS)
def test_physical_damage_changes_the_item_not_the_scene(product, damage):
    plain_photo = sim.buyer_photo(product, rng(3), None)
    plain, damaged = pixels(plain_photo), pixels(sim.buyer_photo(product, rng(3), damage))
    assert plain.shape == damaged.shape
    change = np.abs(damaged - plain).max(axis=2)
    item = cv2.dilate(plain_photo.info[sim.OBJECT_MASK_KEY].astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    assert change[item].max() > 8  # (a turned item can show its damage only at the edge)
    assert change[~item].max() <= 2


@pytest.mark.parametrize("damage", sim.DAMAGE_KINDS)
def test_edit_box_bounds_exactly_the_visible_change(product, damage):
    listing = sim.listing_photo(product, rng(4), 0)
    edited, box = sim.edit_listing(listing, product, rng(40), damage)
    assert edited.size == listing.size
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= listing.width and 0 <= y0 < y1 <= listing.height
    before, after = np.asarray(listing), np.asarray(edited)
    assert sim.changed_box(before, after) == box
    change = np.abs(after.astype(np.int16) - before).max(axis=2)
    outside = change.copy()
    outside[y0:y1, x0:x1] = 0
    assert outside.max() <= sim.VISIBLE_CHANGE + 8  # nothing visible changed outside the box
    inside = change[y0:y1, x0:x1]
    assert inside.max() > 40  # the damage is plain to see
    # Tight: every side of the box touches a visibly changed pixel.
    visible = change >= sim.VISIBLE_CHANGE
    assert visible[y0:y1, x0:x0 + 2].any() and visible[y0:y1, x1 - 2:x1].any()
    assert visible[y0:y0 + 2, x0:x1].any() and visible[y1 - 2:y1, x0:x1].any()
    # On the item, not the backdrop.
    mask = listing.info[sim.OBJECT_MASK_KEY]
    assert mask[y0:y1, x0:x1].mean() > 0.3


def test_edit_of_a_listing_without_a_mask_finds_the_item(product):
    listing = sim.listing_photo(product, rng(5), 0)
    reloaded = Image.open(io.BytesIO(sim.encode(listing, "PNG")))
    assert sim.OBJECT_MASK_KEY not in reloaded.info
    _, box = sim.edit_listing(reloaded, product, rng(50), "crack")
    x0, y0, x1, y1 = box
    assert listing.info[sim.OBJECT_MASK_KEY][y0:y1, x0:x1].mean() > 0.3


def test_unknown_damage_is_refused(product):
    with pytest.raises(ValueError, match="damage"):
        sim.buyer_photo(product, rng(), "dust")
    with pytest.raises(ValueError, match="damage"):
        sim.edit_listing(sim.listing_photo(product, rng(), 0), product, rng(), "melted")


@pytest.mark.parametrize("transform", [
    {"resize": 0.5}, {"resize": 1.7}, {"crop": 0.15}, {"mirror": True}, {"rotate_deg": 9.0},
    {"rotate_deg": -7.0, "crop": 0.1, "mirror": True, "resize": 0.8, "gamma": 1.3},
    {"gamma": 0.7, "colour_gain": (1.05, 0.97, 0.92)},
])
def test_postprocess_keeps_the_box_on_the_change(product, transform):
    listing = sim.listing_photo(product, rng(6), 0)
    edited, box = sim.edit_listing(listing, product, rng(60), "stain")
    # The same transformation (same generator state) of the untouched listing shows where the change went.
    moved_edit, moved_box = sim.postprocess(edited, box, rng(61), **transform)
    moved_plain, _ = sim.postprocess(listing, box, rng(61), **transform)
    assert moved_edit.size == moved_plain.size
    x0, y0, x1, y1 = moved_box
    assert 0 <= x0 < x1 <= moved_edit.width and 0 <= y0 < y1 <= moved_edit.height
    actual = sim.changed_box(np.asarray(moved_plain), np.asarray(moved_edit))
    ix = max(0, min(actual[2], x1) - max(actual[0], x0))
    iy = max(0, min(actual[3], y1) - max(actual[1], y0))
    inter = ix * iy
    union = (actual[2] - actual[0]) * (actual[3] - actual[1]) + (x1 - x0) * (y1 - y0) - inter
    assert inter / union > 0.6, (actual, moved_box)
    # The change lies inside the reported box (a turned box is the bounds of its corners, so larger).
    assert actual[0] >= x0 - 3 and actual[1] >= y0 - 3 and actual[2] <= x1 + 3 and actual[3] <= y1 + 3


def test_postprocess_mirror_moves_the_box_to_the_other_side(product):
    listing = sim.listing_photo(product, rng(7), 0)
    _, box = sim.edit_listing(listing, product, rng(70), "scratch")
    flipped, flipped_box = sim.postprocess(listing, box, rng(71), mirror=True)
    assert flipped_box == (listing.width - box[2], box[1], listing.width - box[0], box[3])
    assert np.array_equal(pixels(flipped), pixels(listing)[:, ::-1])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_encode_writes_each_format_with_metadata(product, fmt):
    img = sim.listing_photo(product, rng(8), 0)
    exif = Image.Exif()
    exif[0x0131] = "Test Editor 1.0"
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    text = {"parameters": "a crack, photo"} if fmt != "WEBP" else None
    raw = sim.encode(img, fmt, 85, exif=exif, xmp=xmp, text=text)
    decoded = Image.open(io.BytesIO(raw))
    assert decoded.format == fmt and decoded.size == img.size
    assert decoded.getexif().get(0x0131) == "Test Editor 1.0"
    assert b"adobe:ns:meta" in raw
    if fmt == "PNG":
        assert decoded.text["parameters"] == "a crack, photo"  # type: ignore[attr-defined]
    if fmt == "JPEG":
        assert b"a crack, photo" in raw


def test_encode_refuses_what_a_format_cannot_hold(product):
    img = sim.listing_photo(product, rng(9), 0)
    with pytest.raises(ValueError):
        sim.encode(img, "WEBP", text={"a": "b"})
    with pytest.raises(ValueError):
        sim.encode(img, "GIF")
