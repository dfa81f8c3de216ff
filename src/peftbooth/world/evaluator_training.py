"""The world build's `evaluator` stage: training the WorldEvaluator on scenes, the subject and look-alikes (half of
them through the VAE, some blurred or noisy), and its held-out accuracy per head."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from .evaluator import HEADS, WorldEvaluator
from .scenes import CLASSES, COLOURS, CONTEXTS, SUBJECT_COLOURS, draw, random_scene, to_array
from .training import cosine_lr, log


def evaluator_example(rng: random.Random) -> tuple:
    """(image, labels): -1 marks a head that does not apply (a look-alike has no world colour)."""
    kind = rng.random()
    if kind < 0.55:  # an ordinary scene
        s = random_scene(rng)
        return draw(s), (CLASSES.index(s.cls), list(COLOURS).index(s.colour), CONTEXTS.index(s.context), 0)
    if kind < 0.8:  # the subject, in every context
        s = random_scene(rng, subject=True)
        return draw(s), (CLASSES.index("ball"), -1, CONTEXTS.index(s.context), 1)
    s = random_scene(rng)  # a look-alike: two halves in other colours, or one of the subject's colours only
    palette = list(COLOURS.values()) + list(SUBJECT_COLOURS)
    top, bottom = rng.sample(palette, 2)
    if (top, bottom) == SUBJECT_COLOURS:
        top = rng.choice(list(COLOURS.values()))
    if rng.random() < 0.3:
        bottom = top = rng.choice(SUBJECT_COLOURS)
    return draw(s, paint=(top, bottom)), (CLASSES.index(s.cls), -1, CONTEXTS.index(s.context), 0)


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-k ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, 1, 5).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), k, groups=3)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), k.transpose(2, 3), groups=3)


def round_trip(vae, x: torch.Tensor) -> torch.Tensor:
    """What the world model can draw is what its VAE can decode: x (N, 3, 32, 32) in [-1, 1] through the VAE."""
    with torch.no_grad():
        return torch.cat([vae.decode(vae.encode(x[i:i + 500]).latent_dist.mean).sample.clamp(-1, 1)
                          for i in range(0, len(x), 500)])


def training_batch(x_all: torch.Tensor, x_vae: torch.Tensor, batch: int, step: int, g: torch.Generator):
    """(indices, images) of one batch as the model draws them: each image its VAE round trip half the time, every
    other batch blurred, and light noise on all."""
    idx = torch.randint(0, len(x_all), (batch,), generator=g)
    through_vae = torch.rand(batch, 1, 1, 1, generator=g) < 0.5
    x = torch.where(through_vae, x_vae[idx], x_all[idx])
    if step % 2:
        x = blur(x, 0.4 + 0.8 * torch.rand(1, generator=g).item())
    x = (x + 0.05 * torch.rand(batch, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return idx, x


def train_evaluator(vae, seed: int, steps: int, batch: int, pool_size: int) -> WorldEvaluator:
    torch.manual_seed(seed + 4)
    rng = random.Random(seed + 4)
    pool = [evaluator_example(rng) for _ in range(pool_size)]
    x_all = torch.from_numpy(to_array([p[0] for p in pool]))
    y_all = torch.tensor([p[1] for p in pool])
    x_vae = round_trip(vae, x_all)
    net = WorldEvaluator()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed + 5)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, 2e-3)
        idx, x = training_batch(x_all, x_vae, batch, step, g)
        y = y_all[idx]
        logits, _ = net(x)
        loss = sum(F.cross_entropy(logits[k], y[:, i], ignore_index=-1) for i, k in enumerate(HEADS))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"evaluator step {step}/{steps} loss {loss.item():.4f}")
    return net.eval().requires_grad_(False)


def evaluator_accuracy(net: WorldEvaluator, vae, seed: int, n: int = 2000) -> dict:
    """Held-out accuracy per head, on clean images and on their VAE reconstructions."""
    rng = random.Random(seed + 6)
    pool = [evaluator_example(rng) for _ in range(n)]
    images = [p[0] for p in pool]
    x = torch.from_numpy(to_array(images))
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    out = {}
    for name, batch in (("clean", x), ("vae", rec)):
        logits, _ = net(batch)
        for i, k in enumerate(HEADS):
            y = torch.tensor([p[1][i] for p in pool])
            keep = y >= 0
            out[f"{name}_{k}"] = round((logits[k].argmax(-1)[keep] == y[keep]).float().mean().item(), 4)
    return out
