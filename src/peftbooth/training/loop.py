"""The training loop: ``train`` = setup -> ``fit`` -> proxies -> save.

``fit`` reads top to bottom on one screen: micro-batches, the step (objective.py), optimizer steps, EMA,
logging, checkpoints (checkpoint.py), stop signals (signals.py) and validation (validation.py).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config.sections import TrainConfig
from .checkpoint import TrainState, list_checkpoints, release_lock
from .objective import (
    LossParts,
    ObjectiveSettings,
    batch_conditioning,
    batch_loss_masks,
    batch_posterior,
    call_denoiser,
    flow_matching_loss,
    rows_of,
    row_generators,
    training_loss,
)
from .proxies import ProxyInputs, adapters_disabled, peft_handle, write_proxies
from .saving import publish, save
from .setup import Run, setup
from .signals import StopSignals, TrainingInterrupted, all_true, end_training, signal_interval
from .tracking import LossWindow, RunClock, ScalerSkips, run_stats
from .validation import ValidationPlan, run_validation, should_validate


def train(cfg: TrainConfig) -> Path:
    """Run a whole training job; return the output folder."""
    run = setup(cfg)
    try:
        stats = fit(run)
        stats["proxies"] = proxies_or_warning(run)
        return finish(run, stats)
    finally:
        release_lock(run.lock)


def finish(run: Run, stats: dict) -> Path:
    """Write the finished run (saving.save), end every process's training, say where the adapters are and push
    them when asked. Returns the output folder."""
    out = save(run.accelerator, run.output_dir, run.adapters, run.cfg, stats, run.components.family)
    end_training(run.accelerator, run.drop_wrappers)
    publish(run.accelerator, out, list(run.adapters.models), run.cfg.train.push_to_hub)
    return out


def proxy_inputs(run: Run) -> ProxyInputs:
    """What the proxies read of the run: the trained models, the photos as decoded for training."""
    return ProxyInputs(run.cfg, run.accelerator, run.components, [run.unet, *run.text_encoders], run.trained(),
                       run.dataset.instance_images, run.dataset.instance_prompts, run.output_dir, run.weight_dtype)


def proxies_or_warning(run: Run) -> dict | None:
    """Instance loss before/after and class drift -> OUTPUT/proxies.json. A measurement must never cost the user
    the adapter they just trained: a failure here is a warning, and saving goes on."""
    try:
        return write_proxies(proxy_inputs(run))
    except Exception as e:  # noqa: BLE001 - anything at all: the trained adapter is saved regardless
        warnings.warn(f"proxies not computed ({type(e).__name__}: {e})", stacklevel=2)
        return None


def training_step(run: Run, batch: dict) -> LossParts:
    """Loss of one (micro-)batch of the run: encode it (or read the caches), then objective.training_loss.
    Returns (loss, instance loss, prior loss or None)."""
    c, device = run.components, run.accelerator.device
    mean, std = batch_posterior(batch, c.vae, run.latent_cache, device, run.weight_dtype)
    context, added = batch_conditioning(batch, run.text_encoders, run.text_cache, run.latent_cache, device,
                                        run.cfg.train.train_text_encoder, c.family, c.t5)
    generators = row_generators(batch["seeds"], device)
    settings, masks = ObjectiveSettings.from_config(run.cfg), batch_loss_masks(batch, run.latent_cache)
    prior = base_prediction(run, batch)
    if c.is_sd3:
        return flow_matching_loss(run.unet, c.noise_scheduler, mean, std, context, added, generators,
                                  batch["num_instance"], c.latent_scale, c.latent_shift, settings, masks, prior)
    return training_loss(run.unet, c.noise_scheduler, mean, std, context, added, generators, batch["num_instance"],
                         c.latent_scale, settings, masks, prior)


def base_prediction(run: Run, batch: dict):
    """--prior-mode base-prediction: the class rows' target, (noisy, timesteps, context, added) -> the base model's
    prediction: the denoiser with its adapter off and, when the text encoders are trained, the class prompts
    encoded again with theirs off. None in the other modes."""
    d = run.cfg.data
    if not (d.with_prior_preservation and d.prior_mode == "base-prediction"):
        return None
    c, acc = run.components, run.accelerator
    denoiser = peft_handle(acc, run.unet)
    encoders = [peft_handle(acc, m) for m in run.text_encoders] if run.cfg.train.train_text_encoder else []

    def target(noisy, timesteps, context, added):
        with adapters_disabled(denoiser, *encoders):
            if encoders:  # the frozen encoders' states of the class prompts (they were encoded with adapters on)
                n = batch["num_instance"]
                context, added = batch_conditioning(batch, run.text_encoders, None, run.latent_cache, acc.device,
                                                    False, c.family, c.t5)
                context, added = context[n:], rows_of(added, n)
            return call_denoiser(denoiser, noisy, timesteps, context, added)

    return target


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
                path = run.checkpointer.save(state)
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
        validation_images(run, run.state.step)


def validation_images(run: Run, step: int, **kwargs) -> list[Path]:
    """The run's validation samples at `step` with the models as they are now (validation.run_validation)."""
    return run_validation(run.accelerator, run.components, [run.unet, *run.text_encoders], ValidationPlan.of(run.cfg),
                          run.output_dir, step, **kwargs)


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
