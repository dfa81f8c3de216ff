"""Offline proxies computed at the end of training (no evaluator model): ``write_proxies(ProxyInputs)`` ->
OUT/proxies.json.

* instance loss: the denoising loss of the instance images under their prompts, before (adapters disabled, which
  is the model before training: every adapter starts as a zero update) and after, on fixed noise and timesteps;
* class drift: how far the adapted model's predictions for class images under the class prompt moved from the
  base model's, on the same fixed noise and timesteps. Compare it between a run with and one without prior
  preservation; its size on one random model says nothing by itself.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..runs.atomic import write_json
from ..runs.rundir import PROXIES_FILE, RunDir

# ---------------------------------------------------------------------------------------------------------------
# offline proxies (end of training)


def fixed_timesteps(num_train_timesteps: int, k: int) -> list[int]:
    """k timesteps at the centres of k equal bins of [0, T): every noise level gets the same weight."""
    return [(2 * i + 1) * num_train_timesteps // (2 * k) for i in range(k)]


def fixed_noise(k: int, shape: tuple, seed: int) -> torch.Tensor:
    """(k, *shape) standard normal noise from a CPU generator: identical on every device and in every call."""
    return torch.randn((k, *shape), generator=torch.Generator("cpu").manual_seed(seed))


@torch.no_grad()
def predictions(unet, scheduler, latents: torch.Tensor, context: torch.Tensor, timesteps: list[int],
                noise: torch.Tensor, added: dict | None = None, chunk: int = 8, flow_matching: bool = False
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(predictions, targets) per fixed timestep, fp32 on the latents' device. latents (N, C, h, w); `added`:
    SDXL's added_cond_kwargs or SD3's pooled_projections, each (N, ...). `flow_matching` (SD3): timestep t is the
    point sigma = t / T of the line from the latents to the noise, and the target the velocity noise - latents."""
    from .flow import flow_target, noisy_latents
    from .losses import diffusion_target
    from .objective import call_denoiser

    def rows(s):
        return None if added is None else {k: v[s : s + chunk] for k, v in added.items()}

    preds, targets = [], []
    num_train_timesteps = scheduler.config.num_train_timesteps
    for k, t in enumerate(timesteps):
        tt = torch.full((latents.shape[0],), t, device=latents.device,
                        dtype=latents.dtype if flow_matching else torch.long)
        eps = noise[k].to(latents.device, latents.dtype)
        if flow_matching:
            noisy = noisy_latents(latents, eps, tt.float() / num_train_timesteps)
        else:
            noisy = scheduler.add_noise(latents, eps, tt)
        # in chunks: a folder of 20 photos at 768 px is one UNet batch too many on a small GPU
        preds.append(torch.cat([call_denoiser(unet, noisy[s : s + chunk], tt[s : s + chunk], context[s : s + chunk],
                                              rows(s)).float()
                                for s in range(0, latents.shape[0], chunk)]))
        target = flow_target(latents, eps, False) if flow_matching else diffusion_target(scheduler, latents, eps, tt)
        targets.append(target.float())
    return preds, targets


def mse_per_timestep(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    return [float(F.mse_loss(x, y)) for x, y in zip(a, b)]


def mean_square(a: list[torch.Tensor]) -> float:
    return float(torch.stack([x.pow(2).mean() for x in a]).mean())


def peft_handle(accelerator, module):
    """The PeftModel under Accelerate's and torch.compile's wrappers (for disable_adapter)."""
    module = accelerator.unwrap_model(module)
    return getattr(module, "_orig_mod", module)


@contextlib.contextmanager
def adapters_disabled(*peft_models):
    with contextlib.ExitStack() as stack:
        for m in peft_models:
            if m is not None and hasattr(m, "disable_adapter"):
                stack.enter_context(m.disable_adapter())
        yield


def _latents(vae, images: list, resolution: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior means (not samples: the proxy must not depend on a random draw), scaled for the UNet, and
    each center crop's SDXL time ids (N, 6)."""
    from ..data.images import ORIGINAL_SIZE
    from ..data.transforms import micro_conditioning, resize_crop_coords, to_tensor

    pixels, time_ids = [], []
    for img in images:
        crop, top_left = resize_crop_coords(img, resolution, True, False)
        pixels.append(to_tensor(crop))
        time_ids.append(micro_conditioning(img.info.get(ORIGINAL_SIZE, img.size), top_left, resolution))
    # in the VAE's own dtype and in bounded chunks: the caller runs this inside models.vae_calls
    means = vae.encode(torch.stack(pixels).to(device)).latent_dist.mean  # (N, C, h, w)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)  # SD3's VAE: (z - shift) * scale
    return ((means - shift) * float(vae.config.scaling_factor)).to(dtype), torch.stack(time_ids).to(device)


def _context(components, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context, pooled) of prompts through the text encoders as they are now (adapters included)."""
    from ..data.dataset import tokenize
    from ..models.components import encode_text

    ids = [tokenize(tok, prompts).to(device) for tok in components.tokenizers]
    return encode_text(components.text_encoders, ids, components.t5)


def _added(components, pooled: torch.Tensor | None, time_ids: torch.Tensor) -> dict | None:
    """The denoiser's added conditioning: SD3's pooled projections, SDXL's pooled embedding and time ids."""
    from ..models.components import added_conditioning

    return {"pooled_projections": pooled} if components.is_sd3 else added_conditioning(pooled, time_ids)


def class_images_for(cfg, output_dir: Path, limit: int) -> list[Path]:
    """Readable class images of the run (its --class-data-dir, else OUTPUT/class_images), first `limit`."""
    from .prior import valid_class_images

    folder = RunDir(output_dir).class_images_of(cfg.data.class_data_dir)
    if not folder.is_dir():
        return []
    return valid_class_images(folder)[0][:limit]  # a corrupt file left by a crash is skipped, as in training


@dataclass
class ProxyInputs:
    """What the proxies read of a run at the end of training."""

    cfg: object  # the run's TrainConfig (data settings, seed)
    accelerator: object
    components: object  # models.components.Components: the frozen modules, the adapters injected into them
    models: list[torch.nn.Module]  # the UNet and text encoders as trained (put in eval mode while measuring)
    adapters: dict[str, torch.nn.Module]  # the trained parts, whose adapters "before" disables
    photos: list  # the instance images, as setup decoded them for training
    prompts: list[str]  # their prompts
    output_dir: Path
    weight_dtype: torch.dtype  # the frozen weights' compute dtype


def compute_proxies(inputs: ProxyInputs, num_timesteps: int = 10, max_class_images: int = 8,
                    seed: int | None = None) -> dict:
    """Instance loss before/after and class drift of a trained run, on fixed noise and timesteps.

    "Before" is the model with its adapters disabled, which is the model before training: LoRA, LoHa and LoKr
    all start as a zero update. Class drift needs a class prompt and class images (the run's class-image folder);
    for a run without prior preservation give it --class-prompt and --class-data-dir to measure it too.
    """
    from ..data.images import load_captions, load_image
    from ..inference.sampling import eval_mode, on_device, untouched_rng
    from ..models.vae import vae_calls

    cfg, acc, c = inputs.cfg, inputs.accelerator, inputs.components
    d, device = cfg.data, acc.device
    seed = cfg.train.seed if seed is None else seed
    timesteps = fixed_timesteps(c.noise_scheduler.config.num_train_timesteps, num_timesteps)
    # the photos and per-image prompts as setup decoded them for training: not read a second time
    instance_images, instance_prompts = inputs.photos, inputs.prompts
    class_paths = class_images_for(cfg, inputs.output_dir, max_class_images) if d.class_prompt else []
    handles = [peft_handle(acc, m) for m in inputs.adapters.values()]

    result = {"timesteps": timesteps, "noise_seed": seed, "with_prior_preservation": d.with_prior_preservation,
              "latents": "VAE posterior mean", "class": None, "class_note": None}
    with torch.no_grad(), untouched_rng(device), eval_mode(*inputs.models, c.vae), \
            on_device(device, c.vae, *c.text_encoders, *([c.text_encoder_3] if c.text_encoder_3 is not None else [])), \
            acc.autocast(), vae_calls(c.vae):
        groups = {"instance": (instance_images, instance_prompts)}
        if class_paths:
            groups["class"] = ([load_image(p) for p in class_paths], load_captions(class_paths, d.class_prompt))
        runs = {}
        for name, (images, prompts) in groups.items():
            latents, time_ids = _latents(c.vae, images, d.resolution, device, inputs.weight_dtype)
            noise = fixed_noise(len(timesteps), tuple(latents.shape), seed if name == "instance" else seed + 1)
            # the prompts are encoded in each state: a trained text-encoder adapter is part of "after"
            ctx, pooled = _context(c, prompts, device)
            after = predictions(c.unet, c.noise_scheduler, latents, ctx, timesteps, noise,  # (preds, targets)
                                _added(c, pooled, time_ids), flow_matching=c.is_sd3)
            with adapters_disabled(*handles):
                ctx, pooled = _context(c, prompts, device)
                before = predictions(c.unet, c.noise_scheduler, latents, ctx, timesteps, noise,
                                     _added(c, pooled, time_ids), flow_matching=c.is_sd3)
            runs[name] = (before, after, len(images), prompts)

    def losses(before, after):
        b, a = mse_per_timestep(before[0], before[1]), mse_per_timestep(after[0], after[1])
        return {"loss_before": sum(b) / len(b), "loss_after": sum(a) / len(a),
                "per_timestep": {"before": b, "after": a}}

    before, after, n, prompts = runs["instance"]
    result["instance"] = {"images": n, "prompts": sorted(set(prompts)), **losses(before, after)}
    if "class" in runs:
        before, after, n, _ = runs["class"]
        drift = mse_per_timestep(after[0], before[0])  # adapted vs base prediction, same inputs
        result["class"] = {
            "images": n, "prompt": d.class_prompt,
            "drift": sum(drift) / len(drift),
            # relative to the size of the base prediction: comparable across models and prediction types
            "relative_drift": (sum(drift) / len(drift)) / max(mean_square(before[0]), 1e-12),
            "drift_per_timestep": drift,
            **losses(before, after),
        }
    elif not d.class_prompt:
        result["class_note"] = "no --class-prompt: class drift not measured"
    else:
        result["class_note"] = ("no class images found (--class-data-dir or OUTPUT/class_images): "
                                "class drift not measured")
    return result


def write_proxies(inputs: ProxyInputs, **kwargs) -> dict | None:
    """compute_proxies, written to OUTPUT/proxies.json and summed up in one line. Main process only."""
    if not inputs.accelerator.is_main_process:
        return None
    result = compute_proxies(inputs, **kwargs)
    write_json(Path(inputs.output_dir) / PROXIES_FILE, result)
    inputs.accelerator.print(proxies_summary(result))
    return result


def proxies_summary(p: dict) -> str:
    i = p["instance"]
    line = f"instance loss {i['loss_before']:.4f} -> {i['loss_after']:.4f}"
    if p.get("class"):
        line += f"; class drift {p['class']['relative_drift']:.4f} (relative)"
    return line

