"""kohya / LyCORIS single-file adapters (A1111, Forge, ComfyUI): export from PEFT, import into PEFT.

The entry points: `kohya_file` / `kohya_state_dict` (a run's PEFT adapters -> one kohya state dict and its header)
and `kohya_to_peft` (a kohya file -> a PEFT config and state dict per model part, checked against the base model).
The pieces live beside this module: key and module names in :mod:`.kohya_names`, per-algorithm tensors (LoRA,
LoHa, LoKr) in :mod:`.kohya_tensors`, a part's modules into a PEFT config and state dict in :mod:`.kohya_import`, the ss_* header in :mod:`.kohya_metadata`, and which base model (SD 1.x /
2.x / SDXL) a run or file is for in :mod:`.kohya_base`.
"""

from __future__ import annotations

import torch

from ...config.sections import UsageError
from ..rundir import TRANSFORMER
from .base_models import builtin_configs, model_configs
from .common import KOHYA_SDXL_TE_PREFIX, KOHYA_TE_PREFIX, Adapter, RunFolder, kohya_module_name
from .kohya_base import file_family, guess_version, run_base
from .kohya_import import convert_part
from .kohya_metadata import kohya_metadata
from .kohya_names import LORA_NAMES, group_kohya_keys
from .kohya_tensors import MODULE_EXPORTERS
from .sgm import SgmNames

# ---------------------------------------------------------------------------------------------------------------
# export


def kohya_state_dict(adapters: dict[str, Adapter], sgm: SgmNames | None = None) -> dict[str, torch.Tensor]:
    """All adapters as one kohya / LyCORIS state dict (pure: works on meta tensors too, for checking names).
    `sgm`: the UNet's SGM names, for an SDXL model (see `kohya_module_name`)."""
    out = {}
    for part, adapter in adapters.items():
        for module, params in adapter.modules.items():
            name = kohya_module_name(part, module, sgm)
            for param, tensor in MODULE_EXPORTERS[adapter.kind](adapter, module, params).items():
                out[f"{name}.{LORA_NAMES.get(param, param)}"] = tensor
    return out


def kohya_file(run: RunFolder, output_name: str) -> tuple[dict, dict[str, str]]:
    if TRANSFORMER in run.adapters:  # SD3: fused qkv layers, MMDiT names (see .sd3)
        from .sd3 import sd3_kohya_file

        return sd3_kohya_file(run, output_name)
    base = run_base(run)
    return kohya_state_dict(run.adapters, base.sgm), kohya_metadata(run, output_name, base)


# ---------------------------------------------------------------------------------------------------------------
# import


def kohya_to_peft(tensors: dict, metadata: dict, model: str | None, where: str) -> dict:
    """{'unet': (config, state dict), 'text_encoder': ..., 'text_encoder_2': ...} of a kohya / LyCORIS file; for an
    SD3 file {'transformer': ..., ...} (see .sd3)."""
    from .sd3 import is_sd3_file, refuse_t5, sd3_to_peft

    refuse_t5(tensors, where)
    groups = group_kohya_keys(tensors, where)
    if is_sd3_file(groups, metadata, model, where):
        return sd3_to_peft(groups, metadata, model, where)
    family, evidence = file_family(metadata, groups, where)
    configs = model_configs(model) if model else builtin_configs(guess_version(metadata, groups, family))
    if family is not None and (family == "sdxl") != configs.is_sdxl:
        named = "an SDXL" if family == "sdxl" else "an SD 1.x / 2.x"
        raise UsageError(f"{where}: is {named} adapter ({evidence}) but {configs.source} is {configs.family}; "
                         f"pass --model with {named} base model")
    if not any(n.startswith("lora_unet_") for n in groups):
        raise UsageError(f"{where}: holds no UNet weights (lora_unet_*); peftbooth adapters always adapt the UNet")
    prefixes = {"unet": "lora_unet_", **(KOHYA_SDXL_TE_PREFIX if configs.is_sdxl else KOHYA_TE_PREFIX)}
    parts = {part: {n: p for n, p in groups.items() if n.startswith(prefix)} for part, prefix in prefixes.items()}
    return {part: convert_part(part, g, configs, metadata, where) for part, g in parts.items() if g}
