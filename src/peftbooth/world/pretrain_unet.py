"""The world build's `unet` stage: the UNet and the CLIP text encoder, built from the seed and trained jointly on
the scene data set (Min-SNR-5, EMA weights, captions re-drawn each step, some left empty for CFG)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..training.losses import min_snr_weights, snr
from . import configs
from .training import cosine_lr, log


def build_text_and_unet(seed: int):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed + 2)
    return CLIPTextModel(CLIPTextConfig(**configs.text_config())), UNet2DConditionModel(**configs.unet_config())


def ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            ema[k].mul_(decay).add_(v, alpha=1 - decay)


def train_unet(data: dict, vae, seed: int, steps: int, batch: int, lr: float, p_empty: float):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**configs.scheduler_config())
    text_encoder, unet = build_text_and_unet(seed)
    scale = vae.config.scaling_factor
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema_unet = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_text = {k: v.detach().clone() for k, v in text_encoder.state_dict().items()}
    mean, std = torch.from_numpy(data["mean"]), torch.from_numpy(data["std"])
    ids, empty = torch.from_numpy(data["ids"]).long(), torch.from_numpy(data["empty_ids"]).long()
    g = torch.Generator().manual_seed(seed + 3)
    t0, running = time.perf_counter(), 0.0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr)
        idx = torch.randint(0, len(mean), (batch,), generator=g)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale  # (B, 4, 8, 8)
        variant = torch.randint(0, 4, (batch,), generator=g)
        input_ids = ids[idx, variant]  # (B, 16)
        drop = torch.rand(batch, generator=g) < p_empty  # empty captions: the unconditional model for CFG
        input_ids[drop] = empty
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        noisy = sched.add_noise(latents, noise, t)
        context = text_encoder(input_ids)[0]  # (B, 16, 64)
        pred = unet(noisy, t, context).sample
        per_row = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (min_snr_weights(snr(sched, t), 5.0, "epsilon") * per_row).mean()  # Min-SNR-5
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        running = 0.98 * running + 0.02 * per_row.mean().item() if step else per_row.mean().item()
        if step % 100 == 0 or step == steps - 1:
            rate = (time.perf_counter() - t0) / (step + 1)
            log(f"unet step {step}/{steps} loss {running:.4f} {rate:.2f} s/step, "
                f"{rate * (steps - step - 1) / 60:.0f} min left")
    unet.load_state_dict(ema_unet)
    text_encoder.load_state_dict(ema_text)
    return text_encoder.eval().requires_grad_(False), unet.eval().requires_grad_(False)
