"""Class-image generation speed: peftbooth's generator vs a plain pipeline call with default settings.

    python benchmarks/class_images.py --model tiny --num-images 8
    python benchmarks/class_images.py --model sd15 --num-images 16        # GPU

plain: StableDiffusionPipeline as loaded (the model's own scheduler, 50 steps, fp32, one image per call).
peftbooth: `generate_class_images` (DPM-Solver++ at --class-image-steps, batched by --sample-batch-size, bf16/fp16
on GPU; its time includes loading its own pipeline). Prints one JSON line per mode with images_s and
speedup_vs_plain.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--sample-batch-size", type=int, default=4)
    p.add_argument("--class-image-steps", type=int, default=25)
    p.add_argument("--plain-steps", type=int, default=50, help="the plain pipeline's steps (its default: 50)")
    args = p.parse_args()

    import torch

    from peftbooth.cli import quiet_libraries
    from peftbooth.models.loading import cache_dir, load_pipeline
    from peftbooth.models.tiny import build_tiny_model
    from peftbooth.training.prior import generate_class_images

    quiet_libraries()
    path = cache_dir() / ("tiny-sd" if args.model == "tiny" else "sd15-random")
    if not (path / "model_index.json").exists():
        build_tiny_model(path, shape=args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompt = "a photo of a dog"
    rows = {}

    pipe = load_pipeline(str(path)).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt, num_inference_steps=2)  # warm-up
    start = time.perf_counter()
    for i in range(args.num_images):
        pipe(prompt, num_inference_steps=args.plain_steps, generator=torch.Generator(device).manual_seed(i))
    if device == "cuda":
        torch.cuda.synchronize()
    rows["plain"] = args.num_images / (time.perf_counter() - start)
    del pipe

    with tempfile.TemporaryDirectory() as tmp:
        generate_class_images(str(path), prompt, Path(tmp) / "warm", 1, 1, 2, show_progress=False)
        start = time.perf_counter()
        generate_class_images(str(path), prompt, Path(tmp) / "class", args.num_images, args.sample_batch_size,
                              args.class_image_steps, show_progress=False)
        rows["peftbooth"] = args.num_images / (time.perf_counter() - start)

    for mode, images_s in rows.items():
        print(json.dumps({"mode": mode, "model": args.model, "device": device, "num_images": args.num_images,
                          "images_s": round(images_s, 3), "speedup_vs_plain": round(images_s / rows["plain"], 2)}))


if __name__ == "__main__":
    main()
