"""`train`'s memory check against a real run: the estimate (peftbooth.training.memory) beside the device's free memory and
the peak the run then really allocates, per phase, so the formula's constants can be checked on a GPU.

    python benchmarks/memory_check.py --model sd15 --out rows.jsonl      # GPU: SD 1.5 shapes, 512 px
    python benchmarks/memory_check.py --model tiny                       # CPU: plumbing only (no CUDA figures)

Each setting (train's defaults at bf16; the low-memory preset) runs in its own process, so peaks do not mix: a
LoRA r16 on `all`, a text-encoder adapter, prior preservation with 2 class images still to draw, --steps steps.
One JSON line per setting: the estimate per phase (bytes, before the margin), the estimate with the margin, the
free memory before loading, the check's verdict, and the measured `max_memory_allocated` of setup (caching and
class images) and of training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def one(args) -> dict:
    import torch
    from train_throughput import config, prepare

    from peftbooth.cli import quiet_libraries
    from peftbooth.models.loading import load_components
    from peftbooth.models.vae import vae_force_upcast
    from peftbooth.precision import for_training
    from peftbooth.training import memory
    from peftbooth.training.loop import fit
    from peftbooth.training.setup import setup

    quiet_libraries()
    cuda = torch.cuda.is_available()
    device = memory.device_memory()  # before anything is loaded: what `train`'s check sees
    root = Path(tempfile.mkdtemp(prefix="peftbooth-memcheck-"))
    model, photos, _ = prepare(args.model, root)
    args.gradient_checkpointing, args.mixed_precision = False, "bf16"
    cfg = config(args, "lora", model, photos, root / "class-drawn", root / "out", max_train_steps=1,
                 train_text_encoder=True, memory_check=False)
    cfg.data.num_class_images, cfg.data.class_image_steps = 2, 2  # an empty folder: setup draws them
    if args.setting == "low-memory":
        memory.apply_preset(cfg, memory.LOW_MEMORY)
    cfg = cfg.resolved()
    c = load_components(cfg.model.model)
    precision = for_training(cfg.train.mixed_precision, "cuda", c.family, vae_force_upcast(c.vae), cfg.model.upcast_vae)
    fp, plan = memory.footprint_of(cfg, c), memory.plan_of(cfg, precision)
    del c
    phases = memory.estimate(fp, plan)
    need, phase = memory.peak(fp, plan)
    row = {"model": args.model, "setting": args.setting, "resolution": cfg.data.resolution,
           "estimate_mb": {k: round(v / 2**20) for k, v in phases.items()}, "estimate_with_margin_mb": round(need / 2**20),
           "estimate_peak_phase": phase, "free_mb": round(device[0] / 2**20) if device else None,
           "device": device[1] if device else "cpu",
           "check": (memory.refusal(fp, plan, *device) or "fits") if device else "skipped (no CUDA device)"}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run = setup(cfg)
    row["measured_setup_mb"] = round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run.cfg.train.max_train_steps = args.steps
    fit(run)
    row["measured_training_mb"] = round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    p.add_argument("--resolution", type=int, default=None, help="default: 64 (tiny), 512 (sd15)")
    p.add_argument("--settings", default="default,low-memory")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.add_argument("--setting", help=argparse.SUPPRESS)  # one setting, in this process
    args = p.parse_args()
    args.resolution = args.resolution or (64 if args.model == "tiny" else 512)
    if args.setting:
        print(json.dumps(one(args)), flush=True)
        return
    failed = False
    for setting in args.settings.split(","):
        cmd = [sys.executable, __file__, "--model", args.model, "--resolution", str(args.resolution),
               "--steps", str(args.steps), "--setting", setting]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        row = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
            "model": args.model, "setting": setting, "error": proc.stderr.strip().splitlines()[-3:]}
        failed |= "error" in row
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
