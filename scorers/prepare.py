"""Turn fetched bytes into a :class:`PreparedImage`: decode safely, orient, scale down.

Pure and CPU-bound; runs in the image process pool. Every way a file can be
unreadable becomes an :class:`ImageProblem` with a stable code, so the refund
is held with a reason that names it.
"""

from __future__ import annotations

import hashlib
import io
import warnings

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
            if fmt == "JPEG":
                # Draft mode decodes at 1/2, 1/4 or 1/8 scale straight from the DCT: much cheaper.
                img.draft("RGB", (working_side, working_side))
            img.load()
            img = ImageOps.exif_transpose(img) if orientation != 1 else img
            if img.mode != "RGB":
                img = _to_rgb(img)
            if max(img.size) > working_side:
                # resize(), not thumbnail(): the same bilinear filter, measured 3x cheaper here.
                scale = working_side / max(img.size)
                size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
                img = img.resize(size, Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.uint8)
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
