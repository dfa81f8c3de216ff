"""Validation during training: sample fixed prompts with the in-memory model every --validation-steps steps.

The pipeline is assembled from the training run's own modules (PEFT injected the adapter layers into them in
place), so what is sampled is exactly the model being trained: no copy, no reload from disk. Each image index has
its own fixed seed, so step N's image k starts from the same noise as step 0's image k and the rows of the report
show what training changed, not what the noise changed.

Images go to ``OUTPUT/validation/step_N/`` (``prompt00_00.png`` ..., ``grid.png``: one row per prompt) and, with
TensorBoard, the grid is logged under the tag ``validation``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..inference.sampling import grid, image_seeds, in_memory_pipeline, sample, sampling_state
from ..runs.atomic import write_json
from ..runs.rundir import VALIDATION_DIR, WARNING_FILE, step_dir, validation_steps_on_disk

# Two samples of the same seed are "the same" below this mean absolute difference (0-255 levels): a PNG round trip
# of one image gives 0, and an adapter that learned anything moves 32-px world samples by tens of levels.
SAME_IMAGES = 0.5
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


# ---------------------------------------------------------------------------------------------------------------
# writing


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


@dataclass(frozen=True)
class ValidationPlan:
    """What validation samples: every prompt `num_images` times, image k from seed `seed + k`, at `resolution`;
    the grid also goes to TensorBoard when `log`."""

    prompts: list[str]
    seed: int
    num_images: int
    resolution: int
    log: bool = False

    @classmethod
    def of(cls, cfg) -> "ValidationPlan":
        t = cfg.train
        return cls(list(t.validation_prompt), t.seed, t.num_validation_images, cfg.data.resolution,
                   t.report_to != "none")


def run_validation(accelerator, components, models: list, plan: ValidationPlan, output_dir: str | Path, step: int,
                   num_inference_steps: int | None = None, guidance_scale: float | None = None) -> list[Path]:
    """Sample every prompt of `plan` with the model as it is now: `components`' modules, with the adapters that
    `models` (the trained UNet and text encoders) hold.

    Adapters stay active; every module is in eval mode while sampling and gets its own training flag back
    afterwards; the global RNG state is left as it was. Returns the PNGs written (the grid not included); []
    without validation prompts and on processes other than the main one.
    """
    acc, c = accelerator, components
    if not plan.prompts or not acc.is_main_process:
        return []
    if step == 0:
        # a fresh run (or --overwrite): rows from an earlier run in this folder would be mixed into the report
        shutil.rmtree(Path(output_dir) / VALIDATION_DIR, ignore_errors=True)
    # the base modules: they hold the text-encoder adapter layers when those are trained
    t5 = [c.text_encoder_3] if c.text_encoder_3 is not None else []  # SD3's, offloaded after caching as the CLIPs
    with sampling_state(acc.device, c.vae, [*models, c.vae], [c.vae, *c.text_encoders, *t5], acc.autocast()):
        pipe = in_memory_pipeline(c)
        rows = sample(pipe, plan.prompts, image_seeds(plan.seed, plan.num_images), plan.resolution,
                      num_inference_steps or DEFAULT_INFERENCE_STEPS,
                      DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale)
    paths = write_images(step_dir(output_dir, step), rows)
    write_json(Path(output_dir) / VALIDATION_DIR / "prompts.json", plan.prompts)
    note_unchanged(output_dir, step)
    if plan.log:
        log_grid(acc, grid(rows), step)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# the warning: samples that stop changing


def mean_difference(a: Path, b: Path) -> float:
    with Image.open(a) as x, Image.open(b) as y:
        if x.size != y.size:
            return float("inf")
        return float(np.abs(np.asarray(x.convert("RGB"), np.int16) - np.asarray(y.convert("RGB"), np.int16)).mean())


def same_samples(output_dir: str | Path, step: int, other: int) -> bool:
    """Whether every sample of `step` equals the same prompt-and-seed sample of `other` (fixed seeds: only
    training can change them)."""
    mine = sorted(step_dir(output_dir, step).glob("prompt*.png"))
    return bool(mine) and all((step_dir(output_dir, other) / p.name).is_file()
                              and mean_difference(p, step_dir(output_dir, other) / p.name) < SAME_IMAGES for p in mine)


def unchanged_warning(output_dir: str | Path, step: int) -> str | None:
    """A line when step's samples equal the base model's (step 0) or the previous validation step's; else None.
    Training ran between them, so the adapter changes nothing visible: for this model, too low a learning rate,
    too few steps or too few layers."""
    earlier = [s for s in validation_steps_on_disk(output_dir) if s < step]
    if step == 0 or not earlier:
        return None
    hint = "raise --learning-rate or --max-train-steps, or adapt more layers (--target-modules all)"
    if 0 in earlier and same_samples(output_dir, step, 0):
        return (f"validation samples at step {step} equal the base model's (step 0): the adapter changes nothing "
                f"visible; {hint}")
    if same_samples(output_dir, step, earlier[-1]):
        return (f"validation samples stopped changing: step {step} equals step {earlier[-1]} although training "
                f"ran; {hint}")
    return None


def note_unchanged(output_dir: str | Path, step: int) -> None:
    """Keep validation/warning.json about the newest validation step: written when it warns, removed when not."""
    path = Path(output_dir) / VALIDATION_DIR / WARNING_FILE
    warning = unchanged_warning(output_dir, step)
    if warning:
        write_json(path, {"step": step, "warning": warning})
    else:
        path.unlink(missing_ok=True)
