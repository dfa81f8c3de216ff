"""Validation during training: sample fixed prompts with the in-memory model every --validation-steps steps.

The pipeline is assembled from the training run's own modules (PEFT injected the adapter layers into them in
place), so what is sampled is exactly the model being trained: no copy, no reload from disk. Each image index has
its own fixed seed, so step N's image k starts from the same noise as step 0's image k and the rows of the report
show what training changed, not what the noise changed.

Images go to ``OUTPUT/validation/step_N/`` (``prompt00_00.png`` ..., ``grid.png``: one row per prompt) and, with
TensorBoard, the grid is logged under the tag ``validation``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .models import vae_in_own_dtype

VALIDATION_DIR = "validation"
# Read at call time, so a test (or a caller without the arguments, like fit) can change them in one place.
DEFAULT_INFERENCE_STEPS = 25  # DPM-Solver++: close to converged for SD 1.x / 2.x
DEFAULT_GUIDANCE_SCALE = 7.5


# ---------------------------------------------------------------------------------------------------------------
# when


def validation_schedule(max_train_steps: int, every: int) -> list[int]:
    """Steps at which validation runs: 0 (before training), every `every` steps, and the last step."""
    steps = list(range(0, max_train_steps + 1, every))
    if steps[-1] != max_train_steps:
        steps.append(max_train_steps)  # the finished adapter always gets a row, whatever the interval
    return steps


def should_validate(cfg, step: int) -> bool:
    """Whether `step` (0 = before the first optimizer step) is a validation step of this config."""
    t = cfg.train
    if not t.validation_prompt:
        return False
    return step % t.validation_steps == 0 or step == t.max_train_steps


def step_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / VALIDATION_DIR / f"step_{step}"


def validation_steps_on_disk(output_dir: str | Path) -> list[int]:
    """Steps with a validation folder in a run folder, in numeric order (step_100 after step_20)."""
    root = Path(output_dir) / VALIDATION_DIR
    steps = []
    for d in root.glob("step_*") if root.is_dir() else []:
        suffix = d.name[len("step_"):]
        if d.is_dir() and suffix.isdigit():
            steps.append(int(suffix))
    return sorted(steps)


# ---------------------------------------------------------------------------------------------------------------
# model state helpers (shared with the offline proxies in evaluate.py)


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module):
    """Put every submodule in eval mode (no adapter/LoRA dropout) and restore each one's own flag afterwards.

    Restoring per submodule, not calling .train() at the end, keeps whatever mix the caller had (frozen parts in
    eval, trained parts in train) and works before training, when everything is still in eval mode.
    """
    flags = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextlib.contextmanager
def on_device(device: torch.device, *models: torch.nn.Module):
    """Move models to `device` for the block and back to where each was.

    On a GPU the VAE and a frozen text encoder are moved to the CPU once their outputs are cached (train.offload);
    sampling needs them on the GPU for a moment.
    """
    homes = [(m, module_device(m)) for m in models]
    moved = [(m, home) for m, home in homes if home != device]
    for m, _ in moved:
        m.to(device)
    try:
        yield
    finally:
        for m, home in moved:
            m.to(home)
        if moved and device.type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def untouched_rng(device: torch.device):
    """Run the block without advancing the global RNGs: training draws the same noise with or without validation."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


# ---------------------------------------------------------------------------------------------------------------
# sampling


def in_memory_pipeline(components):
    """A StableDiffusion(XL)Pipeline over the run's own modules (shared, not copied) with a DPM-Solver++ scheduler.

    The scheduler is built from the model's own scheduler config, so a v-prediction model is sampled as one.
    """
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    c = components
    scheduler = DPMSolverMultistepScheduler.from_config(c.noise_scheduler.config)
    if c.is_sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer,
            tokenizer_2=c.tokenizer_2, unet=c.unet, scheduler=scheduler, add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_seeds(seed: int, num_images: int) -> list[int]:
    """Seed of each image index: the same for every prompt and every step, so rows are comparable."""
    return [seed + i for i in range(num_images)]


def sample(pipe, prompts: list[str], seeds: list[int], resolution: int, steps: int, guidance_scale: float
           ) -> list[list[Image.Image]]:
    """images[j][i]: prompt j from seed i. CPU generators: the same starting noise on any device."""
    rows = []
    for prompt in prompts:
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        rows.append(pipe(prompt, num_images_per_prompt=len(seeds), generator=generators, height=resolution,
                         width=resolution, num_inference_steps=steps, guidance_scale=guidance_scale).images)
    return rows


def grid(rows: list[list[Image.Image]]) -> Image.Image:
    """One row per prompt, one column per seed."""
    w, h = rows[0][0].size
    out = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for j, row in enumerate(rows):
        for i, img in enumerate(row):
            out.paste(img, (i * w, j * h))
    return out


def write_images(folder: Path, rows: list[list[Image.Image]]) -> list[Path]:
    """prompt{j}_{i}.png per image and grid.png; returns the per-image paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for j, row in enumerate(rows):
        for i, img in enumerate(row):
            paths.append(folder / f"prompt{j:02d}_{i:02d}.png")
            img.save(paths[-1])
    grid(rows).save(folder / "grid.png")
    return paths


def log_grid(accelerator, image: Image.Image, step: int) -> None:
    """Log the grid to TensorBoard when that tracker is active (report_to=tensorboard)."""
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "tensorboard":
            tracker.log_images({"validation": np.asarray(image)[None]}, step=step, dataformats="NHWC")


def run_validation(run, step: int, num_inference_steps: int | None = None,
                   guidance_scale: float | None = None) -> list[Path]:
    """Sample every --validation-prompt --num-validation-images times with the model as it is now.

    `run` is train.Run. Adapters stay active; every module is in eval mode while sampling and gets its own
    training flag back afterwards; the global RNG state is left as it was. Returns the PNGs written (the grid not
    included); [] without validation prompts and on processes other than the main one.
    """
    t, acc, c = run.cfg.train, run.accelerator, run.components
    prompts = list(t.validation_prompt)
    if not prompts or not acc.is_main_process:
        return []
    if step == 0:
        # a fresh run (or --overwrite): rows from an earlier run in this folder would be mixed into the report
        shutil.rmtree(Path(run.output_dir) / VALIDATION_DIR, ignore_errors=True)
    # the base modules: they hold the text-encoder adapter layers when those are trained
    text_encoders = c.text_encoders
    with torch.no_grad(), untouched_rng(acc.device), eval_mode(run.unet, *run.text_encoders, c.vae), \
            on_device(acc.device, c.vae, *text_encoders), acc.autocast(), vae_in_own_dtype(c.vae):
        pipe = in_memory_pipeline(c)
        rows = sample(pipe, prompts, image_seeds(t.seed, t.num_validation_images), run.cfg.data.resolution,
                      num_inference_steps or DEFAULT_INFERENCE_STEPS,
                      DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale)
    paths = write_images(step_dir(run.output_dir, step), rows)
    (Path(run.output_dir) / VALIDATION_DIR / "prompts.json").write_text(json.dumps(prompts, indent=1))
    if t.report_to != "none":
        log_grid(acc, grid(rows), step)
    return paths


def maybe_validate(run, step: int, **kwargs) -> list[Path]:
    """run_validation at the configured steps (0, every --validation-steps, the last); [] otherwise."""
    if not should_validate(run.cfg, step):
        return []
    return run_validation(run, step, **kwargs)
