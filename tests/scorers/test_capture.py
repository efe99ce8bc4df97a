"""image.capture: camera EXIF against the order's timeline, and the EXIF thumbnail against the picture."""

from __future__ import annotations

import datetime as dt
import io
import struct
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from scorers.base import RequestFacts, ScoreResult, ScoringInput
from scorers.capture import CaptureScorer, parse_exif_time, parse_offset
from scorers.prepare import prepare_image

C2PA_DIR = Path(__file__).resolve().parents[1] / "data" / "c2pa"
REQUESTED = dt.datetime(2026, 9, 10, 12, 0, tzinfo=dt.UTC)
DELIVERED = REQUESTED - dt.timedelta(days=2)
PLACED = REQUESTED - dt.timedelta(days=6)


def request(delivered: dt.datetime | None = DELIVERED) -> RequestFacts:
    return RequestFacts(
        refund_id="RF-1", order_id="OD-1", buyer_id="BY-1", merchant_id="MC-1", requested_at=REQUESTED,
        kind="refund_only", reason="damaged", amount=Decimal("99.00"), currency="CNY",
        placed_at=PLACED, delivered_at=delivered, account_created_at=REQUESTED - dt.timedelta(days=400),
    )


def score(*raws: bytes, delivered: dt.datetime | None = DELIVERED) -> ScoreResult:
    images = tuple(prepare_image(raw, image_id=f"IMG-{i}", role="evidence") for i, raw in enumerate(raws))
    result = CaptureScorer().score(ScoringInput(request(delivered), images))
    assert 0.0 <= result.score <= 0.7  # a signal, never a verdict
    return result


def codes(result: ScoreResult) -> list[str]:
    return [r.code for r in result.reasons]


def scene(seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A picture with large-scale structure (so a 24x24 reduction still tells scenes apart)."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(60, 200, 3)))
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w * 3 // 4)), int(rng.integers(0, h * 3 // 4))
        x1, y1 = x0 + int(rng.integers(w // 8, w // 3)), y0 + int(rng.integers(h // 8, h // 3))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


def tiff_exif(ifd0: dict[int, Any], exif_ifd: dict[int, Any], thumbnail: bytes | None = None) -> bytes:
    """A little-endian TIFF/EXIF block: IFD0 (+ Exif IFD) and, with a thumbnail, IFD1 pointing at it."""

    def entries(tags: dict[int, Any]) -> list[tuple[int, int, int, bytes]]:
        out = []
        for tag, value in sorted(tags.items()):
            if isinstance(value, str):
                data = value.encode() + b"\x00"
                out.append((tag, 2, len(data), data))
            elif isinstance(value, bytes):
                out.append((tag, 7, len(value), value))
            else:  # SHORT for orientation, LONG for pointers/offsets
                typ = 3 if tag == 0x0112 else 4
                out.append((tag, typ, 1, struct.pack("<H", value) if typ == 3 else struct.pack("<I", value)))
        return out

    def ifd_size(tags: dict[int, Any]) -> int:
        return 2 + 12 * len(tags) + 4 + sum(len(d) + (len(d) & 1) for *_, d in entries(tags) if len(d) > 4)

    ifd0 = dict(ifd0)
    ifd0[0x8769] = 0  # placeholder, fixed below
    ifd1: dict[int, Any] = {0x0201: 0, 0x0202: len(thumbnail)} if thumbnail else {}
    off0 = 8
    off_exif = off0 + ifd_size(ifd0)
    off1 = off_exif + ifd_size(exif_ifd)
    off_thumb = off1 + (ifd_size(ifd1) if ifd1 else 0)
    ifd0[0x8769] = off_exif
    if ifd1:
        ifd1[0x0201] = off_thumb

    def write(tags: dict[int, Any], at: int, next_ifd: int) -> bytes:
        items = entries(tags)
        data_at = at + 2 + 12 * len(items) + 4
        head, tail = struct.pack("<H", len(items)), b""
        for tag, typ, count, data in items:
            if len(data) <= 4:
                head += struct.pack("<HHI", tag, typ, count) + data.ljust(4, b"\x00")
            else:
                head += struct.pack("<HHII", tag, typ, count, data_at + len(tail))
                tail += data + (b"\x00" if len(data) & 1 else b"")
        return head + struct.pack("<I", next_ifd) + tail

    block = b"II*\x00" + struct.pack("<I", off0)
    block += write(ifd0, off0, off1 if ifd1 else 0)
    block += write(exif_ifd, off_exif, 0)
    if ifd1:
        block += write(ifd1, off1, 0) + thumbnail
    return block


def jpeg(img: Image.Image, exif_block: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    kw = {"exif": b"Exif\x00\x00" + exif_block} if exif_block is not None else {}
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def thumb_of(img: Image.Image, size: tuple[int, int] = (160, 120)) -> bytes:
    buf = io.BytesIO()
    img.resize(size).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def camera(taken: str | None, offset: str | None = None, make: str = "Xiaomi", model: str = "23049RAD8C",
           orientation: int = 1) -> tuple[dict[int, Any], dict[int, Any]]:
    ifd0: dict[int, Any] = {0x0112: orientation}
    if make:
        ifd0[0x010F] = make
    if model:
        ifd0[0x0110] = model
    exif_ifd: dict[int, Any] = {}
    if taken:
        exif_ifd[0x9003] = taken
    if offset:
        exif_ifd[0x9011] = offset
    return ifd0, exif_ifd


def local(moment: dt.datetime, hours: float) -> str:
    return (moment + dt.timedelta(hours=hours)).strftime("%Y:%m:%d %H:%M:%S")


# ------------------------------------------------------------------ timeline


def test_consistent_phone_photo_has_no_reasons() -> None:
    taken = REQUESTED - dt.timedelta(hours=5)
    raw = jpeg(scene(1), tiff_exif(*camera(local(taken, 8), "+08:00")))
    result = score(raw)
    assert result.reasons == ()
    assert result.score == 0.0


def test_unknown_zone_is_tolerated() -> None:
    # 2 h after delivery in UTC, written as Beijing wall-clock time without an offset tag
    taken = DELIVERED + dt.timedelta(hours=2)
    assert score(jpeg(scene(1), tiff_exif(*camera(local(taken, 8))))).reasons == ()
    # ... or as a US west-coast wall-clock time, 7 h behind
    assert score(jpeg(scene(1), tiff_exif(*camera(local(taken, -7))))).reasons == ()


def test_photo_taken_days_before_delivery() -> None:
    taken = DELIVERED - dt.timedelta(days=1, hours=12)
    result = score(jpeg(scene(1), tiff_exif(*camera(local(taken, 8)))))
    assert codes(result) == ["CAPTURE_BEFORE_DELIVERY"]
    reason = result.reasons[0]
    assert reason.evidence["reference"] == "delivered"
    assert reason.evidence["hours_before"] > 0
    assert 0.4 <= result.score < 0.6


def test_known_offset_makes_the_check_exact() -> None:
    taken = DELIVERED - dt.timedelta(hours=4)
    exact = score(jpeg(scene(1), tiff_exif(*camera(local(taken, 8), "+08:00"))))
    assert codes(exact) == ["CAPTURE_BEFORE_DELIVERY"]
    assert exact.reasons[0].evidence["zone_known"] is True
    # without the offset 4 h is within the zone tolerance
    assert score(jpeg(scene(1), tiff_exif(*camera(local(taken, 8))))).reasons == ()


def test_photo_before_the_order_scores_higher_than_before_delivery() -> None:
    before_delivery = score(jpeg(scene(1), tiff_exif(*camera(local(DELIVERED - dt.timedelta(days=2), 0)))))
    before_order = score(jpeg(scene(1), tiff_exif(*camera(local(PLACED - dt.timedelta(days=2), 0)))))
    assert before_order.score > before_delivery.score > 0.0


def test_without_delivery_time_the_order_time_is_used() -> None:
    taken = PLACED - dt.timedelta(days=3)
    result = score(jpeg(scene(1), tiff_exif(*camera(local(taken, 0)))), delivered=None)
    assert codes(result) == ["CAPTURE_BEFORE_DELIVERY"]
    assert result.reasons[0].evidence["reference"] == "ordered"
    # between order and request with no delivery time: fine
    fine = REQUESTED - dt.timedelta(days=3)
    assert score(jpeg(scene(1), tiff_exif(*camera(local(fine, 0)))), delivered=None).reasons == ()


def test_photo_after_the_request() -> None:
    taken = REQUESTED + dt.timedelta(days=2)
    result = score(jpeg(scene(1), tiff_exif(*camera(local(taken, 8)))))
    assert codes(result) == ["CAPTURE_AFTER_REQUEST"]
    assert result.reasons[0].evidence["hours_after"] > 0
    assert result.score < 0.6


def test_unset_camera_clock_is_barely_a_signal() -> None:
    result = score(jpeg(scene(1), tiff_exif(*camera("2000:01:01 00:03:12"))))
    assert codes(result) == ["CAPTURE_BEFORE_DELIVERY"]
    assert result.reasons[0].evidence["clock_unset"] is True
    assert result.score <= 0.2


@pytest.mark.parametrize("value", ["0000:00:00 00:00:00", "", "yesterday", "2026:13:45 99:00:00"])
def test_placeholder_capture_times_are_ignored(value: str) -> None:
    assert score(jpeg(scene(1), tiff_exif(*camera(value or None)))).reasons == ()


def test_parsers() -> None:
    assert parse_exif_time("2026:09:10 08:30:00\x00") == dt.datetime(2026, 9, 10, 8, 30)
    assert parse_exif_time("2026-09-10T08:30:00") == dt.datetime(2026, 9, 10, 8, 30)
    assert parse_offset("+08:00") == dt.timedelta(hours=8)
    assert parse_offset("-05:30") == -dt.timedelta(hours=5, minutes=30)
    assert parse_offset("+23:00") is None
    assert parse_offset("   :  ") is None


# ------------------------------------------------------------------ camera data


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_no_exif_is_a_tiny_signal(fmt: str) -> None:
    buf = io.BytesIO()
    scene(1).save(buf, fmt)
    result = score(buf.getvalue())
    assert codes(result) == ["CAPTURE_NO_CAMERA_DATA"]
    assert 0.0 < result.score <= 0.2


def test_capture_time_without_make_and_model() -> None:
    taken = REQUESTED - dt.timedelta(hours=5)
    result = score(jpeg(scene(1), tiff_exif(*camera(local(taken, 8), make="", model=""))))
    assert codes(result) == ["CAPTURE_NO_CAMERA_DATA"]


# ------------------------------------------------------------------ thumbnail


def test_thumbnail_of_the_same_picture_passes() -> None:
    picture = scene(3)
    ok = REQUESTED - dt.timedelta(hours=5)
    assert score(jpeg(picture, tiff_exif(*camera(local(ok, 8), "+08:00"), thumbnail=thumb_of(picture)))).reasons == ()


def test_thumbnail_of_a_different_picture_is_flagged() -> None:
    ok = REQUESTED - dt.timedelta(hours=5)
    raw = jpeg(scene(3), tiff_exif(*camera(local(ok, 8), "+08:00"), thumbnail=thumb_of(scene(4))))
    result = score(raw)
    assert codes(result) == ["CAPTURE_THUMBNAIL_MISMATCH"]
    assert result.reasons[0].evidence["similarity"] < 0.3
    assert result.score >= 0.5


def test_thumbnail_follows_the_orientation_tag() -> None:
    picture = scene(5)  # stored landscape, displayed portrait (orientation 6 = rotate 90 cw)
    ok = REQUESTED - dt.timedelta(hours=5)
    raw = jpeg(picture, tiff_exif(*camera(local(ok, 8), "+08:00", orientation=6), thumbnail=thumb_of(picture)))
    assert prepare_image(raw, image_id="x", role="evidence").exif_orientation == 6
    assert score(raw).reasons == ()


def test_letterboxed_thumbnail_of_a_wide_photo_passes() -> None:
    picture = scene(6, (800, 450))
    letterbox = Image.new("RGB", (160, 120))
    letterbox.paste(picture.resize((160, 90)), (0, 15))
    buf = io.BytesIO()
    letterbox.save(buf, "JPEG", quality=80)
    ok = REQUESTED - dt.timedelta(hours=5)
    assert score(jpeg(picture, tiff_exif(*camera(local(ok, 8), "+08:00"), thumbnail=buf.getvalue()))).reasons == ()


def test_real_camera_file_thumbnail_matches() -> None:
    # a Canon EOS photo from the C2PA test suite: its own IFD1 thumbnail, taken 2011, so before the order
    result = score((C2PA_DIR / "IMG_0003.jpg").read_bytes())
    assert "CAPTURE_THUMBNAIL_MISMATCH" not in codes(result)
    assert codes(result) == ["CAPTURE_BEFORE_DELIVERY"]
    assert result.reasons[0].evidence["zone_known"] is True
    assert result.reasons[0].evidence["camera"] == "Canon Canon EOS REBEL T3"


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_thumbnail_and_broken_exif_do_not_crash() -> None:
    ok = REQUESTED - dt.timedelta(hours=5)
    raw = jpeg(scene(3), tiff_exif(*camera(local(ok, 8), "+08:00"), thumbnail=b"\xff\xd8 not really a jpeg"))
    assert score(raw).reasons == ()
    block = bytearray(tiff_exif(*camera(local(ok, 8))))
    block[4:8] = struct.pack("<I", 10**6)  # IFD0 offset past the end
    assert codes(score(jpeg(scene(3), bytes(block)))) == ["CAPTURE_NO_CAMERA_DATA"]


def test_strongest_reason_first_across_images() -> None:
    ok = REQUESTED - dt.timedelta(hours=5)
    fine = jpeg(scene(1), tiff_exif(*camera(local(ok, 8), "+08:00")))
    early = jpeg(scene(2), tiff_exif(*camera(local(PLACED - dt.timedelta(days=9), 0))))
    buf = io.BytesIO()
    scene(3).save(buf, "PNG")
    result = score(fine, early, buf.getvalue())
    assert codes(result) == ["CAPTURE_BEFORE_DELIVERY", "CAPTURE_NO_CAMERA_DATA"]
    assert [r.evidence["image_id"] for r in result.reasons] == ["IMG-1", "IMG-2"]
    assert result.score == result.reasons[0].score
