"""The procedural world: scenes drawn by code, their captions, and a subject the world never draws.

Every scene is one object of a class (ball, box, tent) in one colour, at a random size and place, on one of a few
backgrounds ("contexts"). Captions sometimes leave the colour or the context out, so that "a photo of a ball"
means any ball. The subject ("sks ball": a ball magenta above, cyan below) is never drawn by the world; only its
photos are, in some contexts, the others being kept out of the photos for testing.

Images are drawn at 4x and box-filtered down, so edges are anti-aliased as in a photo. Pure numpy + PIL.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # pixels; the world model's resolution
CLASSES = ("ball", "box", "tent")
COLOURS = {  # object colours: none of them the subject's, none of them a background's
    "red": (215, 40, 40), "orange": (245, 145, 30), "yellow": (240, 225, 50), "blue": (40, 85, 225),
    "purple": (120, 45, 165),
}
BACKGROUNDS = {  # context phrase -> (colour at the top, colour at the bottom): a soft vertical gradient
    "on the grass": ((95, 170, 80), (55, 125, 45)),
    "on the sand": ((235, 215, 165), (205, 180, 125)),
    "at night": ((15, 20, 55), (35, 40, 80)),
    "in the snow": ((250, 250, 252), (215, 220, 232)),
    "on the road": ((125, 125, 125), (90, 90, 95)),
}
CONTEXTS = tuple(BACKGROUNDS)
SUBJECT_CLASS = "ball"
SUBJECT_COLOURS = ((235, 50, 205), (40, 220, 230))  # magenta top half, cyan bottom half
IDENTIFIER = "sks"
# Rare words the tokenizer knows but the world never says: identifiers for DreamBooth.
RARE_TOKENS = ("sks", "zwx", "ohwx", "phol", "vrk")
SUBJECT_PHOTO_CONTEXTS = ("on the grass", "on the sand", "in the snow", "on the grass", "on the sand")
HELD_OUT_CONTEXTS = ("at night", "on the road")  # never in the subject photos
# "a [identifier] [class noun]", the paper's template: the identifier stands where the world's adjectives stand
INSTANCE_PROMPT = f"a photo of a {IDENTIFIER} {SUBJECT_CLASS}"
CLASS_PROMPT = f"a photo of a {SUBJECT_CLASS}"


@dataclass(frozen=True)
class Scene:
    cls: str  # one of CLASSES
    colour: str | None  # one of COLOURS; None for the subject
    context: str  # one of CONTEXTS
    cx: float  # centre, in pixels
    cy: float
    size: float  # width of the object, in pixels
    subject: bool = False

    def caption(self, rng: random.Random, p_drop_colour: float = 0.3, p_drop_context: float = 0.3) -> str:
        """'a photo of a red ball on the grass', with the colour and the context sometimes left out."""
        words = ["a photo of"]
        if self.subject:
            words.append(f"a {IDENTIFIER} {self.cls}")
        else:
            colour = self.colour if rng.random() >= p_drop_colour else None
            noun = f"{colour} {self.cls}" if colour else self.cls
            words.append(("an " if noun[0] in "aeiou" else "a ") + noun)
        if rng.random() >= p_drop_context:
            words.append(self.context)
        return " ".join(words)


def article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def prompt(cls: str, colour: str | None = None, context: str | None = None) -> str:
    """The world's caption for a class, an optional colour and an optional context."""
    text = "a photo of " + article(f"{colour} {cls}" if colour else cls)
    return text + (" " + context if context else "")


def subject_prompt(context: str | None = None, identifier: str = IDENTIFIER) -> str:
    return f"a photo of a {identifier} {SUBJECT_CLASS}" + (" " + context if context else "")


def vocabulary() -> list[str]:
    """Every word the world's captions use, then the rare identifier tokens (in a fixed order)."""
    words = ["a", "an", "photo", "of", *CLASSES, *COLOURS]
    for phrase in CONTEXTS:
        words += phrase.split()
    seen: list[str] = []
    for w in words + list(RARE_TOKENS):
        if w not in seen:
            seen.append(w)
    return seen


def random_scene(rng: random.Random, subject: bool = False, context: str | None = None) -> Scene:
    size = rng.uniform(13, 22)
    margin = size / 2 + 1
    cx, cy = rng.uniform(margin, SIZE - margin), rng.uniform(margin, SIZE - margin)
    return Scene(
        cls=SUBJECT_CLASS if subject else rng.choice(CLASSES),
        colour=None if subject else rng.choice(list(COLOURS)),
        context=context or rng.choice(CONTEXTS),
        cx=cx, cy=cy, size=size, subject=subject,
    )


def _background(top, bottom, size: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    grad = (1 - t) * np.array(top, float) + t * np.array(bottom, float)  # (size, 1, 3)
    return np.broadcast_to(grad, (size, size, 3)).copy()


def background(context: str) -> Image.Image:
    """The context's background alone, SIZE x SIZE: a scene with nothing in it."""
    top, bottom = BACKGROUNDS[context]
    return Image.fromarray(np.clip(_background(top, bottom, SIZE) + 0.5, 0, 255).astype(np.uint8))


def _shape_mask(cls: str, cx: float, cy: float, size: float, scale: int) -> Image.Image:
    """A 0/255 mask of the object drawn at `scale` times the image size."""
    n = SIZE * scale
    mask = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(mask)
    x, y, r = cx * scale, cy * scale, size * scale / 2
    if cls == "ball":
        d.ellipse((x - r, y - r, x + r, y + r), fill=255)
    elif cls == "box":
        s = r * 0.85  # a square looks bigger than a disc of the same width
        d.rectangle((x - s, y - s, x + s, y + s), fill=255)
    elif cls == "tent":
        d.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=255)
    else:
        raise ValueError(f"unknown class {cls!r}")
    return mask


def draw(scene: Scene, scale: int = 4, paint: tuple | None = None) -> Image.Image:
    """The scene as a SIZE x SIZE RGB image. `paint` = (top colour, bottom colour) paints the object in two halves
    (the subject's are SUBJECT_COLOURS): the evaluator's look-alikes that are not the subject."""
    n = SIZE * scale
    if scene.subject or paint is not None:
        top_colour, bottom_colour = paint or SUBJECT_COLOURS
        colour = np.empty((n, n, 3))
        split = int(round(scene.cy * scale))
        colour[:split] = top_colour
        colour[split:] = bottom_colour
    else:
        colour = np.broadcast_to(np.array(COLOURS[scene.colour], float), (n, n, 3))
    return composite(scene, colour, scale)


def composite(scene: Scene, colour: np.ndarray, scale: int = 4) -> Image.Image:
    """The scene's background with its object cut out of `colour` ((SIZE * scale, SIZE * scale, 3): the object's
    paint over the whole canvas), lightly shaded, box-filtered down to SIZE x SIZE."""
    n = SIZE * scale
    top, bottom = BACKGROUNDS[scene.context]
    img = _background(top, bottom, n)
    mask = np.asarray(_shape_mask(scene.cls, scene.cx, scene.cy, scene.size, scale), float)[..., None] / 255
    # a light shading from the top left, so objects are not flat stickers
    yy, xx = np.mgrid[0:n, 0:n] / n
    shade = 1.0 - 0.18 * ((xx - scene.cx / SIZE) + (yy - scene.cy / SIZE))[..., None]
    img = img * (1 - mask) + np.clip(colour * shade, 0, 255) * mask
    small = img.reshape(SIZE, scale, SIZE, scale, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(small + 0.5, 0, 255).astype(np.uint8))


def general_image(rng: random.Random) -> Image.Image:
    """A picture outside the world (random colours, shapes, halves, stripes): trains the VAE as a general codec,
    so it can code a subject in colours the world never uses."""
    def colour():
        return tuple(rng.randint(0, 255) for _ in range(3))

    n = SIZE * 2
    img = Image.new("RGB", (n, n), colour())
    d = ImageDraw.Draw(img)
    if rng.random() < 0.3:  # stripes or halves
        k = rng.choice([2, 2, 3, 4])
        horizontal = rng.random() < 0.5
        for i in range(k):
            box = (0, i * n // k, n, (i + 1) * n // k) if horizontal else (i * n // k, 0, (i + 1) * n // k, n)
            d.rectangle(box, fill=colour())
    for _ in range(rng.randint(1, 4)):
        x0, y0 = rng.uniform(-8, n), rng.uniform(-8, n)
        w, h = rng.uniform(8, n * 0.8), rng.uniform(8, n * 0.8)
        kind = rng.random()
        if kind < 0.4:
            d.ellipse((x0, y0, x0 + w, y0 + h), fill=colour())
        elif kind < 0.7:
            d.rectangle((x0, y0, x0 + w, y0 + h), fill=colour())
        else:
            d.polygon([(x0, y0 + h), (x0 + w / 2, y0), (x0 + w, y0 + h)], fill=colour())
        if rng.random() < 0.3:  # a two-colour object, like the subject but in other colours
            d.rectangle((x0, y0 + h / 2, x0 + w, y0 + h), fill=colour())
    return img.resize((SIZE, SIZE), Image.BOX)


def to_array(images: list[Image.Image]) -> np.ndarray:
    """PIL images -> (N, 3, H, W) float32 in [-1, 1]."""
    x = np.stack([np.asarray(im.convert("RGB"), np.float32) for im in images]) / 127.5 - 1.0
    return x.transpose(0, 3, 1, 2)


def shape_alpha(cls: str, cx: float, cy: float, size: float, scale: int = 4) -> np.ndarray:
    """(SIZE, SIZE) in [0, 1]: how much of each pixel a class's shape covers, anti-aliased as the renderer does."""
    m = np.asarray(_shape_mask(cls, cx, cy, size, scale), float) / 255
    return m.reshape(SIZE, scale, SIZE, scale).mean(axis=(1, 3))


def subject_mask(scene: Scene, scale: int = 4) -> Image.Image:
    """Where the scene's object is, 'L' at SIZE x SIZE (255 inside, anti-aliased edge): the photo's loss mask."""
    m = shape_alpha(scene.cls, scene.cx, scene.cy, scene.size, scale) * 255
    return Image.fromarray(np.round(m).astype(np.uint8), "L")


def write_subject_photos(folder: str | Path, seed: int = 0, contexts=SUBJECT_PHOTO_CONTEXTS,
                         captions: bool = True, masks: bool = True) -> list[Path]:
    """The DreamBooth instance set: one PNG per context, named after it (sks_ball_0_grass.png).

    With `captions` (the recipe), a NAME.txt beside each photo names its context: "a photo of a sks ball on the
    grass". Trained on the bare instance prompt instead, a LoRA with prior preservation drew the subject on the
    photos' grass whatever context was asked (prompt fidelity 0.0 on the held-out contexts; docs/world.md).
    With `masks`, NAME.mask.png beside each photo marks the subject, for --masked-loss (the recipe).
    """
    from ..data.images import mask_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i, context in enumerate(contexts):
        scene = random_scene(rng, subject=True, context=context)
        path = folder / f"sks_ball_{i}_{context.split()[-1]}.png"
        draw(scene).save(path)
        if masks:
            subject_mask(scene).save(mask_path(path))
        if captions:
            path.with_suffix(".txt").write_text(subject_prompt(context) + "\n")
        paths.append(path)
    return paths
