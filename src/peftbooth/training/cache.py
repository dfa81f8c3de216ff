"""Work done once instead of every step: VAE posteriors of the training images and text-encoder states of prompts.

Both caches reproduce the uncached computation: the latent cache stores the VAE posterior (mean, std) rather
than one sample, and the training step draws a fresh sample from it every step, as it does from a posterior
computed on the spot; caching changes speed, not the training.
"""

from __future__ import annotations

import torch

from ..data.dataset import DreamBoothDataset, tokenize
from ..models.components import T5Conditioning, encode_text


class LatentCache:
    """(mean, std) of the VAE posterior and the SDXL time ids per dataset key ('instance' | 'class', index, flipped)."""

    def __init__(self, keys: list[tuple], mean: torch.Tensor, std: torch.Tensor, time_ids: torch.Tensor,
                 masks: dict[tuple, torch.Tensor] | None = None):
        self.index = {key: i for i, key in enumerate(keys)}
        self.mean, self.std = mean, std  # (K, 4, H/f, W/f) each, on the training device
        self.time_ids = time_ids  # (K, 6) on the CPU: the crop that made these latents (SDXL micro-conditioning)
        self.masks = masks  # --masked-loss: instance key -> (1, H, W) pixel mask, on the training device

    @classmethod
    @torch.no_grad()
    def build(cls, dataset: DreamBoothDataset, vae, device, dtype, batch_size: int = 8) -> "LatentCache":
        keys = dataset.all_keys()
        means, stds, time_ids, masks = [], [], [], {}
        for start in range(0, len(keys), batch_size):
            pixels, ids, row_masks = zip(*[dataset.sample(k) for k in keys[start : start + batch_size]])
            masks.update({k: m.to(device) for k, m in zip(keys[start:], row_masks) if m is not None})
            # a VAE kept in fp32 (SDXL's overflows in fp16) encodes in fp32; the cache holds the compute dtype
            vae_dtype = next(vae.parameters()).dtype
            dist = vae.encode(torch.stack(pixels).to(device, dtype=vae_dtype)).latent_dist
            means.append(dist.mean.to(dtype))
            stds.append(dist.std.to(dtype))
            time_ids += ids
        return cls(keys, torch.cat(means), torch.cat(stds), torch.stack(time_ids), masks or None)

    def posterior(self, keys: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (N, 4, H/f, W/f), of the images named by `keys`."""
        idx = torch.tensor([self.index[k] for k in keys], device=self.mean.device)
        return self.mean[idx], self.std[idx]

    def loss_masks(self, keys: list[tuple]) -> torch.Tensor | None:
        """(N, 1, H, W) pixel masks of the instance images named by `keys`; None without --masked-loss."""
        return None if self.masks is None else torch.stack([self.masks[k] for k in keys])

    def crop_time_ids(self, keys: list[tuple]) -> torch.Tensor:
        """(N, 6) SDXL time ids of the images named by `keys` (CPU; asked for by SDXL steps only)."""
        return self.time_ids[[self.index[k] for k in keys]]

    def __len__(self) -> int:
        return len(self.index)


class TextCache:
    """The frozen text encoders' output per distinct prompt: the context (L, D) and, for SDXL and SD3, the pooled
    embedding (P,)."""

    def __init__(self, states: dict[str, torch.Tensor], pooled: dict[str, torch.Tensor] | None = None):
        self.states, self.pooled = states, pooled

    @classmethod
    @torch.no_grad()
    def build(cls, prompts: list[str], tokenizers: list, text_encoders: list, device,
              t5: T5Conditioning | None = None) -> "TextCache":
        unique = list(dict.fromkeys(prompts))
        ids = [tokenize(tok, unique).to(device) for tok in tokenizers]
        context, pooled = encode_text(text_encoders, ids, t5)  # (P, L, D), (P, D2) or None
        return cls(dict(zip(unique, context)), None if pooled is None else dict(zip(unique, pooled)))

    def lookup(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, L, D) states and (N, P) pooled embeddings (None for SD 1.x / 2.x) for a batch's prompts, in order."""
        pooled = None if self.pooled is None else torch.stack([self.pooled[p] for p in prompts])
        return torch.stack([self.states[p] for p in prompts]), pooled
