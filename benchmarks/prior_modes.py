"""Prior preservation two ways on the world model, on the same subject, recipe and seeds: class images (the base
model's pictures for the class prompt, made before training: the paper's way) against the base model's own
prediction as the class rows' target (--prior-mode base-prediction: no class images). One JSON row per run: the
world metrics (subject and prompt fidelity, class drift, diversity), the seconds spent making class images, the
training seconds, and their sum.

    .venv/bin/python benchmarks/prior_modes.py --subjects test --seeds 3 --output benchmarks/results/prior_modes.jsonl

LoRA with the recipe's text-encoder adapter; the class images are made once per seed's run, timed, as a user's
first run would make them. Runs go --jobs at a time (default 2), one CPU thread each.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import learning_quality as lq  # this folder: the worker (base pipeline, evaluator, judge) and the metrics


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", default="ball", help="ball (the tuning subject of the earlier table) | test | "
                   "tuning | comma-separated subject names")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--num-images", type=int, default=8, help="images per evaluation prompt")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--output", default=None, help="also append the JSON rows to this file")
    p.add_argument("--smoke", action="store_true", help="one seed, 2 class images, one job: CI's smallest mode")
    a = p.parse_args()

    import tempfile

    import torch

    from peftbooth.world.subjects import BALL, by_name, split, write_photos

    t0 = time.perf_counter()
    torch.set_num_threads(1)
    tuning, test = split()
    chosen = {"ball": [by_name(BALL)], "test": test, "tuning": tuning}.get(a.subjects)
    names = [x.name for x in chosen] if chosen else a.subjects.split(",")
    names = names[:1] if a.smoke else names
    work = Path(tempfile.mkdtemp(prefix="peftbooth-prior-"))
    lq.init_worker(work, a.num_images)
    base = {}
    for name in names:
        write_photos(by_name(name), work / "photos" / name)
        base[name] = lq.measure(name)
    seeds = 1 if a.smoke else a.seeds
    jobs = [(k, name, mode, seed, a.steps, a.smoke) for k, (name, seed, mode) in
            enumerate((n, s, m) for n in names for s in range(seeds) for m in ("class-images", "base-prediction"))]
    out = open(a.output, "a") if a.output else None
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1 if a.smoke else a.jobs, mp_context=ctx, initializer=lq.init_worker,
                             initargs=(work, a.num_images)) as pool:
        for row in pool.map(one_run, jobs):
            line = json.dumps({**row, "base": base[row["subject"]], "eval": vars(lq.WORKER["settings"])})
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()
    print(f"{len(jobs)} runs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


def one_run(job: tuple) -> dict:
    """(k, subject, prior mode, seed, steps, smoke) -> the run's metrics and seconds."""
    import torch

    from peftbooth.data.images import class_image_prompt
    from peftbooth.models.loading import load_components
    from peftbooth.models.vae import vae_force_upcast
    from peftbooth.precision import for_training
    from peftbooth.training.loop import train
    from peftbooth.training.prior import class_images_from_components
    from peftbooth.world import WORLD_NAME
    from peftbooth.world.recipe import RECIPE, world_config
    from peftbooth.world.subjects import by_name

    k, subject, mode, seed, steps, smoke = job
    w = lq.WORKER
    class_dir = w["work"] / f"class{k}"
    cfg = world_config(w["work"] / "photos" / subject, w["work"] / f"run{k}", "lora", prior=True, text_encoder=True,
                       steps=steps, seed=seed, class_data_dir=class_dir if mode == "class-images" else None,
                       subject=by_name(subject), prior_mode=mode)
    class_seconds = 0.0
    if mode == "class-images":  # made here and timed: what the run would spend making them first
        cfg.data.num_class_images = 2 if smoke else RECIPE["num_class_images"]
        world = load_components(WORLD_NAME)
        t0 = time.perf_counter()
        class_images_from_components(world, class_image_prompt(cfg.data), class_dir, cfg.data.num_class_images, 4,
                                     RECIPE["class_image_steps"], seed,
                                     for_training("no", torch.device("cpu"), world.family,
                                                  vae_force_upcast(world.vae)), show_progress=False)
        class_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    run = train(cfg)
    seconds = time.perf_counter() - t0
    metrics = lq.measure(subject, run)
    return {"subject": subject, "prior_mode": mode, "seed": seed, "steps": cfg.train.max_train_steps,
            "class_image_seconds": round(class_seconds, 1), "train_seconds": round(seconds, 1),
            "wall_seconds": round(class_seconds + seconds, 1), **metrics}


if __name__ == "__main__":
    sys.exit(main())
