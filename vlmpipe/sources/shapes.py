"""The procedural "shapes" world behind the offline default data.

Ten shape kinds in seven colours and two sizes, on a light or dark
background, drawn with noise (jittered position, size, rotation and colour,
a background tint and gradient, pixel noise). Two uses:

- ``shape_image``: one shape in a 32×32 image, the CIFAR-like class images
  (the class is the shape kind);
- ``random_scene``: 1–3 shapes in a ``size``×``size`` scene, each inside its
  own quadrant, with ``scene_captions`` describing it truthfully (kind,
  colour, size, quadrant and relative position).

A scene quadrant is drawn at the same scale as a 32×32 class image, so the
image tower trained on the class images sees familiar content when the
captioner feeds it the four quadrants of a scene.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = (
    "circle", "ring", "semicircle", "triangle", "square",
    "diamond", "hexagon", "bar", "star", "cross",
)
# Saturated colours far apart in RGB (min pairwise distance ~77), each clearly
# off both the light and the dark backgrounds, so the colour of the shape is
# recoverable from its pixels by nearest-palette naming.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 140, 25),
    "yellow": (235, 215, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "purple": (135, 55, 190),
    "pink": (240, 100, 170),
}
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUNDS: tuple[str, ...] = ("light", "dark")
# Quadrant index -> (column, row) and its name; reading order.
QUADRANTS: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (0, 1), (1, 1))
QUADRANT_NAMES: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")

# Radii in pixels for a 32-pixel cell (a class image or one scene quadrant).
_RADIUS = {"small": (5.5, 7.0), "large": (10.0, 12.0)}
# Centre jitter: small shapes can wander further and stay inside the cell.
_JITTER = {"small": 4.0, "large": 2.5}
_ROTATION_DEG = 12.0   # keeps square vs diamond and cross unambiguous
_COLOUR_JITTER = 15    # per channel
_PIXEL_NOISE = 5.0     # std of Gaussian pixel noise
_SUPERSAMPLE = 4       # draw at 4x and box-filter down: anti-aliased edges


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    cx: float          # centre in output pixels
    cy: float
    r: float           # radius in output pixels
    rotation: float    # degrees
    quadrant: int = -1  # index into QUADRANTS for scene shapes, -1 otherwise

    @property
    def description(self) -> str:
        return f"{self.size} {self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    image: np.ndarray   # uint8 H×W×3
    shapes: tuple[Shape, ...]  # in reading order of their quadrants
    background: str


def _outline(kind: str) -> list[tuple[float, float]] | None:
    """Polygon of a shape in unit coordinates (radius 1, y down); None for disc shapes."""
    def ring(n: int, radius: float, start_deg: float) -> list[tuple[float, float]]:
        return [(radius * math.cos(math.radians(start_deg + 360 * i / n)),
                 radius * math.sin(math.radians(start_deg + 360 * i / n))) for i in range(n)]

    if kind == "triangle":
        # Equilateral, pointing up; shifted down so its bounding box is centred.
        return [(x * 1.1, y * 1.1 + 0.27) for x, y in ring(3, 1.0, -90)]
    if kind == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if kind == "diamond":
        # Taller than wide, so it never reads as a tilted square.
        return [(0.0, -1.05), (0.72, 0.0), (0.0, 1.05), (-0.72, 0.0)]
    if kind == "hexagon":
        return ring(6, 0.98, 0)
    if kind == "bar":
        return [(-1.0, -0.33), (1.0, -0.33), (1.0, 0.33), (-1.0, 0.33)]
    if kind == "star":
        pts = []
        for i in range(10):
            radius = 1.05 if i % 2 == 0 else 0.45
            a = math.radians(-90 + 36 * i)
            pts.append((radius * math.cos(a), radius * math.sin(a) + 0.08))
        return pts
    if kind == "cross":
        w, e = 0.3, 0.95
        return [(-w, -e), (w, -e), (w, -w), (e, -w), (e, w), (w, w),
                (w, e), (-w, e), (-w, w), (-e, w), (-e, -w), (-w, -w)]
    if kind == "semicircle":
        # Flat side down, shifted so the half disc sits in the middle of its box.
        return [(math.cos(a), -math.sin(a) * 1.0 + 0.45)
                for a in np.linspace(0, math.pi, 25)]
    if kind in ("circle", "ring"):
        return None
    raise ValueError(f"unknown shape kind {kind!r}")


def shape_mask(shape: Shape, height: int, width: int) -> np.ndarray:
    """Coverage of ``shape`` per pixel, float32 in [0, 1], anti-aliased."""
    s = _SUPERSAMPLE
    # Draw only the shape's bounding box (every outline lies within 1.3 r).
    x0, y0 = max(int(shape.cx - 1.3 * shape.r), 0), max(int(shape.cy - 1.3 * shape.r), 0)
    x1 = min(int(math.ceil(shape.cx + 1.3 * shape.r)), width)
    y1 = min(int(math.ceil(shape.cy + 1.3 * shape.r)), height)
    img = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    draw = ImageDraw.Draw(img)
    cx, cy, r = (shape.cx - x0) * s, (shape.cy - y0) * s, shape.r * s
    if shape.kind in ("circle", "ring"):
        outer = 0.92 * r
        draw.ellipse((cx - outer, cy - outer, cx + outer, cy + outer), fill=255)
        if shape.kind == "ring":
            inner = 0.52 * r
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:
        t = math.radians(shape.rotation)
        c, si = math.cos(t), math.sin(t)
        pts = [(cx + r * (x * c - y * si), cy + r * (x * si + y * c)) for x, y in _outline(shape.kind)]
        draw.polygon(pts, fill=255)
    local = np.asarray(img, dtype=np.float32).reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3)) / 255.0
    mask = np.zeros((height, width), dtype=np.float32)
    mask[y0:y1, x0:x1] = local
    return mask


def _background(rng: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    level = rng.uniform(178, 230) if kind == "light" else rng.uniform(20, 62)
    tint = rng.uniform(-10, 10, size=3)
    # A gentle linear gradient in a random direction: no two backgrounds alike.
    angle = rng.uniform(0, 2 * math.pi)
    amp = rng.uniform(0, 12)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = ((xx / max(width - 1, 1) - 0.5) * math.cos(angle) + (yy / max(height - 1, 1) - 0.5) * math.sin(angle)) * amp
    return level + tint[None, None, :] + ramp[:, :, None]


def render(rng: np.random.Generator, shapes: list[Shape], background: str, height: int, width: int) -> np.ndarray:
    """Draw ``shapes`` over a noisy ``background`` ("light"/"dark"); uint8 H×W×3."""
    img = _background(rng, background, height, width)
    for sh in shapes:
        colour = np.array(COLOURS[sh.colour], dtype=np.float32) + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
        m = shape_mask(sh, height, width)[:, :, None]
        img = img * (1 - m) + colour[None, None, :] * m
    img = img + rng.normal(0, _PIXEL_NOISE, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _place(rng: np.random.Generator, kind: str, colour: str, size: str, cell: float, ox: float, oy: float, quadrant: int = -1) -> Shape:
    scale = cell / 32.0
    r = rng.uniform(*_RADIUS[size]) * scale
    j = _JITTER[size] * scale
    return Shape(
        kind=kind, colour=colour, size=size,
        cx=ox + cell / 2 + rng.uniform(-j, j), cy=oy + cell / 2 + rng.uniform(-j, j),
        r=r, rotation=float(rng.uniform(-_ROTATION_DEG, _ROTATION_DEG)), quadrant=quadrant,
    )


def shape_image(rng: np.random.Generator, kind: str) -> tuple[np.ndarray, Shape, str]:
    """One ``kind`` shape of random colour and size in a 32×32 image: (pixels, shape, background)."""
    colour = str(rng.choice(list(COLOURS)))
    size = str(rng.choice(SIZES))
    background = str(rng.choice(BACKGROUNDS))
    sh = _place(rng, kind, colour, size, 32.0, 0.0, 0.0)
    return render(rng, [sh], background, 32, 32), sh, background


def random_scene(rng: np.random.Generator, size: int = 64) -> Scene:
    """1–3 shapes of distinct kinds, each centred (with jitter) in its own quadrant."""
    n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    quadrants = sorted(rng.choice(4, size=n, replace=False).tolist())
    kinds = rng.choice(len(SHAPES), size=n, replace=False)
    cell = size / 2
    shapes = []
    for q, k in zip(quadrants, kinds):
        col, row = QUADRANTS[q]
        shapes.append(_place(rng, SHAPES[k], str(rng.choice(list(COLOURS))), str(rng.choice(SIZES)),
                             cell, col * cell, row * cell, quadrant=q))
    background = str(rng.choice(BACKGROUNDS))
    return Scene(render(rng, shapes, background, size, size), tuple(shapes), background)


# --- captions --------------------------------------------------------------------


def with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def relation(a: Shape, b: Shape) -> str:
    """Where ``a`` is relative to ``b`` (different quadrants): "above", "to the left of", ..."""
    (ac, ar), (bc, br) = QUADRANTS[a.quadrant], QUADRANTS[b.quadrant]
    vert = "above" if ar < br else "below" if ar > br else ""
    horiz = "to the left of" if ac < bc else "to the right of" if ac > bc else ""
    if vert and horiz:
        return f"{vert} and {horiz}"
    return vert or horiz


def _where(s: Shape) -> str:
    return QUADRANT_NAMES[s.quadrant]


def scene_captions(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` distinct, true paraphrases describing ``scene`` (lower case, no full stop)."""
    sh = scene.shapes
    bg = scene.background
    d = [with_article(s.description) for s in sh]
    if len(sh) == 1:
        (A,), s = d, sh[0]
        pool = [
            A,
            f"{A} on a {bg} background",
            f"{A} in the {_where(s)}",
            f"there is {A} in the {_where(s)} of the image",
            f"a picture of {A}",
            f"{with_article(s.size + ' ' + s.kind)} coloured {s.colour}",
            f"a single {s.description} on a {bg} background",
        ]
    elif len(sh) == 2:
        (A, B), (a, b) = d, sh
        pool = [
            f"{A} {relation(a, b)} {B}",
            f"{B} {relation(b, a)} {A}",
            f"two shapes: {A} and {B}",
            f"{A} in the {_where(a)} and {B} in the {_where(b)}",
            f"there are two shapes, {A} and {B}, on a {bg} background",
            f"{A} and {B}",
            f"a picture of {B} and {A}",
        ]
    else:
        (A, B, C), (a, b, c) = d, sh
        pool = [
            f"three shapes: {A}, {B} and {C}",
            f"{A}, {B} and {C} on a {bg} background",
            f"{A} in the {_where(a)}, {B} in the {_where(b)} and {C} in the {_where(c)}",
            f"{A} {relation(a, b)} {B}, and {C} in the {_where(c)}",
            f"there are three shapes: {C}, {B} and {A}",
            f"{B} {relation(b, c)} {C}, and {A} in the {_where(a)}",
            f"a picture of {A}, {B} and {C}",
        ]
    picks = rng.choice(len(pool), size=n, replace=False)
    return [pool[i] for i in sorted(picks)]
