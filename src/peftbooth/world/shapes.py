"""A shape rule for the world's classes, with no network in it: is the object in this image a disc, a square or a
triangle, and how well does it fit that shape?

The evaluator and the judge are networks trained on drawn scenes; a sample that is a four-pointed star can still
look "box" enough to them. This rule measures the shape itself:
1. matte: how far each pixel is from the context's known background, scaled so the object's body is 1, (H, W);
2. fit: for each class, the drawn shape (scenes.shape_alpha, the renderer's own) whose area and centre match the
   matte's, refined by a small search over centre and size; score = soft IoU, sum(min) / sum(max), over the
   whole shape and over its edge band;
3. the class is the best-fitting shape; `is_class(..., cls)` asks that it is `cls`, that its edge band fits at
   FIT or better, and that the matte is convex (solidity, area over convex-hull area): every class's shape is
   convex, and a star's pushed-in sides are what make it not.
"""

from __future__ import annotations

import itertools

import numpy as np
from PIL import Image

from .scenes import CLASSES, SIZE, background, shape_alpha

FIT = 0.8  # soft IoU on the fitted shape's edge band (docs/world.md "Shapes": drawn and VAE round trips)
OFFSETS = (-1.0, -0.5, 0.0, 0.5, 1.0)  # pixels, around the matte's centre
LOW, HIGH = 0.3, 0.7  # matte ramp, as fractions of the object's distance from the background
MIN_CONTRAST = 20.0  # RGB distance; every world and family colour is at least 62 from every background colour
UPSAMPLE = 4  # solidity's sub-pixel grid
# Least solidity per class: just under the least of 60 drawn scenes of each through the world VAE (0.964, 0.953,
# 0.911; a tent's sharp top loses most to pixels). A square with its sides pushed in by 10 % measures 0.96, by 20 %
# 0.83 (docs/world.md, "Shapes").
SOLIDITY = {"ball": 0.95, "box": 0.94, "tent": 0.9}
SCALES = (0.88, 0.94, 1.0, 1.06, 1.12)  # around the size the matte's area gives


def matte(image: Image.Image, context: str) -> np.ndarray:
    """(SIZE, SIZE) in [0, 1]: distance of each pixel from the background, over the object's typical distance."""
    x = np.asarray(image.convert("RGB"), float)
    d = np.sqrt(((x - np.asarray(background(context), float)) ** 2).sum(-1))
    # objects cover >= 10 % of the image (scenes.random_scene sizes); below MIN_CONTRAST there is no object, only
    # the noise of an empty scene, which must not be stretched into one
    body = max(np.percentile(d, 97), MIN_CONTRAST)
    # a ramp from LOW to HIGH of the body's distance: a codec's faint halo and the renderer's shading both fall
    # outside it, an anti-aliased edge pixel lands in it at its coverage
    return np.clip((d / body - LOW) / (HIGH - LOW), 0.0, 1.0)


def _size_from_area(cls: str, area: float) -> float:
    """The renderer's `size` (object width) whose shape has this area in pixels (scenes._shape_mask)."""
    if cls == "ball":
        return 2 * np.sqrt(area / np.pi)
    if cls == "box":
        return np.sqrt(area) / 0.85
    return 2 * np.sqrt(area / 1.8)  # tent: base 2r, height 1.8r


def _centre_offset(cls: str, size: float) -> float:
    """How far the shape's centroid lies below the renderer's (cx, cy): only the tent's is not its centre."""
    return 0.1 * size if cls == "tent" else 0.0


def soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-6))


def edge_band(shape: np.ndarray) -> np.ndarray:
    """Pixels within about 1.5 px of a shape's edge, (H, W) bool: where a star and a square differ."""
    p = np.pad(shape, 2, mode="edge")
    blur = sum(p[i:i + SIZE, j:j + SIZE] for i in range(5) for j in range(5)) / 25  # 5 x 5 box filter
    return (blur > 0.02) & (blur < 0.98)


def fit(alpha: np.ndarray, cls: str) -> tuple[float, float]:
    """How well `cls`'s drawn shape fits the matte: (soft IoU, soft IoU on the shape's edge band only). The template
    is placed by the best soft IoU over a small search of centre and size. The whole-shape IoU tells the classes
    apart; the edge band, where the interior cannot hide it, tells a square from a star."""
    area = alpha.sum()
    if area < 4:
        return 0.0, 0.0
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5  # pixel centres
    mx, my = (alpha * xx).sum() / area, (alpha * yy).sum() / area
    size0 = _size_from_area(cls, area)
    best, shape = -1.0, None
    for dx, dy, s in itertools.product(OFFSETS, OFFSETS, SCALES):
        size = size0 * s
        t = shape_alpha(cls, mx + dx, my - _centre_offset(cls, size) + dy, size)
        score = soft_iou(alpha, t)
        if score > best:
            best, shape = score, t
    band = edge_band(shape)
    return best, soft_iou(alpha[band], shape[band])


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (N, 2) points (Andrew's monotone chain, then the shoelace formula)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0
    lower: list = []
    upper: list = []
    for p in pts:
        while len(lower) >= 2 and _cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and _cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.array(lower[:-1] + upper[:-1], float)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def solidity(alpha: np.ndarray, up: int = UPSAMPLE) -> float:
    """Area of the matte over the area of its convex hull, on the matte upsampled `up` times (bilinear) and cut at
    0.5: 1 for any convex shape, less where sides are pushed in (a star). Every class's shape is convex."""
    img = Image.fromarray((alpha * 255).astype(np.uint8)).resize((SIZE * up, SIZE * up), Image.BILINEAR)
    inside = np.asarray(img, float) >= 128
    if inside.sum() < 4 * up * up:
        return 0.0
    ys, xs = np.nonzero(inside)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])  # pixel squares
    return float(inside.sum() / max(hull_area(corners), 1e-6))


def classify(image: Image.Image, context: str) -> tuple[str, float, float]:
    """(the class whose shape fits best by soft IoU, its edge-band fit, the matte's solidity)."""
    alpha = matte(image, context)
    fits = {cls: fit(alpha, cls) for cls in CLASSES}
    cls = max(fits, key=lambda c: fits[c][0])
    return cls, fits[cls][1], solidity(alpha)


def is_class(image: Image.Image, context: str, cls: str) -> bool:
    """Does the image's object have `cls`'s shape: the best fit of the three, its edge band at FIT or better, and
    as convex as a VAE-coded drawing of it (SOLIDITY)?"""
    got, edge, solid = classify(image, context)
    return got == cls and edge >= FIT and solid >= SOLIDITY[cls]
