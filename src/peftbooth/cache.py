"""Work done once instead of every step: VAE posteriors of the training images and text-encoder states of prompts.

Both caches reproduce the uncached computation: the latent cache stores the VAE posterior (mean, std) rather
than one sample, and the training step draws a fresh sample from it every step, as it does from a posterior
computed on the spot; caching changes speed, not the training.
"""

from __future__ import annotations

import torch

from .data import DreamBoothDataset, tokenize


class LatentCache:
    """(mean, std) of the VAE posterior per dataset key ('instance' | 'class', index, flipped)."""

    def __init__(self, keys: list[tuple], mean: torch.Tensor, std: torch.Tensor):
        self.index = {key: i for i, key in enumerate(keys)}
        self.mean, self.std = mean, std  # (K, 4, H/f, W/f) each, on the training device

    @classmethod
    @torch.no_grad()
    def build(cls, dataset: DreamBoothDataset, vae, device, dtype, batch_size: int = 8) -> "LatentCache":
        keys = dataset.all_keys()
        means, stds = [], []
        for start in range(0, len(keys), batch_size):
            pixels = torch.stack([dataset.pixels(k) for k in keys[start : start + batch_size]])
            dist = vae.encode(pixels.to(device, dtype=dtype)).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
        return cls(keys, torch.cat(means), torch.cat(stds))

    def posterior(self, keys: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (N, 4, H/f, W/f), of the images named by `keys`."""
        idx = torch.tensor([self.index[k] for k in keys], device=self.mean.device)
        return self.mean[idx], self.std[idx]

    def __len__(self) -> int:
        return len(self.index)


class TextCache:
    """Last hidden states (77, D) of the frozen text encoder per distinct prompt."""

    def __init__(self, states: dict[str, torch.Tensor]):
        self.states = states

    @classmethod
    @torch.no_grad()
    def build(cls, prompts: list[str], tokenizer, text_encoder, device) -> "TextCache":
        unique = list(dict.fromkeys(prompts))
        hidden = text_encoder(tokenize(tokenizer, unique).to(device))[0]  # (P, 77, D)
        return cls(dict(zip(unique, hidden)))

    def lookup(self, prompts: list[str]) -> torch.Tensor:
        """(N, 77, D) states for a batch's prompts, in order."""
        return torch.stack([self.states[p] for p in prompts])
