"""Turn fetched bytes into a :class:`PreparedImage`: decode safely, orient, scale down.

Pure and CPU-bound; runs in the image process pool. Every way a file can be
unreadable becomes an :class:`ImageProblem` with a stable code, so the refund
is held with a reason that names it.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from scorers.base import ImageRole, PreparedImage

# Formats a phone, a shop or an AI tool produces. Anything else (SVG, PSD, EPS,
# ICO, animations used as images) is refused rather than half-understood.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "MPO", "HEIF", "AVIF", "TIFF", "BMP", "GIF"})
# Where more than one frame means an animation. Evidence must be a still: the scorers see one
# frame, the others could show anything. (MPO stays: phones store a second picture in it.)
ANIMATION_FORMATS = frozenset({"GIF", "PNG", "WEBP"})
MAX_TEXT_BYTES = 4 * 1024 * 1024  # per PNG text chunk: Pillow's guard against memory bombs

ImageFile.LOAD_TRUNCATED_IMAGES = False

# Pillow cannot identify these, so they would only be "unreadable"; they are known formats we refuse.
_MARKUP_FORMATS = ((b"<svg", "SVG"), (b"<!doctype svg", "SVG"))


class ImageProblem(ValueError):
    """An image that cannot be used as evidence. ``code`` goes into the decision's reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def prepare_image(
    raw: bytes,
    *,
    image_id: str,
    role: ImageRole,
    working_side: int = 1024,
    max_pixels: int = 40_000_000,
    cache_key: str = "",
) -> PreparedImage:
    if not raw:
        raise ImageProblem("IMAGE_EMPTY", f"image {image_id} is empty (0 bytes)")
    from PIL import PngImagePlugin

    PngImagePlugin.MAX_TEXT_CHUNK = MAX_TEXT_BYTES
    PngImagePlugin.MAX_TEXT_MEMORY = MAX_TEXT_BYTES * 4
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            fmt = img.format or "UNKNOWN"
            if fmt not in ALLOWED_FORMATS:
                raise ImageProblem("IMAGE_FORMAT_UNSUPPORTED", f"image {image_id} is {fmt}, not a photo format")
            width, height = img.size
            if width * height > max_pixels:
                raise ImageProblem(
                    "IMAGE_TOO_LARGE",
                    f"image {image_id} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
                )
            if width < 16 or height < 16:
                raise ImageProblem("IMAGE_TOO_SMALL", f"image {image_id} is {width}x{height}, too small to check")
            # is_animated looks for a second frame only; n_frames would walk every frame.
            if role == "evidence" and fmt in ANIMATION_FORMATS and getattr(img, "is_animated", False):
                raise ImageProblem("IMAGE_FORMAT_UNSUPPORTED", f"image {image_id} is an animated {fmt}, not a still "
                                   "photo")
            orientation = _orientation(img)
            decoded = _decode_common_case(raw, img, working_side)
            if decoded is not None:
                pixels = _oriented(shrink(decoded, working_side), orientation)
            else:
                if fmt == "JPEG":
                    # Draft mode decodes at 1/2, 1/4 or 1/8 scale straight from the DCT: much cheaper.
                    # Ask for the target size itself (not a square): draft keeps both sides at least that.
                    img.draft("RGB", _scaled((width, height), working_side))
                img.load()
                img = ImageOps.exif_transpose(img) if orientation != 1 else img
                if img.mode != "RGB":
                    img = _to_rgb(img)
                pixels = shrink(np.asarray(img, dtype=np.uint8), working_side)
    except ImageProblem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageProblem("IMAGE_TOO_LARGE", f"image {image_id}: {exc}") from exc
    except UnidentifiedImageError as exc:
        markup = _markup_format(raw)
        if markup is not None:
            raise ImageProblem("IMAGE_FORMAT_UNSUPPORTED", f"image {image_id} is {markup}, not a photo format") from exc
        raise ImageProblem("IMAGE_UNREADABLE", f"image {image_id} is not an image file Pillow can identify") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, ValueError) and "MAX_TEXT_" in str(exc):
            # Pillow's limit on PNG text chunks (zTXt/iTXt that inflate to megabytes): a memory bomb.
            raise ImageProblem("IMAGE_TOO_LARGE", f"image {image_id} has PNG text chunks over the "
                               f"{MAX_TEXT_BYTES // (1024 * 1024)} MB limit: {str(exc)[:120]}") from exc
        # Truncated or corrupt data: Pillow raises OSError ("image file is truncated"), SyntaxError or ValueError.
        raise ImageProblem("IMAGE_CORRUPT", f"image {image_id} cannot be decoded: {str(exc)[:160]}") from exc
    except MemoryError as exc:
        raise ImageProblem("IMAGE_TOO_LARGE", f"image {image_id} needs too much memory to decode") from exc
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ImageProblem("IMAGE_CORRUPT", f"image {image_id} decoded to shape {pixels.shape}")
    return PreparedImage(
        image_id=image_id,
        role=role,
        raw=raw,
        pixels=pixels,
        format=fmt,
        width=width,
        height=height,
        exif_orientation=orientation,
        cache_key=cache_key or hashlib.sha256(raw).hexdigest()[:32],
    )


# OpenCV's flags for a JPEG decoded at 1/factor in the DCT (as Pillow's draft mode does), in RGB order.
_JPEG_SCALED = {1: cv2.IMREAD_COLOR_RGB, 2: (cv2.IMREAD_REDUCED_COLOR_2 & ~cv2.IMREAD_COLOR) | cv2.IMREAD_COLOR_RGB,
                4: (cv2.IMREAD_REDUCED_COLOR_4 & ~cv2.IMREAD_COLOR) | cv2.IMREAD_COLOR_RGB,
                8: (cv2.IMREAD_REDUCED_COLOR_8 & ~cv2.IMREAD_COLOR) | cv2.IMREAD_COLOR_RGB}


def _decode_common_case(raw: bytes, img: Image.Image, side: int) -> np.ndarray | None:
    """Decode a complete RGB JPEG (at the DCT scale Pillow's draft mode would pick) or a still RGB
    WebP with OpenCV, unoriented; None for anything else, or if OpenCV fails.

    The same libjpeg-turbo and libwebp as Pillow's give the same pixels (the tests check), straight
    into an array, for half the CPU: Pillow copies its image out again, and decodes every WebP
    through its animation decoder, to RGBA. Pillow stays the judge of every other case and of what
    is corrupt: a file that does not end in its end marker (truncated, or data appended) goes to it.
    """
    if img.mode != "RGB":  # grey, CMYK, alpha, palette, 16-bit: Pillow's conversions
        return None
    width, height = img.size
    if img.format == "JPEG":
        if not raw.rstrip(b"\0").endswith(b"\xff\xd9"):
            return None
        target_width, target_height = _scaled((width, height), side)
        factor = next(f for f in (8, 4, 2, 1) if width // f >= target_width and height // f >= target_height)
        flags, shape = _JPEG_SCALED[factor], (-(-height // factor), -(-width // factor), 3)
    elif img.format == "WEBP" and not getattr(img, "is_animated", False):
        flags, shape = cv2.IMREAD_COLOR_RGB, (height, width, 3)
    else:
        return None
    try:
        decoded = cv2.imdecode(np.frombuffer(raw, np.uint8), flags | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error:
        return None
    return decoded if decoded is not None and decoded.shape == shape else None


def shrink(pixels: np.ndarray, side: int) -> np.ndarray:
    """Scale down so the longer side is at most ``side``: area averaging for whole factors, otherwise
    an anti-aliasing blur and bilinear sampling. Several times cheaper than Pillow's bilinear resize
    (a convolution whose support grows with the factor), which was most of prepare's CPU."""
    height, width = pixels.shape[:2]
    scale = side / max(height, width)
    if scale >= 1:
        return np.ascontiguousarray(pixels)
    size = _scaled((width, height), side)
    factor = 1 / scale
    if abs(factor - round(factor)) < 1e-9 and width % round(factor) == 0 and height % round(factor) == 0:
        return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    blurred = cv2.GaussianBlur(pixels, (0, 0), 0.5 * math.sqrt(factor**2 - 1))
    return cv2.resize(blurred, size, interpolation=cv2.INTER_LINEAR)


def _scaled(size: tuple[int, int], side: int) -> tuple[int, int]:
    """(width, height) scaled down so the longer side is at most ``side``."""
    width, height = size
    scale = min(1.0, side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


# EXIF orientation -> the transpose that displays it upright (as ImageOps.exif_transpose does).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _oriented(pixels: np.ndarray, orientation: int) -> np.ndarray:
    if orientation not in _TRANSPOSE:
        return pixels
    return np.asarray(Image.fromarray(pixels, "RGB").transpose(_TRANSPOSE[orientation]), dtype=np.uint8)


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block must not make the pixels unreadable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _markup_format(raw: bytes) -> str | None:
    head = raw[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<?xml"):
        head = head[head.find(b"?>") + 2 :].lstrip() if b"?>" in head else b""
    for prefix, name in _MARKUP_FORMATS:
        if head.startswith(prefix):
            return name
    return None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16"):
        # 16-bit grey (PNG, TIFF): Pillow's convert clips at 255, which turns most of the picture white.
        grey = np.right_shift(np.clip(np.asarray(img), 0, 65535), 8).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent areas onto white, as a shop page would show them.
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")
