"""The world build's `dataset` stage: world scenes (never the subject), their caption variants as token ids and
their VAE posteriors, and the safetensors file that keeps them in --work-dir."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .scenes import COLOURS, composite, draw, prompt, random_scene, to_array
from .subjects import PATTERN_COLOURS, PATTERNS, paint_pattern
from .tokenizer import MAX_LENGTH
from .training import log


def caption_variants(scene, colour: str | None = None) -> list[str]:
    """The four captions of a scene: with and without the colour (`colour`: the words of a patterned object's
    colours), with and without the context."""
    colour = colour or scene.colour
    return [prompt(scene.cls, c, context) for c in (colour, None) for context in (scene.context, None)]


def patterned(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    """A pattern of the subject family's (subjects.PATTERNS) in distinct colours of the world's own palette."""
    pattern = rng.choice(PATTERNS)
    return pattern, tuple(rng.sample(list(COLOURS), PATTERN_COLOURS[pattern]))


def draw_scenes(seed: int, n: int, p_patterned: float = 0.0) -> tuple[list, list[str]]:
    """n world scenes (never the subject) as images, and their caption variants (4 per scene). A share
    `p_patterned` of the objects is painted in a pattern of two or three world colours ('a photo of a red blue box
    on the grass': the colours top to bottom, body first), so that the model draws objects of many appearances
    in every context, as a pretrained SD has drawn striped and spotted things everywhere. A subject's own colours
    stay outside the world's palette, so no subject is ever drawn. p_patterned 0 draws what the first build drew."""
    rng = random.Random(seed + 1)
    scenes = [random_scene(rng) for _ in range(n)]
    images, texts = [], []
    for scene in scenes:
        if p_patterned and rng.random() < p_patterned:
            pattern, names = patterned(rng)
            images.append(composite(scene, paint_pattern(pattern, [COLOURS[c] for c in names], scene)))
            texts += caption_variants(scene, " ".join(names))
        else:
            images.append(draw(scene))
            texts += caption_variants(scene)
    return images, texts


def build_dataset(vae, tokenizer, seed: int, n: int, p_patterned: float = 0.0) -> dict[str, np.ndarray]:
    images, texts = draw_scenes(seed, n, p_patterned)
    texts = texts + [""]
    longest = max(len(t) for t in tokenizer(texts).input_ids)
    assert longest <= MAX_LENGTH, f"a caption of {longest} tokens would be cut to {MAX_LENGTH}"
    ids = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="np").input_ids
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, n, 500):
            dist = vae.encode(torch.from_numpy(to_array(images[i:i + 500]))).latent_dist
            means.append(dist.mean.numpy())
            stds.append(dist.std.numpy())
            if i % 10000 == 0:
                log(f"dataset {i}/{n}")
    return {"mean": np.concatenate(means), "std": np.concatenate(stds),
            "ids": ids[:-1].reshape(n, 4, MAX_LENGTH), "empty_ids": ids[-1]}


def save_tensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: torch.as_tensor(v).contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))
