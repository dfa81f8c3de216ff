"""The world build's `dataset` stage: world scenes (never the subject), their caption variants as token ids and
their VAE posteriors, and the safetensors file that keeps them in --work-dir."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .scenes import draw, prompt, random_scene, to_array
from .tokenizer import MAX_LENGTH
from .training import log


def caption_variants(scene) -> list[str]:
    """The four captions of a scene: with and without the colour, with and without the context."""
    return [prompt(scene.cls, colour, context) for colour in (scene.colour, None) for context in (scene.context, None)]


def build_dataset(vae, tokenizer, seed: int, n: int) -> dict[str, np.ndarray]:
    rng = random.Random(seed + 1)
    scenes = [random_scene(rng) for _ in range(n)]
    texts = [c for s in scenes for c in caption_variants(s)] + [""]
    ids = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="np").input_ids
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, n, 500):
            dist = vae.encode(torch.from_numpy(to_array([draw(s) for s in scenes[i:i + 500]]))).latent_dist
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
