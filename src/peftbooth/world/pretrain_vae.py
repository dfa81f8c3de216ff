"""The world build's `vae` stage: pretraining the AutoencoderKL on world scenes and general pictures, and the
reconstruction error the build records for it."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from . import configs
from .scenes import CONTEXTS, draw, general_image, random_scene, to_array
from .training import cosine_lr, log


def train_vae(seed: int, steps: int, batch: int, pool_size: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = AutoencoderKL(**configs.vae_config())
    pool = [draw(random_scene(rng)) if i % 2 == 0 else general_image(rng) for i in range(pool_size)]
    data = torch.from_numpy(to_array(pool))  # (pool_size, 3, 32, 32): half world scenes, half general pictures
    fit(vae, list(vae.parameters()), data, seed, steps, batch, 1e-3, "vae")
    with torch.no_grad():  # SD's convention: latents scaled to unit standard deviation
        z = vae.encode(data[:1024]).latent_dist.mean  # (1024, 4, 8, 8)
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return vae


def finetune_decoder(vae, seed: int, steps: int, batch: int, pool_size: int, lr: float = 5e-4):
    """The build's `decoder` stage (`--only decoder`): the decoder trained again with patterned objects of random
    colours in its pool, a third each with world scenes and general pictures. The first VAE never saw a pattern and
    blurred small dots and light parts on light backgrounds into the background (docs/world.md, "The world
    model"). The encoder, and so the latents the UNet was trained on, stay as they are: the UNet, the
    adapters trained on it and the latent scale keep their meaning."""
    from .judge_training import random_description, render  # the judge's renderer: any colours, tinted

    torch.manual_seed(seed + 11)
    rng = random.Random(seed + 11)
    pool = []
    for i in range(pool_size):
        if i % 3 == 0:
            pool.append(draw(random_scene(rng)))
        elif i % 3 == 1:
            pool.append(general_image(rng))
        else:  # never a family subject: random colours (the family is only for measuring)
            context = rng.choice(CONTEXTS)
            pool.append(render(random_description(rng, context), rng, context))
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    return fit(vae, params, torch.from_numpy(to_array(pool)), seed + 11, steps, batch, lr, "decoder")


def fit(vae, params: list, data: torch.Tensor, seed: int, steps: int, batch: int, lr: float, name: str):
    """The VAE's loop: reconstruction MSE of a posterior sample (data (N, 3, 32, 32) in [-1, 1]) and a tiny KL."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr)
        x = data[torch.randint(0, len(data), (batch,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean()
        loss = F.mse_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"{name} step {step}/{steps} mse {F.mse_loss(rec, x).item():.4f} kl {kl.item():.1f}")
    return vae.eval().requires_grad_(False)


def vae_mse(vae, images: list) -> float:
    x = torch.from_numpy(to_array(images))
    with torch.no_grad():
        return F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1), x).item()


def reconstruction_mse(vae, seed: int) -> dict[str, float]:
    """The build's record of a VAE: its MSE on 256 world scenes, 256 general pictures and 256 scenes with the
    subject, drawn from seed + 99."""
    rng = random.Random(seed + 99)
    return {"world": round(vae_mse(vae, [draw(random_scene(rng)) for _ in range(256)]), 5),
            "general": round(vae_mse(vae, [general_image(rng) for _ in range(256)]), 5),
            "subject": round(vae_mse(vae, [draw(random_scene(rng, subject=True)) for _ in range(256)]), 5)}
