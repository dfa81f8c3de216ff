"""An adapter's strength: the factor each adapted layer's update is multiplied with, and setting it.

PEFT scales a layer's update by alpha / r (LoRA, LoHa and LoKr alike), or by alpha / sqrt(r) with rank-stabilised
LoRA. A weight w on top (``generate --mix``, ``fuse --scale``, the UI's strength) makes it w x that: 1.0 is the
adapter as trained. Readers of the kohya / LyCORIS format always scale by alpha / r, so an rsLoRA adapter is
exported with the alpha that gives the same factor there (:func:`kohya_alpha`).
"""

from __future__ import annotations

import math

import torch


def peft_scale(kind: str, alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor PEFT multiplies a layer's update with (its own formula per adapter type)."""
    if kind == "lora" and use_rslora:
        return alpha / math.sqrt(r)  # rank-stabilised LoRA
    return alpha / r  # LoRA, LoHa and LoKr alike


def kohya_alpha(kind: str, alpha: float, r: int, use_rslora: bool = False) -> float:
    """The alpha a reader that scales by alpha / r needs to apply PEFT's factor: alpha, or alpha * sqrt(r) for an
    rsLoRA adapter (alpha / sqrt(r) = (alpha * sqrt(r)) / r)."""
    return alpha * math.sqrt(r) if kind == "lora" and use_rslora else alpha


def set_strength(peft_model: torch.nn.Module, weights: dict[str, float]) -> None:
    """Set every adapter layer's update of each named adapter to weight x its trained strength."""
    for module in peft_model.modules():
        if hasattr(module, "set_scale"):  # LoRA, LoHa and LoKr layers
            for name, weight in weights.items():
                module.set_scale(name, weight)
