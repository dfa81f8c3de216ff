"""A family of subjects for the world: one DreamBooth subject per class and pattern, so learning is measured on many
subjects rather than the one ball the recipe was tuned on (issue #23, item 1).

Each subject is an object of one of the world's classes painted in a pattern of two or three colours that the
world never uses (`PALETTE`: far from every object and background colour):

* ``halves``: top half, bottom half (today's subject, the magenta-and-cyan ball, is the family's first member);
* ``stripes``: three horizontal stripes across the object;
* ``band``: a body colour with a horizontal band through the middle;
* ``dot``: a body colour with a disc in the middle.

Each has its own photo contexts (three of the world's five) and held-out contexts (the other two), rotated
through the family so that "held out" is not always the night and the road.

The family is split once, by a rule written here and nowhere else (`is_test_subject`): a subject is a test
subject when its class index plus its pattern index is odd. That gives six tuning and six test subjects, both
halves holding every class and every pattern, and the ball the recipe was tuned on lands among the tuning
subjects. Recipes, sweeps and thresholds are to be chosen on the tuning half of `split()` only; its test half
is only ever reported.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .scenes import (
    CLASSES,
    CONTEXTS,
    IDENTIFIER,
    SIZE,
    SUBJECT_COLOURS,
    SUBJECT_PHOTO_CONTEXTS,
    Scene,
    composite,
    random_scene,
    subject_mask,
)

PATTERNS = ("halves", "stripes", "band", "dot")
# Colours outside the world's palette (scenes.COLOURS) and its backgrounds: each at least MIN_DISTANCE away (RGB)
# from every one of those. magenta and cyan are today's subject's.
PALETTE = {
    "magenta": SUBJECT_COLOURS[0], "cyan": SUBJECT_COLOURS[1], "lime": (150, 240, 40), "pink": (250, 165, 200),
    "teal": (0, 140, 130), "brown": (120, 70, 20), "mint": (170, 250, 200), "olive": (110, 110, 0),
}
MIN_DISTANCE = 60.0
PATTERN_COLOURS = {"halves": 2, "stripes": 3, "band": 2, "dot": 2}
# the order colours are taken from PALETTE, so that neighbours in the family differ: pattern p of class c starts
# at offset 3 * c + p (today's ball, class 0 pattern 0, gets magenta and cyan)
_ORDER = tuple(PALETTE)


@dataclass(frozen=True)
class Subject:
    cls: str  # one of scenes.CLASSES
    pattern: str  # one of PATTERNS
    colour_names: tuple[str, ...]  # keys of PALETTE, in the pattern's order (top to bottom; body first)
    photo_contexts: tuple[str, ...]  # the contexts its DreamBooth photos show
    held_out_contexts: tuple[str, ...]  # contexts never in its photos: where generalisation is measured

    @property
    def name(self) -> str:
        return f"{self.cls}-{self.pattern}-{'-'.join(self.colour_names)}"

    @property
    def colours(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(PALETTE[c] for c in self.colour_names)

    def prompt(self, context: str | None = None, identifier: str = IDENTIFIER) -> str:
        """'a photo of a sks box on the road': the paper's template, the identifier where adjectives stand."""
        return f"a photo of a {identifier} {self.cls}" + (f" {context}" if context else "")

    def paint(self, scene: Scene, scale: int = 4) -> np.ndarray:
        return paint_pattern(self.pattern, self.colours, scene, scale)

    def draw(self, scene: Scene, scale: int = 4) -> Image.Image:
        return composite(scene, self.paint(scene, scale), scale)

    def scene(self, rng: random.Random, context: str) -> Scene:
        """A random placement of this subject in `context` (the same sizes and margins as the world's objects)."""
        s = random_scene(rng, subject=True, context=context)
        return Scene(self.cls, None, s.context, s.cx, s.cy, s.size, subject=True)


def paint_pattern(pattern: str, colours, scene: Scene, scale: int = 4) -> np.ndarray:
    """A pattern's colours (RGB tuples, in the pattern's order) over the whole canvas, (SIZE * scale, SIZE * scale,
    3), laid out around the scene's object (`scenes.composite` cuts the object out of it). The family's subjects and
    the judge's examples (any colours) are painted by this one function."""
    n = SIZE * scale
    cy, r = scene.cy * scale, scene.size * scale / 2
    rows = np.arange(n)[:, None]
    colours = [np.array(c, float) for c in colours]
    field = np.broadcast_to(colours[0], (n, n, 3)).copy()
    if pattern == "halves":  # as scenes.draw paints today's subject: split at the centre row
        field[int(round(cy)):] = colours[1]
    elif pattern == "stripes":  # three equal stripes over the object's height
        for i, edge in enumerate((cy - r / 3, cy + r / 3)):
            field[rows[:, 0] >= int(round(edge))] = colours[i + 1]
    elif pattern == "band":  # a band a third of the object's height through its middle
        band = (rows[:, 0] >= int(round(cy - r / 3))) & (rows[:, 0] < int(round(cy + r / 3)))
        field[band] = colours[1]
    elif pattern == "dot":  # a disc half the object's width at its centre
        yy, xx = np.mgrid[0:n, 0:n]
        dot = (yy - cy) ** 2 + (xx - scene.cx * scale) ** 2 <= (r / 2) ** 2
        field[dot] = colours[1]
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return field


def contexts_of(index: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(photo contexts, held-out contexts) of family member `index`: two held-out contexts rotating through the
    world's five, the other three in the photos. Member 0 keeps today's subject's ("at night", "on the road")."""
    held = tuple(CONTEXTS[(2 + 2 * index + k) % len(CONTEXTS)] for k in (0, 2))
    return tuple(c for c in CONTEXTS if c not in held), held


def family() -> list[Subject]:
    """Every subject: each class in each pattern (12), today's ball first."""
    out = []
    for c, cls in enumerate(CLASSES):
        for p, pattern in enumerate(PATTERNS):
            start = 3 * c + p
            names = tuple(_ORDER[(start + k) % len(_ORDER)] for k in range(PATTERN_COLOURS[pattern]))
            photo, held = contexts_of(len(out))
            out.append(Subject(cls, pattern, names, photo, held))
    return out


def is_test_subject(subject: Subject) -> bool:
    """The split, fixed once: class index + pattern index odd -> test subject (never tuned on)."""
    return (CLASSES.index(subject.cls) + PATTERNS.index(subject.pattern)) % 2 == 1


def split() -> tuple[list[Subject], list[Subject]]:
    """(tuning subjects, test subjects) of the family, by `is_test_subject`."""
    subjects = family()
    return [s for s in subjects if not is_test_subject(s)], [s for s in subjects if is_test_subject(s)]


def write_photos(subject: Subject, folder: str | Path, seed: int = 0, contexts: tuple[str, ...] | None = None,
                 captions: bool = True, masks: bool = True) -> list[Path]:
    """The subject's DreamBooth instance set, as `scenes.write_subject_photos` writes the ball's: one PNG per photo
    context (its photo contexts in the order of SUBJECT_PHOTO_CONTEXTS' length, cycled), a caption naming the
    context and a loss mask beside each."""
    from ..data.images import mask_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    contexts = contexts or tuple(subject.photo_contexts[i % len(subject.photo_contexts)]
                                 for i in range(len(SUBJECT_PHOTO_CONTEXTS)))
    rng = random.Random(seed)
    paths = []
    for i, context in enumerate(contexts):
        scene = subject.scene(rng, context)
        path = folder / f"{IDENTIFIER}_{subject.cls}_{i}_{context.split()[-1]}.png"
        subject.draw(scene).save(path)
        if masks:
            subject_mask(scene).save(mask_path(path))
        if captions:
            path.with_suffix(".txt").write_text(subject.prompt(context) + "\n")
        paths.append(path)
    return paths


def by_name(name: str) -> Subject:
    """The family subject called `name` (Subject.name, e.g. 'ball-halves-magenta-cyan')."""
    for s in family():
        if s.name == name:
            return s
    raise ValueError(f"no world subject {name!r}; the family: {', '.join(s.name for s in family())}")


BALL = family()[0].name  # today's subject, the magenta-and-cyan ball: the default of the world's metrics
