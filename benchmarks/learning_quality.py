"""Learning quality on the world model: does each adapter learn the subject, follow new contexts, and does prior
preservation keep "a ball" meaning any ball?

For LoRA, LoHa and LoKr, each with and without prior preservation and with and without the text-encoder adapter,
train the world recipe (peftbooth/world/recipe.py) on the subject's photos and print one JSON row per run: the
world metrics (docs/world.md) of the adapter and of the base model, steps and seconds. --prior-seeds repeats the
LoRA runs with and without prior preservation over more seeds, for the spread of the paper's central claim, and
the recipe's LoHa and LoKr runs over the same seeds.

    .venv/bin/python benchmarks/learning_quality.py --output benchmarks/results/learning_quality.jsonl

Runs go --jobs at a time (default 2), one CPU thread each; the rows come out in the grid's order.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--adapters", default="lora,loha,lokr")
    p.add_argument("--prior-seeds", type=int, default=3, help="seeds of the LoRA with/without prior runs")
    p.add_argument("--num-images", type=int, default=8, help="images per evaluation prompt")
    p.add_argument("--prior-loss-weight", type=float, default=None, help="instead of the recipe's")
    p.add_argument("--class-prompt-dropout", type=float, default=None, help="instead of the recipe's (0)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs at once, one CPU thread each (default: 2, or 1 on a one-core machine)")
    p.add_argument("--output", default=None, help="also append the JSON rows to this file")
    p.add_argument("--smoke", action="store_true", help="only the first run of the grid (the first adapter with "
                   "prior preservation and the text encoder, seed 0), 2 class images, one job: CI's smallest mode")
    p.add_argument("--summarize", metavar="JSONL", help="print the Markdown tables of a results file and exit")
    a = p.parse_args()
    if a.summarize:
        print(summarize([json.loads(line) for line in open(a.summarize) if line.strip()]))
        return 0

    import torch

    from peftbooth.models.loading import load_components
    from peftbooth.models.vae import vae_force_upcast
    from peftbooth.precision import for_training
    from peftbooth.training.prior import class_images_from_components
    from peftbooth.world import WORLD_NAME
    from peftbooth.world.metrics import WorldEvalSettings, world_metrics
    from peftbooth.world.recipe import RECIPE
    from peftbooth.world.scenes import CLASS_PROMPT, write_subject_photos

    t0 = time.perf_counter()
    torch.set_num_threads(1)  # each run on one core: on 2 cores two one-thread runs beat one two-thread run
    work = Path(tempfile.mkdtemp(prefix="peftbooth-lq-"))
    write_subject_photos(work / "photos")
    settings = WorldEvalSettings(num_images=a.num_images)
    # the class images every run shares, made first (as the first seed-0 run would) so that no two runs race
    world = load_components(WORLD_NAME)
    cpu_fp32 = for_training("no", torch.device("cpu"), world.family, vae_force_upcast(world.vae))  # as a run here
    num_class_images = 2 if a.smoke else RECIPE["num_class_images"]
    class_images_from_components(world, CLASS_PROMPT, work / "class_images", num_class_images, 4,
                                 RECIPE["class_image_steps"], 0, cpu_fp32, show_progress=False)
    init_worker(work, settings)  # this process measures the base model
    base, _ = world_metrics(WORKER["sample_fn"], WORKER["evaluator"], WORKER["real"], settings)
    out = open(a.output, "a") if a.output else None

    grid = [(ad, prior, te, 0) for ad, prior, te in itertools.product(a.adapters.split(","), (True, False),
                                                                        (True, False))]
    grid += [("lora", prior, True, seed) for seed in range(1, a.prior_seeds) for prior in (True, False)]
    # the recipe (prior preservation + text-encoder adapter) of the other adapters over the same seeds
    grid += [(ad, True, True, seed) for seed in range(1, a.prior_seeds) for ad in a.adapters.split(",") if ad != "lora"]
    changes = {k: v for k, v in [("prior_loss_weight", a.prior_loss_weight),
                                 ("class_prompt_dropout", a.class_prompt_dropout)] if v is not None}
    if a.smoke:  # plumbing, not learning: one run, 2 class images
        grid, a.jobs, changes["num_class_images"] = grid[:1], 1, num_class_images
    recipe = {**RECIPE, **changes}
    jobs = [(k, *run, a.steps, changes) for k, run in enumerate(grid)]
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no torch state forked from this one
    with ProcessPoolExecutor(a.jobs, mp_context=ctx, initializer=init_worker, initargs=(work, settings)) as pool:
        for metrics in pool.map(one_run, jobs):  # in grid order, whatever order they finish in
            row = {**metrics, "base": base, "recipe": recipe, "eval": vars(settings), "jobs": a.jobs}
            line = json.dumps(row, default=list)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()
    print(f"{len(grid)} runs in {time.perf_counter() - t0:.0f} s with {a.jobs} at once", file=sys.stderr)
    return 0


WORKER: dict = {}  # per process: the base pipeline, its sampler, the evaluator and the real photos


def init_worker(work: Path, settings) -> None:
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from peftbooth.data.images import list_images, load_image
    from peftbooth.inference.pipeline import AdapterPipeline
    from peftbooth.world import MODEL_DIR, WORLD_NAME
    from peftbooth.world.evaluator import load_evaluator
    from peftbooth.world.metrics import pipeline_sampler

    torch.set_num_threads(1)
    pipe = AdapterPipeline(WORLD_NAME, device="cpu")
    pipe.pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.pipe.scheduler.config)
    WORKER.update(work=work, settings=settings, pipe=pipe, evaluator=load_evaluator(MODEL_DIR),
                  sample_fn=pipeline_sampler(pipe.pipe, settings.steps, settings.guidance_scale),
                  real=[load_image(x) for x in list_images(work / "photos", "photos")])  # not their masks


def one_run(job: tuple) -> dict:
    """Train one configuration of the grid and measure it: (k, adapter, prior, text encoder, seed, steps, changes
    to the recipe's data settings) -> row."""
    from peftbooth.training.loop import train
    from peftbooth.world.metrics import world_metrics
    from peftbooth.world.recipe import world_config

    k, adapter, prior, te, seed, steps, changes = job
    w = WORKER
    cfg = world_config(w["work"] / "photos", w["work"] / f"run{k}", adapter, prior=prior, text_encoder=te,
                       steps=steps, seed=seed, class_data_dir=w["work"] / "class_images")
    if prior:
        for name, value in changes.items():
            setattr(cfg.data, name, value)
    t0 = time.perf_counter()
    run = train(cfg)
    seconds = time.perf_counter() - t0
    name = f"run{k}"
    w["pipe"].load_adapter(run, name)
    w["pipe"].set_adapters({name: 1.0})
    metrics, _ = world_metrics(w["sample_fn"], w["evaluator"], w["real"], w["settings"])
    w["pipe"].unload(name)
    return {"adapter": adapter, "prior_preservation": prior, "text_encoder": te, "seed": seed,
            "steps": cfg.train.max_train_steps, "train_seconds": round(seconds, 1), **metrics}


def summarize(rows: list[dict]) -> str:
    """One table row per configuration (seed 0), then the recipe and the prior-preservation claim over seeds."""
    import statistics

    def f(x: float) -> str:
        return f"{x + 0.0:.2f}".replace("-0.00", "0.00")  # an entropy of -1e-17 is 0

    cols = ["subject_fidelity", "prompt_fidelity", "class_drift", "class_fidelity", "diversity", "subject_similarity"]
    out = ["| adapter | prior | text encoder | " + " | ".join(cols) + " | train s |",
           "|---" * (len(cols) + 4) + "|"]
    base = rows[0]["base"]
    out.append("| base model | - | - | " + " | ".join(f(base[c]) for c in cols) + " | - |")
    for r in rows:
        if r["seed"] == 0:
            out.append(f"| {r['adapter']} | {'yes' if r['prior_preservation'] else 'no'} | "
                       f"{'yes' if r['text_encoder'] else 'no'} | " + " | ".join(f(r[c]) for c in cols)
                       + f" | {r['train_seconds']:.0f} |")
    out += ["", "| the recipe (prior + text encoder), seeds | adapter | " + " | ".join(cols[:3]) + " |", "|---" * 5 + "|"]
    for adapter in dict.fromkeys(r["adapter"] for r in rows):
        group = [r for r in rows if r["adapter"] == adapter and r["text_encoder"] and r["prior_preservation"]]
        cells = []
        for c in cols[:3]:
            v = [r[c] for r in group]
            cells.append(f"{f(statistics.mean(v))} ± {f(statistics.pstdev(v))} ({', '.join(f(x) for x in v)})")
        out.append(f"| {len(group)} | {adapter} | " + " | ".join(cells) + " |")
    out += ["", "| LoRA + text encoder, seeds | prior | " + " | ".join(cols[:5]) + " |", "|---" * 7 + "|"]
    for prior in (True, False):
        group = [r for r in rows if r["adapter"] == "lora" and r["text_encoder"] and r["prior_preservation"] == prior]
        if not group:
            continue
        cells = []
        for c in cols[:5]:
            v = [r[c] for r in group]
            cells.append(f"{f(statistics.mean(v))} ± {f(statistics.pstdev(v))} ({', '.join(f(x) for x in v)})")
        out.append(f"| {len(group)} | {'yes' if prior else 'no'} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
