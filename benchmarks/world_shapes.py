"""Does the world model draw each class with its shape (a box a square, not a star)? The shape rule (world/shapes.py)
and the evaluator's class head, on samples of every class in every colour and context, and a grid for docs/.

    .venv/bin/python benchmarks/world_shapes.py --per-prompt 2 --grid docs/world_shapes.png   # 150 samples, ~1 min
    .venv/bin/python benchmarks/world_shapes.py --smoke                                       # CI: 1 per class

Prints one JSON row: per class, the share the rule recognises (`shape_*`), the share the evaluator calls that class
(`evaluator_*`), and the same rule on VAE round trips of drawn scenes (`vae_shape_*`), the most any model on this
VAE can reach; over all samples, the share with the prompt's colour and context (`colour_match`,
`background_match`). Sampling is the world's (world.metrics.WorldEvalSettings): guidance 5 for the first 0.4 of
the steps; `--guidance-cutoff 1` guides every step and draws boxes as stars, and a lower --guidance-scale draws
better shapes and follows the prompt less. In the grid each sample has a green frame where the rule recognises its
class, red where not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def vae_round_trip_rates(vae, n: int, seed: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from peftbooth.world.evaluator_training import round_trip
    from peftbooth.world.scenes import CLASSES, Scene, draw, random_scene, to_array
    from peftbooth.world.shapes import is_class

    rng, out = random.Random(seed), {}
    for cls in CLASSES:
        scenes = [Scene(cls, s.colour, s.context, s.cx, s.cy, s.size) for s in (random_scene(rng) for _ in range(n))]
        y = round_trip(vae, torch.from_numpy(to_array([draw(s) for s in scenes])))
        arr = ((y.numpy().transpose(0, 2, 3, 1) + 1) * 127.5).round().astype(np.uint8)
        out[f"vae_shape_{cls}"] = round(float(np.mean([is_class(Image.fromarray(a), s.context, cls)
                                                       for a, s in zip(arr, scenes)])), 4)
    return out


def framed_grid(images, ok, cols: int):
    from PIL import Image

    from peftbooth.world.scenes import SIZE

    cell = SIZE + 4
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell, rows * cell), "white")
    for i, (im, good) in enumerate(zip(images, ok)):
        x, y = (i % cols) * cell, (i // cols) * cell
        sheet.paste(Image.new("RGB", (cell - 2, cell - 2), (40, 170, 60) if good else (210, 40, 40)), (x + 1, y + 1))
        sheet.paste(im, (x + 2, y + 2))
    return sheet


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a world model folder (default: the shipped one)")
    p.add_argument("--per-prompt", type=int, default=2, help="samples per (class, colour, context): 75 prompts")
    p.add_argument("--vae-scenes", type=int, default=100, help="drawn scenes per class for the VAE's ceiling")
    p.add_argument("--steps", type=int, default=25)
    from peftbooth.world.metrics import WorldEvalSettings

    world = WorldEvalSettings()
    p.add_argument("--guidance-scale", type=float, default=world.guidance_scale, help="default: the world's")
    p.add_argument("--guidance-cutoff", type=float, default=world.guidance_cutoff,
                   help="the share of the steps that are guided (default: the world's; 1: all)")
    p.add_argument("--seed", type=int, default=0, help="sample k of prompt i starts from seed SEED + 1000 i + k")
    p.add_argument("--grid", default=None, help="write the framed sample grid here (PNG), a row per (class, colour), contexts across")
    p.add_argument("--smoke", action="store_true", help="CI: one prompt per class, 2 steps, 3 VAE scenes")
    a = p.parse_args(argv)

    import numpy as np

    from peftbooth.inference.sampling import sample
    from peftbooth.world import MODEL_DIR
    from peftbooth.world.evaluator import judge, load_evaluator
    from peftbooth.world.quality import per_class_rates, quality_prompts, shape_verdicts
    from peftbooth.world.scenes import CLASSES, SIZE, prompt
    model = Path(a.model or MODEL_DIR)
    if not (model / "model_index.json").is_file():
        print(f"error: --model {model}: not a world model folder (no model_index.json)", file=sys.stderr)
        return 2
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    triples = sorted(quality_prompts(0, 75))  # every (class, colour, context) once, grouped by class
    if a.smoke:
        triples, a.per_prompt, a.steps, a.vae_scenes = [t for t in triples if t[1] == "red"][::5], 1, 2, 3
    images, labels = [], []
    for i, tr in enumerate(triples):
        images += sample(pipe, [prompt(*tr)], [a.seed + 1000 * i + k for k in range(a.per_prompt)], SIZE, a.steps,
                         a.guidance_scale, a.guidance_cutoff)[0]
        labels += [tr] * a.per_prompt
    row = {"model": str(model), "samples": len(images), "steps": a.steps, "guidance_scale": a.guidance_scale,
           "guidance_cutoff": a.guidance_cutoff, "seed": a.seed}
    ok = shape_verdicts(images, labels)  # once: for the rates and the grid's frames
    row.update(per_class_rates(ok, labels))
    verdict = judge(load_evaluator(model), images)
    for cls in CLASSES:
        mine = [v == cls for v, tr in zip(verdict["class"], labels) if tr[0] == cls]
        row[f"evaluator_{cls}"] = round(float(np.mean(mine)), 4)
    for i, head in ((1, "colour"), (2, "background")):  # does the prompt still get its colour and context?
        row[f"{head}_match"] = round(float(np.mean([v == tr[i] for v, tr in zip(verdict[head], labels)])), 4)
    row.update(vae_round_trip_rates(pipe.vae.float(), a.vae_scenes, seed=1))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    if a.grid:
        sheet = framed_grid(images, ok, cols=5 * a.per_prompt)
        sheet.resize((sheet.width * 2, sheet.height * 2), 0).save(a.grid)  # 0: nearest, pixels stay pixels
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
