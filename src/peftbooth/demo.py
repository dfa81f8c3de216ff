"""`peftbooth demo`: the whole workflow offline on CPU, on the pretrained world model.

Writes five photos of a subject of the world's family (subjects.py: by default DEMO_SUBJECT, a box the world model
never draws), trains the world recipe's LoRA on it (or any of LoRA, LoHa and LoKr: `adapters`, two at a time on one
core each) with prior preservation and a text-encoder adapter, then, with the base model loaded once, draws: the
base model's boxes, each adapter's subject in the two contexts its photos never showed, and each adapter's "a photo
of a box", which should still be ordinary boxes. The world's judge and evaluator score every model (docs/world.md).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .world.scenes import prompt
from .world.subjects import Subject

DEMO_SUBJECT = "box-band-brown-mint"
ADAPTERS = ("lora", "loha", "lokr")
# one adapter at DEMO_STEPS fits 90 s on 2 cores (BENCHMARKS.md, "Time to a learned subject")
DEMO_ADAPTERS = ("lora",)
# the fewest measured steps at which the recipe's LoRA reaches a mean held-out fidelity of 0.8 on the test subjects
# (0.84 over three seeds at 1000, 0.85 at the recipe's 1500; BENCHMARKS.md, "Time to a learned subject"): the demo
# shows a learned subject in two thirds of the recipe's time
DEMO_STEPS = 1000
LONGEST_FIRST = ("loha", "lokr", "lora")  # seconds per step, most first: two workers finish together


def demo_rows(subject: Subject, adapters) -> list[tuple[str, dict, str]]:
    """(label, adapter weights, prompt) per grid row."""
    held = subject.held_out_contexts
    rows = [("base", {}, prompt(subject.cls)), ("base", {}, subject.prompt(held[0]))]
    for a in adapters:
        rows += [(a, {a: 1.0}, subject.prompt(c)) for c in held] + [(a, {a: 1.0}, prompt(subject.cls))]
    return rows


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _train(cfg):
    from .training.loop import train

    return train(cfg)


def train_adapters(cfgs: dict, jobs: int) -> dict:
    """adapter -> its run folder. `jobs` runs at a time, each in a fresh process on one thread: on 2 cores two
    one-thread runs finish sooner than the same runs one after the other on two threads (BENCHMARKS.md)."""
    if jobs <= 1:
        import torch

        # here, on one thread too: the world's small layers train slower on two (1500 steps of LoRA: 101 s on two
        # threads, 76 s on one; BENCHMARKS.md)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return {a: _train(cfg) for a, cfg in cfgs.items()}
        finally:
            torch.set_num_threads(threads)
    order = [a for a in LONGEST_FIRST if a in cfgs]
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no torch state forked from this one
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_one_thread) as pool:
        futures = {a: pool.submit(_train, cfgs[a]) for a in order}
        return {a: futures[a].result() for a in cfgs}


def run_demo(output_dir: str | Path = "demo-output", steps: int | None = None, num_images: int = 4,
             subject: str = DEMO_SUBJECT, jobs: int | None = None, adapters: tuple[str, ...] = DEMO_ADAPTERS) -> dict:
    from .world.recipe import world_config
    from .world.subjects import by_name

    steps = DEMO_STEPS if steps is None else steps
    subj = by_name(subject)  # an unknown name: ValueError naming the family, before any work
    jobs = min(2, os.cpu_count() or 1, len(adapters)) if jobs is None else jobs
    from diffusers import DPMSolverMultistepScheduler

    from .data.images import class_image_prompt, load_image
    from .inference.pipeline import AdapterPipeline
    from .inference.sampling import grid
    from .training.prior import generate_class_images
    from .world import MODEL_DIR, WORLD_NAME
    from .world.metrics import WorldEvalSettings, format_world_table, load_instruments, pipeline_sampler, world_metrics
    from .world.subjects import write_photos

    out = Path(output_dir)
    start = time.perf_counter()
    photos = write_photos(subj, out / "photos")
    print(f"[demo] wrote {len(photos)} photos of {subj.name} ({subj.prompt()!r} + context) into {out / 'photos'}")
    cfgs = {a: world_config(out / "photos", out / f"run-{a}", a, prior=True, text_encoder=True, steps=steps,
                            class_data_dir=out / "class_images", subject=subj) for a in adapters}
    first = cfgs[adapters[0]]
    d = first.data  # class images: made once here, before the runs that share them start
    generate_class_images(WORLD_NAME, class_image_prompt(d), d.class_data_dir, d.num_class_images, d.sample_batch_size,
                          d.class_image_steps, first.train.seed, device="cpu", show_progress=False)
    at_once = f" each, {jobs} at a time" if len(adapters) > 1 else ""
    print(f"[demo] training {', '.join(adapters)} for {steps} steps{at_once} on --model world (prior preservation, "
          "text-encoder adapter)")
    runs = train_adapters(cfgs, jobs)

    pipe = AdapterPipeline(WORLD_NAME, device="cpu")  # loaded once; adapters are switched on it
    pipe.pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.pipe.scheduler.config)
    for adapter, path in runs.items():
        pipe.load_adapter(path, adapter)
    settings = WorldEvalSettings(subject=subj.name)  # the world's sampling, for the sheet and the metrics
    sample_fn = pipeline_sampler(pipe.pipe, settings)
    rows, labels = [], []
    for label, weights, text in demo_rows(subj, runs):
        pipe.set_adapters(weights)
        rows.append(sample_fn(text, list(range(num_images))))
        labels.append(f"{label}: {text}")
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    sheet = grid(rows)
    sheet.resize((sheet.width * 3, sheet.height * 3), 0).save(samples / "before_after.png")
    (samples / "before_after.txt").write_text("\n".join(labels) + "\n")

    instruments = load_instruments(MODEL_DIR)
    real = [load_image(p) for p in photos]
    results = {}
    for name, weights in [("base", {})] + [(a, {a: 1.0}) for a in runs]:
        pipe.set_adapters(weights)
        results[name], _ = world_metrics(sample_fn, instruments, real, settings)
    from .runs.atomic import write_json

    write_json(out / "world_metrics.json", {"settings": vars(settings), "results": results})
    print("[demo] world metrics (held-out contexts; the judge and the evaluator stand in for DINO / CLIP):")
    print(format_world_table(results))
    print(f"[demo] done in {time.perf_counter() - start:.0f} s. Everything is in {out}/:")
    print("  photos/         the subject's photos, their captions and masks")
    print(f"  class_images/   {prompt(subj.cls)!r} images drawn by the base model in the photos' contexts, each "
          "with its prompt (prior preservation)")
    for adapter, path in runs.items():
        print(f"  {Path(path).name + '/':<15} {adapter}: unet/, text_encoder/, report.html, config.yaml, README.md")
    print("  samples/        before_after.png, one row per line of before_after.txt:")
    for line in labels:
        print(f"                    {line}")
    print("  world_metrics.json")
    return {"runs": runs, "samples": samples / "before_after.png", "metrics": results}

