"""Will the run fit on this GPU? The low-memory preset, and a fast estimate of peak memory checked before work.

The low-memory preset (`LOW_MEMORY`) has one owner, here: `train --low-memory` applies it under the flags given on
the command line, and the web UI's low-memory switch applies the same values to its form.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .memory_sd3 import T5_ACTIVATION, DiT, sample_activation, train_activation

# The low-memory preset: the same training in less memory. Gradient checkpointing recomputes the UNet's (and a
# trained text encoder's) activations in backward; bf16 frozen weights halve them (and are safe: bf16 needs no
# loss scaling); one image per step; the VAE and frozen text encoders asked once and moved off the GPU; class
# images one at a time. Not here: --use-8bit-adam (needs bitsandbytes, and AdamW's state is small for an adapter).
LOW_MEMORY: dict[str, object] = {
    "train.gradient_checkpointing": True, "train.mixed_precision": "bf16", "data.train_batch_size": 1,
    "train.cache_latents": True, "train.cache_text_states": True, "data.sample_batch_size": 1,
}


def apply_preset(cfg, preset: dict[str, object], given: set[str] | frozenset = frozenset()) -> None:
    """Set `cfg`'s fields from `preset` ({"section.field": value}), except the keys in `given` (the settings the
    user gave explicitly, which win over the preset)."""
    for key, value in preset.items():
        if key not in given:
            section, name = key.split(".", 1)
            setattr(getattr(cfg, section), name, value)


# --- the estimate ---------------------------------------------------------------------------------------------
# Calibrated on the fake-tensor traces of benchmarks/memory_estimate.py (BENCHMARKS.md, "Peak GPU memory by phase"):
# each constant is that trace's activation memory divided by what it scales with, so the formula reproduces the
# traced figures at their own settings and scales linearly in rows and pixels elsewhere (SDPA keeps no attention
# matrix, so activations grow with the token count, not its square). Bytes per latent pixel per batch row, at a
# 2-byte compute dtype (fp32: twice as much), for SD 1.x/2.x ("sd") and SDXL ("sdxl"):
# UNet forward + backward with a trained text encoder; the key is --gradient-checkpointing. SD 1.5 (LoRA r16 'all'
# + text-encoder adapter, 2 rows of 64 x 64 latents): 2805 MiB of activations without checkpointing, 586 MiB with.
# SDXL: PROVISIONAL, SD 1.5's figures, until its trace is in (BENCHMARKS.md).
TRAIN_ACTIVATION = {
    "sd": {False: 359_000, True: 75_000},
    "sdxl": {False: 359_000, True: 75_000},
}
# One no-grad UNet call while drawing class images. SD 1.5's trace with one image per VAE call: 649 MiB of
# activations for 8 rows (4 images, guided) of 64 x 64 latents, just above the 640 MiB decode, so the UNet call is
# at most 20.8 kB per latent pixel per row. SDXL's decode (3072 MiB, fp32) is the larger term in its trace, which
# bounds its UNet call by 3109 MiB for 8 rows of 128 x 128 latents: 24 kB.
SAMPLE_ACTIVATION = {"sd": 20_800, "sdxl": 24_000}
# SD3 / 3.5 ("sd3"): an MMDiT's activations go by token, not latent pixel: memory_sd3 (its constants and method).
# The VAE at full resolution, bytes per image pixel. Encoding (the latent cache, no autocast): 643 per byte of
# the VAE's dtype (SD 1.5 bf16, 4 x 512 px: 1286 MiB; SDXL fp32, 1 x 1024 px: 2572 MiB). Decoding (class
# images): a half VAE under autocast keeps its norms' fp32 outputs, 2560 per pixel; an fp32 VAE 3072.
VAE_ENCODE, VAE_DECODE = 643, {2: 2560, 4: 3072}
TEXT_ACTIVATION = 64 * 2**20  # a text encoder's activations for a few 77-token rows: small beside the rest
# Not in the traces: the allocator's fragmentation and cuBLAS/cuDNN workspaces. A margin, until a GPU run
# (benchmarks/gpu_session.sh prints estimate, free memory and the measured peak) calibrates it.
MARGIN_FACTOR, MARGIN_BYTES = 1.10, 256 * 2**20


@dataclass(frozen=True)
class Footprint:
    """What the estimate needs to know of the loaded model: parameter counts, not modules."""

    family: str  # "sd" (SD 1.x / 2.x), "sdxl" or "sd3"
    unet: int  # the denoiser's parameters and buffers (SD3: the transformer, its 384^2 position table included)
    text_encoders: tuple[int, ...]  # the CLIPs
    vae: int
    unet_adapter: int  # trainable parameters the UNet's adapter adds
    text_adapter: int = 0  # and the text encoders' (with --train-text-encoder)
    t5: int = 0  # SD3: T5's parameters when it is loaded (0 with --no-t5); never trained
    dit: DiT | None = None  # SD3: the transformer's shape, for its activations by token


@dataclass(frozen=True)
class Plan:
    """The run's settings that move memory, read from a resolved TrainConfig by `plan_of`."""

    resolution: int
    train_batch_size: int
    prior: bool  # prior preservation: a class row beside each instance row
    sample_batch_size: int
    class_images: bool  # class images still to be drawn
    gradient_checkpointing: bool
    compute_bytes: int  # 2 (bf16/fp16) or 4 (fp32): the frozen weights' dtype
    vae_bytes: int
    use_8bit_adam: bool = False
    train_text_encoder: bool = False
    cache_latents: bool = True
    cache_text_states: bool = True

    @property
    def rows(self) -> int:  # UNet rows per step
        return self.train_batch_size * (2 if self.prior else 1)


def estimate(fp: Footprint, p: Plan) -> dict[str, int]:
    """Estimated peak bytes of each phase ({"caching", "class-images", "training"}; class images only when still
    to be drawn), before the margin. Pure arithmetic: milliseconds."""
    latent_px = (p.resolution // 8) ** 2  # (H/8) x (W/8) latents
    image_px = p.resolution**2
    scale = p.compute_bytes / 2
    text = (sum(fp.text_encoders) + fp.t5) * p.compute_bytes
    text_act = TEXT_ACTIVATION + (T5_ACTIVATION if fp.t5 else 0)
    vae = fp.vae * p.vae_bytes
    from ..models.vae import vae_rows_per_call

    chunk = min(p.sample_batch_size, vae_rows_per_call(p.resolution, p.resolution))  # images per VAE call
    phases = {"caching": vae + text + max(text_act, VAE_ENCODE * p.vae_bytes * image_px * chunk)}
    if p.class_images:  # 2: guidance
        per_row = sample_activation(fp.dit, p.resolution) if fp.dit else SAMPLE_ACTIVATION[fp.family] * latent_px
        unet_call = per_row * scale * 2 * p.sample_batch_size
        decode = VAE_DECODE[p.vae_bytes] * image_px * chunk
        phases["class-images"] = fp.unet * p.compute_bytes + text + vae + max(unet_call, decode, text_act)
    # fp32 adapter weights and gradients, AdamW's two moments (fp32, or 1 byte each in 8-bit)
    adapter = (fp.unet_adapter + fp.text_adapter) * (8 + (2 if p.use_8bit_adam else 8))
    train = fp.unet * p.compute_bytes + adapter
    if fp.dit:  # SD3: by token (memory_sd3)
        train += train_activation(fp.dit, p.resolution, p.gradient_checkpointing) * scale * p.rows
    else:
        train += TRAIN_ACTIVATION[fp.family][p.gradient_checkpointing] * scale * p.rows * latent_px
    if p.train_text_encoder or not p.cache_text_states:  # the text states are then encoded every step (T5 too)
        train += text + text_act
    if not p.cache_latents:  # the VAE stays and encodes every step's rows
        train += vae + VAE_ENCODE * p.vae_bytes * image_px * min(p.rows, chunk)
    phases["training"] = train
    return phases


def with_margin(nbytes: int) -> int:
    return int(nbytes * MARGIN_FACTOR + MARGIN_BYTES)


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def peak(fp: Footprint, p: Plan) -> tuple[int, str]:
    """(bytes with the margin, phase) of the largest phase."""
    phase, nbytes = max(estimate(fp, p).items(), key=lambda kv: kv[1])
    return with_margin(nbytes), phase


def low_memory_plan(p: Plan) -> Plan:
    """`p` under the LOW_MEMORY preset (bf16 frozen weights; a VAE kept in fp32 by the policy stays fp32)."""
    vae_bytes = p.vae_bytes if p.vae_bytes != p.compute_bytes else 2
    return replace(p, gradient_checkpointing=True, compute_bytes=2, vae_bytes=vae_bytes, train_batch_size=1,
                   cache_latents=True, cache_text_states=True, sample_batch_size=1)


def alternatives(p: Plan) -> list[tuple[str, Plan]]:
    """The settings the refusal may name, cheapest change first: (flags, plan)."""
    out = []
    if not p.gradient_checkpointing:
        out.append(("--gradient-checkpointing", replace(p, gradient_checkpointing=True)))
    if not p.use_8bit_adam:
        out.append(("--use-8bit-adam", replace(p, use_8bit_adam=True)))
    low = low_memory_plan(p)
    if low != p:
        out.append(("--low-memory", low))
    base = [("", p)] + ([("--low-memory ", low)] if low != p else [])
    for prefix, plan in base:  # the largest lower resolution that fits is added by `refusal`
        for r in range((p.resolution - 1) // 128 * 128, 255, -128):
            out.append((f"{prefix}--resolution {r}", replace(plan, resolution=r)))
    return out


def refusal(fp: Footprint, p: Plan, free: int, device: str) -> str | None:
    """None when the run's estimated peak fits in `free` bytes; else the one-line reason, naming what would fit."""
    need, phase = peak(fp, p)
    if need <= free:
        return None
    fits, smallest, resolutions = [], None, set()
    for flags, plan in alternatives(p):
        nbytes = peak(fp, plan)[0]
        if smallest is None or nbytes < smallest[1]:
            smallest = (flags, nbytes)
        prefix = flags.rsplit("--resolution", 1)[0]
        # of the resolutions, only the largest that fits, and none under a preset that fits at this resolution
        if nbytes <= free and prefix not in resolutions:
            fits.append(f"{flags} ({gib(nbytes)})")
            resolutions.add(prefix if "--resolution" in flags else flags + " ")
    what = (f"would fit: {', '.join(fits)}" if fits else
            f"nothing smaller fits: the least, {smallest[0]}, needs {gib(smallest[1])}")
    return (f"not enough GPU memory: the run needs about {gib(need)} (peak in {phase}, estimated) and {device} has "
            f"{gib(free)} free; {what}; or --no-memory-check to start anyway")


# --- the check in `train` -------------------------------------------------------------------------------------


def device_memory() -> tuple[int, str] | None:
    """(free bytes, name) of this process's CUDA device; None without one (then nothing is checked)."""
    import os

    import torch

    from ..precision import accelerate_device

    if accelerate_device().type != "cuda":
        return None
    index = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
    free, _ = torch.cuda.mem_get_info(index)
    return free, f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def adapter_size(model, targets: list[str], rank: int, kind: str) -> int:
    """Trainable parameters an adapter of `rank` on the modules named `targets` adds: LoRA r x (fan-in + out)
    per layer, LoHa twice that; LoKr is counted as LoRA (its factors are smaller: an upper bound)."""
    import torch

    total = 0
    for name, module in model.named_modules():
        hit = any(name == t or name.endswith("." + t) for t in targets)  # PEFT's rule: the end of the path
        if hit and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_in = module.weight[0].numel()  # in_features, or in_channels x kh x kw
            total += rank * (fan_in + module.weight.shape[0])
    return total * (2 if kind == "loha" else 1)


def footprint_of(cfg, components) -> Footprint:
    """Parameter counts of the loaded components and of the adapters `cfg` (resolved) will attach."""
    from ..adapters.peft_config import TEXT_ENCODER_PRESETS, denoiser_presets, target_modules
    from .memory_sd3 import dit_of

    def count(m):  # buffers too: they are on the device (SD3's position table: 226 M values)
        return sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())

    u, te = cfg.unet_adapter, cfg.text_encoder_adapter
    text_adapter = 0
    if cfg.train.train_text_encoder:
        targets = target_modules(te.target_modules, TEXT_ENCODER_PRESETS)
        text_adapter = sum(adapter_size(m, targets, te.rank, te.adapter) for m in components.text_encoders)
    t5 = getattr(components, "text_encoder_3", None)
    sd3 = components.family == "sd3"
    return Footprint(components.family, count(components.unet), tuple(count(m) for m in components.text_encoders),
                     count(components.vae),
                     adapter_size(components.unet, target_modules(u.target_modules, denoiser_presets(components.family)),
                                  u.rank, u.adapter),
                     text_adapter, count(t5) if sd3 and t5 is not None else 0,
                     dit_of(components.unet, components.max_sequence_length) if sd3 else None)


def class_images_missing(cfg) -> bool:
    """Prior preservation with fewer class images on disk than --num-class-images (nothing is read or written)."""
    from ..data.images import list_images
    from ..runs.rundir import RunDir

    d = cfg.data
    if not d.with_prior_preservation:
        return False
    folder = RunDir(cfg.train.output_dir).class_images_of(d.class_data_dir)
    return not folder.is_dir() or len(list_images(folder, "--class-data-dir")) < d.num_class_images


def plan_of(cfg, precision) -> Plan:
    """The memory-relevant settings of a resolved `cfg`, with the dtypes the precision policy chose."""
    d, t = cfg.data, cfg.train
    return Plan(d.resolution, d.train_batch_size, d.with_prior_preservation, d.sample_batch_size,
                class_images_missing(cfg), t.gradient_checkpointing, precision.compute.itemsize,
                precision.vae.itemsize, t.use_8bit_adam, t.train_text_encoder, t.cache_latents and d.center_crop,
                t.cache_text_states)


def check_memory(cfg, components) -> None:
    """Before anything is written: refuse (UsageError, exit 2) a run on a CUDA device whose estimated peak memory
    is more than the device's free memory. Skipped with --no-memory-check and without a CUDA device."""
    from ..config.sections import UsageError
    from ..models.vae import vae_force_upcast
    from ..precision import for_training

    if not cfg.train.memory_check:
        return
    device = device_memory()
    if device is None:
        return
    precision = for_training(cfg.train.mixed_precision, "cuda", components.family, vae_force_upcast(components.vae),
                             cfg.model.upcast_vae)
    reason = refusal(footprint_of(cfg, components), plan_of(cfg, precision), *device)
    if reason:
        raise UsageError(reason)
