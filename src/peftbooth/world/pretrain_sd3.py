"""The SD3 world build's training stages (`python -m peftbooth.world.build_sd3`): the 16-channel VAE and its latent
statistics, and the MMDiT transformer trained jointly with two CLIP text encoders by flow matching (logit-normal
sigmas, the velocity target, EMA weights, captions re-drawn each step, some left empty for CFG).

The SD world's stages are reused where they fit: its scenes, general pictures, data set of captions / token ids /
VAE posteriors (scene_dataset), its log and learning-rate schedule (training), its EMA update (pretrain_unet), and
peftbooth's own conditioning (models.components.encode_text) and flow-matching maths (training.flow), so the model
is pretrained on exactly the conditioning `peftbooth train` gives it.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.components import T5Conditioning, encode_text
from ..training.flow import flow_target, noisy_latents, shifted_sigmas, sigmas_of
from . import configs_sd3
from .pretrain_unet import ema_update
from .scenes import draw, general_image, random_scene, to_array
from .training import cosine_lr, log

SD_WORLD_VAE = Path(__file__).parent / "model" / "vae"


def init_vae_from_world(vae, world_vae_dir: Path = SD_WORLD_VAE) -> int:
    """Start the 16-channel VAE from the SD world's 4-channel one: every weight of the same shape is copied (all
    but the encoder's last conv and the decoder's first, which the channel count changes). Returns how many."""
    from diffusers import AutoencoderKL

    world = AutoencoderKL.from_pretrained(str(world_vae_dir)).float().state_dict()
    own = vae.state_dict()
    copied = {k: v for k, v in world.items() if k in own and own[k].shape == v.shape}
    own.update(copied)
    vae.load_state_dict(own)
    return len(copied)


def train_vae_sd3(seed: int, steps: int, batch: int, pool_size: int, lr: float = 1e-3):
    """The VAE of the SD world's recipe (half world scenes, half general pictures; MSE + 1e-6 KL), at 16 latent
    channels, started from the SD world's VAE."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = AutoencoderKL(**configs_sd3.vae_config())
    n = init_vae_from_world(vae)
    log(f"vae: {n} tensors from the SD world's VAE")
    pool = [draw(random_scene(rng)) if i % 2 == 0 else general_image(rng) for i in range(pool_size)]
    data = torch.from_numpy(to_array(pool))
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=min(100, steps // 5 + 1))
        x = data[torch.randint(0, len(data), (batch,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean()
        loss = F.mse_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            rate = (time.perf_counter() - t0) / (step + 1)
            log(f"vae step {step}/{steps} mse {F.mse_loss(rec, x).item():.4f} kl {kl.item():.1f} {rate:.2f} s/step")
    return vae.eval().requires_grad_(False)


def set_latent_stats(vae, means: torch.Tensor) -> dict:
    """SD3's convention, measured on the data: shift_factor is the latents' mean, scaling_factor makes
    (z - shift_factor) * scaling_factor unit-variance. `means`: posterior means (N, 16, h, w)."""
    shift = float(means.mean())
    scale = float(1.0 / (means - shift).std())
    vae.register_to_config(shift_factor=round(shift, 6), scaling_factor=round(scale, 6))
    return {"shift_factor": vae.config.shift_factor, "scaling_factor": vae.config.scaling_factor}


def build_text_and_transformer(seed: int):
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed + 2)
    te1 = CLIPTextModelWithProjection(CLIPTextConfig(**configs_sd3.text_config(1)))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs_sd3.text_config(2)))
    return te1, te2, SD3Transformer2DModel(**configs_sd3.transformer_config())


def conditioning(te1, te2, input_ids: torch.Tensor):
    """(context, pooled) as peftbooth conditions an SD3 model without T5 (both CLIPs get the same ids: they share
    the tokenizer): zeros of T5_ROWS rows stand for T5."""
    t5 = T5Conditioning(None, 2 * configs_sd3.TEXT_WIDTH, configs_sd3.T5_ROWS)
    return encode_text([te1, te2], [input_ids, input_ids], t5)


def train_transformer(data: dict, vae, seed: int, steps: int, batch: int, lr: float, p_empty: float,
                      ema_max: float, deadline: float | None = None):
    """Flow matching: x_t = (1 - sigma) x0 + sigma eps with sigma from the shifted table at a logit-normal u, the
    transformer's output compared with the velocity eps - x0 (unweighted: the density is the weighting).
    `deadline` (time.time()): stop early there, the cosine schedule's end moved to that step (recorded)."""
    te1, te2, transformer = build_text_and_transformer(seed)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    table = shifted_sigmas(1000, configs_sd3.SHIFT)
    modules = (transformer, te1, te2)
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    emas = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]
    mean, std = torch.from_numpy(data["mean"]), torch.from_numpy(data["std"])
    ids, empty = torch.from_numpy(data["ids"]).long(), torch.from_numpy(data["empty_ids"]).long()
    g = torch.Generator().manual_seed(seed + 3)
    t0, running, done = time.perf_counter(), 0.0, steps
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr)
        idx = torch.randint(0, len(mean), (batch,), generator=g)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g) - shift) * scale  # (B,16,8,8)
        variant = torch.randint(0, 4, (batch,), generator=g)
        input_ids = ids[idx, variant]
        drop = torch.rand(batch, generator=g) < p_empty  # empty captions: the unconditional model for CFG
        input_ids[drop] = empty
        noise = torch.randn(latents.shape, generator=g)
        u = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal(0, 1), as training.flow's default
        sigmas = sigmas_of(u, table)
        noisy = noisy_latents(latents, noise, sigmas)
        context, pooled = conditioning(te1, te2, input_ids)
        pred = transformer(hidden_states=noisy, encoder_hidden_states=context, pooled_projections=pooled,
                           timestep=sigmas * 1000).sample
        per_row = F.mse_loss(pred, flow_target(latents, noise, False), reduction="none").mean(dim=(1, 2, 3))
        loss = per_row.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_max, (1 + step) / (10 + step))
        for ema, m in zip(emas, modules):
            ema_update(ema, m, decay)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 50 == 0 or step == steps - 1:
            rate = (time.perf_counter() - t0) / (step + 1)
            log(f"transformer step {step}/{steps} loss {running:.4f} {rate:.2f} s/step, "
                f"{rate * (steps - step - 1) / 60:.0f} min left")
        if deadline is not None and time.time() > deadline:
            done = step + 1
            log(f"transformer: deadline reached after {done} steps")
            break
    for ema, m in zip(emas, modules):
        m.load_state_dict(ema)
        m.eval().requires_grad_(False)
    return te1, te2, transformer, {"steps_done": done, "final_loss": round(running, 5)}
