"""DreamBooth training: ``setup`` validates and builds everything, ``fit`` is the loop, ``save`` writes the run.

Read top to bottom: nothing is written to disk until every input has been checked.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import adapters as ad
from . import factored
from .cache import LatentCache, TextCache
from .checkpoint import (
    CHECKPOINTS, TrainState, acquire_lock, check_compatible, data_fingerprint, list_checkpoints, load_checkpoint,
    release_lock, resolve_resume, save_checkpoint,
)
from .config import TrainConfig, UsageError, to_dict
from .data import DreamBoothDataset, EpochSampler, collate, list_images, load_captions, load_image
from .evaluate import write_proxies
from .hub import check_repo_id, hub_token, model_card, push
from .models import Components, check_vae_arg, load_components
from .objective import (
    LossParts, ObjectiveSettings, batch_conditioning, batch_posterior, row_generators, training_loss,
)
from .report import write_report
# SIGNAL_STEPS and TrainingInterrupted are imported from here by the CLI and tests too
from .signals import (  # noqa: F401
    SIGNAL_STEPS, StopSignals, TrainingInterrupted, all_true, end_training, signal_interval,
)
from .tracking import LossWindow, ScalerSkips
from .validation import maybe_validate

RUN_MARKER = Path("unet") / "adapter_model.safetensors"  # a folder holding this is a finished run


@dataclass
class Run:
    """Everything `fit` needs, built by `setup`."""

    cfg: TrainConfig
    accelerator: object
    components: Components
    unet: torch.nn.Module  # PeftModel around the UNet (prepared by Accelerate)
    text_encoder: torch.nn.Module  # PeftModel when trained, else the frozen CLIPTextModel
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    dataloader: DataLoader
    weight_dtype: torch.dtype
    output_dir: Path
    sampler: EpochSampler
    dataset: DreamBoothDataset
    state: TrainState  # where the loop stands (fresh, or restored from a checkpoint)
    fingerprint: str  # of the instance photos, recorded in checkpoints
    lock: Path | None = None
    latent_cache: LatentCache | None = None  # VAE posteriors per (image, flip), when cached
    text_cache: TextCache | None = None  # text-encoder states per prompt, when the text encoder is frozen
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second text encoder (PeftModel when trained)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    def trained(self) -> dict[str, torch.nn.Module]:
        """The models with adapters, by the folder name their adapter is saved under."""
        parts = {"unet": self.unet}
        if self.cfg.train.train_text_encoder:
            parts["text_encoder"] = self.text_encoder
            if self.text_encoder_2 is not None:
                parts["text_encoder_2"] = self.text_encoder_2
        return parts


def train(cfg: TrainConfig) -> Path:
    """Run a whole training job; return the output folder."""
    run = setup(cfg)
    try:
        stats = fit(run)
        stats["proxies"] = proxies_or_warning(run)
        return save(run, stats)
    finally:
        release_lock(run.lock)


def proxies_or_warning(run: Run) -> dict | None:
    """Instance loss before/after and class drift -> OUTPUT/proxies.json. A measurement must never cost the user
    the adapter they just trained: a failure here is a warning, and saving goes on."""
    try:
        return write_proxies(run)
    except Exception as e:  # noqa: BLE001 - anything at all: the trained adapter is saved regardless
        warnings.warn(f"proxies not computed ({type(e).__name__}: {e})", stacklevel=2)
        return None


# ---------------------------------------------------------------------------------------------------------------
# setup


def check_inputs(cfg: TrainConfig) -> tuple[list, list[str], str, Path | None]:
    """Validate config, output folder, photos and resume; return (images, prompts, fingerprint, checkpoint).

    Writes nothing.
    """
    cfg.validate()
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out}: is a file")
    if (out / RUN_MARKER).exists() and not cfg.train.overwrite:
        raise UsageError(f"--output-dir {out}: already holds a finished run; pass --overwrite or choose another folder")
    # complete checkpoints only: a run killed while writing its first one leaves just a .tmp- folder, which
    # --resume latest cannot use and a fresh start replaces
    if list_checkpoints(out) and not cfg.train.resume and not cfg.train.overwrite:
        raise UsageError(f"--output-dir {out}: holds checkpoints of an unfinished run; pass --resume latest to "
                         "continue it, or --overwrite to start over (its checkpoints are deleted)")
    check_vae_arg(cfg.model.vae)
    d = cfg.data
    paths = list_images(d.instance_data_dir, "--instance-data-dir")
    if not paths:
        raise UsageError(f"--instance-data-dir {d.instance_data_dir}: no images (jpg, jpeg, png, webp) found")
    images = [load_image(p, max_side=2 * d.resolution) for p in paths]
    for p, img in zip(paths, images):
        if min(img.size) < 8:
            raise UsageError(f"{p}: image is only {img.size[0]}x{img.size[1]} px; use photos of at least 8 px a side")
    fingerprint = data_fingerprint(paths)
    checkpoint = None
    if cfg.train.resume:
        checkpoint = resolve_resume(cfg.train.resume, out)
        check_compatible(checkpoint, cfg, fingerprint, cfg.train.resume_force)
    if d.with_prior_preservation and d.class_data_dir and Path(d.class_data_dir).is_file():
        raise UsageError(f"--class-data-dir {d.class_data_dir}: is a file, not a folder")
    if cfg.train.mixed_precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise UsageError("--mixed-precision bf16: this GPU has no bf16 support; use --mixed-precision fp16")
    from accelerate import PartialState

    if cfg.train.mixed_precision == "fp16" and PartialState().device.type == "cpu":
        # Accelerate runs fp16 on the CPU with neither autocast nor a gradient scaler: fp16 gradients would
        # underflow unseen
        raise UsageError("--mixed-precision fp16: needs a GPU (on the CPU there is no fp16 autocast or gradient "
                         "scaler); use --mixed-precision bf16 or no")
    if cfg.train.push_to_hub:  # refuse now, not after an hour of training
        check_repo_id(cfg.train.push_to_hub)
        hub_token()
    if cfg.train.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UsageError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes") from None
    return images, load_captions(paths, d.instance_prompt), fingerprint, checkpoint


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def cpu_processes_from_launcher() -> None:
    """Plain `torchrun --nproc_per_node N` on a machine without a GPU: Accelerate joins the processes only when
    told to use the CPU (what --num-processes sets), else each believes it is alone and they fight over the output
    folder. Set it before Accelerate's state is first built (check_inputs builds it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def setup(cfg: TrainConfig) -> Run:
    """Validate everything, then load, claim the output folder and build the Run."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    cfg = cfg.resolved()
    cpu_processes_from_launcher()
    images, prompts, fingerprint, checkpoint = check_inputs(cfg)
    t = cfg.train
    components = load_components(cfg.model.model, cfg.model.revision, cfg.model.variant, cfg.model.vae)
    # Check adapter targets against the loaded modules before anything is written.
    ad.check_targets(components.unet, cfg.unet_adapter.target_modules, ad.UNET_PRESETS, "")
    if t.train_text_encoder:
        for encoder in components.text_encoders:
            ad.check_targets(encoder, cfg.text_encoder_adapter.target_modules, ad.TEXT_ENCODER_PRESETS, "text-encoder-")

    # --- inputs are valid: from here on files are written
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        # Every optimizer step sums exactly N micro-batches. Accelerate's default also steps at the end of each
        # pass over the data, which with 5 photos and N=4 gives every second step a quarter-size gradient.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=t.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=None if t.report_to == "none" else t.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    lock = acquire_lock(out) if accelerator.is_main_process else None  # one lock per run, not per process
    if checkpoint is None and accelerator.is_main_process and (out / CHECKPOINTS).exists():
        shutil.rmtree(out / CHECKPOINTS)  # --overwrite: the old run's checkpoints must not be resumed by mistake
    try:
        return build_run(cfg, accelerator, components, images, prompts, fingerprint, checkpoint, lock)
    except BaseException:
        release_lock(lock)  # a failed setup must not leave the folder looking busy
        raise


def build_run(cfg: TrainConfig, accelerator, components: Components, images: list, prompts: list[str],
              fingerprint: str, checkpoint: Path | None, lock: Path | None) -> Run:
    """The rest of setup, once the output folder is ours: class images, adapters, dtypes, caches, optimizer."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    t, d, out = cfg.train, cfg.data, Path(cfg.train.output_dir)
    set_seed(t.seed)

    class_paths = None
    if d.with_prior_preservation:
        from .prior import generate_class_images

        class_dir = Path(d.class_data_dir) if d.class_data_dir else out / "class_images"
        class_paths = generate_class_images(
            components.model_path, d.class_prompt, class_dir, d.num_class_images, d.sample_batch_size,
            d.class_image_steps, t.seed, cfg.model.revision, cfg.model.variant, accelerator.device,
            show_progress=accelerator.is_local_main_process, process_index=accelerator.process_index,
            num_processes=accelerator.num_processes, barrier=accelerator.wait_for_everyone, vae=cfg.model.vae,
        )
        set_seed(t.seed)  # training randomness must not depend on whether class images had to be generated

    if t.channels_last:
        # before the adapters exist: only the frozen 4-D weights change layout; adapter weights stay contiguous,
        # as safetensors needs them for saving
        components.unet.to(memory_format=torch.channels_last)
    unet = ad.attach(components.unet, cfg.unet_adapter, ad.UNET_PRESETS, "", cfg.model.model)
    # one text encoder (SD 1.x / 2.x) or two (SDXL); with --train-text-encoder each gets its own adapter of the
    # --text-encoder-* settings, saved as text_encoder/ and text_encoder_2/
    text_encoders = list(components.text_encoders)
    if t.train_text_encoder:
        text_encoders = [ad.attach(m, cfg.text_encoder_adapter, ad.TEXT_ENCODER_PRESETS, "text-encoder-", cfg.model.model,
                                   layers=used_text_layers(components, i))
                         for i, m in enumerate(text_encoders)]
    if t.factored_lycoris:  # LoHa/LoKr layers wide enough to gain apply their update through the factors
        for model in (unet, *text_encoders):
            factored.install(model)

    # Frozen weights in the compute dtype, adapter weights in fp32: the optimizer sees exact fp32 parameters
    # and gradients while the big frozen matmuls run in half precision.
    weight_dtype = weight_dtype_for(t.mixed_precision)
    components.vae.to(accelerator.device, dtype=torch.float32 if upcast_vae(cfg, components) else weight_dtype)
    for model in text_encoders:
        to_compute_dtype(model, accelerator.device, weight_dtype)

    # Caches: the frozen VAE and text encoder give the same answer for the same input, so ask them once.
    cache_latents = t.cache_latents and d.center_crop
    if t.cache_latents and not d.center_crop:
        accelerator.print("note: latents are not cached: random crops (--no-center-crop) give new pixels every step")
    dataset = DreamBoothDataset(images, prompts, d.resolution, d.center_crop, d.random_flip, class_paths,
                                d.class_prompt, load_pixels=not cache_latents, seed=t.seed)
    latent_cache = text_cache = None
    if cache_latents:
        latent_cache = LatentCache.build(dataset, components.vae, accelerator.device, weight_dtype, d.sample_batch_size)
        offload(components.vae, accelerator.device)
    if t.cache_text_states and not t.train_text_encoder:
        all_prompts = prompts + ([d.class_prompt] if class_paths else [])
        text_cache = TextCache.build(all_prompts, components.tokenizers, text_encoders, accelerator.device)
        for encoder in text_encoders:
            offload(encoder, accelerator.device)
    # The UNet goes to the device only now: the VAE encoding the photos at full resolution is the largest
    # activation before training, and the UNet's weights (1.7 GB in bf16 for SD 1.5) need not sit beside it.
    to_compute_dtype(unet, accelerator.device, weight_dtype)
    if t.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        if t.train_text_encoder:
            for encoder in components.text_encoders:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    params = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": t.learning_rate}]
    if t.train_text_encoder:
        params.append({"params": [p for m in text_encoders for p in m.parameters() if p.requires_grad],
                       "lr": t.text_encoder_learning_rate or t.learning_rate})
    optimizer = make_optimizer(params, t, accelerator.device)
    # the data order is a function of (seed, epoch): resumable; whole global batches: no padding by Accelerate
    sampler = EpochSampler(len(dataset), t.seed, d.train_batch_size * accelerator.num_processes)
    dataloader = DataLoader(
        dataset, batch_size=d.train_batch_size, sampler=sampler, num_workers=d.dataloader_num_workers,
        collate_fn=partial(collate, tokenizers=None if text_cache else components.tokenizers),
        generator=torch.Generator().manual_seed(t.seed), pin_memory=accelerator.device.type == "cuda",
    )
    # The schedule counts optimizer steps; it is stepped by hand once per optimizer step (see fit).
    lr_scheduler = get_scheduler(
        t.lr_scheduler, optimizer=optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=t.max_train_steps
    )
    if t.train_text_encoder:
        unet, *text_encoders, optimizer, dataloader = accelerator.prepare(unet, *text_encoders, optimizer, dataloader)
    else:
        unet, optimizer, dataloader = accelerator.prepare(unet, optimizer, dataloader)
    if t.compile:
        unet = maybe_compile(unet, accelerator, t.compile_mode)
    if accelerator.is_main_process and t.report_to != "none":
        accelerator.init_trackers("peftbooth")
    run = Run(cfg, accelerator, components, unet, text_encoders[0], optimizer, lr_scheduler, dataloader, weight_dtype,
              out, sampler, dataset, TrainState(), fingerprint, lock, latent_cache, text_cache,
              text_encoders[1] if len(text_encoders) > 1 else None)
    for name, model in run.trained().items():
        trainable, total = ad.count_parameters(model)
        accelerator.print(f"{name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
    if checkpoint is not None:
        run.state = load_checkpoint(run, checkpoint)
        accelerator.print(f"resuming from {checkpoint} at step {run.state.step}")
    return run


def used_text_layers(components: Components, index: int) -> list[int] | None:
    """Encoder layers of text encoder `index` whose output reaches the UNet; None: all of them.

    SDXL conditions on the penultimate hidden states, and takes the pooled embedding from the second encoder
    only: the first encoder's last layer never affects the loss. An adapter there would be saved untrained, and
    under DistributedDataParallel its missing gradients stall the gradient exchange.
    """
    if not components.is_sdxl or index != 0:
        return None
    return list(range(components.text_encoder.config.num_hidden_layers - 1))


def to_compute_dtype(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move `model` to `device` with its frozen weights in `dtype` and its trainable (adapter) weights in fp32."""
    model.to(device, dtype=dtype)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def upcast_vae(cfg: TrainConfig, components: Components) -> bool:
    """--upcast-vae, by default on for SDXL's own VAE: in fp16 it overflows to NaN latents (an fp16-fixed --vae
    does not, so a replacement VAE runs in the compute dtype unless asked)."""
    if cfg.model.upcast_vae is not None:
        return cfg.model.upcast_vae
    return components.is_sdxl and cfg.model.vae is None


def offload(model: torch.nn.Module, device: torch.device) -> None:
    """Move a model whose outputs are cached off the GPU for the rest of training."""
    if device.type == "cuda":
        model.to("cpu")
        torch.cuda.empty_cache()


def maybe_compile(unet: torch.nn.Module, accelerator, mode: str = "default") -> torch.nn.Module:
    """torch.compile the UNet; where compiling cannot work, warn and train eagerly instead of failing.

    With the adapters in place the UNet compiles to one graph for LoRA, and for LoHa/LoKr through
    factored.forward_without_coin (PEFT's own LoHa/LoKr forward splits it at every adapted layer).
    """
    import torch._dynamo

    why = None
    if not torch._dynamo.is_dynamo_supported():
        why = "torch.compile is not supported on this Python/platform"
    elif accelerator.device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++")):
        why = "no C++ compiler found for the CPU backend"
    if why:
        warnings.warn(f"--compile: {why}; training eagerly", stacklevel=2)
        return unet
    if mode in ("reduce-overhead", "max-autotune") and accelerator.device.type != "cuda":
        warnings.warn(f"--compile-mode {mode}: CUDA graphs need a CUDA device; compiled without them on "
                      f"{accelerator.device.type}", stacklevel=2)
    compiled = torch.compile(unet, mode=None if mode == "default" else mode)
    # An op the compiler cannot handle falls back to eager for that graph, with a warning, instead of crashing:
    # suppress_errors only while this UNet runs (compiling happens inside its calls), not for the whole process.
    compiled.forward = suppress_compile_errors(compiled.forward)
    return compiled


def suppress_compile_errors(forward):
    import functools

    import torch._dynamo

    @functools.wraps(forward)
    def scoped(*args, **kwargs):
        with torch._dynamo.config.patch(suppress_errors=True):
            return forward(*args, **kwargs)

    return scoped


def make_optimizer(params: list[dict], t, device: torch.device) -> torch.optim.Optimizer:
    kw = dict(betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
    if t.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kw)
    # fused AdamW: one kernel for all parameters on CUDA instead of a handful per tensor
    return torch.optim.AdamW(params, fused=device.type == "cuda", **kw)


# ---------------------------------------------------------------------------------------------------------------
# the loop


def training_step(run: Run, batch: dict) -> LossParts:
    """Loss of one (micro-)batch of the run: encode it (or read the caches), then objective.training_loss.
    Returns (loss, instance loss, prior loss or None)."""
    c, device = run.components, run.accelerator.device
    mean, std = batch_posterior(batch, c.vae, run.latent_cache, device, run.weight_dtype)
    context, added = batch_conditioning(batch, run.text_encoders, run.text_cache, run.latent_cache, device,
                                        run.cfg.train.train_text_encoder, c.is_sdxl)
    generators = row_generators(batch["seeds"], device)
    return training_loss(run.unet, c.noise_scheduler, mean, std, context, added, generators, batch["num_instance"],
                         c.latent_scale, ObjectiveSettings.from_config(run.cfg))


def begin_epoch(run: Run, state: TrainState) -> None:
    """Point the sampler and dataset at `state`'s epoch, skipping the micro-batches already consumed."""
    if hasattr(run.dataloader, "set_epoch"):
        run.dataloader.set_epoch(state.epoch)  # Accelerate's loader passes it on to the sampler
    run.sampler.set_epoch(state.epoch)
    run.dataset.set_epoch(state.epoch)
    # every process consumes train_batch_size items per micro-batch
    run.sampler.start = state.position * run.cfg.data.train_batch_size * run.accelerator.num_processes


def fit(run: Run) -> dict:
    """Optimise the adapters until max_train_steps optimizer steps. Returns a few statistics for the run card.

    Continues from `run.state` (a resumed run starts mid-way); writes checkpoints every --checkpointing-steps
    and when interrupted; stops on a non-finite loss per --nan-policy.
    """
    t, acc, state = run.cfg.train, run.accelerator, run.state
    trained = list(run.trained().values())
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    for m in trained:
        m.train()
    progress = tqdm(total=t.max_train_steps, initial=state.step, desc="train", disable=not acc.is_local_main_process)
    # The first step with a non-finite loss, tracked on the device so that no step waits for the host.
    first_bad = torch.tensor(-1, device=acc.device)
    last_loss, history, start, start_step = float("nan"), [], time.perf_counter(), state.step
    validation_seconds = 0.0  # time spent sampling validation images, left out of the throughput
    if state.step == 0:  # the "before training" row; a resumed run has it already
        tick = time.perf_counter()
        maybe_validate(run, 0)
        validation_seconds += time.perf_counter() - tick
    skip_group = False  # --nan-policy skip-step: this optimizer step's micro-batches are being skipped
    # fp16: a step whose scaled gradients overflowed updates nothing; it must not count or advance the schedule
    scaler_skips = ScalerSkips(getattr(acc, "scaler", None))
    window = LossWindow(acc.device)  # the logged losses: means over the steps since the last log
    with StopSignals(signal_interval(acc.num_processes, t.logging_steps)) as signals:
        while state.step < t.max_train_steps:
            begin_epoch(run, state)
            for batch in run.dataloader:
                state.position += 1
                overflowed = False
                with acc.accumulate(*trained):
                    loss, instance_loss, prior_loss = training_step(run, batch)
                    finite = torch.isfinite(loss)
                    if t.nan_policy == "skip-step" and not all_true(acc, finite):  # one host sync per step
                        skip_group = True  # every process skips the same optimizer step
                    else:
                        first_bad = torch.where(~finite & (first_bad < 0), state.step + 1, first_bad)
                        window.add(loss, instance_loss, prior_loss)
                        acc.backward(loss)
                    if acc.sync_gradients and not skip_group:
                        if t.max_grad_norm > 0:
                            acc.clip_grad_norm_(params, t.max_grad_norm)
                        run.optimizer.step()
                        overflowed = scaler_skips.skipped()
                    if acc.sync_gradients:
                        run.optimizer.zero_grad(set_to_none=True)
                if not acc.sync_gradients:
                    continue
                window.end_step(updated=not (skip_group or overflowed))
                if skip_group:  # a non-finite loss in this optimizer step's micro-batches: drop the whole step
                    acc.print(f"warning: non-finite loss in step {state.step + 1}; that step was skipped")
                    skip_group = False
                    continue
                if overflowed:  # the scaler skipped the update and lowered its scale: this step is taken again
                    continue
                run.lr_scheduler.step()
                state.step += 1
                progress.update(1)
                checkpoint_due = bool(t.checkpointing_steps) and state.step % t.checkpointing_steps == 0
                stop = signals.agreed(acc, state.step, checkpoint_due)  # all processes stop after the same step
                if state.step % t.logging_steps == 0 or state.step == t.max_train_steps or checkpoint_due or stop:
                    # reading the device waits for it: only at these steps, not every step
                    logs = window.read(acc)  # first: with several processes every one takes part in the sum
                    check_finite(first_bad, params, state.step, run.output_dir)
                    last_loss = logs["loss"]
                    history.append((state.step, last_loss))
                    logs["lr"] = run.lr_scheduler.get_last_lr()[0]
                    progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{logs['lr']:.2e}")
                    if t.report_to != "none":
                        acc.log(logs, step=state.step)
                if checkpoint_due or stop:
                    path = save_checkpoint(run, state, run.fingerprint)
                    if stop:
                        progress.close()
                        raise TrainingInterrupted(stop, path)
                tick = time.perf_counter()
                if maybe_validate(run, state.step):
                    validation_seconds += time.perf_counter() - tick
                if state.step >= t.max_train_steps:
                    break
            else:  # the epoch ran out before max_train_steps
                state.epoch, state.position = state.epoch + 1, 0
    progress.close()
    seconds = time.perf_counter() - start - validation_seconds
    steps = state.step - start_step
    stats = {"steps": state.step, "final_loss": last_loss, "seconds": seconds, "it_s": steps / max(seconds, 1e-9),
             "loss_history": history, "validation_seconds": validation_seconds}
    return stats


def check_finite(first_bad: torch.Tensor, params: list[torch.Tensor], step: int, output_dir: Path | None = None) -> None:
    """Raise FloatingPointError naming the first step with a non-finite loss, or non-finite adapter weights.

    Called before a checkpoint is written, so a checkpoint never holds a diverged adapter. The message names the
    newest checkpoint in `output_dir` only when there is one.
    """
    bad = int(first_bad.item())
    weights_ok = bad >= 0 or bool(torch.stack([torch.isfinite(p).all() for p in params]).all())
    if bad < 0 and weights_ok:
        return
    found = list_checkpoints(output_dir) if output_dir is not None else []
    kept = (f"the last checkpoint before it is kept ({found[-1]})" if found else
            "no checkpoint had been written (--checkpointing-steps N keeps some)")
    if bad >= 0:
        raise FloatingPointError(f"loss became NaN/inf at step {bad}; {kept}; lower --learning-rate or use "
                                 "--nan-policy skip-step")
    raise FloatingPointError(f"adapter weights became NaN/inf by step {step}; {kept}; lower --learning-rate or "
                             "--max-grad-norm")


# ---------------------------------------------------------------------------------------------------------------
# saving


def replayable(cfg: TrainConfig) -> TrainConfig:
    """The config as saved in OUTPUT/config.yaml: one-off actions of this invocation (resume, overwrite, push)
    reset, so `train --config OUTPUT/config.yaml --output-dir NEW` trains the same thing again and nothing more."""
    import dataclasses

    train_args = dataclasses.replace(cfg.train, resume=None, resume_force=False, overwrite=False, push_to_hub=None)
    return dataclasses.replace(cfg, train=train_args)


def check_ranks_agree(run: Run) -> None:
    """Data-parallel processes must end with the same adapters (only rank 0's are saved): compare exactly."""
    acc = run.accelerator
    models = list(run.trained().values())
    # one float64 checksum per adapter tensor: (P,) per process, gathered to (world * P,)
    sums = torch.stack([p.detach().double().sum() for m in models for p in m.parameters() if p.requires_grad])
    per_rank = acc.gather(sums.to(acc.device)).view(acc.num_processes, -1)
    if not bool((per_rank == per_rank[0]).all()):
        raise RuntimeError("data-parallel processes ended with different adapter weights; not saving")
    acc.print(f"adapter weights identical on all {acc.num_processes} processes")


def save(run: Run, stats: dict) -> Path:
    """Write unet/ (and text_encoder/) adapter folders, config.yaml and README.md into the output dir.

    Everything is written complete into a hidden staging folder first, then moved into place one by one, unet/
    (the finished-run marker) last: no file is ever half-written, though a crash between moves can leave the new
    config.yaml beside the previous adapter.
    """
    acc, out = run.accelerator, run.output_dir
    acc.wait_for_everyone()
    if acc.num_processes > 1:
        check_ranks_agree(run)
    if acc.is_main_process:
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
        try:
            # save_embedding_layers=False: no embeddings are trained, and 'auto' would look the base model up online
            for name, model in run.trained().items():
                acc.unwrap_model(model).save_pretrained(staging / name, save_embedding_layers=False)
            (staging / "config.yaml").write_text(yaml.safe_dump(to_dict(replayable(run.cfg)), sort_keys=False))
            (staging / "README.md").write_text(model_card(run.cfg, stats, out, sdxl=run.components.is_sdxl))
            # config.yaml and README.md first, unet/ (the finished-run marker) last
            for name in ["config.yaml", "README.md", "text_encoder", "text_encoder_2", "unet"]:
                src, dst = staging / name, out / name
                if not src.exists():
                    if dst.is_dir() and name.startswith("text_encoder"):
                        shutil.rmtree(dst)  # an --overwrite of a run that did train the text encoder
                    continue
                if dst.is_dir():
                    shutil.rmtree(dst)
                os.replace(src, dst)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        acc.print(f"report: {write_report(out, stats)}")  # after the move: it reads the adapter sizes from disk
    end_training(run.accelerator, run)
    acc.print(f"adapters written to {out}: " + ", ".join(f"{name}/" for name in run.trained()))
    if run.cfg.train.push_to_hub and acc.is_main_process:
        url = push(out, run.cfg.train.push_to_hub)
        acc.print(f"pushed to {url}")
    return out
