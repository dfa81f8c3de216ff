"""DreamBooth training: ``setup`` validates and builds everything, ``fit`` is the loop, ``save`` writes the run.

Read top to bottom: nothing is written to disk until every input has been checked (preflight.py). The step's
maths is objective.py, stop signals and the multi-process exit are signals.py, dtypes and devices precision.py,
compiling and the optimizer speed.py, class images prior.py, and the finished run folder saving.py.
"""

from __future__ import annotations

import shutil
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import adapters as ad
from . import factored
from . import token_embedding as te_rows
from .cache import LatentCache, TextCache
from .checkpoint import (
    CHECKPOINTS, TrainState, acquire_lock, list_checkpoints, load_checkpoint, release_lock, save_checkpoint,
)
from .config import TrainConfig
from .data import DreamBoothDataset, EpochSampler, collate
from .distributed import accelerator_kwargs
from .ema import AdapterEMA, adapter_ema
from .evaluate import write_proxies
from .memory import check_memory
from .model_defaults import announce
from .models import Components, load_components, vae_force_upcast
from .objective import (
    LossParts, ObjectiveSettings, batch_conditioning, batch_loss_masks, batch_posterior, row_generators, training_loss,
)
from .precision import Precision, for_training, place_frozen
from .rundir import RunDir
# Names other modules, benchmarks and tests import from here (peftbooth.train) keep working: check_inputs (CLI,
# UI), TrainingInterrupted (CLI), the speed helpers (benchmarks); tests patch some of them on this module.
from .preflight import RUN_MARKER, check_inputs, cpu_processes_from_launcher  # noqa: F401
from .saving import check_ranks_agree, replayable, save  # noqa: F401
from .signals import SIGNAL_STEPS, StopSignals, TrainingInterrupted, all_true, signal_interval  # noqa: F401
from .speed import make_optimizer, maybe_compile, offload  # noqa: F401
from .tracking import LossWindow, RunClock, ScalerSkips, run_stats
from .validation import run_validation, should_validate


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
    precision: Precision  # the device and dtypes of every component (precision.for_training)
    output_dir: Path
    sampler: EpochSampler
    dataset: DreamBoothDataset
    state: TrainState  # where the loop stands (fresh, or restored from a checkpoint)
    fingerprint: str  # of the instance photos, recorded in checkpoints
    lock: Path | None = None
    latent_cache: LatentCache | None = None  # VAE posteriors per (image, flip), when cached
    text_cache: TextCache | None = None  # text-encoder states per prompt, when the text encoder is frozen
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second text encoder (PeftModel when trained)
    ema: AdapterEMA | None = None  # --ema-decay: the moving average of the adapter weights

    @property
    def weight_dtype(self) -> torch.dtype:
        """The frozen weights' compute dtype (--mixed-precision's)."""
        return self.precision.compute

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


def setup(cfg: TrainConfig) -> Run:
    """Validate everything, then load, claim the output folder and build the Run."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    cfg = cfg.resolved()
    cpu_processes_from_launcher()
    images, prompts, fingerprint, checkpoint, masks = check_inputs(cfg)
    t = cfg.train
    components = load_components(cfg.model.model, cfg.model.revision, cfg.model.variant, cfg.model.vae)
    # Check adapter targets against the loaded modules before anything is written.
    ad.check_targets(components.unet, cfg.unet_adapter.target_modules, ad.UNET_PRESETS, "")
    if t.train_text_encoder:
        for encoder in components.text_encoders:
            ad.check_targets(encoder, cfg.text_encoder_adapter.target_modules, ad.TEXT_ENCODER_PRESETS, "text-encoder-")
    if t.train_token_embedding:
        for tokenizer in components.tokenizers:
            te_rows.identifier_id(tokenizer, t.train_token_embedding)
    check_memory(cfg, components)  # on a GPU: refuse a run whose estimated peak exceeds the free memory
    announce()  # the CLI's "defaults from the model" line, once the run is known to start (a refusal: one line)

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
        **accelerator_kwargs(cfg),  # DDP told of unused weights under module dropout (distributed.py)
    )
    lock = acquire_lock(out) if accelerator.is_main_process else None  # one lock per run, not per process
    if checkpoint is None and accelerator.is_main_process and (out / CHECKPOINTS).exists():
        shutil.rmtree(out / CHECKPOINTS)  # --overwrite: the old run's checkpoints must not be resumed by mistake
    try:
        return build_run(cfg, accelerator, components, images, prompts, fingerprint, checkpoint, lock, masks)
    except BaseException:
        release_lock(lock)  # a failed setup must not leave the folder looking busy
        raise


def build_run(cfg: TrainConfig, accelerator, components: Components, images: list, prompts: list[str],
              fingerprint: str, checkpoint: Path | None, lock: Path | None, masks: list | None = None) -> Run:
    """The rest of setup, once the output folder is ours: class images, adapters, dtypes, caches, optimizer."""
    from accelerate.utils import set_seed

    t, d, device = cfg.train, cfg.data, accelerator.device
    precision = for_training(t.mixed_precision, device, components.family, vae_force_upcast(components.vae),
                             cfg.model.upcast_vae)
    # Frozen weights in the compute dtype from the start, still on the CPU: class images are made in it (SDXL's
    # UNet and text encoders would take 14 GB of a GPU in fp32), and training keeps them so.
    for model in (components.unet, *components.text_encoders):
        model.to(dtype=precision.compute)
    components.vae.to(dtype=precision.vae)
    set_seed(t.seed)
    class_paths = class_images(cfg, accelerator, components, precision) if d.with_prior_preservation else None
    set_seed(t.seed)  # training randomness must not depend on whether class images had to be generated
    unet, text_encoders = attach_adapters(cfg, components)
    # Adapter weights in fp32 beside the frozen ones: the optimizer sees exact fp32 parameters and gradients while
    # the big frozen matmuls run in half precision.
    components.vae.to(device)
    for model in text_encoders:
        place_frozen(model, precision)
    dataset, latent_cache, text_cache = dataset_and_caches(cfg, accelerator, components, text_encoders, images,
                                                           prompts, class_paths, precision.compute, masks)
    # The UNet goes to the device only now: the VAE encoding the photos at full resolution is the largest
    # activation before training, and the UNet's weights (1.7 GB in bf16 for SD 1.5) need not sit beside it.
    place_frozen(unet, precision)
    if t.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        if t.train_text_encoder:
            for encoder in components.text_encoders:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer, lr_scheduler = optimizer_and_schedule(t, unet, text_encoders, device)
    # the data order is a function of (seed, epoch): resumable; whole global batches: no padding by Accelerate
    sampler = EpochSampler(len(dataset), t.seed, d.train_batch_size * accelerator.num_processes)
    dataloader = DataLoader(
        dataset, batch_size=d.train_batch_size, sampler=sampler, num_workers=d.dataloader_num_workers,
        collate_fn=partial(collate, tokenizers=None if text_cache else components.tokenizers),
        generator=torch.Generator().manual_seed(t.seed), pin_memory=device.type == "cuda",
    )
    trained_encoders = text_encoders if t.train_text_encoder else []  # a frozen encoder is not wrapped
    unet, *prepared, optimizer, dataloader = accelerator.prepare(unet, *trained_encoders, optimizer, dataloader)
    text_encoders = prepared or text_encoders
    if t.compile:
        unet = maybe_compile(unet, accelerator, t.compile_mode)
    if accelerator.is_main_process and t.report_to != "none":
        accelerator.init_trackers("peftbooth")
    run = Run(cfg, accelerator, components, unet, text_encoders[0], optimizer, lr_scheduler, dataloader, precision,
              Path(t.output_dir), sampler, dataset, TrainState(), fingerprint, lock, latent_cache, text_cache,
              text_encoders[1] if len(text_encoders) > 1 else None)
    run.ema = adapter_ema(run.trained(), t.ema_decay, accelerator.unwrap_model)
    for name, model in run.trained().items():
        trainable, total = ad.count_parameters(model)
        accelerator.print(f"{name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
    if checkpoint is not None:
        run.state = load_checkpoint(run, checkpoint)
        accelerator.print(f"resuming from {checkpoint} at step {run.state.step}")
    return run


def class_images(cfg: TrainConfig, accelerator, components: Components, precision: Precision) -> list[Path]:
    """The run's class images (--class-data-dir, else OUTPUT/class_images), the missing ones made first by the
    components in memory, in their compute dtype: called before the adapters are attached, so they are the base
    model's images."""
    from .prior import class_images_from_components

    d, out = cfg.data, Path(cfg.train.output_dir)
    class_dir = Path(d.class_data_dir) if d.class_data_dir else RunDir(out).class_images_dir
    return class_images_from_components(
        components, d.class_prompt, class_dir, d.num_class_images, d.sample_batch_size, d.class_image_steps,
        cfg.train.seed, precision, show_progress=accelerator.is_local_main_process,
        process_index=accelerator.process_index, num_processes=accelerator.num_processes,
        barrier=accelerator.wait_for_everyone,
    )


def attach_adapters(cfg: TrainConfig, components: Components) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """(UNet with its adapter, text encoders): one (SD 1.x / 2.x) or two (SDXL); with --train-text-encoder each
    gets its own adapter of the --text-encoder-* settings, saved as text_encoder/ and text_encoder_2/."""
    t = cfg.train
    if t.channels_last:
        # before the adapters exist: only the frozen 4-D weights change layout; adapter weights stay contiguous,
        # as safetensors needs them for saving
        components.unet.to(memory_format=torch.channels_last)
    unet = ad.attach(components.unet, cfg.unet_adapter, ad.UNET_PRESETS, "", cfg.model.model)
    text_encoders = list(components.text_encoders)
    if t.train_text_encoder:
        text_encoders = [ad.attach(m, cfg.text_encoder_adapter, ad.TEXT_ENCODER_PRESETS, "text-encoder-",
                                   cfg.model.model, layers=used_text_layers(components, i))
                         for i, m in enumerate(text_encoders)]
    if t.train_token_embedding:  # the identifier's own input vector, in every text encoder
        for tokenizer, model in zip(components.tokenizers, text_encoders):
            te_rows.attach(model, [te_rows.identifier_id(tokenizer, t.train_token_embedding)])
    if t.factored_lycoris:  # LoHa/LoKr layers wide enough to gain apply their update through the factors
        for model in (unet, *text_encoders):
            factored.install(model)
    return unet, text_encoders


def dataset_and_caches(cfg: TrainConfig, accelerator, components: Components, text_encoders: list, images: list,
                       prompts: list[str], class_paths: list[Path] | None, weight_dtype: torch.dtype,
                       masks: list | None = None) -> tuple[DreamBoothDataset, LatentCache | None, TextCache | None]:
    """The dataset, and the caches: the frozen VAE and text encoder give the same answer for the same input, so
    they are asked once and then moved off the GPU."""
    t, d, device = cfg.train, cfg.data, accelerator.device
    cache_latents = t.cache_latents and d.center_crop
    if t.cache_latents and not d.center_crop:
        accelerator.print("note: latents are not cached: random crops (--no-center-crop) give new pixels every step")
    dataset = DreamBoothDataset(images, prompts, d.resolution, d.center_crop, d.random_flip, class_paths,
                                d.class_prompt, load_pixels=not cache_latents, seed=t.seed,
                                class_prompt_dropout=d.class_prompt_dropout if class_paths else 0.0,
                                instance_masks=masks)
    latent_cache = text_cache = None
    if cache_latents:
        latent_cache = LatentCache.build(dataset, components.vae, device, weight_dtype, d.sample_batch_size)
        offload(components.vae, device)
    if t.cache_text_states and not t.train_text_encoder:
        all_prompts = prompts + ([d.class_prompt] if class_paths else []) + ([""] if d.class_prompt_dropout else [])
        text_cache = TextCache.build(all_prompts, components.tokenizers, text_encoders, device)
        for encoder in text_encoders:
            offload(encoder, device)
    return dataset, latent_cache, text_cache


def optimizer_and_schedule(t, unet: torch.nn.Module, text_encoders: list, device: torch.device):
    """AdamW over the adapter weights (the text encoders' at --text-encoder-learning-rate) and its LR schedule,
    which counts optimizer steps: fit steps it by hand once per optimizer step."""
    from diffusers.optimization import get_scheduler

    params = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": t.learning_rate}]
    rows = [r.weight for m in text_encoders if (r := te_rows.trained_rows(m)) is not None]
    if t.train_text_encoder:
        params.append({"params": [p for m in text_encoders for p in m.parameters()
                                  if p.requires_grad and not any(p is r for r in rows)],
                       "lr": t.text_encoder_learning_rate or t.learning_rate})
    if rows:  # no weight decay: it would pull the identifier's vector towards zero, away from the other words'
        params.append({"params": rows, "weight_decay": 0.0,
                       "lr": t.token_embedding_learning_rate or t.text_encoder_learning_rate or t.learning_rate})
    optimizer = make_optimizer(params, t, device)
    return optimizer, get_scheduler(t.lr_scheduler, optimizer=optimizer, num_warmup_steps=t.lr_warmup_steps,
                                    num_training_steps=t.max_train_steps)


def used_text_layers(components: Components, index: int) -> list[int] | None:
    """Encoder layers of text encoder `index` whose output reaches the UNet; None: all of them.

    SDXL conditions on the penultimate hidden states, and takes the pooled embedding from the second encoder
    only: the first encoder's last layer never affects the loss. An adapter there would be saved untrained, and
    under DistributedDataParallel its missing gradients stall the gradient exchange.
    """
    if not components.is_sdxl or index != 0:
        return None
    return list(range(components.text_encoder.config.num_hidden_layers - 1))


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
                         c.latent_scale, ObjectiveSettings.from_config(run.cfg),
                         batch_loss_masks(batch, run.latent_cache))


@dataclass
class Loop:
    """What `fit` carries from one optimizer step to the next besides `run.state` (which checkpoints hold): the
    trained models and their parameters, the progress bar, the losses since the last log, the clock and what went
    wrong."""

    trained: list[torch.nn.Module]
    params: list[torch.Tensor]  # the adapter weights (requires_grad)
    progress: tqdm
    window: LossWindow  # the logged losses: means over the steps since the last log
    scaler_skips: ScalerSkips  # fp16: a step whose scaled gradients overflowed updates nothing
    first_bad: torch.Tensor  # () the first step with a non-finite loss, -1: none; on the device, no host sync
    skip_group: bool = False  # --nan-policy skip-step: this optimizer step's micro-batches are being skipped
    last_loss: float = float("nan")
    clock: RunClock = field(default_factory=RunClock)  # training time of the run, validation apart, all segments


def start_loop(run: Run) -> Loop:
    """The trained models in train mode and a fresh Loop, its progress bar at the run's step."""
    acc, trained = run.accelerator, list(run.trained().values())
    for m in trained:
        m.train()
    progress = tqdm(total=run.cfg.train.max_train_steps, initial=run.state.step, desc="train",
                    disable=not acc.is_local_main_process)
    return Loop(trained, [p for m in trained for p in m.parameters() if p.requires_grad], progress,
                LossWindow(acc.device), ScalerSkips(getattr(acc, "scaler", None)), torch.tensor(-1, device=acc.device),
                clock=RunClock(run.state.seconds, run.state.validation_seconds))  # a resumed run's time goes on


def fit(run: Run) -> dict:
    """Optimise the adapters until max_train_steps optimizer steps. Returns a few statistics for the run card.

    Continues from `run.state` (a resumed run starts mid-way); writes checkpoints every --checkpointing-steps
    and when interrupted; stops on a non-finite loss per --nan-policy.
    """
    t, acc, state = run.cfg.train, run.accelerator, run.state
    loop = start_loop(run)
    if state.step == 0:  # the "before training" row; a resumed run has it already
        validate(run, loop)
    with StopSignals(signal_interval(acc.num_processes, t.logging_steps)) as signals:
        for batch in micro_batches(run):
            if not micro_step(run, loop, batch):
                continue  # within an accumulation group, or a step that updated nothing
            run.lr_scheduler.step()
            state.step += 1
            if run.ema is not None:
                run.ema.update()
            loop.progress.update(1)
            checkpoint_due = bool(t.checkpointing_steps) and state.step % t.checkpointing_steps == 0
            stop = signals.agreed(acc, state.step, checkpoint_due)  # all processes stop after the same step
            if state.step % t.logging_steps == 0 or state.step == t.max_train_steps or checkpoint_due or stop:
                log_losses(run, loop)  # reading the device waits for it: only at these steps, not every step
            if checkpoint_due or stop:
                state.seconds, state.validation_seconds = loop.clock.totals()  # carried into a resumed run
                path = save_checkpoint(run, state, run.fingerprint)
                if stop:
                    loop.progress.close()
                    raise TrainingInterrupted(stop, path)
            validate(run, loop)
    loop.progress.close()
    if run.ema is not None:
        run.ema.copy_to_params()  # what is saved and measured from here on is the average
    return run_stats(state, loop.clock, loop.last_loss)  # every segment of the run, not only this one


def micro_batches(run: Run):
    """The run's micro-batches, epoch after epoch, from where `run.state` stands until max_train_steps optimizer
    steps are done (the consumer advances state.step). state.position counts the micro-batches of the epoch."""
    state, max_steps = run.state, run.cfg.train.max_train_steps
    while state.step < max_steps:
        begin_epoch(run, state)
        for batch in run.dataloader:
            state.position += 1
            yield batch
            if state.step >= max_steps:
                return
        state.epoch, state.position = state.epoch + 1, 0  # the epoch ran out before max_train_steps


def begin_epoch(run: Run, state: TrainState) -> None:
    """Point the sampler and dataset at `state`'s epoch, skipping the micro-batches already consumed."""
    if hasattr(run.dataloader, "set_epoch"):
        run.dataloader.set_epoch(state.epoch)  # Accelerate's loader passes it on to the sampler
    run.sampler.set_epoch(state.epoch)
    run.dataset.set_epoch(state.epoch)
    # every process consumes train_batch_size items per micro-batch
    run.sampler.start = state.position * run.cfg.data.train_batch_size * run.accelerator.num_processes


def micro_step(run: Run, loop: Loop, batch: dict) -> bool:
    """Forward and backward of one micro-batch; at the end of an accumulation group, the optimizer step.

    True when that optimizer step updated the adapters; False within a group, for a group skipped for a
    non-finite loss (--nan-policy skip-step) and for an fp16 step whose gradients overflowed (taken again).
    """
    t, acc, state = run.cfg.train, run.accelerator, run.state
    overflowed = False
    with acc.accumulate(*loop.trained):
        loss, instance_loss, prior_loss = training_step(run, batch)
        finite = torch.isfinite(loss)
        if t.nan_policy == "skip-step" and not all_true(acc, finite):  # one host sync per step
            loop.skip_group = True  # every process skips the same optimizer step
        else:
            loop.first_bad = torch.where(~finite & (loop.first_bad < 0), state.step + 1, loop.first_bad)
            loop.window.add(loss, instance_loss, prior_loss)
            acc.backward(loss)
        if acc.sync_gradients and not loop.skip_group:
            if t.max_grad_norm > 0:
                acc.clip_grad_norm_(loop.params, t.max_grad_norm)
            run.optimizer.step()
            overflowed = loop.scaler_skips.skipped()  # the scaler lowered its scale: this step is taken again
        if acc.sync_gradients:
            run.optimizer.zero_grad(set_to_none=True)
    if not acc.sync_gradients:
        return False
    skipped, loop.skip_group = loop.skip_group, False
    loop.window.end_step(updated=not (skipped or overflowed))
    if skipped:  # a non-finite loss in this optimizer step's micro-batches: the whole step is dropped
        acc.print(f"warning: non-finite loss in step {state.step + 1}; that step was skipped")
    return not (skipped or overflowed)


def log_losses(run: Run, loop: Loop) -> None:
    """Read the mean losses since the last log (a host sync), refuse non-finite ones, show and log them."""
    acc, step = run.accelerator, run.state.step
    logs = loop.window.read(acc)  # first: with several processes every one takes part in the sum
    check_finite(loop.first_bad, loop.params, step, run.output_dir)
    loop.last_loss = logs["loss"]
    run.state.loss_history.append([step, loop.last_loss])  # in the state: checkpoints carry it into a resume
    logs["lr"] = run.lr_scheduler.get_last_lr()[0]
    loop.progress.set_postfix(loss=f"{loop.last_loss:.4f}", lr=f"{logs['lr']:.2e}")
    if run.cfg.train.report_to != "none":
        acc.log(logs, step=step)


def validate(run: Run, loop: Loop) -> None:
    """Validation images at this step when it is a validation step, timed apart from training; with --ema-decay
    they show the average, which is what the run will save."""
    if not should_validate(run.cfg, run.state.step):
        return
    with loop.clock.validating(), run.ema.swapped_in() if run.ema is not None else nullcontext():
        run_validation(run, run.state.step)


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
