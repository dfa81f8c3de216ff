"""SD3's rectified-flow objective as small pure functions (Esser et al. 2024, "Scaling Rectified Flow Transformers").

A training point lies on the straight line from the latents to the noise: x_t = (1 - sigma) * x0 + sigma * eps.
The transformer predicts the velocity along it, eps - x0. With preconditioning (the reference script's default)
its output v is turned into an estimate of the latents, x_t - sigma * v, and that is compared with x0.

Which sigmas are trained is the sampling density of u in (0, 1): logit-normal (the paper's choice), a 'mode'
density, or uniform; u indexes the scheduler's shifted sigma table, as diffusers' script does. 'sigma_sqrt' and
'cosmap' instead weight the loss of uniformly drawn sigmas.
"""

from __future__ import annotations

import functools
import math

import torch


def density_sample(scheme: str, generator: torch.Generator, device, logit_mean: float = 0.0, logit_std: float = 1.0,
                   mode_scale: float = 1.29) -> torch.Tensor:
    """One u in (0, 1), shape (1,), from `generator`: logit_normal: sigmoid(N(mean, std)); mode: the SD3 paper's
    mode density with scale s, u = 1 - r - s * (cos(pi r / 2)^2 - 1 + r), r uniform; anything else: uniform."""
    if scheme == "logit_normal":
        z = torch.randn(1, generator=generator, device=device) * logit_std + logit_mean
        return torch.sigmoid(z)
    r = torch.rand(1, generator=generator, device=device)
    if scheme == "mode":
        return 1 - r - mode_scale * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
    return r


@functools.lru_cache(maxsize=8)  # built once per (T, shift), not every step; callers only index it
def shifted_sigmas(num_train_timesteps: int, shift: float) -> torch.Tensor:
    """The training sigma table of FlowMatchEulerDiscreteScheduler, (T,), from 1 down to 1/T: s = (T - i) / T,
    shifted towards noise as shift * s / (1 + (shift - 1) * s) (SD3's shift is 3.0: more training at high noise,
    where composition is decided, for its larger images)."""
    s = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float64) / num_train_timesteps
    return (shift * s / (1 + (shift - 1) * s)).float()


def sigmas_of(u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """u (N,) in [0, 1] -> sigmas (N,): the table entry at index floor(u * T), as diffusers' script indexes it."""
    idx = (u * len(table)).long().clamp(0, len(table) - 1)
    return table.to(u.device)[idx]


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) * x0 + sigma * noise; x0, noise (N, C, h, w), sigmas (N,)."""
    s = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor, precondition: bool) -> torch.Tensor:
    """What the (preconditioned) output is compared with: x0, or the velocity noise - x0."""
    return x0 if precondition else noise - x0


def preconditioned(pred: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The transformer's velocity v turned into an estimate of x0: x_t - sigma * v (an exact x0 for the true v)."""
    s = sigmas.view(-1, *([1] * (pred.ndim - 1))).to(pred.dtype)
    return noisy - s * pred


def loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-row loss weights (N,): sigma_sqrt: 1 / sigma^2; cosmap: 2 / (pi (1 - 2 sigma + 2 sigma^2)); else 1."""
    s = sigmas.float()
    if scheme == "sigma_sqrt":
        return s ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * s + 2 * s ** 2))
    return torch.ones_like(s)
