"""Synthetic product imagery: listing shots, buyer phone photos and AI-style edits of listings.

Everything is deterministic for a ``numpy.random.Generator``. A product is drawn
once as reflectance (albedo), coverage (alpha) and a surface height map, so every
shot of it is *rendered*: lit from some direction and, when the item is turned,
warped as a 3D body (a cylinder model, which no homography reproduces). That makes
a genuine re-photograph differ from the listing the way a real one does — other
light, other pose, other background, other camera — while an edit of the listing
shares its pixels everywhere except where the damage was painted in.
"""

from __future__ import annotations

import colorsys
import io
import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

LAYER_SIDE = 768  # the product is drawn on a square canvas of this side
DAMAGE_KINDS = ("crack", "stain", "scratch", "dent")
# Image.info key under which listing_photo and buyer_photo leave the product's coverage (bool H x W),
# so edit_listing can paint on the object; a photo without it is segmented instead.
OBJECT_MASK_KEY = "simulate.object_mask"

_FAMILIES = ("bottle", "mug", "speaker", "bag", "book", "vase")
_CATEGORY = {
    "bottle": "beauty", "mug": "home", "speaker": "electronics",
    "bag": "fashion", "book": "books", "vase": "home",
}
_ROUND_FAMILIES = frozenset({"bottle", "mug", "vase"})
_BRANDS = ("AURORA", "NORDIK", "LUMA", "KIWI&CO", "SENSO", "MIRA", "OKAPI", "VELLUM", "TERRA", "QUILL")
_PRICE_POINTS = (19, 29, 39, 59, 79, 99, 149, 199, 299, 459, 899, 1299)
_BUYER_SIZES = ((1280, 960), (960, 1280), (1440, 1080), (1080, 1440), (1600, 1200), (1200, 900))

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 with x1/y1 exclusive, like PIL's getbbox


@dataclass(eq=False)
class Product:
    """One catalogue item. ``layer`` is the item under studio light on a transparent canvas."""

    sku: str
    title: str
    category: str
    price: str
    layer: Image.Image
    # The surface, cropped to the item's bounds in ``layer``:
    albedo: np.ndarray = field(repr=False)  # float32 (h, w, 3) reflectance in [0, 1]
    alpha: np.ndarray = field(repr=False)  # float32 (h, w) coverage in [0, 1]
    height: np.ndarray = field(repr=False)  # float32 (h, w) surface height in pixels
    round_body: bool = True  # turned as a cylinder (bottles, mugs) or as a flatter body
    normals: np.ndarray | None = field(default=None, repr=False)  # of ``height``, filled in by make_product


@dataclass(frozen=True)
class _Light:
    direction: tuple[float, float, float]  # towards the light; +x right, +y down, +z to the camera
    ambient: float
    diffuse: float
    specular: float
    shininess: float
    colour: tuple[float, float, float]


_STUDIO_LIGHT = _Light((-0.35, -0.45, 1.0), 0.52, 0.5, 0.16, 40.0, (1.0, 1.0, 1.0))


# ---------------------------------------------------------------- products


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _vivid(rng: np.random.Generator, value: tuple[float, float] = (0.35, 0.9)) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(float(rng.uniform(0, 1)), float(rng.uniform(0.3, 0.85)), float(rng.uniform(*value)))
    return int(r * 255), int(g * 255), int(b * 255)


def _pale(rng: np.random.Generator) -> tuple[int, int, int]:
    hue, saturation, value = float(rng.uniform(0, 1)), float(rng.uniform(0.03, 0.2)), float(rng.uniform(0.85, 0.98))
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return int(r * 255), int(g * 255), int(b * 255)


def _shade_of(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c * factor))) for c in colour)  # type: ignore[return-value]


def _text_block(paint: ImageDraw.ImageDraw, box: tuple[float, float, float, float], lines: list[str],
                ink: tuple[int, int, int], size: int) -> None:
    x0, y0, _, _ = box
    y = y0
    for i, line in enumerate(lines):
        font = _font(size if i == 0 else max(10, int(size * 0.55)))
        paint.text((x0, y), line, fill=ink, font=font)
        y += (size if i == 0 else size * 0.55) * 1.35


def _draw_label(paint: ImageDraw.ImageDraw, rng: np.random.Generator, box: tuple[float, float, float, float],
                brand: str, title: str, sku: str) -> None:
    """A printed label: ground, stripes, a logo mark and text — the texture matching relies on."""
    x0, y0, x1, y1 = box
    ground = _pale(rng)
    ink = _vivid(rng, (0.15, 0.5))
    accent = _vivid(rng)
    paint.rectangle(box, fill=ground)
    stripe_h = (y1 - y0) * 0.09
    for k in range(int(rng.integers(1, 4))):
        sy = y0 + stripe_h * (0.6 + 1.6 * k)
        paint.rectangle((x0, sy, x1, sy + stripe_h * 0.5), fill=accent)
    cx, cy, r = x0 + (x1 - x0) * 0.8, y0 + (y1 - y0) * 0.72, (x1 - x0) * 0.1
    paint.ellipse((cx - r, cy - r, cx + r, cy + r), outline=ink, width=max(2, int(r * 0.18)))
    paint.polygon([(cx - r * 0.5, cy + r * 0.4), (cx, cy - r * 0.6), (cx + r * 0.5, cy + r * 0.4)], fill=accent)
    size = max(14, int((x1 - x0) * 0.16))
    _text_block(paint, (x0 + (x1 - x0) * 0.07, y0 + (y1 - y0) * 0.42, x1, y1),
                [brand, title, sku, f"{int(rng.integers(50, 900))} ml  lot {int(rng.integers(1000, 9999))}"], ink, size)


def _draw_bottle(paint: ImageDraw.ImageDraw, cover: ImageDraw.ImageDraw, rng: np.random.Generator,
                 brand: str, title: str, sku: str) -> None:
    s, cx = LAYER_SIDE, LAYER_SIDE / 2
    bw, bh = float(rng.integers(230, 300)), float(rng.integers(380, 460))
    bottom = s - 40
    top = bottom - bh
    body = _vivid(rng)
    nw, nh = bw * float(rng.uniform(0.28, 0.38)), float(rng.integers(70, 120))
    for d in (paint, cover):
        fill = body if d is paint else 255
        d.rounded_rectangle((cx - bw / 2, top, cx + bw / 2, bottom), radius=bw * 0.22, fill=fill)
        d.rectangle((cx - nw / 2, top - nh, cx + nw / 2, top + 20), fill=fill)
    cap = _vivid(rng, (0.2, 0.7))
    cw, ch = bw * 0.42, float(rng.integers(45, 75))
    cap_box = (cx - cw / 2, top - nh - ch, cx + cw / 2, top - nh + 4)
    cover.rounded_rectangle(cap_box, radius=8, fill=255)
    paint.rounded_rectangle(cap_box, radius=8, fill=cap)
    for x in np.arange(cap_box[0] + 6, cap_box[2] - 4, 7):
        paint.line((x, cap_box[1] + 4, x, cap_box[3] - 4), fill=_shade_of(cap, 0.7), width=2)
    _draw_label(paint, rng, (cx - bw * 0.42, top + bh * 0.22, cx + bw * 0.42, top + bh * 0.7), brand, title, sku)


def _draw_mug(paint: ImageDraw.ImageDraw, cover: ImageDraw.ImageDraw, rng: np.random.Generator,
              brand: str, title: str, sku: str) -> None:
    s = LAYER_SIDE
    bw, bh = float(rng.integers(330, 420)), float(rng.integers(330, 420))
    cx, bottom = s / 2 - 40, s - 120
    top = bottom - bh
    body, print_colour = _vivid(rng, (0.6, 0.95)), _vivid(rng, (0.2, 0.7))
    hx0, hy0 = cx + bw / 2 - 30, top + bh * 0.2
    for d in (paint, cover):
        fill = body if d is paint else 255
        d.ellipse((hx0, hy0, hx0 + bw * 0.45, hy0 + bh * 0.55), outline=fill, width=34)
        d.rounded_rectangle((cx - bw / 2, top, cx + bw / 2, bottom), radius=40, fill=fill)
    paint.rectangle((cx - bw / 2, top, cx + bw / 2, top + 16), fill=_shade_of(body, 0.8))
    if rng.random() < 0.5:  # polka dots
        step = float(rng.integers(34, 52))
        for j, y in enumerate(np.arange(top + 40, bottom - 20, step)):
            for x in np.arange(cx - bw / 2 + 20 + (j % 2) * step / 2, cx + bw / 2 - 10, step):
                r = step * 0.22
                paint.ellipse((x - r, y - r, x + r, y + r), fill=print_colour)
    else:  # chevron band
        y = top + bh * float(rng.uniform(0.25, 0.45))
        for k in range(3):
            xs = np.arange(cx - bw / 2, cx + bw / 2, 24)
            pts = [(x, y + k * 26 + (14 if (i % 2) else 0)) for i, x in enumerate(xs)]
            paint.line(pts, fill=print_colour, width=6)
    _text_block(paint, (cx - bw * 0.35, top + bh * 0.62, cx + bw / 2, bottom), [brand, title],
                _shade_of(print_colour, 0.6), 34)


def _draw_speaker(paint: ImageDraw.ImageDraw, cover: ImageDraw.ImageDraw, rng: np.random.Generator,
                  brand: str, title: str, sku: str) -> None:
    s = LAYER_SIDE
    w, h = float(rng.integers(420, 560)), float(rng.integers(320, 440))
    x0, y0 = (s - w) / 2, s - 60 - h
    shell, grille = _vivid(rng, (0.2, 0.6)), _vivid(rng, (0.1, 0.35))
    cover.rounded_rectangle((x0, y0, x0 + w, y0 + h), radius=44, fill=255)
    paint.rounded_rectangle((x0, y0, x0 + w, y0 + h), radius=44, fill=shell)
    gx0, gy0, gx1, gy1 = x0 + 30, y0 + 30, x0 + w - 30, y0 + h * 0.68
    paint.rounded_rectangle((gx0, gy0, gx1, gy1), radius=20, fill=_shade_of(grille, 1.3))
    pitch = float(rng.integers(11, 16))
    for j, y in enumerate(np.arange(gy0 + pitch, gy1 - pitch / 2, pitch * 0.87)):
        for x in np.arange(gx0 + pitch * (0.7 + 0.5 * (j % 2)), gx1 - pitch / 2, pitch):
            paint.ellipse((x - pitch * 0.28, y - pitch * 0.28, x + pitch * 0.28, y + pitch * 0.28), fill=grille)
    for k in range(int(rng.integers(2, 5))):
        bx, by = x0 + w * 0.55 + k * 42, y0 + h * 0.83
        paint.ellipse((bx - 13, by - 13, bx + 13, by + 13), fill=_shade_of(shell, 0.55))
        paint.text((bx - 5, by - 8), "+-o>"[k % 4], fill=_pale(rng), font=_font(14))
    _text_block(paint, (x0 + 40, y0 + h * 0.74, x0 + w, y0 + h), [brand, sku], _pale(rng), 30)


def _draw_bag(paint: ImageDraw.ImageDraw, cover: ImageDraw.ImageDraw, rng: np.random.Generator,
              brand: str, title: str, sku: str) -> None:
    s = LAYER_SIDE
    w_top, w_bot, h = float(rng.integers(320, 420)), float(rng.integers(440, 560)), float(rng.integers(360, 440))
    cx, bottom = s / 2, s - 50
    top = bottom - h
    leather, trim = _vivid(rng, (0.3, 0.8)), _vivid(rng, (0.15, 0.5))
    outline = [(cx - w_top / 2, top), (cx + w_top / 2, top), (cx + w_bot / 2, bottom), (cx - w_bot / 2, bottom)]
    for d in (paint, cover):
        fill = leather if d is paint else 255
        d.arc((cx - w_top * 0.35, top - h * 0.45, cx + w_top * 0.35, top + h * 0.3), 180, 360,
              fill=trim if d is paint else 255, width=18)
        d.polygon(outline, fill=fill)
    for k in range(0, int(w_bot), 9):  # diagonal weave of the leather
        x = cx - w_bot / 2 + k
        paint.line((x, bottom, x - h * 0.6, top), fill=_shade_of(leather, 0.93), width=2)
    flap = [(cx - w_top / 2 + 8, top + 8), (cx + w_top / 2 - 8, top + 8), (cx + w_top * 0.4, top + h * 0.42),
            (cx, top + h * 0.5), (cx - w_top * 0.4, top + h * 0.42)]
    paint.polygon(flap, fill=trim)
    for a, b in [*itertools.pairwise(flap), (flap[-1], flap[0])]:  # stitching: dashes along the flap
        n = int(math.dist(a, b) // 14)
        for i in range(n):
            t0, t1 = i / n, (i + 0.5) / n
            paint.line((a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0 + 6,
                        a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1 + 6), fill=_pale(rng), width=2)
    paint.rectangle((cx - 22, top + h * 0.45, cx + 22, top + h * 0.58), fill=(200, 180, 90))
    _text_block(paint, (cx - w_bot * 0.3, top + h * 0.68, cx + w_bot / 2, bottom), [brand, title], _pale(rng), 30)


def _draw_book(paint: ImageDraw.ImageDraw, cover: ImageDraw.ImageDraw, rng: np.random.Generator,
               brand: str, title: str, sku: str) -> None:
    s = LAYER_SIDE
    w, h = float(rng.integers(380, 470)), float(rng.integers(520, 640))
    x0, y0 = (s - w) / 2, (s - h) / 2 + 20
    ground = _vivid(rng, (0.3, 0.9))
    cover.rectangle((x0, y0, x0 + w, y0 + h), fill=255)
    paint.rectangle((x0, y0, x0 + w, y0 + h), fill=ground)
    paint.rectangle((x0, y0, x0 + 26, y0 + h), fill=_shade_of(ground, 0.7))
    for _ in range(int(rng.integers(6, 14))):  # the cover illustration
        cx, cy = x0 + float(rng.uniform(0.15, 0.9)) * w, y0 + float(rng.uniform(0.3, 0.75)) * h
        r = float(rng.uniform(15, 70))
        if rng.random() < 0.5:
            paint.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_vivid(rng))
        else:
            pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.sort(rng.uniform(0, 2 * math.pi, 5))]
            paint.polygon(pts, fill=_vivid(rng))
    ink = _pale(rng)
    paint.text((x0 + 50, y0 + 40), title.upper(), fill=ink, font=_font(int(w * 0.1)))
    paint.text((x0 + 50, y0 + 40 + w * 0.13), brand.title() + " Press", fill=ink, font=_font(int(w * 0.055)))
    paint.text((x0 + 50, y0 + h - 60), sku, fill=ink, font=_font(22))


def _draw_vase(paint: ImageDraw.ImageDraw, cover: ImageDraw.ImageDraw, rng: np.random.Generator,
               brand: str, title: str, sku: str) -> None:
    s, cx = LAYER_SIDE, LAYER_SIDE / 2
    top, bottom = float(rng.integers(90, 160)), s - 40
    ys = np.linspace(top, bottom, 48)
    t = (ys - top) / (bottom - top)
    bulge, waist = float(rng.uniform(0.45, 0.75)), float(rng.uniform(0.15, 0.35))
    neck = 40 * np.exp(-((t - waist) / 0.1) ** 2) * float(rng.uniform(-1, 1))
    radius = 70 + 200 * np.exp(-((t - bulge) / 0.28) ** 2) + neck
    left = [(cx - r, y) for r, y in zip(radius, ys, strict=True)]
    outline = left + [(cx + r, y) for r, y in zip(radius[::-1], ys[::-1], strict=True)]
    glaze, band = _vivid(rng, (0.4, 0.9)), _vivid(rng, (0.15, 0.6))
    cover.polygon(outline, fill=255)
    paint.polygon(outline, fill=glaze)
    for k in range(int(rng.integers(2, 5))):
        y = top + (bottom - top) * float(rng.uniform(0.2, 0.85))
        half = float(np.interp(y, ys, radius))
        paint.rectangle((cx - half, y, cx + half, y + 14), fill=band)
        zig = [(x, y + 26 + (12 if i % 2 else 0)) for i, x in enumerate(np.arange(cx - half + 10, cx + half - 10, 16))]
        if len(zig) > 1:
            paint.line(zig, fill=_shade_of(band, 0.6), width=4)
        if k == 0:
            for x in np.arange(cx - half + 20, cx + half - 20, 30):
                paint.ellipse((x - 5, y - 22, x + 5, y - 12), fill=band)


_DRAW = {"bottle": _draw_bottle, "mug": _draw_mug, "speaker": _draw_speaker,
         "bag": _draw_bag, "book": _draw_book, "vase": _draw_vase}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std noise low-passed at ``sigma`` pixels (wide ones drawn coarse and scaled up: fast)."""
    step = max(1, int(sigma / 2))
    coarse = (shape[0] // step + 2, shape[1] // step + 2)
    noise = cv2.GaussianBlur(rng.standard_normal(coarse, dtype=np.float32), (0, 0), sigma / step)
    if step > 1:
        noise = cv2.resize(noise, (coarse[1] * step, coarse[0] * step), interpolation=cv2.INTER_LINEAR)
    noise = noise[: shape[0], : shape[1]]
    return (noise - noise.mean()) / max(float(noise.std()), 1e-6)


def _height_map(alpha: np.ndarray, round_body: bool) -> np.ndarray:
    """Surface height in pixels: a cylinder across each row for round items, a bevelled slab otherwise."""
    if not round_body:
        return cv2.GaussianBlur(alpha, (0, 0), 14) * 30.0
    inside = alpha > 0.5
    cols = np.arange(alpha.shape[1], dtype=np.float32)[None, :]
    has = inside.any(axis=1)
    left = np.where(has, inside.argmax(axis=1), 0).astype(np.float32)[:, None]
    right = np.where(has, alpha.shape[1] - 1 - inside[:, ::-1].argmax(axis=1), 0).astype(np.float32)[:, None]
    centre, half = (left + right) / 2, np.maximum((right - left) / 2, 1.0)
    height = np.sqrt(np.clip(half**2 - (cols - centre) ** 2, 0, None))
    return cv2.GaussianBlur(height * alpha, (0, 0), 2.0)


def make_product(rng: np.random.Generator, index: int) -> Product:
    """A catalogue item with a printed, textured surface; deterministic for ``rng``'s state."""
    family = _FAMILIES[index % len(_FAMILIES)]  # every family turns up in any run of six
    brand = _BRANDS[int(rng.integers(0, len(_BRANDS)))]
    number = f"{index:03d}"
    title = f"{family.title()} {number}"
    sku = f"SKU-{family.upper()}-{number}"
    paint_img = Image.new("RGB", (LAYER_SIDE, LAYER_SIDE), (0, 0, 0))
    cover_img = Image.new("L", (LAYER_SIDE, LAYER_SIDE), 0)
    _DRAW[family](ImageDraw.Draw(paint_img), ImageDraw.Draw(cover_img), rng, brand, title, sku)
    alpha = cv2.GaussianBlur(np.asarray(cover_img, dtype=np.float32) / 255.0, (0, 0), 0.7)
    # Keep only the item's bounds (plus a margin for the blur): every later step is cheaper.
    ys, xs = np.nonzero(alpha > 0.01)
    x0, y0 = max(0, int(xs.min()) - 4), max(0, int(ys.min()) - 4)
    x1, y1 = min(LAYER_SIDE, int(xs.max()) + 5), min(LAYER_SIDE, int(ys.max()) + 5)
    alpha = np.ascontiguousarray(alpha[y0:y1, x0:x1])
    grain = 1.0 + float(rng.uniform(0.02, 0.05)) * _smooth_noise(rng, alpha.shape, 0.9)
    albedo = np.asarray(paint_img, dtype=np.float32)[y0:y1, x0:x1] / 255.0 * grain[..., None]
    albedo = np.clip(albedo, 0.0, 1.0)
    round_body = family in _ROUND_FAMILIES
    height = _height_map(alpha, round_body)
    normals = _normals(height)
    rgba = _render(albedo, alpha, normals, round_body, _STUDIO_LIGHT, 0.0)
    canvas = np.zeros((LAYER_SIDE, LAYER_SIDE, 4), np.uint8)
    canvas[y0:y1, x0:x1, :3] = rgba[..., :3].astype(np.uint8)
    canvas[y0:y1, x0:x1, 3] = (rgba[..., 3] * 255).clip(0, 255).astype(np.uint8)
    layer = Image.fromarray(canvas, "RGBA")
    price = f"{_PRICE_POINTS[int(rng.integers(0, len(_PRICE_POINTS)))] + 0.9:.2f}"
    return Product(sku=sku, title=title, category=_CATEGORY[family], price=price, layer=layer,
                   albedo=albedo, alpha=alpha, height=height, round_body=round_body, normals=normals)


# ---------------------------------------------------------------- rendering


def _normals(height: np.ndarray) -> np.ndarray:
    gy, gx = np.gradient(height)
    n = np.dstack([-gx, -gy, np.ones_like(height)])
    return n / np.linalg.norm(n, axis=2, keepdims=True)


def _surface_normals(product: Product) -> np.ndarray:
    return product.normals if product.normals is not None else _normals(product.height)


def _render(albedo: np.ndarray, alpha: np.ndarray, normals: np.ndarray, round_body: bool,
            light: _Light, turn_deg: float) -> np.ndarray:
    """Turn the item about its vertical axis and shade it. Returns float32 (S, S, 4): RGB 0..255, alpha 0..1."""
    to_light = np.array(light.direction, np.float32)
    to_light /= np.linalg.norm(to_light)
    half_vector = to_light + np.array([0, 0, 1], np.float32)
    half_vector /= np.linalg.norm(half_vector)
    if turn_deg:
        turn = math.radians(turn_deg)
        albedo, alpha, normals = _turn(albedo, alpha, normals, round_body, turn)
        # The surface turned by ``turn`` about the vertical axis: equivalently, turn the light the other way.
        c, s = math.cos(turn), math.sin(turn)
        undo = np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]], np.float32)
        to_light, half_vector = undo @ to_light, undo @ half_vector
    dots = cv2.transform(normals, np.stack([to_light, half_vector]).astype(np.float32))  # both n.l, n.h at once
    lambert = np.clip(dots[..., 0], 0.0, 1.0)
    gloss = np.clip(dots[..., 1], 0.0, 1.0)
    for _ in range(max(1, round(math.log2(light.shininess)))):  # gloss ** shininess, by squaring: fast
        gloss *= gloss
    colour = np.array(light.colour, np.float32) * np.float32(255.0)
    rgba = np.empty((*alpha.shape, 4), np.float32)
    rgba[..., :3] = albedo * (light.ambient + light.diffuse * lambert)[..., None]
    rgba[..., :3] += (light.specular * gloss)[..., None]
    rgba[..., :3] *= colour
    np.clip(rgba[..., :3], 0, 255, out=rgba[..., :3])
    rgba[..., 3] = alpha
    return rgba


def _turn(albedo: np.ndarray, alpha: np.ndarray, normals: np.ndarray, round_body: bool,
          turn: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotate the body about a vertical axis: surface points move along a sine, not a projective map.

    Normals are moved with their surface point but keep their direction (the caller turns the light)."""
    inside = alpha > 0.5
    cols = np.flatnonzero(inside.any(axis=0))
    if cols.size == 0:
        return albedo, alpha, normals
    x_out = np.arange(albedo.shape[1], dtype=np.float32)[None, :]
    if round_body:
        # Each row is a circle about one vertical axis; its silhouette stays, its surface slides
        # round. The radius is the body's (a mug's handle sticks out beyond it and stays put).
        rows = inside.any(axis=1)
        left = np.where(rows, inside.argmax(axis=1), 0)
        right = np.where(rows, inside.shape[1] - 1 - inside[:, ::-1].argmax(axis=1), 0)
        axis = float(np.median((left + right)[rows]) / 2)
        radius = np.maximum(np.minimum(axis - left, right - axis), 1).astype(np.float32)[:, None]
        u = (x_out - axis) / radius
        angle_in = np.clip(np.arcsin(np.clip(u, -1, 1)) - turn, -math.pi / 2, math.pi / 2)
        map_x = np.where(np.abs(u) <= 1, axis + radius * np.sin(angle_in), x_out).astype(np.float32)
    else:
        # A flatter body: an arc of a wide cylinder, turned and re-centred; what turns out of
        # the arc's range is gone (coverage 0 there).
        axis = (cols[0] + cols[-1]) / 2
        radius = (cols[-1] - cols[0]) / 2 * 2.2
        reach = math.asin((cols[-1] - cols[0]) / 2 / radius)
        u = np.clip((x_out - axis) / radius + math.sin(turn), -1, 1)
        angle_in = np.arcsin(u) - turn
        inside_arc = np.abs(angle_in) <= reach + 0.02
        map_x = np.where(inside_arc, axis + radius * np.sin(angle_in), -10).astype(np.float32)
    map_x = np.broadcast_to(map_x, alpha.shape).copy()
    map_y = np.broadcast_to(np.arange(alpha.shape[0], dtype=np.float32)[:, None], alpha.shape).copy()
    stacked = cv2.remap(np.dstack([albedo, alpha[..., None]]), map_x, map_y, cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    moved_normals = cv2.remap(normals, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=(0, 0, 1))
    return stacked[..., :3], stacked[..., 3], moved_normals


def _object_box(alpha: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(alpha > 0.5)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def _placement(alpha: np.ndarray, out_size: tuple[int, int], long_side: float, centre: tuple[float, float],
               rotate_deg: float = 0.0) -> np.ndarray:
    """3x3 matrix taking layer pixels to the shot: scale the object box to ``long_side``, rotate, centre it."""
    x0, y0, x1, y1 = _object_box(alpha)
    scale = long_side / max(x1 - x0, y1 - y0)
    c, s = math.cos(math.radians(rotate_deg)) * scale, math.sin(math.radians(rotate_deg)) * scale
    ox, oy = (x0 + x1) / 2, (y0 + y1) / 2
    return np.array([[c, s, centre[0] - c * ox - s * oy], [-s, c, centre[1] + s * ox - c * oy], [0, 0, 1]], np.float64)


def _warp_window(rgba: np.ndarray, matrix: np.ndarray, out_size: tuple[int, int]) -> tuple[np.ndarray, Box]:
    """Warp the rendered item into the shot, computing only the window it lands in."""
    h, w = rgba.shape[:2]
    corners = cv2.perspectiveTransform(np.float32([[[0, 0], [w, 0], [w, h], [0, h]]]), matrix)[0]
    x0, y0 = (max(0, int(v) - 2) for v in corners.min(axis=0))
    x1, y1 = min(out_size[0], int(corners[:, 0].max()) + 3), min(out_size[1], int(corners[:, 1].max()) + 3)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((1, 1, 4), np.float32), (0, 0, 1, 1)
    shift = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], np.float64)
    window = cv2.warpPerspective(rgba, shift @ matrix, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return window, (x0, y0, x1, y1)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Float image -> uint8, rounded and saturated (OpenCV: several times faster than clip + astype)."""
    if values.shape[0] * values.shape[1] < 64:  # OpenCV reads a tiny H x W x 3 array as a column of scalars
        return np.clip(np.round(values), 0, 255).astype(np.uint8)
    return cv2.convertScaleAbs(cv2.max(values, 0.0))


def _paste(photo: np.ndarray, window: np.ndarray, box: Box) -> None:
    """Lay the warped item (float RGBA window) over ``photo`` (uint8 RGB, in place)."""
    x0, y0, x1, y1 = box
    cover = window[..., 3:4]
    region = photo[y0:y1, x0:x1].astype(np.float32)
    region += (window[..., :3] - region) * cover
    photo[y0:y1, x0:x1] = _to_uint8(region)


def _smooth_field(rng: np.random.Generator, out_size: tuple[int, int], cells: int = 6) -> np.ndarray:
    """A slowly varying field in [-1, 1] (uneven light, cloth folds), cheap at any size."""
    coarse = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return cv2.resize(coarse, out_size, interpolation=cv2.INTER_CUBIC).clip(-1, 1)


# ---------------------------------------------------------------- listing shots


def listing_photo(product: Product, rng: np.random.Generator, variant: int = 0) -> Image.Image:
    """The shop's studio shot on a plain light background. ``variant`` 1: the item turned and moved.

    The product's coverage is left in ``img.info[OBJECT_MASK_KEY]`` for :func:`edit_listing`.
    """
    side = int(rng.choice([1000, 1200]))
    out_size = (side, side)
    grey = float(rng.uniform(236, 252))
    coarse = side // 8  # the backdrop and its shadow are smooth: built at 1/8 size and scaled up
    ramp = np.linspace(0, 1, coarse, dtype=np.float32)[:, None]
    glow = grey + 6 * _smooth_field(rng, (coarse, coarse), 3) - 14 * ramp
    tint = np.array([1.0, 1.0, float(rng.uniform(0.98, 1.01))], np.float32)
    if variant:
        light = _Light((float(rng.uniform(0.1, 0.5)), -0.5, 1.0), 0.5, 0.5, 0.2, 30.0, (1.0, 0.99, 0.97))
        turn = float(rng.choice([-1, 1]) * rng.uniform(15, 30))
        long_side, rotation = side * float(rng.uniform(0.58, 0.68)), float(rng.uniform(-8, 8))
        centre = (side * float(rng.uniform(0.42, 0.58)), side * float(rng.uniform(0.45, 0.55)))
    else:
        light, turn, long_side, rotation, centre = _STUDIO_LIGHT, 0.0, side * 0.78, 0.0, (side / 2, side / 2)
    rgba = _render(product.albedo, product.alpha, _surface_normals(product), product.round_body, light, turn)
    window, box = _warp_window(rgba, _placement(product.alpha, out_size, long_side, centre, rotation), out_size)
    x0, y0, x1, y1 = box
    shadow = np.zeros((coarse, coarse), np.float32)
    foot = ((x0 + x1) // 16, int(y1 / 8 - 2))
    cv2.ellipse(shadow, foot, (int((x1 - x0) / 8 * 0.5), max(1, coarse // 40)), 0, 0, 360, 1.0, -1)
    shadow = cv2.GaussianBlur(shadow, (0, 0), coarse * 0.02) * float(rng.uniform(0.15, 0.25))
    glow *= 1 - shadow
    backdrop = (glow[..., None] * tint).clip(0, 255).astype(np.uint8)
    photo = cv2.resize(backdrop, out_size, interpolation=cv2.INTER_LINEAR)
    _paste(photo, window, box)
    img = Image.fromarray(photo, "RGB")
    coverage = np.zeros((side, side), bool)
    coverage[y0:y1, x0:x1] = window[..., 3] > 0.5
    img.info[OBJECT_MASK_KEY] = coverage
    return img


# ---------------------------------------------------------------- damage shapes


def _random_object_point(mask: np.ndarray, rng: np.random.Generator, margin: int) -> tuple[int, int]:
    inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=max(1, margin)) > 0
    ys, xs = np.nonzero(inner if inner.any() else mask)
    if ys.size == 0:
        return mask.shape[1] // 2, mask.shape[0] // 2
    i = int(rng.integers(0, ys.size))
    return int(xs[i]), int(ys[i])


def _jagged(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, depth: int, roughness: float) -> list[np.ndarray]:
    """Midpoint displacement: a crack's zig-zag path from ``a`` to ``b``."""
    if depth == 0:
        return [a, b]
    normal = np.array([a[1] - b[1], b[0] - a[0]])
    mid = (a + b) / 2 + normal * float(rng.normal(0, roughness))
    left = _jagged(a, mid, rng, depth - 1, roughness)
    return left[:-1] + _jagged(mid, b, rng, depth - 1, roughness)


def _crack_mask(shape: tuple[int, int], start: tuple[int, int], size: float, rng: np.random.Generator) -> np.ndarray:
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    angle = float(rng.uniform(0, 2 * math.pi))
    origin = np.array(start, np.float64)
    length = size * float(rng.uniform(0.7, 1.3))
    path = _jagged(origin, origin + length * np.array([math.cos(angle), math.sin(angle)]), rng, 5, 0.22)
    width = max(2, round(size * float(rng.uniform(0.012, 0.022))))
    draw.line([tuple(p) for p in path], fill=255, width=width, joint="curve")
    for _ in range(int(rng.integers(1, 4))):
        base = path[int(rng.integers(1, len(path) - 1))]
        branch_angle = angle + float(rng.choice([-1, 1]) * rng.uniform(0.4, 1.1))
        tip = base + length * float(rng.uniform(0.25, 0.5)) * np.array([math.cos(branch_angle), math.sin(branch_angle)])
        draw.line([tuple(p) for p in _jagged(base, tip, rng, 4, 0.25)], fill=255, width=max(1, width - 1))
    return cv2.GaussianBlur(np.asarray(canvas, np.float32) / 255.0, (0, 0), 0.7)


def _stain_mask(shape: tuple[int, int], start: tuple[int, int], size: float, rng: np.random.Generator) -> np.ndarray:
    radius = size * float(rng.uniform(0.22, 0.45))
    half = int(radius * 1.6) + 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    falloff = 1 - (xx**2 + yy**2) / radius**2
    blotch = falloff + 0.7 * _smooth_noise(rng, falloff.shape, radius / 4)
    patch = np.clip((blotch - 0.05) / 0.35, 0, 1) * float(rng.uniform(0.7, 1.0))
    return _paste_patch(shape, start, patch)


def _scratch_mask(shape: tuple[int, int], start: tuple[int, int], size: float, rng: np.random.Generator) -> np.ndarray:
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    angle = float(rng.uniform(0, math.pi))
    direction, across = np.array([math.cos(angle), math.sin(angle)]), np.array([-math.sin(angle), math.cos(angle)])
    for _ in range(int(rng.integers(3, 7))):
        a = np.array(start) + across * float(rng.normal(0, size * 0.1)) + direction * float(rng.normal(0, size * 0.1))
        length, bend = size * float(rng.uniform(0.5, 1.0)), float(rng.normal(0, size * 0.04))
        ts = np.linspace(0, 1, 12)
        pts = [tuple(a + direction * length * t + across * bend * 4 * t * (1 - t)) for t in ts]
        draw.line(pts, fill=int(rng.integers(180, 256)), width=max(1, round(size * 0.006)))
    return cv2.GaussianBlur(np.asarray(canvas, np.float32) / 255.0, (0, 0), 0.5)


def _dent_bump(shape: tuple[int, int], start: tuple[int, int], size: float, rng: np.random.Generator) -> np.ndarray:
    radius = size * float(rng.uniform(0.12, 0.22))
    half = int(radius * 3) + 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    return _paste_patch(shape, start, np.exp(-(xx**2 + yy**2) / (2 * radius**2)))


def _paste_patch(shape: tuple[int, int], centre: tuple[int, int], patch: np.ndarray) -> np.ndarray:
    out = np.zeros(shape, np.float32)
    half = patch.shape[0] // 2
    x, y = centre
    y0, y1, x0, x1 = max(0, y - half), min(shape[0], y + half + 1), max(0, x - half), min(shape[1], x + half + 1)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = patch[y0 - (y - half):y1 - (y - half), x0 - (x - half):x1 - (x - half)]
    return out


_SHAPES = {"crack": _crack_mask, "stain": _stain_mask, "scratch": _scratch_mask, "dent": _dent_bump}


def _check_damage(damage: str) -> None:
    if damage not in _SHAPES:
        raise ValueError(f"damage must be one of {DAMAGE_KINDS}, got {damage!r}")


def _stain_tint(rng: np.random.Generator) -> np.ndarray:
    return np.array([rng.uniform(60, 140), rng.uniform(40, 110), rng.uniform(20, 80)], np.float32)


# ---------------------------------------------------------------- buyer photos


def _home_background(rng: np.random.Generator, out_size: tuple[int, int]) -> np.ndarray:
    """A surface at home: wood, cloth, tiles or stone — or a plain white table (RGB uint8)."""
    w, h = out_size
    sw, sh = w // 2, h // 2  # drawn at half size: grain this fine is lost to the phone's processing anyway
    kind = str(rng.choice(["wood", "cloth", "tiles", "stone", "white", "white"]))
    xx = np.arange(sw, dtype=np.float32)[None, :]
    yy = np.arange(sh, dtype=np.float32)[:, None]
    if kind == "white":
        base = np.array([1, 1, rng.uniform(0.96, 1.0)], np.float32) * float(rng.uniform(228, 248))
        shade = 1 + 0.015 * _smooth_noise(rng, (sh, sw), 3)
        plain = (base * shade[..., None]).clip(0, 255).astype(np.uint8)
        return cv2.resize(plain, out_size, interpolation=cv2.INTER_LINEAR)
    base = np.array(_vivid(rng, (0.35, 0.85)), np.float32)
    if kind == "wood":
        angle = float(rng.uniform(0, math.pi))
        along = math.cos(angle) * xx + math.sin(angle) * yy
        warp = 25 * _smooth_noise(rng, (sh, sw), 20)
        pattern = np.sin((along + warp) * float(rng.uniform(0.05, 0.15))) * 0.12
        pattern += 0.05 * _smooth_noise(rng, (sh, sw), 1)
    elif kind == "cloth":
        pitch = float(rng.uniform(3, 6))
        pattern = 0.08 * np.sin(xx * 2 * math.pi / pitch) * np.sin(yy * 2 * math.pi / pitch)
        pattern = pattern + 0.06 * _smooth_noise(rng, (sh, sw), 30)
    elif kind == "tiles":
        pitch = int(rng.integers(60, 140))
        grout = ((xx.astype(np.int32) % pitch) < 4) | ((yy.astype(np.int32) % pitch) < 4)
        tone = cv2.resize(rng.uniform(-0.06, 0.06, (sh // pitch + 2, sw // pitch + 2)).astype(np.float32),
                          None, fx=pitch, fy=pitch, interpolation=cv2.INTER_NEAREST)[:sh, :sw]
        pattern = np.where(grout, -0.3, tone) + 0.03 * _smooth_noise(rng, (sh, sw), 1)
    else:
        pattern = 0.1 * _smooth_noise(rng, (sh, sw), 2) + 0.08 * _smooth_noise(rng, (sh, sw), 12)
    surface = _to_uint8((base * (1 + pattern)[..., None]).astype(np.float32))
    return cv2.resize(surface, out_size, interpolation=cv2.INTER_LINEAR)


def _damaged_surface(product: Product, damage: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The item's albedo and surface normals with physical damage on it."""
    _check_damage(damage)
    shape = product.alpha.shape
    x0, y0, x1, y1 = _object_box(product.alpha)
    size = max(x1 - x0, y1 - y0) * float(rng.uniform(0.22, 0.35))
    start = _random_object_point(product.alpha > 0.5, rng, int(LAYER_SIDE * 0.06))
    mask = _SHAPES[damage](shape, start, size, rng) * product.alpha
    albedo, height = product.albedo.copy(), product.height.copy()
    m = mask[..., None]
    if damage == "crack":
        albedo *= 1 - 0.8 * m
        height -= 3 * mask
    elif damage == "stain":
        strength = float(rng.uniform(0.35, 0.6))
        albedo = albedo * (1 - strength * m) + _stain_tint(rng) / 255 * strength * 0.55 * m
    elif damage == "scratch":
        albedo += (1 - albedo) * 0.7 * m
    else:
        height -= mask * size * float(rng.uniform(0.06, 0.1))
    normals = _normals(height) if damage in ("crack", "dent") else _surface_normals(product)
    return albedo, normals


def buyer_photo(product: Product, rng: np.random.Generator, damage: str | None = None) -> Image.Image:
    """A buyer's phone photo of the real item: another pose, light and surface, uneven light, noise.

    ``damage`` ("crack", "stain", "scratch", "dent") is on the item itself, so it is lit and turned with it.
    The scene does not depend on the damage: the same generator state photographs the same scene.
    """
    scene_seed, damage_seed = (int(v) for v in rng.integers(0, 2**63 - 1, size=2))
    if damage is None:
        albedo, normals = product.albedo, _surface_normals(product)
    else:
        albedo, normals = _damaged_surface(product, damage, np.random.default_rng(damage_seed))
    rng = np.random.default_rng(scene_seed)
    out_size = _BUYER_SIZES[int(rng.integers(0, len(_BUYER_SIZES)))]
    w, h = out_size
    background = _home_background(rng, out_size)
    azimuth, elevation = float(rng.uniform(0, 2 * math.pi)), math.radians(float(rng.uniform(25, 65)))
    warm = float(rng.uniform(-0.06, 0.08))
    direction = (math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth), math.sin(elevation))
    light = _Light(direction, float(rng.uniform(0.28, 0.45)), float(rng.uniform(0.6, 0.8)),
                   float(rng.uniform(0.1, 0.35)), float(rng.uniform(15, 50)), (1 + warm, 1.0, 1 - warm))
    turn = float(rng.choice([-1, 1]) * rng.uniform(10, 35))
    rgba = _render(albedo, product.alpha, normals, product.round_body, light, turn)
    long_side = min(w, h) * float(rng.uniform(0.45, 0.78))
    centre = (w * float(rng.uniform(0.35, 0.65)), h * float(rng.uniform(0.38, 0.62)))
    placement = _placement(product.alpha, out_size, long_side, centre, float(rng.uniform(-25, 25)))
    jitter = long_side * 0.07  # the phone is not square to the item: a perspective on top
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    moved = corners + rng.uniform(-jitter, jitter, corners.shape).astype(np.float32)
    matrix = cv2.getPerspectiveTransform(corners, moved) @ placement
    window, box = _warp_window(rgba, matrix, out_size)
    x0, y0, x1, y1 = box
    _paste(background, window, box)
    # Light on the scene, at quarter size (it is smooth): the item's cast shadow, falling away from
    # the light, the fall-off of a lamp or window and some unevenness.
    quarter = (w // 4, h // 4)
    coverage = np.zeros((h // 4, w // 4), np.float32)
    small = cv2.resize(window[..., 3], ((x1 - x0) // 4 or 1, (y1 - y0) // 4 or 1), interpolation=cv2.INTER_AREA)
    coverage[y0 // 4:y0 // 4 + small.shape[0], x0 // 4:x0 // 4 + small.shape[1]] = small[: h // 4 - y0 // 4,
                                                                                         : w // 4 - x0 // 4]
    offset = min(w, h) / 4 * float(rng.uniform(0.03, 0.08))
    shift = np.float32([[1, 0, -math.cos(azimuth) * offset], [0, 1, -math.sin(azimuth) * offset]])
    cast = cv2.GaussianBlur(cv2.warpAffine(coverage, shift, quarter), (0, 0), float(rng.uniform(3, 8)))
    shadow = cast * (1 - coverage) * float(rng.uniform(0.3, 0.5))
    lx, ly = float(rng.uniform(0, w)) / 4, float(rng.uniform(0, h)) / 4
    xx, yy = np.arange(w // 4, dtype=np.float32)[None, :], np.arange(h // 4, dtype=np.float32)[:, None]
    falloff = np.sqrt(((xx - lx) / (w / 4)) ** 2 + ((yy - ly) / (h / 4)) ** 2)
    gain = float(rng.uniform(1.05, 1.2)) - float(rng.uniform(0.25, 0.5)) * falloff
    gain += 0.04 * _smooth_field(rng, quarter, 4)
    gain *= 1 - shadow
    gain = cv2.resize(gain, out_size, interpolation=cv2.INTER_LINEAR)
    photo = background.astype(np.float32)
    photo *= gain[..., None]
    photo += _sensor_noise(rng, (h, w), float(rng.uniform(2.0, 5.0)))[..., None]
    photo = _to_uint8(photo)
    img = Image.fromarray(cv2.GaussianBlur(photo, (0, 0), float(rng.uniform(0.5, 1.1))), "RGB")
    coverage = np.zeros((h, w), bool)
    coverage[y0:y1, x0:x1] = window[..., 3] > 0.5
    img.info[OBJECT_MASK_KEY] = coverage  # so a shipment photo can be "edited" too
    return img


_NOISE_SIDE = 1600 + 256


@lru_cache(maxsize=1)
def _noise_field() -> np.ndarray:
    return np.random.default_rng(0x5E45).standard_normal((_NOISE_SIDE, _NOISE_SIDE), dtype=np.float32)


def _sensor_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Per-pixel unit noise times ``sigma``: a random window of one fixed field (fresh normals cost too much)."""
    oy, ox = int(rng.integers(0, _NOISE_SIDE - shape[0] + 1)), int(rng.integers(0, _NOISE_SIDE - shape[1] + 1))
    return _noise_field()[oy:oy + shape[0], ox:ox + shape[1]] * np.float32(sigma)


# ---------------------------------------------------------------- edits


def _segment_listing(arr: np.ndarray) -> np.ndarray:
    """The item in a studio shot: pixels far from the row's background colour (taken at the borders)."""
    border = max(4, arr.shape[1] // 50)
    edges = np.concatenate([arr[:, :border], arr[:, -border:]], axis=1).astype(np.float32)
    background = np.median(edges, axis=1)[:, None, :]
    far = np.abs(arr.astype(np.float32) - background).max(axis=2) > 28
    return cv2.morphologyEx(far.astype(np.uint8), cv2.MORPH_OPEN, np.ones((5, 5), np.uint8)) > 0


def edit_listing(listing: Image.Image, product: Product, rng: np.random.Generator,
                 damage: str) -> tuple[Image.Image, Box]:
    """The listing with ``damage`` painted on the item, the way an AI inpainting editor does it.

    The painted damage is blended in and a margin around it is re-synthesised (re-rendered
    texture: softer, with fresh noise and a slight tone drift). Returns the edited image
    (same size) and the bounding box of every pixel that visibly changed.
    """
    _check_damage(damage)
    original = np.asarray(listing.convert("RGB"), dtype=np.float32)
    h, w = original.shape[:2]
    mask = listing.info.get(OBJECT_MASK_KEY)
    if not isinstance(mask, np.ndarray) or mask.shape != (h, w):
        mask = _segment_listing(original)
    ys, xs = np.nonzero(mask)
    object_size = float(max(np.ptp(xs), np.ptp(ys))) if xs.size else min(w, h) * 0.5
    size = object_size * float(rng.uniform(0.22, 0.35))
    start = _random_object_point(mask, rng, int(object_size * 0.06))
    painted = _SHAPES[damage]((h, w), start, size, rng)
    pad = max(4, int(size * float(rng.uniform(0.08, 0.15))))
    # Work in a window around the damage: the editor re-renders only there.
    ys, xs = np.nonzero(painted > 0.005)
    if ys.size == 0:
        return listing.convert("RGB").copy(), (0, 0, 0, 0)
    margin = 3 * pad + 8
    wx0, wy0 = max(0, int(xs.min()) - margin), max(0, int(ys.min()) - margin)
    wx1, wy1 = min(w, int(xs.max()) + margin + 1), min(h, int(ys.max()) + margin + 1)
    before = original[wy0:wy1, wx0:wx1]
    on_object = cv2.GaussianBlur(mask[wy0:wy1, wx0:wx1].astype(np.float32), (0, 0), 1.5)
    shape = painted[wy0:wy1, wx0:wx1] * on_object
    m = shape[..., None]
    if damage == "crack":
        lip = np.roll(shape, 2, axis=1)[..., None] * (1 - m) * 0.3  # light catching the crack's raised edge
        edited = before * (1 - 0.8 * m) + (255 - before) * lip
    elif damage == "stain":
        strength = float(rng.uniform(0.35, 0.6))
        edited = before * (1 - strength * m) + _stain_tint(rng) * strength * 0.55 * m
    elif damage == "scratch":
        edited = before + (255 - before) * 0.7 * m
    else:  # dent: the studio light's shading of a dimple, lit from the upper left
        gy, gx = np.gradient(shape)
        relief = -(gx * -0.35 + gy * -0.45) * size * 0.9
        edited = before * (1 + np.clip(relief, -0.45, 0.45) * on_object)[..., None]
        shape = np.where(shape > 0.15, shape, 0)
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pad + 1, 2 * pad + 1))
    region = cv2.dilate((shape > 0.04).astype(np.uint8), disc)
    feather = cv2.GaussianBlur(region.astype(np.float32), (0, 0), pad / 3)[..., None]
    resynth = cv2.GaussianBlur(edited, (0, 0), float(rng.uniform(0.9, 1.5)))
    resynth += rng.standard_normal((*shape.shape, 1), dtype=np.float32) * 2.5 + float(rng.uniform(-4, 4))
    edited = edited * (1 - feather) + resynth * feather
    result = original.astype(np.uint8)
    result[wy0:wy1, wx0:wx1] = edited.clip(0, 255).astype(np.uint8)
    x0, y0, x1, y1 = changed_box(before, result[wy0:wy1, wx0:wx1])
    box = (x0 + wx0, y0 + wy0, x1 + wx0, y1 + wy0) if x1 > x0 else (0, 0, 0, 0)
    return Image.fromarray(result, "RGB"), box


VISIBLE_CHANGE = 16.0  # grey levels (about 6 %): a smaller change in a 3x3 neighbourhood is not seen


def changed_box(before: np.ndarray, after: np.ndarray, threshold: float = VISIBLE_CHANGE) -> Box:
    """Bounding box of pixels that visibly changed: 3x3-averaged max-channel difference over ``threshold``."""
    diff = np.abs(before.astype(np.float32) - after.astype(np.float32)).max(axis=2)
    diff = cv2.blur(diff, (3, 3))
    ys, xs = np.nonzero(diff > threshold)
    if ys.size == 0:
        return (0, 0, 0, 0)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def postprocess(img: Image.Image, box: Box, rng: np.random.Generator, *, resize: float | None = None,
                crop: float | None = None, mirror: bool = False, rotate_deg: float = 0.0, gamma: float | None = None,
                colour_gain: tuple[float, float, float] | None = None) -> tuple[Image.Image, Box]:
    """What a fraudster does to an edit before uploading it, keeping ``box`` on the changed region.

    Applied in this order: rotate (about the centre, corners filled with the border colour;
    the box becomes the bounds of its turned corners), crop (up to ``crop`` of each side,
    never through the box), mirror, resize by ``resize``, then ``gamma`` and ``colour_gain``.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if rotate_deg:
        arr = np.asarray(img.convert("RGB"))
        fill = tuple(int(v) for v in np.median(np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]]), axis=0))
        # Counter-clockwise on screen for a positive angle, about the centre, corners filled.
        turn = cv2.getRotationMatrix2D((arr.shape[1] / 2, arr.shape[0] / 2), rotate_deg, 1.0)
        img = Image.fromarray(cv2.warpAffine(arr, turn, (arr.shape[1], arr.shape[0]), flags=cv2.INTER_CUBIC,
                                             borderMode=cv2.BORDER_CONSTANT, borderValue=fill), "RGB")
        corners = np.array([[x, y, 1.0] for x in (x0, x1) for y in (y0, y1)]) @ turn.T
        x0, x1 = max(0.0, corners[:, 0].min()), min(float(img.width), corners[:, 0].max())
        y0, y1 = max(0.0, corners[:, 1].min()), min(float(img.height), corners[:, 1].max())
    if crop:
        left = min(x0, float(rng.uniform(0, crop)) * img.width)
        top = min(y0, float(rng.uniform(0, crop)) * img.height)
        right = min(img.width - x1, float(rng.uniform(0, crop)) * img.width)
        bottom = min(img.height - y1, float(rng.uniform(0, crop)) * img.height)
        left, top, right, bottom = (max(0, int(v)) for v in (left, top, right, bottom))
        img = img.crop((left, top, img.width - right, img.height - bottom))
        x0, x1, y0, y1 = x0 - left, x1 - left, y0 - top, y1 - top
    if mirror:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x0, x1 = img.width - x1, img.width - x0
    if resize and resize != 1.0:
        new_size = (max(16, round(img.width * resize)), max(16, round(img.height * resize)))
        fx, fy = new_size[0] / img.width, new_size[1] / img.height
        img = img.resize(new_size, Image.Resampling.LANCZOS if resize < 1 else Image.Resampling.BICUBIC)
        x0, x1, y0, y1 = x0 * fx, x1 * fx, y0 * fy, y1 * fy
    if gamma or colour_gain:
        levels = np.arange(256, dtype=np.float64) / 255.0
        curve = levels ** (1.0 / gamma) if gamma else levels
        gains = colour_gain or (1.0, 1.0, 1.0)
        lut: list[int] = []
        for g in gains:  # one 256-entry table per channel: Image.point applies it in one pass
            lut.extend(int(v) for v in (curve * g * 255).clip(0, 255).round())
        img = img.convert("RGB").point(lut)
    return img, (math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1))


# ---------------------------------------------------------------- files


def encode(img: Image.Image, fmt: str, quality: int = 90, exif: Image.Exif | None = None,
           xmp: bytes | None = None, text: dict[str, str] | None = None) -> bytes:
    """The image as a JPEG, PNG or WEBP file, optionally carrying EXIF, an XMP packet or PNG text chunks.

    ``text`` becomes tEXt/iTXt chunks in a PNG and the comment in a JPEG; WEBP has no place for it.
    """
    fmt = fmt.upper()
    options: dict[str, object] = {}
    if exif is not None:
        options["exif"] = exif
    buffer = io.BytesIO()
    rgb = img.convert("RGB")
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for key, value in (text or {}).items():
            if value.isascii():
                info.add_text(key, value)
            else:
                info.add_itxt(key, value)
        if xmp:
            info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8"))
        rgb.save(buffer, "PNG", pnginfo=info, **options)
    elif fmt in ("JPEG", "WEBP"):
        if xmp:
            options["xmp"] = xmp
        if text:
            if fmt == "WEBP":
                raise ValueError("WEBP files have no text chunks; use PNG (chunks) or JPEG (comment)")
            options["comment"] = "\n".join(f"{k}: {v}" for k, v in text.items())
        rgb.save(buffer, fmt, quality=quality, **options)
    else:
        raise ValueError(f"fmt must be JPEG, PNG or WEBP, got {fmt!r}")
    return buffer.getvalue()
