"""Build the world model and its evaluator from a seed: `python -m peftbooth.world.build --out DIR`.

Stages, each kept in --work-dir so that a stopped build goes on from the last finished stage (same seed, same
result; the CPU run is deterministic with one thread):
  vae        AutoencoderKL on world scenes and general pictures (a codec beyond the world's palette)
  dataset    world scenes (never the subject) and their VAE posteriors
  unet       UNet + CLIP text encoder trained jointly (Min-SNR, EMA), captions re-drawn each time
  evaluator  the WorldEvaluator on scenes, subjects and look-alikes, half of them through the VAE
  quality    samples for many prompts judged by the evaluator; a grid for docs/
  write      the diffusers folder (fp16 weights), evaluator.safetensors and build.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..losses import min_snr_weights, snr
from ..rundir import atomic_dir, write_text
from . import configs
from .evaluator import HEADS, WorldEvaluator, judge, load_evaluator, save_evaluator
from .scenes import (BACKGROUNDS, CLASSES, COLOURS, CONTEXTS, SUBJECT_COLOURS, draw, general_image, prompt,
                     random_scene, to_array, vocabulary)
from .tokenizer import MAX_LENGTH, write_tokenizer

DEFAULTS = dict(vae_steps=800, vae_batch=32, vae_pool=6000, scenes=40000, unet_steps=3000, unet_batch=128, unet_lr=1e-3,
                evaluator_steps=1200, evaluator_batch=128, evaluator_pool=8000, quality_prompts=150, quality_steps=25,
                quality_guidance=5.0, p_empty=0.1)


def log(msg: str) -> None:
    print(f"[world {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cosine_lr(step: int, total: int, base: float, warmup: int = 100, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------------------------
# VAE


def train_vae(seed: int, steps: int, batch: int, pool_size: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = AutoencoderKL(**configs.vae_config())
    pool = [draw(random_scene(rng)) if i % 2 == 0 else general_image(rng) for i in range(pool_size)]
    data = torch.from_numpy(to_array(pool))  # (pool_size, 3, 32, 32): half world scenes, half general pictures
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, 1e-3)
        x = data[torch.randint(0, len(data), (batch,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean()
        loss = F.mse_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} mse {F.mse_loss(rec, x).item():.4f} kl {kl.item():.1f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # SD's convention: latents scaled to unit standard deviation
        z = vae.encode(data[:1024]).latent_dist.mean  # (1024, 4, 8, 8)
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return vae


def vae_mse(vae, images: list) -> float:
    x = torch.from_numpy(to_array(images))
    with torch.no_grad():
        return F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1), x).item()


# ---------------------------------------------------------------------------------------------------------------
# data set: scenes, their caption variants (token ids) and VAE posteriors


def caption_variants(scene) -> list[str]:
    """The four captions of a scene: with and without the colour, with and without the context."""
    return [prompt(scene.cls, colour, context) for colour in (scene.colour, None) for context in (scene.context, None)]


def build_dataset(vae, tokenizer, seed: int, n: int) -> dict[str, np.ndarray]:
    rng = random.Random(seed + 1)
    scenes = [random_scene(rng) for _ in range(n)]
    texts = [c for s in scenes for c in caption_variants(s)] + [""]
    ids = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="np").input_ids
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, n, 500):
            dist = vae.encode(torch.from_numpy(to_array([draw(s) for s in scenes[i:i + 500]]))).latent_dist
            means.append(dist.mean.numpy())
            stds.append(dist.std.numpy())
            if i % 10000 == 0:
                log(f"dataset {i}/{n}")
    return {"mean": np.concatenate(means), "std": np.concatenate(stds),
            "ids": ids[:-1].reshape(n, 4, MAX_LENGTH), "empty_ids": ids[-1]}


# ---------------------------------------------------------------------------------------------------------------
# UNet + text encoder


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


# ---------------------------------------------------------------------------------------------------------------
# evaluator


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


def train_evaluator(vae, seed: int, steps: int, batch: int, pool_size: int) -> WorldEvaluator:
    torch.manual_seed(seed + 4)
    rng = random.Random(seed + 4)
    pool = [evaluator_example(rng) for _ in range(pool_size)]
    x_all = torch.from_numpy(to_array([p[0] for p in pool]))
    y_all = torch.tensor([p[1] for p in pool])
    with torch.no_grad():  # what the world model can draw is what its VAE can decode
        x_vae = torch.cat([vae.decode(vae.encode(x_all[i:i + 500]).latent_dist.mean).sample.clamp(-1, 1)
                           for i in range(0, len(x_all), 500)])
    net = WorldEvaluator()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed + 5)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, 2e-3)
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        through_vae = torch.rand(batch, 1, 1, 1, generator=g) < 0.5
        x = torch.where(through_vae, x_vae[idx], x_all[idx])
        if step % 2:
            x = blur(x, 0.4 + 0.8 * torch.rand(1, generator=g).item())
        x = (x + 0.05 * torch.rand(batch, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)).clamp(-1, 1)
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


# ---------------------------------------------------------------------------------------------------------------
# quality of the world model


def quality_prompts(seed: int, n: int) -> list[tuple[str, str, str]]:
    """n (class, colour, context) triples: every combination once (75), then random ones (fewer: the first n)."""
    combos = [(c, col, ctx) for c in CLASSES for col in COLOURS for ctx in CONTEXTS]
    rng = random.Random(seed + 7)
    return (combos + [rng.choice(combos) for _ in range(max(0, n - len(combos)))])[:n]


def world_quality(pipe, net: WorldEvaluator, seed: int, n: int, steps: int = 25, guidance: float = 5.0) -> dict:
    from ..sampling import sample

    triples = quality_prompts(seed, n)
    images = [sample(pipe, [prompt(*tr)], [seed + i], configs.SIZE, steps, guidance)[0][0]
              for i, tr in enumerate(triples)]
    verdict = judge(net, images)
    out = {f"{k}_match": round(float(np.mean([v == tr[i] for v, tr in zip(verdict[k], triples)])), 4)
           for i, k in enumerate(("class", "colour", "background"))}
    out["subject_rate"] = round(float(np.mean(verdict["p_subject"] > 0.5)), 4)
    out.update(prompts=len(triples), steps=steps, guidance_scale=guidance)
    return out, images, triples


# ---------------------------------------------------------------------------------------------------------------
# writing


def assemble_pipeline(tokenizer, text_encoder, unet, vae):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDPMScheduler(**configs.scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def write_model(pipe, tok_dir: Path, out: Path) -> None:
    """The diffusers folder. The UNet and VAE are stored as fp16 (diffusers loads them back as fp32); the text
    encoder (0.6 MB) stays fp32, since transformers loads a checkpoint in its stored dtype."""
    with atomic_dir(out) as tmp:
        pipe.unet.half()
        pipe.vae.half()
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        pipe.unet.float()
        pipe.vae.float()
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(tok_dir / name, tmp / "tokenizer" / name)


def save_tensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: torch.as_tensor(v).contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m peftbooth.world.build", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "model"), help="the world model folder to write")
    p.add_argument("--work-dir", default=".world-build", help="stage results, for a build that was stopped")
    p.add_argument("--seed", type=int, default=configs.BUILD_SEED)
    p.add_argument("--grid", default="docs/world-samples.png", help="where the sample grid goes")
    p.add_argument("--only", choices=("evaluator",), help="run this stage alone (beside a build that is running: "
                   "it needs the finished VAE in --work-dir)")
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # deterministic, and the fastest setting on a shared 2-core machine
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    import sys

    given = sys.argv[1:] if argv is None else argv
    record = {"command": " ".join(["python -m peftbooth.world.build", *given]), "seed": a.seed,
              "settings": {k: getattr(a, k) for k in DEFAULTS}, "seconds": {}}
    start = time.perf_counter()

    def stage(name, made: bool = True):
        """Record a stage's time; one loaded from --work-dir reports the time it took when it was made there."""
        seconds = round(time.perf_counter() - stage.t, 1)
        kept = work / f"{name}.seconds"
        if made or not kept.exists():
            kept.write_text(f"{seconds}\n")
        record["seconds"][name] = float(kept.read_text())
        stage.t = time.perf_counter()
        log(f"stage {name} done in {seconds:.0f} s")
    stage.t = start

    tok_dir = work / "tokenizer"
    tokenizer = write_tokenizer(tok_dir, vocabulary())
    from diffusers import AutoencoderKL

    made = not (work / "vae" / "config.json").exists()
    if not made:
        vae = AutoencoderKL.from_pretrained(str(work / "vae")).eval().requires_grad_(False)
    else:
        vae = train_vae(a.seed, a.vae_steps, a.vae_batch, a.vae_pool)
        vae.save_pretrained(str(work / "vae"))
    rng = random.Random(a.seed + 99)
    record["vae_mse"] = {"world": round(vae_mse(vae, [draw(random_scene(rng)) for _ in range(256)]), 5),
                         "general": round(vae_mse(vae, [general_image(rng) for _ in range(256)]), 5),
                         "subject": round(vae_mse(vae, [draw(random_scene(rng, subject=True)) for _ in range(256)]), 5)}
    record["vae_scaling_factor"] = vae.config.scaling_factor
    log(f"vae reconstruction mse {record['vae_mse']}")
    stage("vae", made)

    if a.only == "evaluator":
        stage.t = time.perf_counter()
        save_evaluator(train_evaluator(vae, a.seed, a.evaluator_steps, a.evaluator_batch, a.evaluator_pool),
                       work / "evaluator")
        stage("evaluator")
        return 0

    data_file = work / "dataset.safetensors"
    made = not data_file.exists()
    if not made:
        data = {k: v.numpy() for k, v in load_tensors(data_file).items()}
    else:
        data = build_dataset(vae, tokenizer, a.seed, a.scenes)
        save_tensors(data_file, data)
    stage("dataset", made)

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    made = not (work / "unet" / "config.json").exists()
    if not made:
        unet = UNet2DConditionModel.from_pretrained(str(work / "unet")).eval().requires_grad_(False)
        text_encoder = CLIPTextModel.from_pretrained(str(work / "text_encoder"), dtype=torch.float32)
        text_encoder.eval().requires_grad_(False)
    else:
        text_encoder, unet = train_unet(data, vae, a.seed, a.unet_steps, a.unet_batch, a.unet_lr, a.p_empty)
        unet.save_pretrained(str(work / "unet"))
        text_encoder.save_pretrained(str(work / "text_encoder"))
    stage("unet", made)

    made = not (work / "evaluator" / "evaluator.safetensors").exists()
    if not made:
        net = load_evaluator(work / "evaluator")
    else:
        net = train_evaluator(vae, a.seed, a.evaluator_steps, a.evaluator_batch, a.evaluator_pool)
        save_evaluator(net, work / "evaluator")
    net.half().float()  # stored as fp16: measure what ships
    record["evaluator_accuracy"] = evaluator_accuracy(net, vae, a.seed, n=min(2000, a.evaluator_pool))
    log(f"evaluator accuracy {record['evaluator_accuracy']}")
    stage("evaluator", made)

    from ..sampling import in_memory_pipeline
    from ..models import Components
    from diffusers import DDPMScheduler

    pipe = assemble_pipeline(tokenizer, text_encoder, unet, vae)
    comps = Components(tokenizer, DDPMScheduler(**configs.scheduler_config()), vae, unet, text_encoder, "world")
    quality, images, triples = world_quality(in_memory_pipeline(comps), net, a.seed, a.quality_prompts,
                                             a.quality_steps, a.quality_guidance)
    record["quality"] = quality
    log(f"world model quality {quality}")
    if a.grid:
        from ..sampling import grid

        rows = [r for r in (images[i * 15:(i + 1) * 15] for i in range(5)) if r]
        Path(a.grid).parent.mkdir(parents=True, exist_ok=True)
        g = grid(rows)
        g.resize((g.width * 3, g.height * 3), 0).save(a.grid)
        record["grid_prompts"] = [prompt(*t) for t in triples[:75]]
    stage("quality")

    out = Path(a.out)
    write_model(pipe, tok_dir, out)
    save_evaluator(net, out)
    # every stage's own time (those loaded from --work-dir: when they were made there), and this invocation's
    record["total_seconds"] = round(sum(record["seconds"].values()), 1)
    record["invocation_seconds"] = round(time.perf_counter() - start, 1)
    record["configs"] = {"unet": configs.unet_config(), "vae": configs.vae_config(), "text": configs.text_config(),
                         "scheduler": configs.scheduler_config(), "vocabulary": vocabulary()}
    write_text(out / "build.json", json.dumps(record, indent=1, default=list) + "\n")
    log(f"wrote {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
