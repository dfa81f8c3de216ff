"""The world build's `quality` stage: samples of the world model for many prompts, judged by the evaluator and,
for their shapes, by the shape rule (shapes.py)."""

from __future__ import annotations

import random

import numpy as np

from . import configs
from .evaluator import WorldEvaluator, judge
from .scenes import CLASSES, COLOURS, CONTEXTS, prompt
from .shapes import is_class


def shape_verdicts(images: list, triples: list[tuple[str, str, str]]) -> list[bool]:
    """Per sample of (class, colour, context): does its object have that class's shape (a box a square, not a star)?"""
    return [is_class(im, ctx, cls) for im, (cls, _, ctx) in zip(images, triples)]


def per_class_rates(ok: list[bool], triples: list[tuple[str, str, str]]) -> dict:
    """{"shape_<class>": share of that class's samples that passed}, for the classes present."""
    return {f"shape_{c}": round(float(np.mean([o for o, tr in zip(ok, triples) if tr[0] == c])), 4)
            for c in CLASSES if any(tr[0] == c for tr in triples)}


def shape_rates(images: list, triples: list[tuple[str, str, str]]) -> dict:
    """Per class, the share of samples whose object has that class's shape."""
    return per_class_rates(shape_verdicts(images, triples), triples)


def quality_prompts(seed: int, n: int) -> list[tuple[str, str, str]]:
    """n (class, colour, context) triples: every combination once (75), then random ones (fewer: the first n)."""
    combos = [(c, col, ctx) for c in CLASSES for col in COLOURS for ctx in CONTEXTS]
    rng = random.Random(seed + 7)
    return (combos + [rng.choice(combos) for _ in range(max(0, n - len(combos)))])[:n]


def world_quality(pipe, net: WorldEvaluator, seed: int, n: int, steps: int = 25, guidance: float = 5.0) -> dict:
    from ..inference.sampling import sample

    triples = quality_prompts(seed, n)
    images = [sample(pipe, [prompt(*tr)], [seed + i], configs.SIZE, steps, guidance)[0][0]
              for i, tr in enumerate(triples)]
    verdict = judge(net, images)
    out = {f"{k}_match": round(float(np.mean([v == tr[i] for v, tr in zip(verdict[k], triples)])), 4)
           for i, k in enumerate(("class", "colour", "background"))}
    out["subject_rate"] = round(float(np.mean(verdict["p_subject"] > 0.5)), 4)
    out.update(shape_rates(images, triples))
    out.update(prompts=len(triples), steps=steps, guidance_scale=guidance)
    return out, images, triples
