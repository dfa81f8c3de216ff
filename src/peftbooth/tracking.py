"""What the training loop keeps track of between optimizer steps, without waiting for the device every step."""

from __future__ import annotations


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

