"""An exponential moving average of the adapter weights (--ema-decay D).

After every optimizer step the average moves towards the weights: avg <- d * avg + (1 - d) * w, so it spans about
the last 1 / (1 - D) steps (100 for D = 0.99) once its warm-up (`ema_decay`) has reached D. The run saves,
validates and measures the average instead of the last step's weights. Why: DreamBooth adapters train at large
constant rates on batches of one photo, and what the adapter draws then flickers from step to step
(docs/world.md, fifth sweep: one run's subject fidelity moved by 0.6 within 50 steps); the average keeps what the
steps agree on. It costs one fp32 copy of the adapter weights
(a few MB) and one fused multiply-add over them per step.

The average is part of a checkpoint (ema.safetensors, with its update count), so a resumed run ends with the same
average as an uninterrupted one.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

FILE = "ema.safetensors"


def ema_decay(decay: float, updates: int) -> float:
    """The decay of the update after `updates` earlier ones: `decay`, warmed up as (1 + n) / (10 + n) so that the
    untrained starting weights do not dominate the early average (the first update keeps 10 % of the start, the
    100th 92 %, and from about the 900th on D = 0.99 holds)."""
    return min(decay, (1 + updates) / (10 + updates))


class AdapterEMA:
    """The moving average of named trainable tensors, updated in place beside them."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.params = params  # name -> the live parameter (the optimizer's tensors, not copies)
        self.decay = decay
        self.updates = 0
        self.average = {k: p.detach().clone() for k, p in params.items()}
        # the same tensors as flat lists in one order, for the fused (one launch per list) updates below
        self._live = [p.detach() for p in params.values()]
        self._avg = [self.average[k] for k in params]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average one step towards the current weights (after an optimizer step that updated them); on
        the hot path, so one fused lerp over all tensors rather than one per tensor."""
        torch._foreach_lerp_(self._avg, self._live, 1.0 - ema_decay(self.decay, self.updates))
        self.updates += 1

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Put the average into the live weights: at the end of training, before the adapters are saved."""
        torch._foreach_copy_(self._live, self._avg)

    @contextmanager
    def swapped_in(self):
        """The average in the live weights for the duration (validation samples), the trained ones back after."""
        kept = [p.clone() for p in self._live]
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self._live, kept)

    @torch.no_grad()
    def restart(self) -> None:
        """Start the average again from the current weights, as a new AdapterEMA over them would (a resume with
        --resume-force from a checkpoint that holds no average)."""
        torch._foreach_copy_(self._avg, self._live)
        self.updates = 0

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.average.items()}
        save_file(tensors, str(path), metadata={"updates": str(self.updates), "decay": repr(self.decay)})

    def load(self, path: Path) -> None:
        """Restore the average and its update count from a checkpoint's ema.safetensors."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if names != set(self.average):
                missing = sorted(set(self.average) - names) or sorted(names - set(self.average))
                raise ValueError(f"{path} does not fit this run's adapters (e.g. {missing[0]})")
            for k in names:
                self.average[k].copy_(f.get_tensor(k))
            self.updates = int(f.metadata()["updates"])


def adapter_ema(models: dict[str, torch.nn.Module], decay: float, unwrap=lambda m: m) -> AdapterEMA | None:
    """The EMA of every trainable tensor of `models` (by their saved folder name: unet, text_encoder, ...), keyed
    'unet/<parameter name>' on the unwrapped model so that the names do not depend on the number of processes;
    None when decay is 0 (off)."""
    if not decay:
        return None
    params = {f"{part}/{name}": p for part, model in models.items()
              for name, p in unwrap(model).named_parameters() if p.requires_grad}
    return AdapterEMA(params, decay)
