"""Training throughput and peak memory: floor vs plain vs peftbooth, per adapter type, in one run.

    python benchmarks/train_throughput.py --model tiny            # CPU, a few minutes
    python benchmarks/train_throughput.py --model sd15 --resolution 512 --mixed-precision bf16   # GPU

Modes (each measured in its own worker process, one after another, so peak memory is per mode):
  floor      UNet forward + backward + optimizer step on ready-made tensors, with the same model, adapter,
             dtypes and shapes as the real run: the cost no trainer can avoid.
  plain      the naive algorithm of the widely used example scripts: VAE and text encoder every step, frozen
             weights kept in fp32 (autocast for mixed precision), no caching, no compile.
  peftbooth  peftbooth's real `setup` + `fit` with its defaults (latent and text-state caching, frozen weights
             in the compute dtype, LoHa/LoKr through their factors); `peftbooth-compile` adds --compile when
             asked (with --compile-mode); `peftbooth-channels-last` (with --channels-last) adds
             --channels-last; `peftbooth-peft-forward` (with --peft-forward) is peftbooth with PEFT's own
             LoHa/LoKr forward (--no-factored-lycoris), to show what the factored forward is worth.
Batch: 1 instance + 1 class image per step (prior preservation). One JSON line per (adapter, mode) with it_s,
images_s (UNet samples per second: instance + class), peak_mb (CUDA max_memory_allocated, or peak RSS on CPU),
speedup_vs_plain and efficiency_vs_floor.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANKS = {"lora": 16, "loha": 8, "lokr": 8}
MODES = ("floor", "plain", "peftbooth", "peftbooth-compile", "peftbooth-channels-last", "peftbooth-peft-forward")


def draw_photos(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """n drawn photos (a red block with a yellow eye on a random background), size x size: content does not
    matter to a speed or memory benchmark, only the pixel count. Kept here, not in the package: the demo's own
    photos are the world's, at the world's 32 px."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.new("RGB", (size, size), tuple(rng.randint(60, 200) for _ in range(3)))
        s = rng.randint(size // 3, size // 2)
        x, y = rng.randint(4, size - s - 4), rng.randint(4, size - s - 4)
        d = ImageDraw.Draw(img)
        d.rectangle((x, y, x + s, y + s), fill=(210, 30, 30))
        d.ellipse((x + s // 4, y + s // 4, x + 3 * s // 4, y + 3 * s // 4), fill=(250, 220, 40))
        paths.append(folder / f"toy_{i}.png")
        img.save(paths[-1])
    return paths


def prepare(model: str, root: Path) -> tuple[str, Path, Path]:
    """The random model folder, 5 subject photos and 4 class images (drawn, so nothing is generated)."""
    from peftbooth.models.loading import cache_dir
    from peftbooth.models.tiny import build_tiny_model

    path = cache_dir() / ("tiny-sd" if model == "tiny" else "sd15-random")
    if not (path / "model_index.json").exists():
        build_tiny_model(path, shape=model)
    photos = root / "photos"
    draw_photos(photos, n=5, size=600 if model == "sd15" else 96)
    classes = root / "class"
    draw_photos(classes, n=4, size=600 if model == "sd15" else 96, seed=1)
    return str(path), photos, classes


def config(args, adapter: str, model: str, photos: Path, classes: Path, out: Path, **train):
    from peftbooth.config.checks import MAX_STEPS
    from peftbooth.config.sections import TrainConfig

    cfg = TrainConfig()
    cfg.model.model = model
    cfg.unet_adapter.adapter, cfg.unet_adapter.rank, cfg.unet_adapter.target_modules = adapter, RANKS[adapter], "all"
    cfg.data.instance_data_dir, cfg.data.instance_prompt = str(photos), "a photo of sks toy"
    cfg.data.with_prior_preservation, cfg.data.class_prompt = True, "a photo of a toy"
    cfg.data.class_data_dir, cfg.data.num_class_images = str(classes), 4
    cfg.data.resolution = args.resolution
    cfg.train.output_dir, cfg.train.overwrite, cfg.train.report_to = str(out), True, "none"
    cfg.train.mixed_precision = args.mixed_precision
    cfg.train.gradient_checkpointing = args.gradient_checkpointing
    cfg.train.logging_steps = MAX_STEPS  # never inside the run; the last step's loss is still read (a device sync)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(step, args) -> float:
    """Seconds for args.steps calls of `step` after args.warmup calls; the last loss is read (a device sync)."""
    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss.item()
    return time.perf_counter() - start


def run_peftbooth(args, cfg) -> float:
    """Seconds for args.steps optimizer steps of peftbooth's own loop, after warm-up steps."""
    from peftbooth.training.loop import fit
    from peftbooth.training.setup import setup

    cfg.train.max_train_steps = args.warmup
    run = setup(cfg)
    fit(run)  # warm-up (and compilation, with --compile)
    run.cfg.train.max_train_steps = args.warmup + args.steps  # fit continues from the warm-up's last step
    sync()
    start = time.perf_counter()
    fit(run)
    sync()
    return time.perf_counter() - start


def run_floor(args, cfg) -> float:
    """UNet forward + backward + AdamW step on fixed tensors shaped like the real run's batch."""
    import torch
    import torch.nn.functional as F

    from peftbooth.adapters import factored
    from peftbooth.adapters.inject import attach
    from peftbooth.adapters.peft_config import UNET_PRESETS
    from peftbooth.models.loading import load_components
    from peftbooth.precision import DTYPES, Precision, place_frozen
    from peftbooth.training.speed import make_optimizer

    cfg = cfg.resolved()
    c = load_components(cfg.model.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[cfg.train.mixed_precision]
    unet = attach(c.unet, cfg.unet_adapter, UNET_PRESETS, "")
    place_frozen(unet, Precision(device, dtype, dtype))  # as the trainer does: frozen weights in dtype, adapters fp32
    if cfg.train.factored_lycoris:  # the same adapter forward as the measured peftbooth run
        factored.install(unet)
    if cfg.train.gradient_checkpointing:
        c.unet.enable_gradient_checkpointing()
    unet.train()
    opt = make_optimizer([{"params": [p for p in unet.parameters() if p.requires_grad], "lr": 1e-4}], cfg.train, device)
    f = 2 ** (len(c.vae.config.block_out_channels) - 1)
    h = cfg.data.resolution // f
    g = torch.Generator(device).manual_seed(0)
    latents = torch.randn(2, 4, h, h, device=device, dtype=dtype, generator=g)
    target = torch.randn(2, 4, h, h, device=device, dtype=dtype, generator=g)
    context = torch.randn(2, 77, c.text_encoder.config.hidden_size, device=device, dtype=dtype, generator=g)
    timesteps = torch.tensor([100, 800], device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            pred = unet(latents, timesteps, context).sample
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return timed(step, args)


def run_plain(args, cfg) -> float:
    """The example scripts' algorithm: every step decodes images, runs the VAE and the text encoder; fp32 weights."""
    import torch
    from torch.utils.data import DataLoader

    from peftbooth.adapters.inject import attach
    from peftbooth.adapters.peft_config import UNET_PRESETS
    from peftbooth.data.dataset import DreamBoothDataset, collate
    from peftbooth.data.images import list_images, load_image
    from peftbooth.models.loading import load_components
    from peftbooth.precision import DTYPES
    from peftbooth.training.losses import diffusion_target, dreambooth_loss
    from peftbooth.training.speed import make_optimizer

    cfg = cfg.resolved()
    d = cfg.data
    c = load_components(cfg.model.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[cfg.train.mixed_precision]
    unet = attach(c.unet, cfg.unet_adapter, UNET_PRESETS, "").to(device)  # everything fp32
    c.vae.to(device)
    c.text_encoder.to(device)
    if cfg.train.gradient_checkpointing:
        c.unet.enable_gradient_checkpointing()
    unet.train()
    opt = make_optimizer([{"params": [p for p in unet.parameters() if p.requires_grad], "lr": 1e-4}], cfg.train, device)
    paths = list_images(d.instance_data_dir, "photos")
    ds = DreamBoothDataset([load_image(p) for p in paths], [d.instance_prompt] * len(paths), d.resolution,
                           class_paths=list_images(d.class_data_dir, "class"), class_prompt=d.class_prompt)
    loader = DataLoader(ds, batch_size=1, shuffle=True, collate_fn=lambda e: collate(e, [c.tokenizer]))
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def batches():
        while True:
            yield from loader

    it = batches()

    def step():
        batch = next(it)
        with autocast:
            with torch.no_grad():
                latents = c.vae.encode(batch["pixel_values"].to(device)).latent_dist.sample() * c.latent_scale
                context = c.text_encoder(batch["input_ids"][0].to(device))[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (latents.shape[0],), device=device)
            pred = unet(c.noise_scheduler.add_noise(latents, noise, t), t, context).sample
        loss = dreambooth_loss(pred, diffusion_target(c.noise_scheduler, latents, noise, t), 1, 1.0)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in unet.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return timed(step, args)


def worker(args) -> None:
    """One (adapter, mode) measurement; prints one JSON line."""
    import torch

    from peftbooth.cli import quiet_libraries

    quiet_libraries()
    torch.manual_seed(0)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    root = Path(args.workdir)
    model, photos, classes = prepare(args.model, root)
    compiled = args.mode == "peftbooth-compile"
    cfg = config(args, args.adapter, model, photos, classes, root / f"out-{args.adapter}-{args.mode}",
                 compile=compiled, compile_mode=args.compile_mode if compiled else "default",
                 channels_last=args.mode == "peftbooth-channels-last",
                 factored_lycoris=args.mode != "peftbooth-peft-forward")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    fn = {"floor": run_floor, "plain": run_plain}.get(args.mode, run_peftbooth)
    seconds = fn(args, cfg)
    row = {"adapter": args.adapter, "mode": args.mode, "it_s": args.steps / seconds, "peak_mb": round(peak_mb(), 1)}
    if cfg.train.compile:
        # what the compiler really did: a failed compile falls back to eager, and skipped CUDA graphs only log
        from torch._dynamo.utils import counters

        row.update(graphs=counters["stats"]["unique_graphs"],
                   graph_breaks=sum(counters["graph_break"].values()) + sum(counters["unimplemented"].values()),
                   cudagraph_skips=counters["inductor"]["cudagraph_skips"])
    print(json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    p.add_argument("--adapters", default="lora,loha,lokr")
    p.add_argument("--resolution", type=int, default=None, help="default: 64 (tiny), 512 (sd15)")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                   help="default: no on CPU, bf16 on GPU")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="also measure peftbooth with --compile")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode of the --compile run "
                   "(reduce-overhead: CUDA graphs)")
    p.add_argument("--channels-last", action="store_true", help="also measure peftbooth with --channels-last")
    p.add_argument("--peft-forward", action="store_true",
                   help="also measure peftbooth with PEFT's own LoHa/LoKr forward (--no-factored-lycoris)")
    p.add_argument("--modes", help="comma-separated modes to run instead of the ones the flags above choose, e.g. "
                   "floor,peftbooth (the ratios need floor and plain in the same run)")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default 20 tiny, 50 sd15)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2,
                   help="measure the modes this many times, interleaved; the best it/s of each is reported")
    p.add_argument("--out", help="also append the JSON lines to this file (each worker's raw row as soon as it "
                   "finishes, then the rows with the ratios)")
    p.add_argument("--worker-timeout", type=int, default=None, help="seconds one (adapter, mode) may take")
    p.add_argument("--worker", nargs=2, metavar=("ADAPTER", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.resolution = args.resolution or (64 if args.model == "tiny" else 512)
    args.steps = args.steps or (20 if args.model == "tiny" else 50)
    if args.mixed_precision is None:
        import torch

        args.mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    if args.worker:
        args.adapter, args.mode = args.worker
        return worker(args)

    modes = ["floor", "plain", "peftbooth"] + (["peftbooth-compile"] if args.compile else [])
    modes += ["peftbooth-peft-forward"] if args.peft_forward else []
    modes += ["peftbooth-channels-last"] if args.channels_last else []
    if args.modes:
        modes = args.modes.split(",")
        unknown = sorted(set(modes) - set(MODES))
        if unknown:
            p.error(f"--modes: unknown {', '.join(unknown)}; modes are {', '.join(MODES)}")
    workdir = tempfile.mkdtemp(prefix="peftbooth-bench-")
    common = ["--model", args.model, "--resolution", str(args.resolution), "--mixed-precision",
              args.mixed_precision, "--steps", str(args.steps), "--warmup", str(args.warmup), "--workdir", workdir,
              "--compile-mode", args.compile_mode]
    if args.gradient_checkpointing:
        common.append("--gradient-checkpointing")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")

    def emit(row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    for adapter in args.adapters.split(","):
        rows = {}
        # interleaved repeats: a slow spell of a shared machine hits every mode, not one; the best run counts
        for _ in range(args.repeats):
            for mode in modes:
                try:
                    proc = subprocess.run([sys.executable, __file__, *common, "--worker", adapter, mode], env=env,
                                          capture_output=True, text=True, timeout=args.worker_timeout)
                except subprocess.TimeoutExpired:
                    emit({"adapter": adapter, "mode": mode, "error": f"over --worker-timeout {args.worker_timeout} s"})
                    continue
                lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
                if proc.returncode or not lines:
                    emit({"adapter": adapter, "mode": mode, "error": proc.stderr.strip().splitlines()[-3:]})
                    continue
                row = json.loads(lines[-1])
                emit({**row, "raw": True})  # kept even if a later mode runs out of time
                if mode not in rows or row["it_s"] > rows[mode]["it_s"]:
                    rows[mode] = row
        for mode, row in rows.items():
            if mode == "peftbooth-compile":
                row["compile_mode"] = args.compile_mode
            row.update(model=args.model, resolution=args.resolution, mixed_precision=args.mixed_precision,
                       gradient_checkpointing=args.gradient_checkpointing, steps=args.steps, repeats=args.repeats,
                       images_s=round(row["it_s"] * 2, 3))
            if "plain" in rows:
                row["speedup_vs_plain"] = round(row["it_s"] / rows["plain"]["it_s"], 3)
            if "floor" in rows:
                row["efficiency_vs_floor"] = round(row["it_s"] / rows["floor"]["it_s"], 3)
            row["it_s"] = round(row["it_s"], 3)
            emit(row)


if __name__ == "__main__":
    main()
