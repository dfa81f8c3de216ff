"""Learning quality on the world model: does each adapter learn the subject, follow new contexts, and does prior
preservation keep "a ball" meaning any ball?

For LoRA, LoHa and LoKr, each with and without prior preservation and with and without the text-encoder adapter,
train the world recipe (peftbooth/world/recipe.py) on the subject's photos and print one JSON row per run: the
world metrics (docs/world.md) of the adapter and of the base model, steps and seconds. --prior-seeds repeats the
LoRA runs with and without prior preservation over more seeds, for the spread of the paper's central claim, and
the recipe's LoHa and LoKr runs over the same seeds.

    .venv/bin/python benchmarks/learning_quality.py --output benchmarks/results/learning_quality.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--adapters", default="lora,loha,lokr")
    p.add_argument("--prior-seeds", type=int, default=3, help="seeds of the LoRA with/without prior runs")
    p.add_argument("--num-images", type=int, default=8, help="images per evaluation prompt")
    p.add_argument("--output", default=None, help="also append the JSON rows to this file")
    p.add_argument("--summarize", metavar="JSONL", help="print the Markdown tables of a results file and exit")
    a = p.parse_args()
    if a.summarize:
        print(summarize([json.loads(line) for line in open(a.summarize) if line.strip()]))
        return 0

    from diffusers import DPMSolverMultistepScheduler

    from peftbooth.data import load_image
    from peftbooth.inference import AdapterPipeline
    from peftbooth.train import train
    from peftbooth.world import MODEL_DIR, WORLD_NAME
    from peftbooth.world.evaluator import load_evaluator
    from peftbooth.world.metrics import WorldEvalSettings, pipeline_sampler, world_metrics
    from peftbooth.world.recipe import RECIPE, world_config
    from peftbooth.world.scenes import write_subject_photos

    work = Path(tempfile.mkdtemp(prefix="peftbooth-lq-"))
    photos = write_subject_photos(work / "photos")
    real = [load_image(x) for x in photos]
    settings = WorldEvalSettings(num_images=a.num_images)
    pipe = AdapterPipeline(WORLD_NAME, device="cpu")
    pipe.pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.pipe.scheduler.config)
    evaluator = load_evaluator(MODEL_DIR)
    sample_fn = pipeline_sampler(pipe.pipe, settings.steps, settings.guidance_scale)
    base, _ = world_metrics(sample_fn, evaluator, real, settings)
    out = open(a.output, "a") if a.output else None

    grid = [(ad, prior, te, 0) for ad, prior, te in itertools.product(a.adapters.split(","), (True, False),
                                                                        (True, False))]
    grid += [("lora", prior, True, seed) for seed in range(1, a.prior_seeds) for prior in (True, False)]
    # the recipe (prior preservation + text-encoder adapter) of the other adapters over the same seeds
    grid += [(ad, True, True, seed) for seed in range(1, a.prior_seeds) for ad in a.adapters.split(",") if ad != "lora"]
    for k, (adapter, prior, te, seed) in enumerate(grid):
        cfg = world_config(work / "photos", work / f"run{k}", adapter, prior=prior, text_encoder=te, steps=a.steps,
                           seed=seed, class_data_dir=work / "class_images")
        t0 = time.perf_counter()
        run = train(cfg)
        seconds = time.perf_counter() - t0
        name = f"run{k}"
        pipe.load_adapter(run, name)
        pipe.set_adapters({name: 1.0})
        metrics, _ = world_metrics(sample_fn, evaluator, real, settings)
        pipe.unload(name)
        row = {"adapter": adapter, "prior_preservation": prior, "text_encoder": te, "seed": seed,
               "steps": cfg.train.max_train_steps, "train_seconds": round(seconds, 1), **metrics,
               "base": base, "recipe": RECIPE, "eval": vars(settings)}
        line = json.dumps(row, default=list)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()
    return 0


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
