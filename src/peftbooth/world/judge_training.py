"""The world build's `judge` stage: training the SubjectJudge on subjects of random colours and patterns, their
look-alikes and ordinary scenes (half of them through the world VAE, some blurred or noisy), and its calibration.

A positive is the described subject drawn in a context; a negative is one thing changed: another class, another
pattern, one colour replaced, the colours in another order, one colour only, an ordinary world object, or nothing
at all. So the judge learns that a subject is its class *and* pattern *and* colours, in that order.
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from .evaluator_training import round_trip, training_batch
from .judge import Description, SubjectJudge, description_vector
from .scenes import BACKGROUNDS, CLASSES, CONTEXTS, background, composite, draw, random_scene, to_array
from .subjects import PATTERN_COLOURS, PATTERNS, paint_pattern
from .training import cosine_lr, log

NEGATIVES = ("class", "pattern", "colour", "order", "plain", "world", "empty")  # one change each, see above
MIN_APART = 80.0  # RGB distance between a subject's colours, and between a colour and its replacement
MIN_FROM_BACKGROUND = 60.0  # a colour this close to the context's background is not a visible subject


def _far(c, others, d: float) -> bool:
    return all(np.linalg.norm(np.subtract(c, o)) >= d for o in others)


def random_colour(rng: random.Random, avoid, d: float = MIN_APART) -> tuple[int, int, int]:
    while True:
        c = tuple(rng.randint(0, 255) for _ in range(3))
        if _far(c, avoid, d):
            return c


def random_description(rng: random.Random, context: str) -> Description:
    """A subject of random class, pattern and colours, each colour visible on `context`'s background."""
    pattern = rng.choice(PATTERNS)
    colours: list = []
    for _ in range(PATTERN_COLOURS[pattern]):
        colours.append(_visible_colour(rng, colours, context))
    return Description(rng.choice(CLASSES), pattern, tuple(colours))


def _visible_colour(rng, taken, context):
    while True:
        c = random_colour(rng, taken)
        if _far(c, BACKGROUNDS[context], MIN_FROM_BACKGROUND):
            return c


JITTER = 8.0  # RGB units: each colour perturbed a little, as a model's samples do
CAST = 0.3  # the world model tints a subject towards its context's background (pink on grass comes out peach)


def render(d: Description, rng: random.Random, context: str):
    """The described subject at a random place in `context`, its colours as a model draws them: blended towards the
    background by up to CAST (one share for the whole image) and jittered by JITTER. Look-alikes are rendered the
    same way, so that neither tint nor jitter tells the judge anything."""
    s = random_scene(rng, context=context)
    s = replace(s, cls=d.cls, colour=None, subject=True)
    cast = rng.uniform(0.0, CAST)
    bg = np.mean(BACKGROUNDS[context], axis=0)  # (3,) the gradient's mean colour
    colours = [tuple(np.clip((1 - cast) * np.asarray(c, float) + cast * bg
                             + [rng.gauss(0, JITTER) for _ in range(3)], 0, 255)) for c in d.colours]
    return composite(s, paint_pattern(d.pattern, colours, s), 4)


def look_alike(d: Description, kind: str, rng: random.Random, context: str):
    """An image that is not the described subject: `kind` (one of NEGATIVES) says what is changed."""
    if kind == "class":
        return render(replace(d, cls=rng.choice([c for c in CLASSES if c != d.cls])), rng, context)
    if kind == "pattern":
        other = rng.choice([p for p in PATTERNS if p != d.pattern])
        colours = list(d.colours[:PATTERN_COLOURS[other]])
        while len(colours) < PATTERN_COLOURS[other]:
            colours.append(_visible_colour(rng, colours, context))
        return render(Description(d.cls, other, tuple(colours)), rng, context)
    if kind == "colour":
        colours = list(d.colours)
        k = rng.randrange(len(colours))
        colours[k] = _visible_colour(rng, colours, context)  # at least MIN_APART from every colour it had
        return render(replace(d, colours=tuple(colours)), rng, context)
    if kind == "order":
        colours = list(d.colours)
        while tuple(colours) == d.colours:
            rng.shuffle(colours)
        return render(replace(d, colours=tuple(colours)), rng, context)
    if kind == "plain":
        c = rng.choice(d.colours)
        return render(Description(d.cls, "halves", (c, c)), rng, context)
    if kind == "world":
        return draw(random_scene(rng, context=context))
    if kind == "empty":
        return background(context)
    raise ValueError(f"unknown look-alike {kind!r}")


def judge_example(rng: random.Random, d: Description | None = None, kind: str | None = None):
    """(image, description, label 1/0, kind): the subject (kind "subject") half the time, else a look-alike."""
    context = rng.choice(CONTEXTS)
    if d is None:
        d = random_description(rng, context)
    elif not all(_far(c, BACKGROUNDS[context], MIN_FROM_BACKGROUND) for c in d.colours):
        context = next(c for c in CONTEXTS if all(_far(x, BACKGROUNDS[c], MIN_FROM_BACKGROUND) for x in d.colours))
    kind = kind or ("subject" if rng.random() < 0.5 else rng.choice(NEGATIVES))
    if kind == "subject":
        return render(d, rng, context), d, 1, kind
    return look_alike(d, kind, rng, context), d, 0, kind


def train_judge(vae, seed: int, steps: int, batch: int, pool_size: int) -> SubjectJudge:
    torch.manual_seed(seed + 7)
    rng = random.Random(seed + 7)
    pool = [judge_example(rng) for _ in range(pool_size)]
    x_all = torch.from_numpy(to_array([p[0] for p in pool]))
    d_all = torch.stack([description_vector(p[1]) for p in pool])
    y_all = torch.tensor([float(p[2]) for p in pool])
    x_vae = round_trip(vae, x_all)
    log(f"judge pool of {pool_size} made")
    net = SubjectJudge()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed + 8)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, 2e-3)
        idx, x = training_batch(x_all, x_vae, batch, step, g)
        loss = F.binary_cross_entropy_with_logits(net(x, d_all[idx]), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"judge step {step}/{steps} loss {loss.item():.4f}")
    return net.eval().requires_grad_(False)


def rates(p: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> dict:
    """Recall (share of the subject's images called the subject) and false-positive rate (share of the others)."""
    yes = p > threshold
    return {"recall": round(float(yes[y == 1].mean()), 4) if (y == 1).any() else None,
            "false_positive_rate": round(float(yes[y == 0].mean()), 4) if (y == 0).any() else None,
            "n": int(len(y))}


@torch.no_grad()
def judge_calibration(net: SubjectJudge, vae, seed: int, n: int = 2000, subjects=()) -> dict:
    """Recall and false-positive rate on drawn images and on their VAE round trips: new random subjects (a seed the
    training pool never used), each look-alike kind apart, and each given family subject (positives and every kind of
    look-alike, equally many)."""
    rng = random.Random(seed + 9)
    cases = {"random": [judge_example(rng) for _ in range(n)]}
    for s in subjects:
        d = Description(s.cls, s.pattern, tuple(s.colours))
        kinds = ["subject"] * len(NEGATIVES) + list(NEGATIVES)
        cases[s.name] = [judge_example(rng, d, kinds[i % len(kinds)]) for i in range(max(28, n // 20))]
    out = {}
    for name, pool in cases.items():
        x = torch.from_numpy(to_array([p[0] for p in pool]))
        d = torch.stack([description_vector(p[1]) for p in pool])
        y = np.array([p[2] for p in pool])
        kinds = np.array([p[3] for p in pool])
        for variant, xs in (("drawn", x), ("vae", round_trip(vae, x))):
            p = torch.sigmoid(net(xs, d)).numpy()
            row = rates(p, y)
            if name == "random":
                row["false_positive_rate_by_kind"] = {k: round(float((p[kinds == k] > 0.5).mean()), 4)
                                                      for k in NEGATIVES if (kinds == k).any()}  # tiny pools
            out[f"{name}/{variant}"] = row
    return out
