"""The DreamBooth maths as small pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import UsageError


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


def dreambooth_loss(
    pred: torch.Tensor, target: torch.Tensor, num_instance: int, prior_loss_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, instance_loss, prior_loss) for a batch whose first `num_instance` rows are instance images.

    pred, target: (B_inst + B_class, C, h, w). loss = MSE(instance) + prior_loss_weight * MSE(class); computed
    in fp32 so a bf16/fp16 forward does not lose the small differences the MSE is made of.
    """
    instance_loss = F.mse_loss(pred[:num_instance].float(), target[:num_instance].float())
    if pred.shape[0] == num_instance:
        return instance_loss, instance_loss, None
    prior_loss = F.mse_loss(pred[num_instance:].float(), target[num_instance:].float())
    return instance_loss + prior_loss_weight * prior_loss, instance_loss, prior_loss
