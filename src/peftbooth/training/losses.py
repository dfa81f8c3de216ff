"""The DreamBooth maths as small pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config.sections import UsageError


def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict, per the model's own scheduler config.

    epsilon: the added noise. v_prediction: v = sqrt(a_t) * noise - sqrt(1 - a_t) * x0 (Salimans & Ho), which
    SD 2.x 768 models use; training those on the noise would teach them the wrong quantity.
    """
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise UsageError(f"the model's scheduler has prediction_type {prediction_type!r}; supported: epsilon, v_prediction")


def snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) per row, (N,)."""
    alpha_bar = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1 - alpha_bar)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights per row (Hang et al., 2023), (N,).

    The MSE on epsilon equals SNR x the MSE on x0; clamping that factor at gamma stops low-noise timesteps from
    dominating: w = min(SNR, gamma) / SNR. A v-prediction MSE equals (SNR + 1) x the x0 MSE: w = min(SNR, gamma) / (SNR + 1).
    """
    clamped = torch.minimum(snr_t, torch.full_like(snr_t, gamma))
    return clamped / (snr_t + 1) if prediction_type == "v_prediction" else clamped / snr_t


def offset_noise(noise: torch.Tensor, offset: torch.Tensor, strength: float) -> torch.Tensor:
    """Noise plus a per-channel constant, noise + strength * offset, offset (N, C, 1, 1) ~ N(0, 1).

    Plain noise never changes an image's mean brightness much, so models cannot learn very dark or very bright
    images; the offset lets them (Guttenberg, 2023).
    """
    return noise + strength * offset


def latent_loss_weights(masks: torch.Tensor, latent_size: tuple[int, int], unmasked_weight: float) -> torch.Tensor:
    """Per-latent-pixel loss weights of masked photos: (N, 1, H, W) masks in [0, 1] -> (N, 1, h, w).

    Each latent pixel takes the share of its H/h x W/w patch that the mask covers (an area average, since one
    latent pixel codes that patch), then the pixels outside count `unmasked_weight`:
    w = unmasked_weight + (1 - unmasked_weight) * coverage.
    """
    coverage = F.adaptive_avg_pool2d(masks.float(), latent_size)
    return unmasked_weight + (1.0 - unmasked_weight) * coverage


def _mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None,
         pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
    if weights is None and pixel_weights is None:
        return F.mse_loss(pred.float(), target.float())
    err = (pred.float() - target.float()).pow(2)  # (N, C, h, w)
    if pixel_weights is None:
        per_row = err.flatten(1).mean(1)  # (N,)
    else:  # a weighted mean per row: the loss keeps its scale whatever share of the photo the mask covers
        w = pixel_weights.expand_as(err)
        per_row = (err * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-8)
    return per_row.mean() if weights is None else (per_row * weights).mean()


def dreambooth_loss(
    pred: torch.Tensor, target: torch.Tensor, num_instance: int, prior_loss_weight: float,
    instance_weights: torch.Tensor | None = None, instance_pixel_weights: torch.Tensor | None = None,
    prior_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, instance_loss, prior_loss) for a batch whose first `num_instance` rows are instance images.

    pred, target: (B_inst + B_class, C, h, w); instance_weights: optional (B_inst,) per-row weights (Min-SNR) of
    the instance rows; instance_pixel_weights: optional (B_inst, 1, h, w) weights per latent pixel (--masked-loss,
    from latent_loss_weights). loss = weighted MSE(instance) + prior_loss_weight * MSE(class). The class (prior) rows are
    not Min-SNR weighted, as in the diffusers DreamBooth scripts: --prior-loss-weight keeps its meaning with Min-SNR
    on; prior_weights (B_class,) are SD3's per-sigma weights, which its reference script applies to both halves.
    Computed in fp32 so a bf16/fp16 forward does not lose the small differences the MSE is made of.
    """
    instance_loss = _mse(pred[:num_instance], target[:num_instance], instance_weights, instance_pixel_weights)
    if pred.shape[0] == num_instance:
        return instance_loss, instance_loss, None
    prior_loss = _mse(pred[num_instance:], target[num_instance:], prior_weights)
    return instance_loss + prior_loss_weight * prior_loss, instance_loss, prior_loss
