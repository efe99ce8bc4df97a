"""Is an evidence photo derived from one of the shop's own photos — and if so, what was changed?

The fraud this catches: the buyer takes the listing (or shipment) photo, paints damage into
it with an AI editor, perhaps resizes, crops, mirrors, turns or re-colours it, and submits it
as their photo of the item. A *genuine* photo of the same item looks alike but was taken with
another camera, pose and light, on another surface; it must not count as derived.

Per evidence image, all at a working size of 512 px:

1. Geometry. ORB features, ratio-tested matches against each reference (and its mirror image:
   reference features are cached per process, mirrored ones too), RANSAC on a similarity, then
   an affine map refined on its inliers. No perspective: resizing, cropping, mirroring and
   turning a file never produce one, re-photographing does. The map must be a plausible edit
   (scale, stretch) and be supported by many consistent matches.
2. Pixel agreement. The reference is warped onto the evidence, the alignment refined to a
   fraction of a pixel (phase correlation in patches), and its tones mapped through a curve
   per channel fitted on the overlap (gamma, contrast, colour casts). A copy then agrees almost
   everywhere: textured patches correlate and the residual is small. A genuine photograph
   fails: its background, shading and 3D pose differ over much of the frame, which no affine
   map and tone curve explain.
3. Localisation. For a copy, the residual outside a 3x3 tolerance band (after bringing both
   images to equal crispness), plus a local mean of the colour difference for faint extended
   changes, thresholded against the copy's own noise, grown by hysteresis, merged into
   regions: reported in the evidence file's displayed pixel coordinates.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Generic, TypeVar

import cv2
import numpy as np

from scorers.base import COPY_OF_REFERENCE, PreparedImage, Reason, ScoreResult, ScoringInput, clamp01
from scorers.prepare import shrink

# Working geometry: everything is compared at this longer side (speed; resampling noise averages out).
WORK_SIDE = 512
FINE_BLUR = 0.6  # px, when locating changes: the two images went through different resampling filters
SHARPNESS_STEPS = (0.4, 0.6, 0.8, 1.0, 1.3, 1.7)  # blurs tried to bring the two to equal crispness
ORB_FEATURES = 400
RATIO_TEST = 0.8
RANSAC_PIXELS = 4.0
MIN_INLIERS = 14
STRONG_INLIERS, STRONG_MATCH_RATIO = 60, 0.6  # a direct match this good needs no mirrored try
STRETCH_EVIDENCE = 1.25  # a stretched (affine) fit must explain this many times the matches of a similarity
# A derived copy's map is close to a similarity: bounds on what resizing/cropping/turning produce.
SCALE_RANGE = (0.35, 3.0)
MAX_ANISOTROPY = 1.5
MIN_COVERAGE = 0.5  # share of the evidence the warped reference must cover
BORDER = 4  # working pixels at the evidence's edges left out of every comparison
# Sub-pixel refinement of the alignment.
REFINE_GRID = 7  # patches per side
REFINE_PATCH = 64
REFINE_BLUR = 1.5  # px: the images are smoothed this much for it
REFINE_TEXTURE = 5.0  # grey-level std a patch needs for a shift to be measurable
# Agreement that makes an image "derived".
PATCH = 16
TEXTURED_STD = 3.0  # grey levels: a patch flatter than this says nothing about structure
PATCH_NCC = 0.75
MIN_TEXTURED_PATCHES = 8
DERIVED_AGREEMENT = 0.75  # share of textured patches whose structure correlates (copies: 0.85+, other shots: < 0.7)
MIN_SUPPORT = 12.0  # inliers x inlier share of the matches (copies measured: 26+)
EDGE_ALLOWANCE = 0.5  # of the local contrast, forgiven when locating changes next to edges
TONE_FIT_SLACK = 6.0  # grey levels: a tone curve that misses the medians by more is not trusted
TONE_TOLERANCE = 14.0  # grey levels a derived copy's pixels may stray from the mapped reference
DERIVED_MAX_STRAY = 0.3  # share of the overlap allowed to stray by more (edits, crops' borders)
FIRST_LOOK_MAX_STRAY = 0.2  # in grey, before the sub-pixel refinement (copies measured: at most 0.1)
# Localisation of the change.
LOCATE_TOLERANCE = 6.0  # grey levels, the least change that counts when locating (noisy copies: more)
BROAD_WINDOW = 5  # pixels (at half the locating scale) averaged for faint, extended changes
BROAD_TOLERANCE = 5.0  # grey levels of local mean difference
BROAD_EDGE_ALLOWANCE = 0.4  # of the local contrast
FAINT_SHARE = 0.7  # of the tolerance: fainter pixels connected to a clear change belong to it
MIN_SEED_PIXELS = 6
LARGE_REGION_SHARE = 0.002  # of the overlap: a faint change this large still counts
MIN_REGION_SHARE = 0.0004  # of the overlap: smaller residue is noise or resampling, not an edit
REGION_MERGE_GAP = 0.05  # of the diagonal: parts of one edit (a crack's branches) closer than this merge
MAX_REGIONS = 3
CACHE_SIZE = 256

T = TypeVar("T")

EDITED_CODE = "EVIDENCE_EDITED_FROM_LISTING"
COPY_CODE = "EVIDENCE_IS_REFERENCE_PHOTO"


@dataclass(frozen=True)
class _Features:
    points: np.ndarray  # float32 (N, 2) keypoint positions in working pixels
    descriptors: np.ndarray | None  # uint8 (N, 32)
    size: tuple[int, int]  # working image (width, height)


@dataclass(frozen=True)
class _ReferenceFeatures:
    plain: _Features
    mirrored: _Features  # of the left-right flipped reference, in flipped coordinates


@dataclass(frozen=True)
class _Alignment:
    reference: PreparedImage = field(repr=False)
    homography: np.ndarray  # 3x3 (affine), reference working pixels -> evidence working pixels
    inliers: int
    match_ratio: float
    mirrored: bool
    spread: float  # share of the evidence's area spanned by the inliers' bounding box


@dataclass(frozen=True)
class _Verdict:
    alignment: _Alignment
    derived: bool
    agreement: float  # share of textured patches that correlate
    stray: float  # share of the overlap straying beyond the tone tolerance
    coverage: float
    regions: tuple[tuple[int, int, int, int], ...]  # in evidence file pixels, strongest first
    changed_fraction: float  # of the overlap
    contrast: float  # the strongest region's peak, in multiples of its tolerance


class _LRU(Generic[T]):
    """A small thread-safe LRU for per-process caches."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[str, T] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> T | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: T) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class ReferenceMatchScorer:
    """Holds evidence that is a shop photo, edited or not; says where an edit is."""

    name = "image.reference"
    kind = "image"
    pixels_side = WORK_SIDE  # everything is compared at this size: the pool need decode no larger

    def __init__(self, cache_size: int = CACHE_SIZE) -> None:
        self._cache: _LRU[_ReferenceFeatures] = _LRU(cache_size)
        # The references' working-size pixels too (0.75 MB each: fewer), for the listings that keep coming back.
        self._pixels: _LRU[np.ndarray] = _LRU(max(1, cache_size // 8))
        self._orb = cv2.ORB_create(nfeatures=ORB_FEATURES, scaleFactor=1.2, nlevels=6,
                                   edgeThreshold=15, patchSize=21, fastThreshold=7)
        self._matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
        self._threads_set = False

    def score(self, data: ScoringInput) -> ScoreResult:
        if not data.evidence or not data.references:
            return ScoreResult(0.0)
        if not self._threads_set:
            cv2.setNumThreads(1)  # the image pool runs one scorer per process: no nested threading
            self._threads_set = True
        references = [(ref, self._reference_features(ref)) for ref in data.references]
        best = 0.0
        reasons: list[Reason] = []
        for evidence in data.evidence:
            verdict = self._check(evidence, references)
            if verdict is None:
                continue
            if not verdict.derived:
                # Alike but not a copy: a weak, informative score far below any hold threshold.
                best = max(best, round(0.3 * clamp01(verdict.agreement) * (1 - clamp01(verdict.stray)), 4))
                continue
            reason = _reason(evidence, verdict)
            reasons.append(reason)
            best = max(best, reason.score)
        reasons.sort(key=lambda r: -r.score)
        return ScoreResult(clamp01(best), tuple(reasons))

    # ------------------------------------------------------------ features

    def _reference_colour(self, ref: PreparedImage) -> np.ndarray:
        key = _cache_key(ref)
        colour = self._pixels.get(key)
        if colour is None:
            colour = _working_colour(ref.pixels)
            self._pixels.put(key, colour)
        return colour

    def _reference_features(self, ref: PreparedImage) -> _ReferenceFeatures:
        key = _cache_key(ref)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        grey = cv2.cvtColor(self._reference_colour(ref), cv2.COLOR_RGB2GRAY)
        features = _ReferenceFeatures(self._features(grey), self._features(np.ascontiguousarray(grey[:, ::-1])))
        self._cache.put(key, features)
        return features

    def _features(self, grey: np.ndarray) -> _Features:
        keypoints, descriptors = self._orb.detectAndCompute(grey, None)
        points = np.array([k.pt for k in keypoints], np.float32).reshape(-1, 2)
        return _Features(points, descriptors, (grey.shape[1], grey.shape[0]))

    # ------------------------------------------------------------ matching

    def _check(self, evidence: PreparedImage,
               references: list[tuple[PreparedImage, _ReferenceFeatures]]) -> _Verdict | None:
        colour = _working_colour(evidence.pixels)
        grey = cv2.cvtColor(colour, cv2.COLOR_RGB2GRAY)
        features = self._features(grey)
        if features.descriptors is None or len(features.points) < MIN_INLIERS:
            return None
        alignments: list[_Alignment] = []
        for ref, ref_features in references:
            direct = self._align(features, ref, ref_features, False)
            if direct is not None:
                alignments.append(direct)
            # A plain copy matches its source far better than any mirror image could.
            if direct is None or direct.inliers < STRONG_INLIERS or direct.match_ratio < STRONG_MATCH_RATIO:
                mirrored = self._align(features, ref, ref_features, True)
                if mirrored is not None:
                    alignments.append(mirrored)
        if not alignments:
            return None
        alignments.sort(key=lambda a: -a.inliers)
        verdict = _verify(colour, grey, evidence, alignments[0], self._reference_colour(alignments[0].reference))
        # Another reference (the listing's second shot, the mirrored match of a symmetric item)
        # gets a look only when the best did not verify and it is nearly as well supported.
        for runner_up in alignments[1:3]:
            if verdict.derived or runner_up.inliers < 0.5 * alignments[0].inliers:
                break
            other = _verify(colour, grey, evidence, runner_up, self._reference_colour(runner_up.reference))
            if (other.derived, other.agreement - other.stray) > (verdict.derived, verdict.agreement - verdict.stray):
                verdict = other
        return verdict

    def _align(self, features: _Features, ref: PreparedImage, ref_features: _ReferenceFeatures,
               mirrored: bool) -> _Alignment | None:
        source = ref_features.mirrored if mirrored else ref_features.plain
        if source.descriptors is None or len(source.points) < MIN_INLIERS:
            return None
        pairs = self._matcher.knnMatch(features.descriptors, source.descriptors, k=2)
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO_TEST * p[1].distance]
        if len(good) < MIN_INLIERS:
            return None
        src = source.points[[m.trainIdx for m in good]]
        dst = features.points[[m.queryIdx for m in good]]
        # Hypotheses from a 4-degree-of-freedom similarity (2-point samples: RANSAC converges in a
        # few hundred draws even when most matches are wrong), then a full affine map (a resize
        # may stretch one axis) fitted to its inliers and refined. No perspective: resizing,
        # cropping, mirroring and turning a file never produce one, re-photographing does.
        similarity, rough = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC,
                                                        ransacReprojThreshold=2 * RANSAC_PIXELS,
                                                        maxIters=600, confidence=0.99)
        if similarity is None or rough is None or int(rough.sum()) < MIN_INLIERS:
            return None
        near = np.flatnonzero(rough.ravel())
        # Refit on those: a similarity, unless a full affine map (a file stretched along one
        # axis) explains clearly more matches. A free affine fit would otherwise let a periodic
        # pattern (a speaker grille, a check) pull it a row off along one axis.
        fitted, refined = cv2.estimateAffinePartial2D(src[near], dst[near], method=cv2.RANSAC,
                                                      ransacReprojThreshold=RANSAC_PIXELS, maxIters=200,
                                                      confidence=0.995, refineIters=10)
        stretched, stretch_kept = cv2.estimateAffine2D(src[near], dst[near], method=cv2.RANSAC,
                                                       ransacReprojThreshold=RANSAC_PIXELS, maxIters=200,
                                                       confidence=0.995, refineIters=10)
        if fitted is None or refined is None or (
                stretched is not None and stretch_kept is not None
                and int(stretch_kept.sum()) > STRETCH_EVIDENCE * int(refined.sum())):
            fitted, refined = stretched, stretch_kept
        if fitted is None or refined is None:
            return None
        affine = fitted
        homography = np.vstack([affine, [0.0, 0.0, 1.0]])
        inlier_mask = np.zeros(len(good), np.uint8)
        inlier_mask[near[refined.ravel() > 0]] = 1
        inliers = int(inlier_mask.sum())
        if inliers < MIN_INLIERS or not _plausible(homography):
            return None
        if mirrored:  # compose with the flip so the homography maps the unflipped reference
            width = source.size[0]
            flip = np.array([[-1, 0, width - 1], [0, 1, 0], [0, 0, 1]], np.float64)
            homography = homography @ flip
        kept = dst[inlier_mask.ravel() > 0]
        span = np.ptp(kept, axis=0)
        spread = float(span[0] * span[1]) / (features.size[0] * features.size[1])
        return _Alignment(ref, homography, inliers, inliers / len(good), mirrored, spread)


# ---------------------------------------------------------------- verification


def _verify(colour: np.ndarray, grey: np.ndarray, evidence: PreparedImage, alignment: _Alignment,
            reference: np.ndarray) -> _Verdict:
    height, width = grey.shape
    warped_grey, valid = _warp_onto(cv2.cvtColor(reference, cv2.COLOR_RGB2GRAY), alignment.homography,
                                    (width, height))
    coverage = float(valid.mean())
    if coverage < MIN_COVERAGE:
        return _Verdict(alignment, False, 0.0, 1.0, coverage, (), 0.0, 0.0)
    # A cheap first look in grey: a genuine photo of the item strays over much of the frame
    # (other background, light, pose), far beyond what a copy's residual misalignment could.
    seen_grey = cv2.GaussianBlur(grey, (0, 0), 1.0)
    blurred_grey = cv2.GaussianBlur(warped_grey, (0, 0), 1.0)
    mapped_grey = cv2.LUT(blurred_grey, _tone_curves(blurred_grey, seen_grey, valid))
    first_stray = _stray(_residual(seen_grey, mapped_grey, valid), valid)
    if first_stray > FIRST_LOOK_MAX_STRAY:
        return _Verdict(alignment, False, 0.0, first_stray, coverage, (), 0.0, 0.0)
    # Smoothed further (to 1.5 px in all) for the refinement: fine grain and compression noise
    # would otherwise steer the correlation.
    extra = math.sqrt(REFINE_BLUR**2 - 1.0)
    correction = _refine(cv2.GaussianBlur(blurred_grey, (0, 0), extra), cv2.GaussianBlur(seen_grey, (0, 0), extra),
                         valid)
    if correction is not None:
        alignment = replace(alignment, homography=correction @ alignment.homography)
    warped, valid = _warp_onto(reference, alignment.homography, (width, height))
    # Blurred: the decision should not hinge on resampling and compression grain.
    seen = cv2.GaussianBlur(colour, (0, 0), 1.0)
    blurred = cv2.GaussianBlur(warped, (0, 0), 1.0)
    curves = _tone_curves(blurred, seen, valid)
    mapped = cv2.LUT(blurred, curves)
    agreement, textured = _structure_agreement(cv2.cvtColor(seen, cv2.COLOR_RGB2GRAY),
                                               cv2.cvtColor(mapped, cv2.COLOR_RGB2GRAY), valid)
    stray = _stray(_residual(seen, mapped, valid), valid)
    # A copy's features match consistently (many inliers, and most matches among them); another
    # photo of the item, even one that lines up in places, is supported by a few only.
    support = alignment.inliers * alignment.match_ratio
    derived = (textured >= MIN_TEXTURED_PATCHES and agreement >= DERIVED_AGREEMENT and stray <= DERIVED_MAX_STRAY
               and support >= MIN_SUPPORT)
    if not derived:
        return _Verdict(alignment, False, agreement, stray, coverage, (), 0.0, 0.0)
    regions, changed, contrast = _localise(colour, warped, valid, curves, evidence)
    return _Verdict(alignment, True, agreement, stray, coverage, regions, changed, contrast)


def _refine(warped: np.ndarray, grey: np.ndarray, valid: np.ndarray) -> np.ndarray | None:
    """A small affine correction of the alignment, from sub-pixel shifts measured by phase
    correlation in textured patches spread over the image.

    Features fix the map to a pixel or so; an edit only shows once the copy is aligned to a
    fraction of one, above all far from the centre of the matched features.
    """
    height, width = grey.shape
    half = REFINE_PATCH // 2
    area = REFINE_PATCH * REFINE_PATCH
    # Patch variances from integral images: one pass instead of a std per patch.
    sums = [cv2.integral2(image, sdepth=cv2.CV_64F) for image in (warped, grey)]

    def variance(which: int, x0: int, y0: int) -> float:
        total, squares = sums[which]
        x1, y1 = x0 + REFINE_PATCH, y0 + REFINE_PATCH
        s1 = total[y1, x1] - total[y0, x1] - total[y1, x0] + total[y0, x0]
        s2 = squares[y1, x1] - squares[y0, x1] - squares[y1, x0] + squares[y0, x0]
        return float(s2 / area - (s1 / area) ** 2)

    source, target = [], []
    for row in range(REFINE_GRID):
        for col in range(REFINE_GRID):
            cx, cy = int((col + 0.5) * width / REFINE_GRID), int((row + 0.5) * height / REFINE_GRID)
            x0, y0 = cx - half, cy - half
            if x0 < 0 or y0 < 0 or x0 + REFINE_PATCH > width or y0 + REFINE_PATCH > height:
                continue
            if not valid[y0:y0 + REFINE_PATCH:4, x0:x0 + REFINE_PATCH:4].all():
                continue
            if min(variance(0, x0, y0), variance(1, x0, y0)) < REFINE_TEXTURE**2:
                continue
            patch_ref = warped[y0:y0 + REFINE_PATCH, x0:x0 + REFINE_PATCH].astype(np.float32)
            patch_ev = grey[y0:y0 + REFINE_PATCH, x0:x0 + REFINE_PATCH].astype(np.float32)
            (dx, dy), response = cv2.phaseCorrelate(patch_ref, patch_ev, _hanning())
            if response < 0.2 or abs(dx) > 4 or abs(dy) > 4:
                continue
            source.append((cx, cy))
            target.append((cx + dx, cy + dy))
    if len(source) < 6:
        return None
    correction, kept = cv2.estimateAffine2D(np.float32(source), np.float32(target), method=cv2.RANSAC,
                                            ransacReprojThreshold=0.75, refineIters=10)
    if correction is None or kept is None or int(kept.sum()) < 6:
        return None
    return np.vstack([correction, [0.0, 0.0, 1.0]])


@lru_cache(maxsize=1)
def _hanning() -> np.ndarray:
    return cv2.createHanningWindow((REFINE_PATCH, REFINE_PATCH), cv2.CV_32F)


def _warp_onto(reference: np.ndarray, homography: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The reference in the evidence's frame, and where that comparison is meaningful."""
    warped = cv2.warpAffine(reference, homography[:2], size, flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    height, width = reference.shape[:2]
    corners = np.float64([[0, 0, 1], [width, 0, 1], [width, height, 1], [0, height, 1]]) @ homography[:2].T
    inside = np.zeros((size[1], size[0]), np.uint8)
    cv2.fillConvexPoly(inside, np.round(corners).astype(np.int32), 255)
    # Leave out the overlap's rim and the evidence's own border: interpolation and blurring there
    # mix in what lies beyond, which differs between the two images.
    valid = cv2.erode(inside, np.ones((7, 7), np.uint8)) > 0
    margin = max(BORDER, round(BORDER * max(size) / WORK_SIDE))
    valid[:margin], valid[-margin:], valid[:, :margin], valid[:, -margin:] = False, False, False, False
    return warped, valid


def _stray(residual: np.ndarray, valid: np.ndarray) -> float:
    """Share of the overlap whose residual exceeds what a copy's tones allow."""
    return float(np.count_nonzero(residual > TONE_TOLERANCE)) / max(1, int(np.count_nonzero(valid)))


def _residual(seen: np.ndarray, mapped: np.ndarray, valid: np.ndarray, edge_allowance: float = 0.0) -> np.ndarray:
    """Per pixel, how far the evidence lies outside the range of the mapped reference's 3x3
    neighbourhood (forgives a pixel of misalignment), largest over the channels; uint8.

    ``edge_allowance`` forgives that share of the neighbourhood's own range on top: next to a
    strong edge, different resampling filters (ringing) differ by more than on a flat surface.
    """
    kernel = np.ones((3, 3), np.uint8)
    high, low = cv2.dilate(mapped, kernel), cv2.erode(mapped, kernel)
    # Saturating uint8 arithmetic: negative differences clip to 0, and OpenCV's kernels are fast.
    outside = cv2.max(cv2.subtract(seen, high), cv2.subtract(low, seen))
    if edge_allowance:
        outside = cv2.subtract(outside, cv2.convertScaleAbs(cv2.subtract(high, low), alpha=edge_allowance))
    if outside.ndim == 2:
        residual = outside
    else:
        red, green, blue = cv2.split(outside)
        residual = cv2.max(cv2.max(red, green), blue)
    residual[~valid] = 0
    return residual


def _localise(colour: np.ndarray, warped: np.ndarray, valid: np.ndarray, curves: np.ndarray,
              evidence: PreparedImage) -> tuple[tuple[tuple[int, int, int, int], ...], float, float]:
    """The changed regions of a derived copy: compared without the decision's blur (a scratch is
    a pixel wide), after bringing both to the same crispness."""
    seen = cv2.GaussianBlur(colour, (0, 0), FINE_BLUR)  # damps the evidence's compression ringing
    seen, warped = _equal_sharpness(seen, warped, valid)
    mapped = cv2.LUT(warped, curves)
    # Pixel-sharp comparison in luma only: JPEG and WebP keep colour at half resolution, so next
    # to fine coloured detail the colour differs by a pixel's worth between any two encodings.
    # Colour changes still show in the broad (local mean) comparison below.
    residual = _residual(cv2.cvtColor(seen, cv2.COLOR_RGB2GRAY), cv2.cvtColor(mapped, cv2.COLOR_RGB2GRAY), valid,
                         EDGE_ALLOWANCE)
    size = (colour.shape[1], colour.shape[0])
    return _changed_regions(residual, _broad_difference(seen, mapped, valid), valid, evidence, size)


def _equal_sharpness(seen: np.ndarray, warped: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blur the sharper of the two until their edges are about as crisp.

    The copy and the reference went through different resampling (a Lanczos resize sharpens,
    a bilinear warp softens); a thin line then differs in depth, not in place, and no tolerance
    band absorbs that. Crispness is the mean squared gradient on the reference's edges.
    """
    grey_seen = cv2.cvtColor(seen, cv2.COLOR_RGB2GRAY)
    grey_ref = cv2.cvtColor(warped, cv2.COLOR_RGB2GRAY)
    gradient = cv2.morphologyEx(grey_ref, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    inner = valid.copy()
    inner[:, :2], inner[:, -2:], inner[:2], inner[-2:] = False, False, False, False
    edges = inner & (gradient >= max(16, int(np.percentile(gradient[inner][::7], 90)) if inner.any() else 16))
    ys, xs = np.nonzero(edges)
    if ys.size < 200:
        return seen, warped
    pick = slice(None, None, max(1, ys.size // 20_000))  # a sample of the edge pixels is enough
    ys, xs = ys[pick], xs[pick]
    # Trial blurs only over the window holding the sample (plus the blur's reach).
    top, left = max(0, int(ys.min()) - 8), max(0, int(xs.min()) - 8)
    grey_seen = grey_seen[top:int(ys.max()) + 9, left:int(xs.max()) + 9]
    grey_ref = grey_ref[top:int(ys.max()) + 9, left:int(xs.max()) + 9]
    ys, xs = ys - top, xs - left

    def crispness(grey: np.ndarray) -> float:
        gx = grey[ys, xs + 1].astype(np.float32) - grey[ys, xs - 1]
        gy = grey[ys + 1, xs].astype(np.float32) - grey[ys - 1, xs]
        return float(np.mean(gx * gx + gy * gy))

    crisp_seen, crisp_ref = crispness(grey_seen), crispness(grey_ref)
    seen_sharper = crisp_seen > crisp_ref
    sharp, target = (grey_seen, crisp_ref) if seen_sharper else (grey_ref, crisp_seen)
    if max(crisp_seen, crisp_ref) <= 1.1 * min(crisp_seen, crisp_ref):
        return seen, warped
    chosen = 0.0
    for sigma in SHARPNESS_STEPS:
        chosen = sigma
        if crispness(cv2.GaussianBlur(sharp, (0, 0), sigma)) <= target:
            break
    if seen_sharper:
        return cv2.GaussianBlur(seen, (0, 0), chosen), warped
    return seen, cv2.GaussianBlur(warped, (0, 0), chosen)


def _broad_difference(seen: np.ndarray, mapped: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Local mean of the signed difference, largest over the channels (float32, full size).

    A faint change over an area (a stain on a dark surface) hides in the per-pixel noise but not
    here, where noise and resampling ripples cancel out. Along a strong edge a sub-pixel
    misalignment does not cancel: a share of the local contrast is forgiven. Computed at half
    size (the mean is smooth anyway) and scaled back up.
    """
    half_seen, half_mapped = cv2.pyrDown(seen), cv2.pyrDown(mapped)
    window = (BROAD_WINDOW, BROAD_WINDOW)
    signed = cv2.subtract(half_seen, half_mapped, dtype=cv2.CV_16S)
    kernel = np.ones((3, 3), np.uint8)
    contrast = cv2.subtract(cv2.dilate(half_mapped, kernel), cv2.erode(half_mapped, kernel))
    broad = np.zeros(half_seen.shape[:2], np.float32)
    for channel, local in zip(cv2.split(signed), cv2.split(contrast), strict=True):
        excess = np.abs(cv2.boxFilter(channel, cv2.CV_32F, window))
        excess -= BROAD_EDGE_ALLOWANCE * cv2.boxFilter(local, cv2.CV_32F, window)
        np.maximum(broad, excess, out=broad)
    broad = cv2.resize(broad, (seen.shape[1], seen.shape[0]), interpolation=cv2.INTER_LINEAR)
    inner = cv2.erode(valid.astype(np.uint8), np.ones((2 * BROAD_WINDOW + 1,) * 2, np.uint8)) > 0
    broad[~inner] = 0
    return broad


def _tone_curves(reference: np.ndarray, evidence: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per channel, a monotone curve taking reference levels to evidence levels on the overlap
    (a (1, 256, channels) uint8 table for cv2.LUT; grey images have one channel).

    Per 8-level bin of the reference, the median evidence level, made monotone. Gamma, contrast,
    brightness and per-channel colour casts all fit such a curve; a local edit is too small to
    move the medians.
    """
    channels = reference.shape[2] if reference.ndim == 3 else 1
    step = max(1, round(math.sqrt(valid.size / 35_000)))  # ~35k samples are plenty for 32 medians a channel
    sample = valid[::step, ::step]
    ref_levels = reference[::step, ::step][sample].astype(np.int64).reshape(-1, channels)
    ev_levels = evidence[::step, ::step][sample].astype(np.int64).reshape(-1, channels)
    codes = ((np.arange(channels) * 32 + (ref_levels >> 3)) * 256 + ev_levels).ravel()
    joint = np.bincount(codes, minlength=channels * 32 * 256).reshape(channels, 32, 256)
    counts = joint.sum(axis=2)
    medians = (joint.cumsum(axis=2) < (counts[..., None] + 1) // 2).sum(axis=2).astype(np.float64)
    centres = np.arange(32, dtype=np.float64) * 8 + 3.5
    curves = np.empty((1, 256, channels), np.uint8)
    for c in range(channels):
        filled = counts[c] >= 8
        if filled.sum() >= 3:
            weights = np.sqrt(counts[c][filled].astype(np.float64))  # sparse bins still count
            curve = _power_curve(centres[filled], medians[c][filled], weights)
            if curve is None:
                # Weighted isotonic regression: a sparse bin (edge pixels) cannot drag the
                # well-populated bins around it, as a running maximum would let it.
                fitted = _isotonic(medians[c][filled], counts[c][filled].astype(np.float64))
                curve = np.interp(np.arange(256), centres[filled], fitted)
        elif filled.any():
            curve = np.arange(256) + (medians[c][filled][0] - centres[filled][0])
        else:
            curve = np.arange(256, dtype=np.float64)
        curves[0, :, c] = np.clip(np.round(curve), 0, 255)
    return curves


_GAMMAS = np.geomspace(0.35, 2.8, 48)
_LEVELS = np.arange(256, dtype=np.float64) / 255


def _power_curve(levels: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
    """Fit targets ~ gain * (level / 255) ** gamma + offset (gamma, contrast, brightness, one
    channel's colour cast): smooth, monotone and well behaved where samples are sparse. Two
    passes; the second down-weights bins the first fits badly (edge pixels). Bins whose
    evidence level is clipped at black or white say only "at least"/"at most": they are left
    out (the curve is clipped after). None if no such curve fits within a few grey levels."""
    unclipped = (targets > 3) & (targets < 252)
    if np.count_nonzero(unclipped) < 3:
        return None
    levels, targets, weights = levels[unclipped], targets[unclipped], weights[unclipped]
    x = levels / 255
    powered = x[None, :] ** _GAMMAS[:, None]  # (gammas, bins)
    for _ in range(2):
        total = weights.sum()
        mean_p = powered @ weights / total
        mean_t = float(targets @ weights) / total
        centred_p = powered - mean_p[:, None]
        variance = (centred_p**2) @ weights
        gain = (centred_p @ (weights * (targets - mean_t))) / np.maximum(variance, 1e-12)
        offset = mean_t - gain * mean_p
        errors = targets[None, :] - (gain[:, None] * powered + offset[:, None])
        cost = (errors**2) @ weights
        best = int(np.argmin(cost))
        residual = np.abs(errors[best])
        weights = weights * np.minimum(1.0, TONE_FIT_SLACK / np.maximum(residual, 1e-6))
    rms = math.sqrt(float(cost[best]) / max(float(weights.sum()), 1e-12))
    if gain[best] <= 0 or rms > TONE_FIT_SLACK:
        return None
    return gain[best] * _LEVELS ** _GAMMAS[best] + offset[best]


def _isotonic(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-decreasing fit (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, length]
    for value, weight in zip(values.tolist(), weights.tolist(), strict=True):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean2, weight2, length2 = blocks.pop()
            mean1, weight1, length1 = blocks[-1]
            total = weight1 + weight2
            blocks[-1] = [(mean1 * weight1 + mean2 * weight2) / total, total, length1 + length2]
    return np.repeat([b[0] for b in blocks], [int(b[2]) for b in blocks])


def _structure_agreement(evidence: np.ndarray, mapped: np.ndarray, valid: np.ndarray) -> tuple[float, int]:
    """Share of textured, fully covered patches whose grey structure correlates, and their number."""
    ev = evidence.astype(np.float32)
    ref = mapped.astype(np.float32)
    rows, cols = ev.shape[0] // PATCH, ev.shape[1] // PATCH
    if rows == 0 or cols == 0:
        return 0.0, 0

    def blocks(a: np.ndarray) -> np.ndarray:
        return a[: rows * PATCH, : cols * PATCH].reshape(rows, PATCH, cols, PATCH).swapaxes(1, 2).reshape(
            rows, cols, PATCH * PATCH)

    e, r = blocks(ev), blocks(ref)
    full = blocks(valid.astype(np.float32)).min(axis=2) > 0
    e = e - e.mean(axis=2, keepdims=True)
    r = r - r.mean(axis=2, keepdims=True)
    e_std, r_std = np.sqrt((e * e).mean(axis=2)), np.sqrt((r * r).mean(axis=2))
    textured = full & (np.maximum(e_std, r_std) >= TEXTURED_STD)
    ncc = (e * r).mean(axis=2) / (e_std * r_std + 1e-6)
    balanced = np.minimum(e_std, r_std) >= 0.5 * np.maximum(e_std, r_std)
    agree = textured & (ncc >= PATCH_NCC) & balanced
    count = int(textured.sum())
    return (float(agree.sum()) / count if count else 0.0), count


def _changed_regions(residual: np.ndarray, broad: np.ndarray, valid: np.ndarray, evidence: PreparedImage,
                     size: tuple[int, int]) -> tuple[tuple[tuple[int, int, int, int], ...], float, float]:
    """Boxes (evidence file pixels) of the places that changed, the changed share, and how
    strongly the strongest stands out (in multiples of its tolerance)."""
    overlap = max(1, int(np.count_nonzero(valid)))
    # Tolerances rise with the copy's own noise (heavy JPEG), measured over the whole overlap.
    sharp_tolerance = max(LOCATE_TOLERANCE, 2.5 * _percentile_levels(residual, valid, 0.9))
    broad_tolerance = max(BROAD_TOLERANCE, 2.5 * float(np.percentile(broad[::4, ::4][valid[::4, ::4]], 90)))
    significance = cv2.max(residual.astype(np.float32) * (1 / sharp_tolerance), broad * (1 / broad_tolerance))
    seeds = significance > 1
    # Hysteresis: a change is seeded where it is clear and extends through connected fainter
    # pixels (a crack's thinning ends, a stain's fading rim). No opening: a scratch is one
    # pixel wide at this scale. Dilation joins a crack's pieces; the area and strength tests
    # below drop isolated specks.
    changed = cv2.dilate((significance > FAINT_SHARE).astype(np.uint8), np.ones((5, 5), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(changed, connectivity=8)
    min_area = max(16, MIN_REGION_SHARE * overlap)
    parts: list[tuple[float, list[int]]] = []
    peak = 0.0
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        if area < min_area:
            continue
        inside = labels[y:y + h, x:x + w] == label
        strength = significance[y:y + h, x:x + w][inside & seeds[y:y + h, x:x + w]]
        if strength.size < MIN_SEED_PIXELS:
            continue
        # Either a marked change somewhere, or a faint one over a large area; scattered specks
        # of compression noise are neither.
        if float(strength.max()) < 1.5 and strength.size < LARGE_REGION_SHARE * overlap:
            continue
        peak = max(peak, float(strength.max()))
        parts.append((float(strength.sum()), [x, y, x + w, y + h, area]))
    if not parts:
        return (), 0.0, 0.0
    parts.sort(key=lambda p: -p[0])
    gap = REGION_MERGE_GAP * math.hypot(*size)
    groups: list[list[int]] = []
    for _, box in parts:
        for group in groups:
            if (box[0] <= group[2] + gap and box[2] >= group[0] - gap
                    and box[1] <= group[3] + gap and box[3] >= group[1] - gap):
                group[:4] = [min(group[0], box[0]), min(group[1], box[1]), max(group[2], box[2]), max(group[3], box[3])]
                group[4] += box[4]
                break
        else:
            groups.append(list(box))
    # The dilation above grew each part by 2 px; undo that before reporting.
    sx, sy = _file_scale(evidence, size)
    boxes = []
    for x0, y0, x1, y1, _ in groups[:MAX_REGIONS]:
        x0, y0, x1, y1 = x0 + 2, y0 + 2, max(x0 + 3, x1 - 2), max(y0 + 3, y1 - 2)
        boxes.append((round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy)))
    changed_share = sum(g[4] for g in groups) / overlap
    return tuple(boxes), changed_share, peak


def _percentile_levels(levels: np.ndarray, valid: np.ndarray, share: float) -> float:
    """The ``share`` quantile of a uint8 map over ``valid`` (every other pixel), via a histogram."""
    counts = np.bincount(levels[::2, ::2][valid[::2, ::2]], minlength=256).cumsum()
    return float(np.searchsorted(counts, share * counts[-1])) if counts[-1] else 0.0


def _file_scale(evidence: PreparedImage, size: tuple[int, int]) -> tuple[float, float]:
    """Working pixels -> pixels of the file as displayed (EXIF orientation applied, full resolution)."""
    width, height = evidence.width, evidence.height
    if evidence.exif_orientation in (5, 6, 7, 8):  # stored on its side: displayed width is the file's height
        width, height = height, width
    return width / size[0], height / size[1]


# ---------------------------------------------------------------- helpers


def _working_colour(pixels: np.ndarray) -> np.ndarray:
    # The pool already decodes at WORK_SIDE (pixels_side): then this is the same array, no copy.
    return shrink(pixels, WORK_SIDE)


def _cache_key(ref: PreparedImage) -> str:
    return ref.cache_key or f"id:{ref.image_id}:{ref.pixels.shape}"


def _plausible(homography: np.ndarray) -> bool:
    """Could resizing, cropping, mirroring and a small turn have produced this map?"""
    h = homography / homography[2, 2]
    if not np.all(np.isfinite(h)):
        return False
    singular = np.linalg.svd(h[:2, :2], compute_uv=False)
    if singular[1] <= 1e-6:
        return False
    scale = math.sqrt(singular[0] * singular[1])
    if not (SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]) or singular[0] / singular[1] > MAX_ANISOTROPY:
        return False
    return bool(np.linalg.det(h[:2, :2]) > 0)  # a reflection is handled by the mirrored reference, never here


def _reason(evidence: PreparedImage, verdict: _Verdict) -> Reason:
    alignment = verdict.alignment
    ref = alignment.reference
    source = "shipment photo" if ref.role == "shipment" else "listing photo"
    facts: dict[str, object] = {
        "image_id": evidence.image_id,
        "reference_id": ref.image_id,
        "reference_role": ref.role,
        "inliers": alignment.inliers,
        "match_ratio": round(alignment.match_ratio, 3),
        "agreement": round(verdict.agreement, 3),
        "mirrored": int(alignment.mirrored),
        COPY_OF_REFERENCE: 1,
    }
    # How sure the copy is: agreement beyond the bar, inliers beyond the minimum, a spread of matches.
    certainty = min(
        clamp01((verdict.agreement - DERIVED_AGREEMENT) / (1 - DERIVED_AGREEMENT) * 1.5),
        clamp01((alignment.inliers - MIN_INLIERS) / 30),
        clamp01(alignment.spread / 0.05),
    )
    if verdict.regions:
        x0, y0, x1, y1 = verdict.regions[0]
        facts["changed_region"] = [x0, y0, x1, y1]
        if len(verdict.regions) > 1:
            facts["changed_regions"] = [list(box) for box in verdict.regions]
        facts["changed_fraction"] = round(verdict.changed_fraction, 4)
        score = 0.85 + 0.14 * min(certainty, clamp01((verdict.contrast - 1.5) / 1.5))
        return Reason(EDITED_CODE,
                      f"Evidence {evidence.image_id} is the {source} {ref.image_id} with a region changed "
                      f"at {facts['changed_region']} ({verdict.changed_fraction:.1%} of the image)",
                      round(score, 4), facts)
    facts["changed_fraction"] = 0.0
    return Reason(COPY_CODE,
                  f"Evidence {evidence.image_id} is the {source} {ref.image_id} itself, not a photo of the item",
                  round(0.72 + 0.1 * certainty, 4), facts)
