"""Synthetic "phone photos" of a few built-in objects, so the demo and tests have concept images
without shipping downloaded ones. The same (concept, n, size, seed) gives the same pixels every time."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class SampleConcept:
    """One object that every image of the concept shows: what it is (``class_word``, the word a
    residual is trained against), how it is drawn (``shape``), its colours and its body pattern."""

    concept_id: str
    class_word: str
    shape: str  # a key of SHAPES
    body: RGB
    accent: RGB  # the pattern's colour (the duck's wing)
    detail: RGB  # teapot lid knob, mug rim, vase lip, duck beak
    pattern: str  # a key of PATTERNS

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"concept '{self.concept_id}': unknown shape '{self.shape}'; valid: {', '.join(SHAPES)}")
        if self.pattern not in PATTERNS:
            raise ValueError(
                f"concept '{self.concept_id}': unknown pattern '{self.pattern}'; valid: {', '.join(PATTERNS)}"
            )


# Shapes draw in unit coordinates (0..1 across the object's square canvas, y down, resting at y≈0.93)
# scaled by `u`. `obj` paints the object; `body` is the mask the pattern may cover, so parts in front
# of the body (a lid, a rim) erase it again.
Drawer = Callable[[ImageDraw.ImageDraw, ImageDraw.ImageDraw, float, SampleConcept], None]


def _scaled(u: float, *coords: float) -> list[float]:
    return [c * u for c in coords]


def _tone(colour: RGB, factor: float) -> RGB:
    r, g, b = (min(255, round(c * factor)) for c in colour)
    return r, g, b


def _draw_teapot(obj: ImageDraw.ImageDraw, body: ImageDraw.ImageDraw, u: float, c: SampleConcept) -> None:
    obj.ellipse(_scaled(u, 0.05, 0.43, 0.37, 0.81), outline=_tone(c.body, 0.85), width=round(0.06 * u))
    spout = [
        (0.70, 0.58), (0.80, 0.53), (0.88, 0.40), (0.90, 0.36), (0.97, 0.38), (0.93, 0.44), (0.86, 0.62), (0.72, 0.80)
    ]
    obj.polygon([(x * u, y * u) for x, y in spout], fill=c.body)
    obj.ellipse(_scaled(u, 0.19, 0.35, 0.81, 0.93), fill=c.body)
    body.ellipse(_scaled(u, 0.19, 0.35, 0.81, 0.93), fill=255)
    lid = _scaled(u, 0.33, 0.27, 0.67, 0.42)
    obj.ellipse(lid, fill=_tone(c.body, 1.1), outline=_tone(c.body, 0.7), width=max(1, round(0.012 * u)))
    body.ellipse(lid, fill=0)
    obj.ellipse(_scaled(u, 0.455, 0.19, 0.545, 0.30), fill=c.detail)


def _draw_mug(obj: ImageDraw.ImageDraw, body: ImageDraw.ImageDraw, u: float, c: SampleConcept) -> None:
    obj.ellipse(_scaled(u, 0.58, 0.33, 0.90, 0.75), outline=c.body, width=round(0.08 * u))
    # A cylinder seen slightly from above: straight sides, elliptic base and rim.
    side, base = _scaled(u, 0.16, 0.20, 0.72, 0.85), _scaled(u, 0.16, 0.78, 0.72, 0.92)
    for draw, fill in ((obj, c.body), (body, 255)):
        draw.rectangle(side, fill=fill)
        draw.ellipse(base, fill=fill)
    rim = _scaled(u, 0.16, 0.13, 0.72, 0.27)
    obj.ellipse(rim, fill=c.detail)
    body.ellipse(rim, fill=0)
    obj.ellipse(_scaled(u, 0.185, 0.15, 0.695, 0.25), fill=_tone(c.body, 0.3))


def _vase_half_width(t: np.ndarray) -> np.ndarray:
    # A narrow neck, a round belly low down, and a flared lip: two bumps on a base width.
    return 0.085 + 0.22 * np.exp(-(((t - 0.6) / 0.28) ** 2)) + 0.05 * np.exp(-((t / 0.05) ** 2))


def _draw_vase(obj: ImageDraw.ImageDraw, body: ImageDraw.ImageDraw, u: float, c: SampleConcept) -> None:
    top, bottom = 0.08, 0.92
    t = np.linspace(0.0, 1.0, 48)
    w = _vase_half_width(t)
    y = top + t * (bottom - top)
    left = [((0.5 - wi) * u, yi * u) for wi, yi in zip(w, y)]
    outline = left + [(u - x, yi) for x, yi in reversed(left)]
    base = _scaled(u, 0.5 - w[-1], bottom - 0.03, 0.5 + w[-1], bottom + 0.03)
    for draw, fill in ((obj, c.body), (body, 255)):
        draw.polygon(outline, fill=fill)
        draw.ellipse(base, fill=fill)
    lip = _scaled(u, 0.5 - w[0], top - 0.03, 0.5 + w[0], top + 0.03)
    obj.ellipse(lip, fill=c.detail)
    body.ellipse(lip, fill=0)
    obj.ellipse(_scaled(u, 0.5 - 0.7 * w[0], top - 0.018, 0.5 + 0.7 * w[0], top + 0.018), fill=_tone(c.body, 0.25))


def _draw_duck(obj: ImageDraw.ImageDraw, body: ImageDraw.ImageDraw, u: float, c: SampleConcept) -> None:
    obj.polygon([(0.04 * u, 0.46 * u), (0.26 * u, 0.60 * u), (0.16 * u, 0.74 * u)], fill=c.body)
    for part in (_scaled(u, 0.08, 0.50, 0.86, 0.94), _scaled(u, 0.44, 0.12, 0.80, 0.58)):
        obj.ellipse(part, fill=c.body)
        body.ellipse(part, fill=255)
    obj.ellipse(_scaled(u, 0.22, 0.62, 0.58, 0.80), fill=c.accent)
    obj.ellipse(_scaled(u, 0.72, 0.38, 0.91, 0.46), fill=_tone(c.detail, 0.85))
    obj.ellipse(_scaled(u, 0.71, 0.32, 0.95, 0.42), fill=c.detail)
    obj.ellipse(_scaled(u, 0.61, 0.24, 0.685, 0.32), fill=(20, 20, 20))
    obj.ellipse(_scaled(u, 0.635, 0.255, 0.66, 0.28), fill=(250, 250, 250))


# Patterns paint 255 where the accent colour goes; they are clipped to the shape's body mask.
def _stripes(mask: ImageDraw.ImageDraw, u: float) -> None:
    for y in (0.50, 0.64, 0.78):
        mask.rectangle(_scaled(u, 0.0, y, 1.0, y + 0.05), fill=255)


def _dots(mask: ImageDraw.ImageDraw, u: float) -> None:
    r, step = 0.035, 0.12
    for row, y in enumerate(np.arange(0.34, 0.92, step)):
        for x in np.arange(0.06 + (row % 2) * step / 2, 1.0, step):
            mask.ellipse(_scaled(u, x - r, y - r, x + r, y + r), fill=255)


def _zigzag(mask: ImageDraw.ImageDraw, u: float) -> None:
    points = [(x * u, (0.62 + (0.05 if i % 2 else -0.05)) * u) for i, x in enumerate(np.arange(0.0, 1.06, 0.06))]
    mask.line(points, fill=255, width=round(0.035 * u), joint="curve")
    for y in (0.48, 0.75):
        mask.rectangle(_scaled(u, 0.0, y, 1.0, y + 0.022), fill=255)


SHAPES: dict[str, Drawer] = {"teapot": _draw_teapot, "mug": _draw_mug, "vase": _draw_vase, "duck": _draw_duck}
PATTERNS: dict[str, Callable[[ImageDraw.ImageDraw, float], None] | None] = {
    "stripes": _stripes,
    "dots": _dots,
    "zigzag": _zigzag,
    "none": None,
}

SAMPLE_CONCEPTS: dict[str, SampleConcept] = {
    c.concept_id: c
    for c in (
        SampleConcept("red-teapot", "teapot", "teapot", (196, 38, 34), (246, 232, 205), (222, 178, 72), "stripes"),
        SampleConcept("blue-mug", "mug", "mug", (36, 84, 186), (244, 244, 238), (236, 236, 230), "dots"),
        SampleConcept("green-vase", "vase", "vase", (34, 132, 78), (228, 186, 64), (228, 186, 64), "zigzag"),
        SampleConcept("yellow-duck", "toy", "duck", (250, 206, 36), (232, 160, 18), (240, 110, 20), "none"),
    )
}

# Backgrounds are kept low in saturation so the object's colours are what a photo set has in common.
WALLS: tuple[RGB, ...] = (
    (236, 232, 224), (200, 194, 186), (180, 186, 192), (190, 200, 210), (222, 210, 188), (92, 98, 106)
)
TABLES: tuple[RGB, ...] = ((196, 170, 136), (118, 94, 76), (232, 232, 228), (150, 150, 152), (214, 204, 186))
SCALE_RANGE = (0.6, 0.9)  # the object's extent as a fraction of the frame
MAX_ROTATION_DEG = 8.0


def _rng(concept_id: str, seed: int, index: int) -> np.random.Generator:
    # sha256 rather than hash(): Python salts str hashes per process. Each image gets its own stream,
    # so image i is the same whatever n is.
    digest = hashlib.sha256(f"{concept_id}\0{seed}".encode()).digest()
    return np.random.default_rng([int.from_bytes(digest[:8], "little"), index])


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Noise of `shape` cells stretched to `size` (w, h): soft blotches, or streaks when one side is thin."""
    cells = Image.fromarray(rng.standard_normal(shape).astype(np.float32), mode="F")
    return np.asarray(cells.resize(size, Image.Resampling.BICUBIC))


def _object_layer(c: SampleConcept, u: int, rng: np.random.Generator) -> Image.Image:
    """The object on a transparent u×u canvas, patterned and shaded, light from a random upper point."""
    obj = Image.new("RGBA", (u, u), (0, 0, 0, 0))
    body = Image.new("L", (u, u), 0)
    SHAPES[c.shape](ImageDraw.Draw(obj), ImageDraw.Draw(body), u, c)
    pattern = PATTERNS[c.pattern]
    if pattern is not None:
        marks = Image.new("L", (u, u), 0)
        pattern(ImageDraw.Draw(marks), u)
        obj.paste(c.accent + (255,), mask=Image.fromarray(np.minimum(np.asarray(marks), np.asarray(body))))

    rgba = np.asarray(obj).astype(np.float32)
    yy, xx = np.mgrid[0:u, 0:u].astype(np.float32) / u
    lx, ly = rng.uniform(0.3, 0.45), rng.uniform(0.25, 0.42)
    dist = np.hypot(xx - lx, yy - ly)
    shade = (1.12 - 0.6 * np.clip(dist / 0.8, 0.0, 1.0) ** 1.5) * (1.0 - 0.12 * yy)
    # Darken toward the silhouette so flat fills read as rounded surfaces.
    soft_alpha = np.asarray(obj.getchannel("A").filter(ImageFilter.GaussianBlur(0.035 * u)), dtype=np.float32) / 255
    shade *= 0.7 + 0.3 * np.clip(2 * soft_alpha - 0.6, 0.0, 1.0)
    gloss = rng.uniform(60, 110) * np.exp(-((dist / 0.07) ** 2))
    rgba[..., :3] = rgba[..., :3] * shade[..., None] + gloss[..., None]
    return Image.fromarray(np.clip(rgba, 0, 255).astype(np.uint8), mode="RGBA")


def _background(rng: np.random.Generator, s: int, horizon: float) -> np.ndarray:
    """An s×s float RGB scene: a studio sweep, or a wall meeting a table (wood or plain) at `horizon`."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    wall = np.array(WALLS[rng.integers(len(WALLS))], np.float32) * rng.uniform(0.9, 1.05)
    blotches = _smooth_noise(rng, (6, 6), (s, s))[..., None] * rng.uniform(2, 7)
    kind = rng.integers(3)
    if kind == 0:
        r2 = (xx - 0.5) ** 2 + (yy - 0.6) ** 2
        return wall * (1.08 - 0.5 * r2)[..., None] + blotches
    scene = wall * (0.92 + 0.1 * yy)[..., None] + blotches
    table = np.array(TABLES[rng.integers(len(TABLES))], np.float32) * rng.uniform(0.9, 1.05)
    grain = 0.0
    if kind == 2:  # wood: long horizontal streaks
        grain = _smooth_noise(rng, (s // 6, 3), (s, s))[..., None] * 9
    surface = table * (0.85 + 0.25 * np.clip((yy - horizon) / (1 - horizon + 1e-6), 0, 1))[..., None] + grain
    below = (yy >= horizon)[..., None]
    return np.where(below, surface, scene)


def _render(c: SampleConcept, size: int, rng: np.random.Generator) -> Image.Image:
    s = 2 * size  # drawn at twice the size and downsampled: PIL's ImageDraw does not antialias
    u = round(rng.uniform(*SCALE_RANGE) * s)
    obj = _object_layer(c, u, rng)
    if rng.random() < 0.5:
        obj = ImageOps.mirror(obj)
    obj = obj.rotate(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG), Image.Resampling.BICUBIC, expand=True)
    w, h = obj.size
    slack = 0.9 * (s - u) / 2
    x0 = round((s - w) / 2 + rng.uniform(-slack, slack))
    y0 = round((s - h) / 2 + rng.uniform(-slack, slack))
    left, _, right, bottom = obj.getchannel("A").getbbox()
    base_y, centre_x = y0 + bottom, x0 + (left + right) / 2

    horizon = float(np.clip((base_y - rng.uniform(0.15, 0.4) * u) / s, 0.12, 0.9))
    scene = _background(rng, s, horizon)
    shadow = Image.new("L", (s, s), 0)
    half_w, offset = 0.42 * (right - left), rng.uniform(-0.08, 0.08) * u
    ImageDraw.Draw(shadow).ellipse(
        [centre_x + offset - half_w, base_y - 0.07 * u, centre_x + offset + half_w, base_y + 0.03 * u], fill=255
    )
    shadow = np.asarray(shadow.filter(ImageFilter.GaussianBlur(0.035 * u)), dtype=np.float32)[..., None] / 255
    scene *= 1.0 - rng.uniform(0.35, 0.55) * shadow

    photo = Image.fromarray(np.clip(scene, 0, 255).astype(np.uint8), mode="RGB")
    photo.paste(obj, (x0, y0), obj)
    photo = photo.resize((size, size), Image.Resampling.LANCZOS)

    # What changes between phone shots of the same thing: exposure, white balance, vignette, sensor noise.
    pixels = np.asarray(photo, dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    vignette = 1.0 - rng.uniform(0.0, 0.35) * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    tint = 1.0 + rng.uniform(-0.04, 0.04) * np.array([1.0, 0.0, -1.0], np.float32)
    pixels = pixels * (rng.uniform(0.82, 1.12) * vignette)[..., None] * tint
    pixels += rng.normal(0.0, rng.uniform(1.5, 5.0), pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


def _concept(concept_id: str) -> SampleConcept:
    try:
        return SAMPLE_CONCEPTS[concept_id]
    except KeyError:
        raise ValueError(
            f"unknown sample concept '{concept_id}'; valid ids: {', '.join(sorted(SAMPLE_CONCEPTS))}"
        ) from None


def concept_images(concept_id: str, n: int = 5, size: int = 256, seed: int = 0) -> list[Image.Image]:
    """`n` varied size×size RGB photos of the one object `concept_id` names (a key of SAMPLE_CONCEPTS).

    Background, placement, scale, tilt, mirroring, lighting and noise vary per image; the object does not.
    Image i depends only on (concept_id, seed, i), so a smaller n gives a prefix of a larger one.
    """
    concept = _concept(concept_id)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    return [_render(concept, size, _rng(concept_id, seed, i)) for i in range(n)]


def concept_jpegs(concept_id: str, n: int = 5, size: int = 256, seed: int = 0, quality: int = 90) -> list[bytes]:
    """The images of `concept_images` encoded as JPEG files, as a user's upload would arrive."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    encoded = []
    for image in concept_images(concept_id, n, size, seed):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        encoded.append(buffer.getvalue())
    return encoded


def write_concept_images(concept_id: str, folder: str | Path, n: int = 5, size: int = 256, seed: int = 0) -> list[Path]:
    """Write the JPEGs as `<folder>/<concept_id>-<i>.jpg` (i from 0), creating `folder`; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(concept_jpegs(concept_id, n, size, seed)):
        path = folder / f"{concept_id}-{i}.jpg"
        path.write_bytes(data)
        paths.append(path)
    return paths
