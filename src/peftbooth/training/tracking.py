"""What the training loop keeps track of between optimizer steps, without waiting for the device every step, and
the run's time and statistics over all its segments (a run stopped and resumed reports as one run)."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch


class ScalerSkips:
    """fp16: did the gradient scaler skip the optimizer step just taken (its scaled gradients overflowed)?

    GradScaler.update() multiplies the scale by its backoff factor (0.5) after a step with inf/NaN gradients and
    never lowers it otherwise, so a lower scale after the step means the weights were not updated. Accelerate's
    own `optimizer_step_was_skipped` watches whether the optimizer's step() was called; a fused AdamW (the
    trainer's optimizer on CUDA) is always called and skips inside its kernel, so that flag stays False.
    Reading the scale is a host sync: once per optimizer step, and only when there is a scaler (fp16).
    """

    def __init__(self, scaler):
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.scale = self.scaler.get_scale() if self.scaler is not None else None

    def skipped(self) -> bool:
        """Call once after each optimizer step (the scaler's step and update)."""
        if self.scaler is None:
            return False
        scale = self.scaler.get_scale()
        skipped, self.scale = scale < self.scale, scale
        return skipped


class LossWindow:
    """Mean losses (loss, instance loss, prior loss) over the optimizer steps since the last log.

    Every micro-batch's losses are added on the device; the host reads the sums only when it logs (the one host
    sync there), so no step waits for the device. A step that updated nothing (a --nan-policy skip-step drop, an
    fp16 overflow) is left out of the mean with its micro-batches. With several processes the sums of all of
    them are added up (a collective at the logging steps, which every process reaches at the same step).
    """

    def __init__(self, device):
        self.device = device
        self.step = torch.zeros(3, device=device)  # (loss, instance, prior) summed over this step's micro-batches
        self.total = torch.zeros(3, device=device)  # ... over the window's completed steps
        self.step_count = self.total_count = 0  # micro-batches in each
        self.has_prior = False

    def add(self, loss: torch.Tensor, instance_loss: torch.Tensor, prior_loss: torch.Tensor | None) -> None:
        prior = torch.zeros_like(loss) if prior_loss is None else prior_loss
        self.step += torch.stack([loss.detach(), instance_loss.detach(), prior.detach()]).float()
        self.step_count += 1
        self.has_prior = prior_loss is not None

    def end_step(self, updated: bool) -> None:
        """The optimizer step is over: keep its micro-batches in the window if it updated the weights."""
        if updated:
            self.total += self.step
            self.total_count += self.step_count
        self.step = torch.zeros_like(self.step)
        self.step_count = 0

    def read(self, accelerator) -> dict[str, float]:
        """{'loss', 'instance_loss'[, 'prior_loss']}: means over the window, which then starts again."""
        sums = torch.cat([self.total, torch.tensor([float(self.total_count)], device=self.device)])
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        loss, instance, prior, count = sums.tolist()  # the host sync
        count = max(count, 1.0)
        self.total, self.total_count = torch.zeros_like(self.total), 0
        means = {"loss": loss / count, "instance_loss": instance / count}
        if self.has_prior:
            means["prior_loss"] = prior / count
        return means


class RunClock:
    """Training time of a run over all its segments (a run stopped and resumed twice has three): the time the
    checkpoint it resumed from carried, plus this segment's since `start`. Validation sampling is timed apart: it
    is not training, and counted in it would lower the throughput."""

    def __init__(self, seconds: float = 0.0, validation_seconds: float = 0.0):
        self.carried, self.carried_validation = seconds, validation_seconds
        self.start = time.perf_counter()
        self.validation = 0.0  # this segment's

    @contextmanager
    def validating(self):
        tick = time.perf_counter()
        try:
            yield
        finally:
            self.validation += time.perf_counter() - tick

    def totals(self) -> tuple[float, float]:
        """(training seconds, validation seconds) of the run up to now."""
        segment = time.perf_counter() - self.start - self.validation
        return self.carried + segment, self.carried_validation + self.validation


def run_stats(state, clock: RunClock, last_loss: float) -> dict:
    """fit()'s statistics of the whole run, every segment (`state`: checkpoint.TrainState), for train_stats.json,
    the report and the model card. The throughput counts the steps the time was measured over."""
    seconds, validation_seconds = clock.totals()
    if math.isnan(last_loss) and state.loss_history:
        last_loss = state.loss_history[-1][1]  # resumed at the last step: this segment logged nothing
    stats = {"steps": state.step, "final_loss": last_loss, "seconds": seconds,
             "it_s": (state.step - state.history_from) / max(seconds, 1e-9), "loss_history": state.loss_history,
             "validation_seconds": validation_seconds, "segments": state.segments, "history_from": state.history_from}
    if state.history_from:
        stats["note"] = (f"resumed from a checkpoint of an earlier peftbooth version at step {state.history_from}: "
                         f"loss history, training time and throughput cover the run from step {state.history_from} on")
    return stats
