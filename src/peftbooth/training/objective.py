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

from ..config.sections import UsageError
from ..models.components import T5Conditioning, added_conditioning, encode_text
from . import flow
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
    # SD3 flow matching (training/flow.py): --weighting-scheme, --logit-mean, --logit-std, --mode-scale
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = True

    @classmethod
    def from_config(cls, cfg) -> "ObjectiveSettings":
        t = cfg.train
        return cls(cfg.data.prior_loss_weight, t.snr_gamma, t.noise_offset or 0.0, t.channels_last,
                   cfg.data.unmasked_weight, t.weighting_scheme, t.logit_mean, t.logit_std, t.mode_scale,
                   t.precondition_outputs)


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


def call_denoiser(model, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                  added: dict | None) -> torch.Tensor:
    """The denoiser's prediction (N, C, h, w): a UNet takes (sample, timestep, context, added_cond_kwargs); SD3's
    transformer takes the pooled text embedding as `pooled_projections` (added = {"pooled_projections": ...})."""
    if added is not None and "pooled_projections" in added:
        return model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=context,
                     pooled_projections=added["pooled_projections"]).sample
    return model(noisy, timesteps, context, added_cond_kwargs=added).sample


def rows_of(added: dict | None, start: int) -> dict | None:
    """The added conditioning of rows start.. (each value (N, ...))."""
    return None if added is None else {k: v[start:] for k, v in added.items()}


def with_prior_target(target: torch.Tensor, num_instance: int, prior_target, noisy: torch.Tensor,
                      timesteps: torch.Tensor, context: torch.Tensor, added: dict | None) -> torch.Tensor:
    """`target` with its class rows replaced by `prior_target`'s prediction for them (--prior-mode
    base-prediction: the base model's own output, adapters off, on the same noisy input and class prompt)."""
    if prior_target is None or target.shape[0] == num_instance:
        return target
    n = num_instance
    with torch.no_grad():
        base = prior_target(noisy[n:], timesteps[n:], context[n:], rows_of(added, n))
    return torch.cat([target[:n], base.to(target.dtype)])


def training_loss(unet, noise_scheduler, mean: torch.Tensor, std: torch.Tensor, context: torch.Tensor,
                  added: dict | None, generators: list[torch.Generator], num_instance: int, latent_scale: float,
                  settings: ObjectiveSettings, loss_masks: torch.Tensor | None = None,
                  prior_target=None) -> LossParts:
    """The loss of one encoded micro-batch whose first `num_instance` rows are instance images.

    unet(noisy (N, 4, h, w), timesteps (N,), context (N, 77, D), added_cond_kwargs=added).sample -> (N, 4, h, w);
    mean, std: the VAE posterior (N, 4, h, w), unscaled; added: SDXL's pooled embedding and time ids, else None;
    loss_masks (--masked-loss): the instance rows' (num_instance, 1, H, W) pixel masks; prior_target: None, or
    (noisy, timesteps, context, added) of the class rows -> the prediction they are trained towards instead of the
    noise (--prior-mode base-prediction).
    """
    s = settings
    latents, noise, timesteps = draw(mean, std, generators, noise_scheduler.config.num_train_timesteps,
                                     latent_scale, s.noise_offset)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if s.channels_last:
        noisy_latents = noisy_latents.contiguous(memory_format=torch.channels_last)  # same values, NHWC strides
    pred = call_denoiser(unet, noisy_latents, timesteps, context, added)
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    target = with_prior_target(target, num_instance, prior_target, noisy_latents, timesteps, context, added)
    weights = None
    if s.snr_gamma is not None:  # Min-SNR on the instance rows (B,); the class rows keep weight 1
        instance_t = timesteps[:num_instance]
        weights = min_snr_weights(snr(noise_scheduler, instance_t), s.snr_gamma,
                                  noise_scheduler.config.prediction_type)
    pixel_weights = None
    if loss_masks is not None:  # (num_instance, 1, h, w): the background counts s.unmasked_weight
        pixel_weights = latent_loss_weights(loss_masks.to(pred.device), tuple(pred.shape[-2:]), s.unmasked_weight)
    return LossParts(*dreambooth_loss(pred, target, num_instance, s.prior_loss_weight, weights, pixel_weights))


def flow_sigma_table(noise_scheduler) -> torch.Tensor:
    """The (T,) training sigmas of a flow-matching scheduler's config (its shift kept)."""
    c = noise_scheduler.config
    if getattr(c, "use_dynamic_shifting", False):
        raise UsageError("the model's scheduler uses dynamic shifting (a Flux-style schedule); only SD3's fixed "
                         "shift is supported")
    return flow.shifted_sigmas(c.num_train_timesteps, float(c.shift))


def draw_flow(mean: torch.Tensor, std: torch.Tensor, generators: list[torch.Generator], sigma_table: torch.Tensor,
              latent_scale: float, latent_shift: float, s: ObjectiveSettings
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents, noise, sigmas) of a flow-matching batch: mean, std (N, 16, h, w) -> (N, 16, h, w) twice, (N,).

    Each row's generator draws, in this order: the latent sample's eps, the noise, u, the offset. SD3's latents
    are shifted, then scaled: (z - shift_factor) * scaling_factor.
    """
    device = mean.device
    eps = torch.stack([torch.randn(mean.shape[1:], generator=g, device=device) for g in generators]).to(mean.dtype)
    latents = (mean + std * eps - latent_shift) * latent_scale
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g, device=device) for g in generators])
    noise = noise.to(latents.dtype)
    u = torch.cat([flow.density_sample(s.weighting_scheme, g, device, s.logit_mean, s.logit_std, s.mode_scale)
                   for g in generators])
    if s.noise_offset:
        offset = torch.stack([torch.randn(latents.shape[1], 1, 1, generator=g, device=device) for g in generators])
        noise = offset_noise(noise, offset.to(noise.dtype), s.noise_offset)  # offset (N, 16, 1, 1)
    return latents, noise, flow.sigmas_of(u, sigma_table)


def flow_matching_loss(transformer, noise_scheduler, mean: torch.Tensor, std: torch.Tensor, context: torch.Tensor,
                       added: dict, generators: list[torch.Generator], num_instance: int, latent_scale: float,
                       latent_shift: float, settings: ObjectiveSettings,
                       loss_masks: torch.Tensor | None = None, prior_target=None) -> LossParts:
    """SD3's loss of one encoded micro-batch whose first `num_instance` rows are instance images.

    transformer(hidden_states (N, 16, h, w), timestep sigma * T (N,), encoder_hidden_states (N, 77 + S, W),
    pooled_projections (N, P)).sample -> (N, 16, h, w). Each row is weighted by --weighting-scheme's weight of its
    sigma, instance and class rows alike, as the reference script weights them. prior_target: as training_loss's
    (the base model's velocity, preconditioned as the prediction is).
    """
    s = settings
    table = flow_sigma_table(noise_scheduler)
    latents, noise, sigmas = draw_flow(mean, std, generators, table, latent_scale, latent_shift, s)
    noisy = flow.noisy_latents(latents, noise, sigmas)
    timesteps = sigmas * noise_scheduler.config.num_train_timesteps  # the scheduler's timestep of each sigma
    timesteps = timesteps.to(noisy.dtype)
    pred = call_denoiser(transformer, noisy, timesteps, context, added)
    velocity = flow.flow_target(latents, noise, False)  # noise - x0; class rows: the base model's (base-prediction)
    velocity = with_prior_target(velocity, num_instance, prior_target, noisy, timesteps, context, added)
    if s.precondition_outputs:  # compare estimates of x0, x_t - sigma * v, of the prediction and of the target
        pred, target = flow.preconditioned(pred, noisy, sigmas), flow.preconditioned(velocity, noisy, sigmas)
    else:
        target = velocity
    weights = flow.loss_weights(s.weighting_scheme, sigmas)
    if s.weighting_scheme not in ("sigma_sqrt", "cosmap"):
        weights = None  # all ones: the plain mean, bit for bit
    pixel_weights = None
    if loss_masks is not None:
        pixel_weights = latent_loss_weights(loss_masks.to(pred.device), tuple(pred.shape[-2:]), s.unmasked_weight)
    instance_w = None if weights is None else weights[:num_instance]
    prior_w = None if weights is None else weights[num_instance:]
    return LossParts(*dreambooth_loss(pred, target, num_instance, s.prior_loss_weight, instance_w, pixel_weights,
                                      prior_w))


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
                       train_text_encoder: bool, family: str, t5: T5Conditioning | None = None
                       ) -> tuple[torch.Tensor, dict | None]:
    """(context (N, L, D), the denoiser's added conditioning or None) of each row's own prompt.

    From the text cache when the text encoders are frozen and cached, else through the encoders (with gradients
    when they are trained; SD3's T5 never has any). SDXL adds the pooled embedding and each row's (N, 6) crop
    micro-conditioning, kept beside its latents in the latent cache or in the batch; SD3 adds the pooled
    embeddings of both CLIPs as the transformer's pooled_projections.
    """
    if text_cache is not None:
        context, pooled = text_cache.lookup(batch["prompts"])
    else:
        with torch.set_grad_enabled(train_text_encoder):
            context, pooled = encode_text(text_encoders, [ids.to(device) for ids in batch["input_ids"]], t5)
    if family == "sd3":
        return context, {"pooled_projections": pooled}
    if family != "sdxl":
        return context, None
    time_ids = latent_cache.crop_time_ids(batch["keys"]) if latent_cache is not None else batch["time_ids"]
    return context, added_conditioning(pooled, time_ids)
