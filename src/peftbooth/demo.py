"""`peftbooth demo`: the whole workflow offline on CPU, on the pretrained world model.

Writes five photos of the world's subject (a ball, magenta above and cyan below, that the world model never
draws), trains a LoRA, a LoHa and a LoKr adapter on it with prior preservation and a text-encoder adapter, then,
with the base model loaded once, draws: the base model's balls, each adapter's subject in two contexts its photos
never showed, and each adapter's "a photo of a ball", which should still be ordinary balls. The world's
evaluator scores every model (docs/world.md).
"""

from __future__ import annotations

import time
from pathlib import Path

from .world.recipe import RECIPE
from .world.scenes import CLASS_PROMPT, HELD_OUT_CONTEXTS, INSTANCE_PROMPT, SIZE, subject_prompt

DEMO_STEPS = RECIPE["max_train_steps"]
ADAPTERS = ("lora", "loha", "lokr")


def demo_rows(adapters) -> list[tuple[str, dict, str]]:
    """(label, adapter weights, prompt) per grid row."""
    rows = [("base", {}, CLASS_PROMPT), ("base", {}, subject_prompt(HELD_OUT_CONTEXTS[0]))]
    for a in adapters:
        rows += [(a, {a: 1.0}, subject_prompt(c)) for c in HELD_OUT_CONTEXTS] + [(a, {a: 1.0}, CLASS_PROMPT)]
    return rows


def run_demo(output_dir: str | Path = "demo-output", steps: int | None = None, num_images: int = 4) -> dict:
    steps = DEMO_STEPS if steps is None else steps
    from diffusers import DPMSolverMultistepScheduler

    from .data.images import load_image
    from .inference.pipeline import AdapterPipeline
    from .inference.sampling import grid, sample
    from .training.loop import train
    from .world import MODEL_DIR, WORLD_NAME
    from .world.metrics import WorldEvalSettings, format_world_table, load_instruments, pipeline_sampler, world_metrics
    from .world.recipe import world_config
    from .world.scenes import write_subject_photos

    out = Path(output_dir)
    start = time.perf_counter()
    photos = write_subject_photos(out / "photos")
    print(f"[demo] wrote {len(photos)} photos of the subject ({INSTANCE_PROMPT!r} + context) into {out / 'photos'}")
    runs = {}
    for adapter in ADAPTERS:
        cfg = world_config(out / "photos", out / f"run-{adapter}", adapter, prior=True, text_encoder=True,
                           steps=steps, class_data_dir=out / "class_images")  # class images: made once, shared
        print(f"[demo] training {adapter} for {steps} steps on --model world (prior preservation, text-encoder adapter)")
        runs[adapter] = train(cfg)

    pipe = AdapterPipeline(WORLD_NAME, device="cpu")  # loaded once; adapters are switched on it
    pipe.pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.pipe.scheduler.config)
    for adapter, path in runs.items():
        pipe.load_adapter(path, adapter)
    rows, labels = [], []
    for label, weights, prompt in demo_rows(runs):
        pipe.set_adapters(weights)
        rows += sample(pipe.pipe, [prompt], list(range(num_images)), SIZE, 20, 5.0)
        labels.append(f"{label}: {prompt}")
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    sheet = grid(rows)
    sheet.resize((sheet.width * 3, sheet.height * 3), 0).save(samples / "before_after.png")
    (samples / "before_after.txt").write_text("\n".join(labels) + "\n")

    instruments = load_instruments(MODEL_DIR)
    real = [load_image(p) for p in photos]
    settings = WorldEvalSettings()
    sample_fn = pipeline_sampler(pipe.pipe, settings.steps, settings.guidance_scale)
    results = {}
    for name, weights in [("base", {})] + [(a, {a: 1.0}) for a in runs]:
        pipe.set_adapters(weights)
        results[name], _ = world_metrics(sample_fn, instruments, real, settings)
    from .runs.atomic import write_json

    write_json(out / "world_metrics.json", {"settings": vars(settings), "results": results})
    print("[demo] world metrics (held-out contexts; the evaluator stands in for DINO / CLIP):")
    print(format_world_table(results))
    print(f"[demo] done in {time.perf_counter() - start:.0f} s. Everything is in {out}/:")
    print("  photos/         the subject's photos, their captions and masks")
    print(f"  class_images/   {CLASS_PROMPT!r} images drawn by the base model (prior preservation)")
    for adapter, path in runs.items():
        print(f"  {Path(path).name + '/':<15} {adapter}: unet/, text_encoder/, report.html, config.yaml, README.md")
    print("  samples/        before_after.png, one row per line of before_after.txt:")
    for line in labels:
        print(f"                    {line}")
    print("  world_metrics.json")
    return {"runs": runs, "samples": samples / "before_after.png", "metrics": results}

