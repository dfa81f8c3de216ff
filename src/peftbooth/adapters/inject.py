"""Attaching an adapter to a model (PEFT injects its layers in place), checking the targets first."""

from __future__ import annotations

import torch
from peft import PeftModel, get_peft_model

from ..config.sections import AdapterArgs, UsageError
from .peft_config import peft_config, target_modules


def attach(model: torch.nn.Module, a: AdapterArgs, presets: dict, flag_prefix: str, base_model: str | None = None,
           layers: list[int] | None = None, layers_pattern: str = "layers",
           exclude: list[str] | None = None) -> PeftModel:
    """Wrap `model` in a PeftModel with one trainable adapter named 'default' (on the `layers` numbered children
    of `layers_pattern` only, if given).

    PEFT replaces the targeted layers in place, so `model` itself now runs with the adapter; the PeftModel is the
    handle for saving and for counting parameters.
    """
    targets = check_targets(model, a.target_modules, presets, flag_prefix)
    peft_model = get_peft_model(model, peft_config(a, targets, layers, layers_pattern, exclude))
    # recorded in adapter_config.json; PEFT cannot read it off a diffusers model itself
    peft_model.peft_config["default"].base_model_name_or_path = base_model
    return peft_model


def check_targets(model: torch.nn.Module, spec: str, presets: dict, flag_prefix: str) -> list[str]:
    """The target list of `spec`; UsageError naming the flag if an explicit name matches no module of `model`."""
    targets = target_modules(spec, presets)
    names = [n for n, _ in model.named_modules()]
    if spec not in presets:
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise UsageError(
                f"--{flag_prefix}target-modules: no module named {', '.join(missing)} in the {type(model).__name__}"
            )
    return targets


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
