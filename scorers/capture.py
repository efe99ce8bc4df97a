"""Capture plausibility: does the camera metadata fit the story of the order?

A damage photo is taken after the parcel arrived and before the claim was
filed, by a camera that records its make and model, and its embedded EXIF
thumbnail shows the same picture as the file (editors that keep the old EXIF
block keep the old thumbnail too). Metadata is easy to strip and to fake, so
this is a weak signal: the policy never lets it hold a refund on its own, and
missing metadata scores almost nothing.
"""

from __future__ import annotations

import io
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import cv2
import numpy as np
from PIL import Image

from scorers.base import PreparedImage, Reason, RequestFacts, ScoreResult, ScoringInput
from scorers.provenance_parsers import ExifData, exif_text, parse_exif, read_metadata

# Without OffsetTimeOriginal the capture time is local time in an unknown zone: UTC-12 .. UTC+14,
# taken as +/-14 h to be tolerant of odd settings.
UNKNOWN_ZONE_SLACK = timedelta(hours=14)
CLOCK_SLACK = timedelta(hours=1)  # camera clock drift, courier scans entered late, DST mistakes
UNSET_CLOCK_BEFORE = 2010  # a capture year before this is a camera whose clock was never set

NO_CAMERA_SCORE = 0.1
BEFORE_DELIVERY_SCORE = 0.45
BEFORE_ORDER_SCORE = 0.6  # taken before the order was even placed
UNSET_CLOCK_SCORE = 0.15
AFTER_REQUEST_SCORE = 0.35
THUMBNAIL_MISMATCH_SCORE = 0.55
THUMBNAIL_PARTIAL_SCORE = 0.3
MAX_SCORE = 0.7  # a signal, never a verdict

THUMB_SIDE = 24
THUMB_DIFFERENT_BELOW = 0.3  # correlation of the two tiny greyscale pictures
THUMB_PARTIAL_BELOW = 0.5
FLAT_STD = 3.0  # grey levels: below this a picture is flat and correlation is meaningless
FLAT_MEAN_DIFF = 40.0
MAX_THUMBNAIL_BYTES = 256 * 1024
CACHE_SIZE = 512

_EXIF_TIME = re.compile(r"^\s*(\d{4})[:\-](\d{2})[:\-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET = re.compile(r"^\s*([+-])(\d{2}):?(\d{2})\s*$")
# Image.transpose operations that apply EXIF orientation 2..8 (as ImageOps.exif_transpose does).
_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class CaptureFacts:
    """What one file's EXIF says about its capture; request-independent, so cached per image."""

    make: str
    model: str
    taken_raw: str  # DateTimeOriginal as written
    taken_local: datetime | None  # naive wall-clock time
    offset: timedelta | None  # OffsetTimeOriginal, when present
    thumbnail_similarity: float | None  # None: no usable thumbnail
    orientation: int


class CaptureScorer:
    name = "image.capture"
    kind = "image"
    pixels_side = 4 * THUMB_SIDE  # the main picture is only compared with the EXIF thumbnail

    def __init__(self) -> None:
        self._cache: OrderedDict[str, CaptureFacts] = OrderedDict()

    def score(self, data: ScoringInput) -> ScoreResult:
        reasons: list[Reason] = []
        for image in data.evidence:
            reasons.extend(capture_reasons(self._facts(image), image.image_id, data.request))
        reasons.sort(key=lambda r: (-r.score, r.code, r.evidence.get("image_id", "")))
        return ScoreResult(max((r.score for r in reasons), default=0.0), tuple(reasons))

    def _facts(self, image: PreparedImage) -> CaptureFacts:
        key = image.cache_key
        if key and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        facts = read_capture_facts(image)
        if key:
            self._cache[key] = facts
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return facts


def read_capture_facts(image: PreparedImage) -> CaptureFacts:
    exif = parse_exif(read_metadata(image.raw).exif_tiff)
    taken_raw = exif_text(exif.exif_ifd.get(0x9003)) or ""
    offset_raw = exif_text(exif.exif_ifd.get(0x9011)) or exif_text(exif.exif_ifd.get(0x9010))
    orientation = exif.ifd0.get(0x0112, 1)
    return CaptureFacts(
        make=exif_text(exif.ifd0.get(0x010F))[:64],
        model=exif_text(exif.ifd0.get(0x0110))[:64],
        taken_raw=taken_raw[:32],
        taken_local=parse_exif_time(taken_raw),
        offset=parse_offset(offset_raw),
        thumbnail_similarity=_thumbnail_similarity(exif, image),
        orientation=orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1,
    )


def parse_exif_time(value: str) -> datetime | None:
    """EXIF "YYYY:MM:DD HH:MM:SS" as a naive datetime; None for blank or impossible values."""
    match = _EXIF_TIME.match(value or "")
    if not match:
        return None
    try:
        return datetime(*(int(part) for part in match.groups()))  # wall-clock time, zone unknown
    except ValueError:  # "0000:00:00 00:00:00" and other placeholders
        return None


def parse_offset(value: str) -> timedelta | None:
    match = _OFFSET.match(value or "")
    if not match:
        return None
    sign, hours, minutes = match.groups()
    delta = timedelta(hours=int(hours), minutes=int(minutes))
    if delta > timedelta(hours=14):
        return None
    return -delta if sign == "-" else delta


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def capture_window(facts: CaptureFacts) -> tuple[datetime, datetime] | None:
    """Earliest and latest UTC instant the photo can have been taken, given what the EXIF says."""
    if facts.taken_local is None:
        return None
    if facts.offset is not None:
        instant = facts.taken_local.replace(tzinfo=UTC) - facts.offset
        return instant - CLOCK_SLACK, instant + CLOCK_SLACK
    wall = facts.taken_local.replace(tzinfo=UTC)
    return wall - UNKNOWN_ZONE_SLACK - CLOCK_SLACK, wall + UNKNOWN_ZONE_SLACK + CLOCK_SLACK


def capture_reasons(facts: CaptureFacts, image_id: str, request: RequestFacts) -> list[Reason]:
    reasons: list[Reason] = []
    base = {"image_id": image_id}
    if not facts.make and not facts.model:
        what = "camera make/model or capture time" if facts.taken_local is None else "camera make/model"
        reasons.append(Reason("CAPTURE_NO_CAMERA_DATA", f"Image {image_id} has no {what}; absence proves nothing",
                              NO_CAMERA_SCORE, dict(base)))
    window = capture_window(facts)
    if window is not None:
        reasons.extend(_time_reasons(facts, window, base, request))
    similarity = facts.thumbnail_similarity
    if similarity is not None and similarity < THUMB_PARTIAL_BELOW:
        different = similarity < THUMB_DIFFERENT_BELOW
        reasons.append(Reason(
            "CAPTURE_THUMBNAIL_MISMATCH",
            f"Image {image_id}: the EXIF thumbnail shows "
            + ("a different picture" if different else "a partly different picture")
            + " than the image (edited after capture)",
            THUMBNAIL_MISMATCH_SCORE if different else THUMBNAIL_PARTIAL_SCORE,
            {**base, "similarity": round(similarity, 3), "orientation": facts.orientation},
        ))
    return reasons


def _time_reasons(facts: CaptureFacts, window: tuple[datetime, datetime], base: dict[str, Any],
                  request: RequestFacts) -> list[Reason]:
    earliest, latest = window
    evidence = {**base, "taken": facts.taken_raw, "zone_known": facts.offset is not None}
    if facts.make or facts.model:
        evidence["camera"] = f"{facts.make} {facts.model}".strip()[:80]
    reasons: list[Reason] = []
    placed = _utc(request.placed_at)
    arrived = _utc(request.delivered_at) if request.delivered_at is not None else placed
    if latest < arrived:
        gap_h = (arrived - latest).total_seconds() / 3600
        clock_unset = facts.taken_local is not None and facts.taken_local.year < UNSET_CLOCK_BEFORE
        if clock_unset:
            score = UNSET_CLOCK_SCORE
        else:
            score = BEFORE_ORDER_SCORE if latest < placed else BEFORE_DELIVERY_SCORE
            score += 0.1 * min(1.0, gap_h / (24 * 7))  # further before: harder to explain by clock error
        event = "delivered" if request.delivered_at is not None else "ordered"
        reasons.append(Reason(
            "CAPTURE_BEFORE_DELIVERY",
            f"Image {base['image_id']} was taken at {facts.taken_raw}, at least {gap_h:.0f} h before the item was "
            f"{event}" + (" (the camera clock looks unset)" if clock_unset else ""),
            min(MAX_SCORE, score),
            {**evidence, "hours_before": round(gap_h, 1), "reference": event, "clock_unset": clock_unset},
        ))
    requested = _utc(request.requested_at)
    if earliest > requested:
        gap_h = (earliest - requested).total_seconds() / 3600
        reasons.append(Reason(
            "CAPTURE_AFTER_REQUEST",
            f"Image {base['image_id']} claims to be taken at {facts.taken_raw}, at least {gap_h:.0f} h after the "
            "refund was requested",
            min(MAX_SCORE, AFTER_REQUEST_SCORE + 0.1 * min(1.0, gap_h / (24 * 7))),
            {**evidence, "hours_after": round(gap_h, 1)},
        ))
    return reasons


# ------------------------------------------------------------------ thumbnail


def _thumbnail_similarity(exif: ExifData, image: PreparedImage) -> float | None:
    """Correlation in [-1, 1] of the EXIF thumbnail and the image as tiny greyscale squares; None without one.

    The best over the thumbnail as stored and as oriented (writers disagree on
    whether it is pre-rotated). Squeezing both to a square tolerates
    thumbnails stretched to 4:3 whatever the photo's shape; letterbox bars are
    cut first. A photo cropped after capture also reads as a mismatch.
    """
    blob = exif.thumbnail_jpeg()
    if blob is None or len(blob) > MAX_THUMBNAIL_BYTES:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            thumb = Image.open(io.BytesIO(blob))
            if thumb.width * thumb.height > 1024 * 1024:
                return None
            thumb = thumb.convert("L")
    except Exception:  # an undecodable thumbnail is not evidence of anything
        return None
    thumb = _trim_black_bars(thumb)
    if thumb is None:
        return None
    main = _tiny(_shrink_by_integer(cv2.cvtColor(image.pixels, cv2.COLOR_RGB2GRAY), 4 * THUMB_SIDE))
    variants = [thumb]
    if image.exif_orientation in _ORIENT:
        variants.append(thumb.transpose(_ORIENT[image.exif_orientation]))
    return max(_similarity(_tiny(np.asarray(variant, dtype=np.uint8)), main) for variant in variants)


def _shrink_by_integer(gray: np.ndarray, side: int) -> np.ndarray:
    """Area-average by a whole factor first: much cheaper than one resize by an odd ratio."""
    factor = max(1, min(gray.shape) // side)
    if factor == 1:
        return gray
    height, width = gray.shape[0] // factor, gray.shape[1] // factor
    return cv2.resize(gray[: height * factor, : width * factor], (width, height), interpolation=cv2.INTER_AREA)


def _trim_black_bars(thumb: Image.Image) -> Image.Image | None:
    """Cut letterbox bars: thumbnails of non-4:3 photos are often padded with black to 160x120."""
    arr = np.asarray(thumb, dtype=np.float32)
    rows = np.nonzero(arr.mean(axis=1) > 16)[0]
    cols = np.nonzero(arr.mean(axis=0) > 16)[0]
    if rows.size < 8 or cols.size < 8:
        return thumb if min(thumb.size) >= 8 else None
    return thumb.crop((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))


def _tiny(gray: np.ndarray) -> np.ndarray:
    return cv2.resize(gray, (THUMB_SIDE, THUMB_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)


def _similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Zero-mean normalised correlation; for flat pictures, 1 or -1 by their mean brightness."""
    std_a, std_b = float(a.std()), float(b.std())
    if std_a < FLAT_STD or std_b < FLAT_STD:
        return 1.0 if abs(float(a.mean()) - float(b.mean())) < FLAT_MEAN_DIFF else -1.0
    return float(((a - a.mean()) * (b - b.mean())).mean() / (std_a * std_b))
