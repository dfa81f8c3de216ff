"""Sampling images from Stable Diffusion modules already in memory, shared by class images (prior.py),
validation (validation.py) and evaluation.

`in_memory_pipeline` wraps the modules (shared, not copied) in a pipeline with a DPM-Solver++ scheduler;
`sampling_state` puts them in the state sampling needs (eval mode, no gradients, on the device, the global RNGs
untouched, the VAE in its own dtype and in bounded chunks) and back; `sample_images` draws one prompt's images, image i
from its own seed, so the same index starts from the same noise whatever else is sampled beside it.
"""

from __future__ import annotations

import contextlib

import torch
from PIL import Image

from ..models.pipeline import assemble, call_kwargs, guidance_cutoff_kwargs
from ..models.vae import vae_calls

# ---------------------------------------------------------------------------------------------------------------
# model state


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
    sampling needs them on the GPU for a moment. Class images are made before the UNet is moved to the GPU.
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
    """Run the block without advancing the global RNGs: training draws the same noise with or without sampling."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def sampling_state(device: torch.device, vae: torch.nn.Module, modules: list[torch.nn.Module],
                   moved: list[torch.nn.Module], autocast=None):
    """The state every sampler here runs in, restored afterwards.

    `modules` go to eval mode (the PeftModel wrappers of trained parts included, so no adapter dropout), `moved`
    to `device` for the block; no gradients; the global RNGs are not advanced; `autocast` (a context manager, e.g.
    the Accelerator's) wraps the block; `vae` runs in its own dtype and in bounded chunks (models.vae_calls).
    """
    with torch.no_grad(), untouched_rng(device), eval_mode(*modules), on_device(device, *moved), \
            autocast or contextlib.nullcontext(), vae_calls(vae):
        yield


# ---------------------------------------------------------------------------------------------------------------
# sampling


def in_memory_pipeline(components):
    """A StableDiffusion(XL|3)Pipeline over the run's own modules (shared, not copied) with a DPM-Solver++ scheduler,
    or for SD3 the model's own flow-matching Euler scheduler.

    The scheduler is built from the model's own scheduler config, so a v-prediction model is sampled as one.
    DPM-Solver++ gives in 20-25 steps the quality DDPM needs 1000 steps for.
    """
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    cls = FlowMatchEulerDiscreteScheduler if components.is_sd3 else DPMSolverMultistepScheduler
    pipe = assemble(components, cls.from_config(components.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_seeds(seed: int, num_images: int) -> list[int]:
    """Seed of each image index: the same for every prompt and every step, so rows are comparable."""
    return [seed + i for i in range(num_images)]


def sample_images(pipe, prompt: str, seeds: list[int], steps: int, guidance_scale: float | None = None,
                  size: int | None = None, generator_device: str | torch.device = "cpu",
                  guidance_cutoff: float = 1.0) -> list[Image.Image]:
    """One image of `prompt` per seed, in one pipeline call: image i starts from the noise of seeds[i].

    guidance_scale: None: the pipeline's own default (7.5 for SD 1.x / 2.x, 5.0 for SDXL, 7.0 for SD3).
    size: height and width in pixels; None: the model's own (the UNet's sample size times the VAE's factor).
    generator_device: where each seed's generator draws; "cpu" gives the same starting noise on any device.
    guidance_cutoff: the share of the steps that are guided (1.0: all; models/pipeline.guidance_cutoff_kwargs).
    Call inside `sampling_state`.
    """
    generators = [torch.Generator(generator_device).manual_seed(s) for s in seeds]
    optional = {} if size is None else {"height": size, "width": size}
    if guidance_scale is not None:
        optional["guidance_scale"] = guidance_scale
    return pipe(prompt, num_images_per_prompt=len(seeds), generator=generators, num_inference_steps=steps,
                **optional, **call_kwargs(pipe), **guidance_cutoff_kwargs(pipe, guidance_cutoff)).images


def sample(pipe, prompts: list[str], seeds: list[int], resolution: int, steps: int, guidance_scale: float,
           guidance_cutoff: float = 1.0) -> list[list[Image.Image]]:
    """images[j][i]: prompt j from seed i, `resolution` px square, CPU generators."""
    return [sample_images(pipe, prompt, seeds, steps, guidance_scale, resolution, guidance_cutoff=guidance_cutoff)
            for prompt in prompts]


def grid(rows: list[list[Image.Image]]) -> Image.Image:
    """One row per prompt, one column per seed."""
    w, h = rows[0][0].size
    out = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for j, row in enumerate(rows):
        for i, img in enumerate(row):
            out.paste(img, (i * w, j * h))
    return out

