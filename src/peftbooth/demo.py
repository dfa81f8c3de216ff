"""`peftbooth demo`: the whole workflow offline on CPU, in about a minute.

Draws a few photos of a synthetic subject, trains a LoRA, a LoHa and a LoKr adapter on the tiny random model with
prior preservation, then generates before/after images with the base model loaded once.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from PIL import Image, ImageDraw

from .config import TrainConfig

INSTANCE_PROMPT = "a photo of sks toy"
CLASS_PROMPT = "a photo of a toy"


def draw_subject_photos(folder: Path, n: int = 5, size: int = 96, seed: int = 0) -> list[Path]:
    """The 'subject': a red block with a yellow eye, at varying places and sizes on varying backgrounds."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.new("RGB", (size, size), tuple(rng.randint(60, 200) for _ in range(3)))
        d = ImageDraw.Draw(img)
        s = rng.randint(size // 3, size // 2)
        x, y = rng.randint(4, size - s - 4), rng.randint(4, size - s - 4)
        d.rectangle((x, y, x + s, y + s), fill=(210, 30, 30))
        d.ellipse((x + s // 4, y + s // 4, x + 3 * s // 4, y + 3 * s // 4), fill=(250, 220, 40))
        paths.append(folder / f"toy_{i}.png")
        img.save(paths[-1])
    return paths


def run_demo(output_dir: str | Path = "demo-output", steps: int = 30, resolution: int = 64) -> dict:
    from .inference import AdapterPipeline, image_grid
    from .train import train

    out = Path(output_dir)
    start = time.perf_counter()
    photos = out / "photos"
    draw_subject_photos(photos)
    print(f"[demo] drew {len(list(photos.glob('*.png')))} photos of the subject into {photos}")
    runs = {}
    for adapter in ("lora", "loha", "lokr"):
        cfg = TrainConfig()
        cfg.model.model = "tiny"
        cfg.unet_adapter.adapter = adapter
        cfg.unet_adapter.rank = 8
        cfg.unet_adapter.target_modules = "all"
        cfg.data.instance_data_dir = str(photos)
        cfg.data.instance_prompt = INSTANCE_PROMPT
        cfg.data.resolution = resolution
        cfg.data.random_flip = True
        cfg.data.with_prior_preservation = True
        cfg.data.class_prompt = CLASS_PROMPT
        cfg.data.class_data_dir = str(out / "class_images")  # shared: generated once, reused by the next runs
        cfg.data.num_class_images = 4
        cfg.data.class_image_steps = 10
        cfg.train.output_dir = str(out / f"run-{adapter}")
        cfg.train.overwrite = True
        cfg.train.max_train_steps = steps
        cfg.train.learning_rate = 1e-3
        cfg.train.train_text_encoder = adapter == "lora"
        cfg.train.logging_steps = 10
        print(f"[demo] training {adapter} for {steps} steps"
              + (" (+ text-encoder adapter)" if cfg.train.train_text_encoder else ""))
        runs[adapter] = train(cfg)

    pipe = AdapterPipeline("tiny")  # loaded once; adapters are swapped on it
    rows = [("base", {})]
    for adapter, path in runs.items():
        pipe.load_adapter(path, adapter)
        rows.append((adapter, {adapter: 1.0}))
    rows.append(("mix lora+lokr", {"lora": 0.5, "lokr": 0.5}))
    images = []
    for _, weights in rows:
        pipe.set_adapters(weights)
        images += pipe.generate(INSTANCE_PROMPT, num_images=2, seed=0, steps=10)
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    image_grid(images, cols=2).save(samples / "before_after.png")
    print(f"[demo] rows of samples/before_after.png: {', '.join(name for name, _ in rows)}")
    print(f"[demo] done in {time.perf_counter() - start:.0f} s. Everything is in {out}/:")
    print(f"  photos/         the synthetic subject photos ({INSTANCE_PROMPT!r})")
    print(f"  class_images/   class images made by the base model ({CLASS_PROMPT!r})")
    for adapter, path in runs.items():
        extra = " + text_encoder/" if (Path(path) / "text_encoder").is_dir() else ""
        print(f"  {Path(path).name + '/':<15} {adapter}: unet/{extra}, report.html, proxies.json, config.yaml, README.md")
    print("  samples/        before_after.png: base, each adapter, and a 50/50 mix, same seed")
    return {"runs": runs, "samples": samples / "before_after.png"}
