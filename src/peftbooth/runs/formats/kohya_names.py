"""kohya / LyCORIS names: module path <-> ``lora_unet_…`` / ``lora_te…`` key, and PEFT <-> kohya parameter names.

Key layout: ``<name>.<parameter>`` where ``name`` is

* SD 1.x / 2.x: ``lora_unet_`` + the diffusers module path of the UNet with dots turned into underscores (these
  files use diffusers paths, not the SGM ``input_blocks`` ones), or ``lora_te_`` + the CLIP path from
  ``text_model`` on (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``);
* SDXL: ``lora_unet_`` + the module path in the original SGM UNet (``lora_unet_input_blocks_4_1_transformer_blocks_0_
  attn1_to_q``, see :mod:`.sgm`), ``lora_te1_`` (text_encoder, CLIP ViT-L) and ``lora_te2_`` (text_encoder_2,
  OpenCLIP bigG) + the CLIP path.
  Import also accepts SDXL UNet modules under their diffusers paths (as diffusers' own kohya conversion writes).

Owns the parameter-name tables, the grouping of a file's keys by module (with the hint for keys of other
formats), the kohya name -> module path map of a base model's part, and the SGM names of an SDXL UNet.
"""

from __future__ import annotations

import torch

from ...config.sections import UsageError
from .base_models import BaseConfigs, adaptable_modules, meta_model
from .common import KOHYA_SDXL_TE_PREFIX, KOHYA_TE_PREFIX, PARAMS, examples, kohya_module_name, kohya_text_name
from .sgm import SgmNames

ALPHA = "alpha"
LORA_NAMES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}  # PEFT -> kohya
KOHYA_PARAMS = {  # kohya parameter -> (algorithm, PEFT parameter)
    **{k: ("lora", p) for p, k in LORA_NAMES.items()},
    **{p: ("loha", p) for p in PARAMS["loha"]},
    **{p: ("lokr", p) for p in PARAMS["lokr"]},
}
KOHYA_PREFIXES = ("lora_unet_", *KOHYA_TE_PREFIX.values(), *KOHYA_SDXL_TE_PREFIX.values())


def group_kohya_keys(tensors: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """{'lora_unet_...': {'lora_down.weight': t, 'alpha': t}, ...}; UsageError naming keys of any other format."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        name, _, param = key.partition(".")
        if name.startswith(KOHYA_PREFIXES) and (param in KOHYA_PARAMS or param == ALPHA):
            groups.setdefault(name, {})[param] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise UsageError(f"{where}: {unknown_key_hint(unknown)}: {examples(unknown)}")
    empty = [name for name, params in groups.items() if set(params) == {ALPHA}]
    if empty:
        raise UsageError(f"{where}: alpha without weights for {examples(empty)}")
    if not groups:
        raise UsageError(f"{where}: holds no tensors")
    return groups


def unknown_key_hint(keys: list[str]) -> str:
    if any(k.endswith(".dora_scale") for k in keys):
        return "DoRA keys (dora_scale), which have no exact PEFT equivalent"
    if any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys):
        return "a diffusers-format file, not a kohya one; load it with load_lora_weights instead"
    return ("unknown key format (expected kohya / LyCORIS keys such as 'lora_unet_<module>.lora_down.weight', "
            "'.hada_w1_a' or '.lokr_w1' and '.alpha')")


def sgm_names(unet_config: dict, source: str) -> SgmNames:
    return SgmNames(meta_model("unet", BaseConfigs(unet_config, {}, source)), source)


def module_names(part: str, model: torch.nn.Module, configs: BaseConfigs) -> dict[str, str]:
    """kohya name -> module path of every adaptable layer of one part. An SDXL UNet answers to its SGM names (what
    sd-scripts writes) and to its diffusers paths (what diffusers' own kohya conversion writes); the two sets of
    names never overlap (input_blocks / down_blocks, ...)."""
    paths = adaptable_modules(model)
    if not configs.is_sdxl:
        return {kohya_module_name(part, path): path for path in paths}
    if part != "unet":
        return {kohya_text_name(part, path, sdxl=True): path for path in paths}
    sgm = SgmNames(model, configs.source)
    names = {kohya_module_name("unet", path): path for path in paths}
    names.update({"lora_unet_" + s.replace(".", "_"): path for s, path in sgm.sgm_paths(paths).items()})
    return names
