"""Evidence reuse: the same photo submitted again, by another buyer or for another order.

Two halves. :func:`evidence_hash` runs in the image pool and turns an evidence
photo into a 64-bit perceptual fingerprint; the stream indexes it under
:func:`band_keys` and looks up earlier claims whose fingerprint is within
:data:`MATCH_DISTANCE`. :class:`EvidenceReuseScorer` then scores those matches
(``features.evidence_matches``): it is pure arithmetic, so it runs with the
behaviour scorers.

The fingerprint is a DCT perceptual hash of the luma channel:

* the photo is area-averaged (BOX) to 64x64 grey, which makes it independent of
  the resolution and of the aspect ratio (a 0.8x1.0 resize lands on the same
  grid) and averages away JPEG/WebP blocking and sensor noise;
* a 2-D DCT-II of that grid; the 64 lowest-frequency AC coefficients in zig-zag
  order (DC is skipped: it only encodes overall brightness) each give one bit,
  set when the coefficient is above their median. Low frequencies describe the
  layout of the scene, which survives rescaling, recompression and trimmed
  edges; fine texture (which does not) is ignored.

Measured on the casegen sets (seed 2026 and 7, photos prepared as the service
prepares them): a resize by 0.8-1.0 per axis plus re-encoding as JPEG, WebP or
PNG moves the hash by 0-2 bits; distinct genuine photos (79,401 pairs, same
product or not) are 8 bits apart or more (9 pairs at 8, 38 at 10, 74 at 12).
Crops are the weak side of any global DCT hash: 0.5 % off every side stays
within MATCH_DISTANCE, 1 % off one side mostly (~90 %), 0-3 % off each side
only 70 % of the time. The median split sets exactly 32 bits, so distances
between two fingerprints are always even.

Chosen against: an 8x8-block pHash of a 32x32 grid like imagehash's (closest
distinct pairs at 4 bits), a difference hash (86 distinct pairs within 6 bits)
and pHash AND dHash together (7 instead of 40 distinct pairs within 10 bits,
but crops matched less often). A colour hash was not added: luma is what
survives white-balance and filter tweaks, and two *photos* rarely differ in
colour alone. What does collide in luma is two studio shots on the same plain
background of same-shaped products in different colours: the merchant's
listing photos, which are the reference scorer's business, not reuse.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image

from scorers.base import EvidenceMatch, Reason, ScoreResult, ScorerKind, ScoringInput, clamp01

HASH_BITS = 64
HASH_VERSION = "p1"  # in every band key: a changed algorithm must not match hashes made by the old one
_GRID = 64  # side of the grey grid the DCT is taken of
# The pool decodes evidence no smaller than this, whichever scorers are on: the 64 x 64 grid is then
# always an average over 4 x 4 or more pixels, and the hash does not move with the decode size.
FINGERPRINT_SIDE = 4 * _GRID

# The largest hamming distance that still counts as the same photo. Resized and
# re-encoded copies measured 0-2; the closest distinct photos 8. 4 sits between
# them and keeps most 1 % crops. 6 would keep more crops but sit one step from
# distinct photos, and need 7 bands of 9 bits: crowded buckets in the index.
MATCH_DISTANCE = 4
# Pigeonhole: two hashes within MATCH_DISTANCE bits differ in at most
# MATCH_DISTANCE of the BANDS bands, so at least one band is identical and the
# exact band lookup finds the pair. 5 bands of 13/13/13/13/12 bits.
BANDS = MATCH_DISTANCE + 1


@cache
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``m @ x @ m.T`` is the 2-D DCT of an n x n block."""
    k = np.arange(n, dtype=np.float64)[:, None]
    i = np.arange(n, dtype=np.float64)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


@cache
def _zigzag(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the ``count`` lowest-frequency AC coefficients, by u + v then u."""
    side = int(np.ceil(np.sqrt(2 * count))) + 2
    cells = sorted(
        ((u, v) for u in range(side) for v in range(side) if (u, v) != (0, 0)),
        key=lambda uv: (uv[0] + uv[1], uv[0]),
    )[:count]
    rows, cols = zip(*cells, strict=True)
    return np.array(rows), np.array(cols)


_BIT_WEIGHTS = [1 << (HASH_BITS - 1 - i) for i in range(HASH_BITS)]


def evidence_hash(pixels: np.ndarray) -> int:
    """A 64-bit perceptual fingerprint of an RGB uint8 photo (H, W, 3).

    Near-identical for rescaled (also unevenly per axis), recompressed and
    slightly cropped copies; compare with :func:`hamming` against
    :data:`MATCH_DISTANCE`. A featureless image (one flat colour) has no
    layout to fingerprint: every such image hashes alike.
    """
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"evidence_hash needs RGB uint8 pixels (H, W, 3), got {pixels.dtype} {pixels.shape}")
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ValueError(f"evidence_hash needs a non-empty image, got {pixels.shape}")
    grey = Image.fromarray(np.ascontiguousarray(pixels), "RGB").convert("L")
    grid = np.asarray(grey.resize((_GRID, _GRID), Image.Resampling.BOX), dtype=np.float64)
    dct = _dct_matrix(_GRID)
    coefficients = dct @ grid @ dct.T
    rows, cols = _zigzag(HASH_BITS)
    ac = coefficients[rows, cols]
    bits = ac > np.median(ac)
    return sum(weight for weight, bit in zip(_BIT_WEIGHTS, bits.tolist(), strict=True) if bit)


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two fingerprints."""
    return (a ^ b).bit_count()


def band_keys(h: int, bands: int = BANDS) -> list[str]:
    """Keys for the band index: the hash cut into ``bands`` nearly equal runs of bits.

    Two hashes within ``bands - 1`` bits of each other share at least one key
    (pigeonhole), so the default finds every pair within :data:`MATCH_DISTANCE`.
    Each key names its band position and the hash version, so equal bits in
    different positions or from another algorithm never collide.
    """
    if not 1 <= bands <= HASH_BITS:
        raise ValueError(f"bands must be between 1 and {HASH_BITS}, got {bands}")
    if not 0 <= h < 1 << HASH_BITS:
        raise ValueError(f"not a {HASH_BITS}-bit hash: {h}")
    keys = []
    start = 0
    for index in range(bands):
        width = HASH_BITS // bands + (1 if index < HASH_BITS % bands else 0)
        value = (h >> (HASH_BITS - start - width)) & ((1 << width) - 1)
        keys.append(f"{HASH_VERSION}:{bands}.{index}:{value:0{(width + 3) // 4}x}")
        start += width
    return keys


# ---------------------------------------------------------------- scorer

OTHER_BUYER_SCORE = 0.95  # at distance 0; another buyer's photo is a fraud ring or a stolen photo
SAME_BUYER_SCORE = 0.85  # at distance 0; one damaged item claimed on several orders
DISTANCE_PENALTY = 0.10  # taken off linearly up to MATCH_DISTANCE: a farther match is less certain


class EvidenceReuseScorer:
    """Scores earlier claims whose evidence photo matches this request's (``features.evidence_matches``).

    A match with a claim on the same refund or the same order is the same claim
    re-submitted (or a redelivery of the same order) and is not a signal.
    """

    name = "image.reuse"
    kind: ScorerKind = "behaviour"

    def score(self, data: ScoringInput) -> ScoreResult:
        request = data.request
        by_image: dict[str, list[EvidenceMatch]] = {}
        for match in data.features.evidence_matches:  # first-use order
            if match.earlier_refund_id == request.refund_id or match.earlier_order_id == request.order_id:
                continue
            if not 0 <= match.distance <= MATCH_DISTANCE:
                continue
            by_image.setdefault(match.image_id, []).append(match)

        reasons = [self._reason(image_id, matches, request.buyer_id) for image_id, matches in by_image.items()]
        reasons.sort(key=lambda r: (-r.score, r.evidence["image_id"]))
        return ScoreResult(max((r.score for r in reasons), default=0.0), tuple(reasons))

    @staticmethod
    def _reason(image_id: str, matches: list[EvidenceMatch], buyer_id: str) -> Reason:
        others = [m for m in matches if m.earlier_buyer_id != buyer_id]
        if others:
            code, base, chosen, whose = "EVIDENCE_REUSED", OTHER_BUYER_SCORE, others, "another buyer"
        else:
            code, base, chosen, whose = "EVIDENCE_REUSED_SAME_BUYER", SAME_BUYER_SCORE, matches, "this buyer"
        first = chosen[0]
        closest = min(m.distance for m in chosen)
        score = clamp01(base - DISTANCE_PENALTY * closest / MATCH_DISTANCE)
        uses = len({m.earlier_refund_id for m in chosen})
        where = "" if others else f" on order {first.earlier_order_id}"
        more = f" and {uses - 1} later claim(s)" if uses > 1 else ""
        message = (
            f"Evidence photo {image_id} was already submitted by {whose}{where}: first in refund "
            f"{first.earlier_refund_id}{more} (photo {first.earlier_image_id}, {closest} of {HASH_BITS} bits apart)"
        )
        return Reason(
            code,
            message,
            score,
            {
                "image_id": image_id,
                "first_refund_id": first.earlier_refund_id,
                "first_buyer_id": first.earlier_buyer_id,
                "first_image_id": first.earlier_image_id,
                "distance": closest,
                "earlier_uses": uses,
            },
        )
