"""The world build's `quality` stage: samples of the world model for many prompts, judged by the evaluator."""

from __future__ import annotations

import random

import numpy as np

from . import configs
from .evaluator import WorldEvaluator, judge
from .scenes import CLASSES, COLOURS, CONTEXTS, prompt


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
    out.update(prompts=len(triples), steps=steps, guidance_scale=guidance)
    return out, images, triples
