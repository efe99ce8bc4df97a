"""prepare_image against hostile and awkward files: refused with a specific code, or accepted as RGB uint8.

The builders below (``bomb_png`` ...) are plain functions so the integration test
can serve the same files over HTTP.
"""

from __future__ import annotations

import functools
import io
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from scorers.prepare import ImageProblem, prepare_image, shrink

IMAGE_ID = "EV-hostile-42"
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


# ------------------------------------------------------------------ builders


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_file(width: int, height: int, idat: bytes, *, depth: int = 8, colour_type: int = 2,
             before_idat: bytes = b"", after_idat: bytes = b"") -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + before_idat + png_chunk(b"IDAT", idat)
            + after_idat + png_chunk(b"IEND", b""))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 1-bit grey PNG of all zeros: kilobytes on disk, width*height bytes once decoded to RGB x3."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    rows_written = min(height, 12_000)  # the header alone must trip the guard; keep building cheap
    idat = b"".join(compressor.compress(row * 500) for _ in range(rows_written // 500)) + compressor.flush()
    return png_file(width, height, idat, depth=1, colour_type=0)


def bomb_jpeg(side: int = 60_000) -> bytes:
    """A small real JPEG whose SOF header is rewritten to claim side x side pixels."""
    data = bytearray(encode(Image.new("RGB", (64, 64), (90, 120, 150)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def _rgb_rows(width: int, height: int) -> bytes:
    return zlib.compress(b"".join(b"\x00" + bytes([y % 256, 80, 160]) * width for y in range(height)))


@functools.cache  # ~0.5 s to build; several tests use it
def text_bomb_chunk(megabytes: int = 50, kind: bytes = b"zTXt") -> bytes:
    """A text chunk of ~50 KB that inflates to ``megabytes`` MB."""
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(b"A" * (1 << 20)) for _ in range(megabytes)) + compressor.flush()
    prefix = b"Comment\x00\x00" if kind == b"zTXt" else b"XML:com.adobe.xmp\x00\x01\x00\x00\x00"
    return png_chunk(kind, prefix + body)


def text_bomb_png(kind: bytes = b"zTXt", before_idat: bool = True) -> bytes:
    chunk = text_bomb_chunk(50, kind)
    if before_idat:
        return png_file(64, 64, _rgb_rows(64, 64), before_idat=chunk)
    return png_file(64, 64, _rgb_rows(64, 64), after_idat=chunk)


def photo(width: int = 128, height: int = 96, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def truncated_jpeg() -> bytes:
    whole = encode(photo(), "JPEG", quality=90)
    return whole[: len(whole) // 2]


HTML_PAGE = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Please sign in</body></html>"
SVG_FILE = (b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="400" '
            b'height="300"><rect width="400" height="300" fill="red"/></svg>')

GIF_FRAMES = 10_000
GIF_PALETTE = [channel for i in range(256) for channel in (i, 255 - i, (i * 7) % 256)]


@functools.cache
def animated_gif(frames: int = GIF_FRAMES, side: int = 16) -> bytes:
    """``frames`` frames of side x side, frame i filled with palette index i % 256 (~50 B per frame)."""
    images = [Image.new("P", (side, side), i % 256) for i in range(frames)]
    images[0].putpalette(GIF_PALETTE)
    return encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=20, loop=0, optimize=False)


# ------------------------------------------------------------------ helpers


def refused(raw: bytes, **options: int) -> ImageProblem:
    with pytest.raises(ImageProblem) as caught:
        prepare_image(raw, image_id=IMAGE_ID, role="evidence", **options)
    assert IMAGE_ID in str(caught.value), "the message must name the image"
    return caught.value


def _peak_rss_kb() -> int:
    match = re.search(r"VmHWM:\s+(\d+) kB", STATUS.read_text())
    assert match is not None
    return int(match.group(1))


@contextmanager
def peak_rss_growth() -> Iterator[Callable[[], float]]:
    """MB the process's peak RSS grew by inside the block (resets the high-water mark first)."""
    CLEAR_REFS.write_text("5")
    before = _peak_rss_kb()
    grown: list[float] = []
    yield lambda: grown[0]
    grown.append((_peak_rss_kb() - before) / 1024)


can_measure_rss = pytest.mark.skipif(not CLEAR_REFS.exists(), reason="needs Linux /proc/self/clear_refs")


# ------------------------------------------------------------------ refused
#
# How I checked that these fail without the protection (on a copy of the tree):
# - pixel check in prepare_image removed and the DecompressionBombWarning filter dropped: the
#   48-Mpx bomb and test_pixel_limit_is_the_callers fail (decoded, no ImageProblem); the larger
#   bombs are still stopped by Pillow's own hard limit (2x MAX_IMAGE_PIXELS), as they should be.
# - PngImagePlugin.MAX_TEXT_CHUNK/MAX_TEXT_MEMORY lifted to 1 GB: all four text-bomb tests
#   fail, the after-IDAT one with "peak RSS grew 100 MB".
# - the prepare.py of commit 3eac2ce (before this change): SVG came back IMAGE_UNREADABLE, the
#   text bombs IMAGE_CORRUPT and 16-bit grey PNGs clipped to white: 6 tests failed.


@can_measure_rss
@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: png_file(100_000, 100_000, zlib.compress(b"\x00" * 4096), depth=1, colour_type=0),
                     id="png-ihdr-100000x100000"),
        pytest.param(lambda: bomb_png(20_000, 10_000), id="png-1bit-200Mpx-over-pillow-limit"),
        pytest.param(lambda: bomb_png(8_000, 6_000), id="png-1bit-48Mpx-over-our-limit"),
        pytest.param(bomb_jpeg, id="jpeg-sof-60000x60000"),
    ],
)
def test_decompression_bombs_are_refused_before_decoding(build: Callable[[], bytes]) -> None:
    raw = build()
    assert len(raw) < 200_000
    with peak_rss_growth() as grown:
        started = time.perf_counter()
        problem = refused(raw)
        seconds = time.perf_counter() - started
    assert problem.code == "IMAGE_TOO_LARGE"
    assert seconds < 1.0
    assert grown() < 30, f"peak RSS grew {grown():.0f} MB: the bomb was decoded"


def test_pixel_limit_is_the_callers() -> None:
    raw = bomb_png(1_000, 1_000)
    assert refused(raw, max_pixels=500_000).code == "IMAGE_TOO_LARGE"
    assert prepare_image(raw, image_id=IMAGE_ID, role="evidence", max_pixels=1_000_000).pixels.shape == (1000, 1000, 3)


@can_measure_rss
@pytest.mark.parametrize("kind", [b"zTXt", b"iTXt"])
def test_png_text_chunk_bomb_before_pixels_is_refused(kind: bytes) -> None:
    raw = text_bomb_png(kind, before_idat=True)
    assert len(raw) < 200_000  # 50 MB once inflated
    with peak_rss_growth() as grown:
        problem = refused(raw)
    assert problem.code == "IMAGE_TOO_LARGE"
    assert "text" in str(problem)
    assert grown() < 30, f"peak RSS grew {grown():.0f} MB: the text was inflated"


@can_measure_rss
def test_png_text_chunk_bomb_after_pixels_is_not_inflated() -> None:
    # Pillow reads chunks after IDAT lazily; the pixels are fine, the text must stay compressed.
    with peak_rss_growth() as grown:
        prepared = prepare_image(text_bomb_png(before_idat=False), image_id=IMAGE_ID, role="evidence")
    assert prepared.pixels.shape == (64, 64, 3)
    assert grown() < 30, f"peak RSS grew {grown():.0f} MB: the text was inflated"


def test_many_text_chunks_under_the_chunk_limit_are_refused_in_total() -> None:
    chunks = b"".join(text_bomb_chunk(3) for _ in range(10))  # 3 MB each, 30 MB in all
    assert refused(png_file(64, 64, _rgb_rows(64, 64), before_idat=chunks)).code == "IMAGE_TOO_LARGE"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        pytest.param(truncated_jpeg(), "IMAGE_CORRUPT", id="jpeg-cut-in-half"),
        pytest.param(encode(photo(), "JPEG")[:300], "IMAGE_CORRUPT", id="jpeg-cut-in-header"),
        pytest.param(encode(photo(), "PNG")[:5_000], "IMAGE_CORRUPT", id="png-cut-short"),
        pytest.param(HTML_PAGE, "IMAGE_UNREADABLE", id="html-page"),
        pytest.param(b"\x00" * 512, "IMAGE_UNREADABLE", id="zeros"),
        pytest.param(SVG_FILE, "IMAGE_FORMAT_UNSUPPORTED", id="svg-with-xml-prolog"),
        pytest.param(b'\xef\xbb\xbf  <svg xmlns="http://www.w3.org/2000/svg"/>', "IMAGE_FORMAT_UNSUPPORTED",
                     id="svg-bom"),
        pytest.param(encode(photo(64, 64), "ICO"), "IMAGE_FORMAT_UNSUPPORTED", id="ico"),
        pytest.param(b"", "IMAGE_EMPTY", id="empty"),
        pytest.param(encode(Image.new("RGB", (1, 1)), "PNG"), "IMAGE_TOO_SMALL", id="1x1"),
        pytest.param(encode(Image.new("RGB", (4000, 8)), "PNG"), "IMAGE_TOO_SMALL", id="4000x8"),
    ],
)
def test_unusable_files_are_refused_with_a_code(raw: bytes, code: str) -> None:
    assert refused(raw).code == code


# ------------------------------------------------------------------ accepted


@can_measure_rss
def test_animated_gif_evidence_is_refused_after_reading_two_frames() -> None:
    raw = animated_gif()
    assert Image.open(io.BytesIO(raw)).n_frames == GIF_FRAMES
    with peak_rss_growth() as grown:
        started = time.thread_time()  # CPU time: a busy machine must not fail it
        problem = refused(raw)
        seconds = time.thread_time() - started
    print(f"\n{GIF_FRAMES}-frame GIF ({len(raw)} B) refused in {seconds * 1000:.1f} ms, peak RSS +{grown():.1f} MB")
    assert problem.code == "IMAGE_FORMAT_UNSUPPORTED" and "animated" in str(problem)
    # Checked: with n_frames instead of is_animated this took 56 ms and failed; with the check
    # removed the GIF was accepted (DID NOT RAISE).
    assert seconds < 0.02
    assert grown() < 10


@can_measure_rss
def test_animated_gif_reference_is_read_at_frame_0_only() -> None:
    # A shop's listing may be an animation; it is compared by its first frame.
    # Checked: with prepare made to load every frame this took 410 ms and failed.
    raw = animated_gif()
    with peak_rss_growth() as grown:
        started = time.thread_time()  # CPU time: a busy machine must not fail it
        prepared = prepare_image(raw, image_id=IMAGE_ID, role="listing")
        seconds = time.thread_time() - started
    print(f"\n{GIF_FRAMES}-frame GIF as listing: {seconds * 1000:.1f} ms, peak RSS +{grown():.1f} MB")
    assert seconds < 0.02
    assert grown() < 10
    assert prepared.format == "GIF" and prepared.pixels.shape == (16, 16, 3)
    assert (prepared.pixels == np.array(GIF_PALETTE[:3], dtype=np.uint8)).all()  # frame 0 = palette index 0


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_other_animations_are_refused_as_evidence(fmt: str) -> None:
    frames = [photo(64, 64, seed) for seed in range(3)]
    raw = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
    assert refused(raw).code == "IMAGE_FORMAT_UNSUPPORTED"


def test_multi_picture_jpeg_from_a_phone_is_accepted() -> None:
    frames = [photo(64, 48, seed) for seed in range(2)]  # MPO: main picture plus e.g. a depth or preview image
    prepared = prepare_image(encode(frames[0], "MPO", save_all=True, append_images=frames[1:]), image_id=IMAGE_ID,
                             role="evidence")
    assert prepared.format == "MPO" and prepared.pixels.shape == (48, 64, 3)


def test_cmyk_jpeg_becomes_rgb() -> None:
    cyan = Image.new("CMYK", (64, 48), (255, 0, 0, 0))
    prepared = prepare_image(encode(cyan, "JPEG", quality=95), image_id=IMAGE_ID, role="evidence")
    assert prepared.pixels.dtype == np.uint8 and prepared.pixels.shape == (48, 64, 3)
    red, green, blue = prepared.pixels.reshape(-1, 3).mean(axis=0)
    assert red < 20 and green > 235 and blue > 235


def test_16_bit_grey_png_keeps_its_tones() -> None:
    ramp = (np.arange(64, dtype=np.uint16) * 1040).reshape(1, 64).repeat(32, axis=0)  # 0 .. 65520
    grey16 = Image.frombytes("I;16", (64, 32), ramp.astype("<u2").tobytes())
    raw = encode(grey16, "PNG")
    assert Image.open(io.BytesIO(raw)).mode.startswith("I;16")
    prepared = prepare_image(raw, image_id=IMAGE_ID, role="evidence")
    assert prepared.pixels.dtype == np.uint8 and prepared.pixels.shape == (32, 64, 3)
    # Converted by dropping the low byte; Pillow's plain convert("RGB") clips everything above 255 to white.
    np.testing.assert_array_equal(prepared.pixels[0, :, 0], (ramp[0] >> 8).astype(np.uint8))
    assert (prepared.pixels[..., 0] == prepared.pixels[..., 2]).all()


def test_16_bit_rgb_png_is_scaled_to_8_bits() -> None:
    width, height = 32, 16
    rgb16 = np.zeros((height, width, 3), dtype=">u2")
    rgb16[..., 0] = 65535
    rgb16[..., 1] = np.arange(width, dtype=np.uint16) * 2000
    idat = zlib.compress(b"".join(b"\x00" + rgb16[y].tobytes() for y in range(height)))
    prepared = prepare_image(png_file(width, height, idat, depth=16), image_id=IMAGE_ID, role="evidence")
    assert prepared.pixels.dtype == np.uint8 and prepared.pixels.shape == (height, width, 3)
    np.testing.assert_array_equal(prepared.pixels[0, :, 1], (np.arange(width) * 2000 >> 8).astype(np.uint8))
    assert (prepared.pixels[..., 0] == 255).all() and (prepared.pixels[..., 2] == 0).all()


def test_palette_png_with_transparency_goes_onto_white() -> None:
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, 16, 32))  # left half opaque blue, right half index 0 = transparent red
    prepared = prepare_image(encode(palette, "PNG", transparency=0), image_id=IMAGE_ID, role="evidence")
    assert prepared.pixels.dtype == np.uint8 and prepared.pixels.shape == (32, 32, 3)
    assert (prepared.pixels[:, :16] == (0, 0, 255)).all()
    assert (prepared.pixels[:, 16:] == (255, 255, 255)).all()


@pytest.mark.parametrize(("width", "height"), [(64, 32), (3000, 2000)])
def test_exif_orientation_6_rotates_the_pixels(width: int, height: int) -> None:
    stored = Image.new("RGB", (width, height), (0, 0, 255))
    marker = width // 8
    stored.paste((255, 0, 0), (0, 0, marker, marker))  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored turned 90 degrees clockwise
    prepared = prepare_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), image_id=IMAGE_ID,
                             role="evidence")
    scale = min(1.0, 1024 / max(width, height))
    assert prepared.exif_orientation == 6
    assert (prepared.width, prepared.height) == (width, height)  # of the file
    assert prepared.pixels.shape == (round(width * scale), round(height * scale), 3)  # tall, not wide
    corner = 2 + int(marker * scale) // 4
    top_right = prepared.pixels[corner, -corner].astype(int)
    top_left = prepared.pixels[corner, corner].astype(int)
    assert top_right[0] > 200 and top_right[2] < 60, "the stored top-left corner must end top-right"
    assert top_left[2] > 200 and top_left[0] < 60


# ------------------------------------------------------------------ decoding at the size scorers use


def smooth_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photo-like content (blobs and edges, no pixel noise): what a downscale must keep."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 40 + 1, width // 40 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def pillow_pixels(raw: bytes, side: int) -> np.ndarray:
    """What prepare_image made of a file with Pillow alone: draft, turn upright, RGB, shrink."""
    img = Image.open(io.BytesIO(raw))
    scale = min(1.0, side / max(img.size))
    img.draft("RGB", (round(img.width * scale), round(img.height * scale)))
    return shrink(np.asarray(ImageOps.exif_transpose(img).convert("RGB")), side)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_opencv_decoding_gives_pillows_pixels_in_every_orientation(fmt: str, orientation: int) -> None:
    # Complete RGB JPEG and still RGB WebP are decoded by OpenCV (half the CPU): the pixels must not change.
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = encode(smooth_photo(1000, 700), fmt, quality=90, exif=exif.tobytes())
    prepared = prepare_image(raw, image_id=IMAGE_ID, role="evidence", working_side=300)
    expected = pillow_pixels(raw, 300)
    assert prepared.exif_orientation == orientation
    assert prepared.pixels.shape == expected.shape
    assert int(np.abs(prepared.pixels.astype(int) - expected).max()) <= 1  # shrunk before turning: rounding


def test_jpeg_with_data_after_its_end_marker_is_still_read() -> None:
    raw = encode(smooth_photo(640, 480), "JPEG", quality=90) + b"vendor trailer" * 10
    prepared = prepare_image(raw, image_id=IMAGE_ID, role="evidence", working_side=320)
    np.testing.assert_array_equal(prepared.pixels, pillow_pixels(raw, 320))


def test_webp_with_alpha_still_goes_onto_white() -> None:
    rgba = Image.new("RGBA", (64, 32), (0, 0, 255, 255))
    rgba.paste((255, 0, 0, 0), (32, 0, 64, 32))
    prepared = prepare_image(encode(rgba, "WEBP", lossless=True), image_id=IMAGE_ID, role="evidence")
    assert (prepared.pixels[:, :30] == (0, 0, 255)).all()
    assert (prepared.pixels[:, 34:] == (255, 255, 255)).all()


@pytest.mark.parametrize(("width", "height"), [(1200, 900), (1600, 1200), (900, 1200), (4000, 3000)])
def test_jpeg_decoded_small_matches_a_full_decode_scaled_down(width: int, height: int) -> None:
    # Draft mode decodes at 1/2..1/8 from the DCT: the result must be the same picture as a full decode.
    raw = encode(smooth_photo(width, height), "JPEG", quality=92)
    prepared = prepare_image(raw, image_id=IMAGE_ID, role="evidence", working_side=512)
    scale = 512 / max(width, height)
    assert prepared.pixels.shape == (round(height * scale), round(width * scale), 3)
    assert (prepared.width, prepared.height) == (width, height)
    full = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    reference = cv2.resize(full, prepared.pixels.shape[1::-1], interpolation=cv2.INTER_AREA)
    difference = np.abs(prepared.pixels.astype(int) - reference)
    assert difference.mean() < 1.5 and np.percentile(difference, 99) < 8


def test_pool_decodes_at_the_largest_size_a_scorer_looks_at(monkeypatch: pytest.MonkeyPatch) -> None:
    from scorers.capture import CaptureScorer
    from scorers.image_reference import WORK_SIDE, ReferenceMatchScorer
    from scorers.provenance import ProvenanceScorer
    from scorers.reuse import FINGERPRINT_SIDE
    from streams import image_pool

    scorers = [ReferenceMatchScorer(), ProvenanceScorer(), CaptureScorer()]
    monkeypatch.setattr(image_pool, "_image_scorers", lambda: scorers)
    assert image_pool._decode_side(768) == WORK_SIDE
    assert image_pool._decode_side(300) == 300  # the setting stays the upper bound
    monkeypatch.setattr(image_pool, "_image_scorers", lambda: scorers[1:])
    assert image_pool._decode_side(768) == max(CaptureScorer.pixels_side, FINGERPRINT_SIDE)

    class Undeclared:
        name, kind = "image.undeclared", "image"

    monkeypatch.setattr(image_pool, "_image_scorers", lambda: [*scorers, Undeclared()])
    assert image_pool._decode_side(768) == 768  # a scorer that does not say gets the full working size


@pytest.mark.parametrize("options", [{"progressive": True}, {"subsampling": 0}, {"subsampling": 1}])
def test_opencv_decoding_gives_pillows_pixels_for_other_jpeg_codings(options: dict[str, object]) -> None:
    raw = encode(smooth_photo(1100, 800), "JPEG", quality=85, **options)
    prepared = prepare_image(raw, image_id=IMAGE_ID, role="evidence", working_side=512)
    np.testing.assert_array_equal(prepared.pixels, pillow_pixels(raw, 512))
