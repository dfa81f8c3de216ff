"""The DreamBooth training step as pure functions: (models, batch, per-row generators) -> loss parts.

`training_loss` is the whole step once the batch is encoded: draw each row's latent sample, noise and timestep
from that row's own generator, noise the latents, predict, compare with the target. `batch_posterior` and
`batch_conditioning` encode a batch (or look it up in the caches). Nothing here reads the run's config or state,
so a test can feed tiny modules and compare the result with a loss computed by hand (tests/test_objective.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..models.components import added_conditioning, encode_text
from .losses import diffusion_target, dreambooth_loss, latent_loss_weights, min_snr_weights, offset_noise, snr


class LossParts(NamedTuple):
    """One micro-batch's losses, each a 0-d fp32 tensor. Unpacks as (total, instance, prior)."""

    total: torch.Tensor  # instance + prior_loss_weight * prior: what is backpropagated
    instance: torch.Tensor  # MSE of the instance rows (Min-SNR weighted when --snr-gamma is set)
    prior: torch.Tensor | None  # MSE of the class rows; None without prior preservation


@dataclass(frozen=True)
class ObjectiveSettings:
    """The flags that change the maths of a step (TrainConfig's --prior-loss-weight, --snr-gamma, ...)."""

    prior_loss_weight: float = 1.0
    snr_gamma: float | None = None  # Min-SNR-gamma weights on the instance rows; None: unweighted
    noise_offset: float = 0.0  # strength of the per-channel offset added to the noise; 0: none
    channels_last: bool = False  # hand the UNet NHWC strides (same values) when its weights are channels-last
    unmasked_weight: float = 0.0  # --masked-loss: the loss weight of instance pixels outside the photo's mask

    @classmethod
    def from_config(cls, cfg) -> "ObjectiveSettings":
        t = cfg.train
        return cls(cfg.data.prior_loss_weight, t.snr_gamma, t.noise_offset or 0.0, t.channels_last,
                   cfg.data.unmasked_weight)


def row_generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    """One generator per batch row, seeded with the row's seed (see DreamBoothDataset): the same row gets the same
    latent sample, noise and timestep in any batch, on any process, before or after a resume."""
    return [torch.Generator(device).manual_seed(s) for s in seeds]


def draw(mean: torch.Tensor, std: torch.Tensor, generators: list[torch.Generator], num_train_timesteps: int,
         latent_scale: float, noise_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents, noise, timesteps) of a batch: mean, std (N, 4, h, w) -> (N, 4, h, w), (N, 4, h, w), (N,) long.

    Each row's generator draws, in this order: the latent sample's eps, the noise, the timestep, the offset.
    Latents are scaled by the VAE's scaling factor (0.18215 for SD 1.x) to roughly unit variance.
    """
    device = mean.device
    eps = torch.stack([torch.randn(mean.shape[1:], generator=g, device=device) for g in generators]).to(mean.dtype)
    latents = (mean + std * eps) * latent_scale
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g, device=device) for g in generators])
    noise = noise.to(latents.dtype)
    timesteps = torch.cat([torch.randint(0, num_train_timesteps, (1,), generator=g, device=device)
                           for g in generators]).long()
    if noise_offset:
        offset = torch.stack([torch.randn(latents.shape[1], 1, 1, generator=g, device=device) for g in generators])
        noise = offset_noise(noise, offset.to(noise.dtype), noise_offset)  # offset (N, 4, 1, 1)
    return latents, noise, timesteps


def training_loss(unet, noise_scheduler, mean: torch.Tensor, std: torch.Tensor, context: torch.Tensor,
                  added: dict | None, generators: list[torch.Generator], num_instance: int, latent_scale: float,
                  settings: ObjectiveSettings, loss_masks: torch.Tensor | None = None) -> LossParts:
    """The loss of one encoded micro-batch whose first `num_instance` rows are instance images.

    unet(noisy (N, 4, h, w), timesteps (N,), context (N, 77, D), added_cond_kwargs=added).sample -> (N, 4, h, w);
    mean, std: the VAE posterior (N, 4, h, w), unscaled; added: SDXL's pooled embedding and time ids, else None;
    loss_masks (--masked-loss): the instance rows' (num_instance, 1, H, W) pixel masks.
    """
    s = settings
    latents, noise, timesteps = draw(mean, std, generators, noise_scheduler.config.num_train_timesteps,
                                     latent_scale, s.noise_offset)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if s.channels_last:
        noisy_latents = noisy_latents.contiguous(memory_format=torch.channels_last)  # same values, NHWC strides
    pred = unet(noisy_latents, timesteps, context, added_cond_kwargs=added).sample
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    weights = None
    if s.snr_gamma is not None:  # Min-SNR on the instance rows (B,); the class rows keep weight 1
        instance_t = timesteps[:num_instance]
        weights = min_snr_weights(snr(noise_scheduler, instance_t), s.snr_gamma,
                                  noise_scheduler.config.prediction_type)
    pixel_weights = None
    if loss_masks is not None:  # (num_instance, 1, h, w): the background counts s.unmasked_weight
        pixel_weights = latent_loss_weights(loss_masks.to(pred.device), tuple(pred.shape[-2:]), s.unmasked_weight)
    return LossParts(*dreambooth_loss(pred, target, num_instance, s.prior_loss_weight, weights, pixel_weights))


# ---------------------------------------------------------------------------------------------------------------
# encoding a batch (or reading it from the caches)


def batch_posterior(batch: dict, vae, latent_cache, device: torch.device, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of each row's VAE posterior, (N, 4, h, w) in `dtype`: from the cache, else by encoding."""
    if latent_cache is not None:
        return latent_cache.posterior(batch["keys"])
    vae_dtype = next(vae.parameters()).dtype  # fp32 for SDXL's own VAE (see speed.upcast_vae)
    pixel_values = batch["pixel_values"].to(device, dtype=vae_dtype, non_blocking=True)  # (N, 3, H, W)
    with torch.no_grad():
        posterior = vae.encode(pixel_values).latent_dist
    return posterior.mean.to(dtype), posterior.std.to(dtype)


def batch_loss_masks(batch: dict, latent_cache) -> torch.Tensor | None:
    """(B_inst, 1, H, W) pixel masks of the batch's instance rows (--masked-loss), from the latent cache or the
    batch; None without masks."""
    if latent_cache is not None:
        return latent_cache.loss_masks(batch["keys"][: batch["num_instance"]])
    return batch.get("loss_masks")


def batch_conditioning(batch: dict, text_encoders: list, text_cache, latent_cache, device: torch.device,
                       train_text_encoder: bool, is_sdxl: bool) -> tuple[torch.Tensor, dict | None]:
    """(context (N, 77, D), added_cond_kwargs or None) of each row's own prompt.

    From the text cache when the text encoders are frozen and cached, else through the encoders (with gradients
    when they are trained). SDXL adds the pooled embedding and each row's (N, 6) crop micro-conditioning, kept
    beside its latents in the latent cache or in the batch.
    """
    if text_cache is not None:
        context, pooled = text_cache.lookup(batch["prompts"])
    else:
        with torch.set_grad_enabled(train_text_encoder):
            context, pooled = encode_text(text_encoders, [ids.to(device) for ids in batch["input_ids"]])
    if not is_sdxl:
        return context, None
    time_ids = latent_cache.crop_time_ids(batch["keys"]) if latent_cache is not None else batch["time_ids"]
    return context, added_conditioning(pooled, time_ids)
