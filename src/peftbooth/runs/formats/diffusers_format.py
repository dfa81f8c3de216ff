"""Export LoRA adapters as one diffusers ``pytorch_lora_weights.safetensors``.

``StableDiffusionPipeline.load_lora_weights(path)`` splits the file on the ``unet.`` / ``text_encoder.`` key prefixes
(``StableDiffusionXLPipeline`` also on ``text_encoder_2.``; ``StableDiffusion3Pipeline`` on ``transformer.``,
``text_encoder.`` and ``text_encoder_2.``, the transformer keyed by its diffusers module paths, to_q / to_k / to_v
unfused, exactly as PEFT saved them) and builds each part's ``LoraConfig``. Without further
information it guesses ``lora_alpha = r`` (strength off whenever alpha != rank) and knows nothing of rsLoRA.
diffusers therefore also reads a JSON object stored in the safetensors header under ``lora_adapter_metadata``: keys
``"<part>.<LoraConfig field>"``, passed straight to ``LoraConfig(**fields)`` for that part. Writing the run's own
r, lora_alpha, use_rslora, use_dora, rank/alpha patterns there makes the file load at exactly the trained strength,
in one call, with the weights unchanged.
"""

from __future__ import annotations

import json

from ...config.sections import UsageError
from ..rundir import DENOISERS, TEXT_ENCODERS
from .common import Adapter, RunFolder, text_model_path

METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name load_lora_weights(folder) looks for
TE_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


def check_lora(adapter: Adapter) -> None:
    if adapter.kind != "lora":
        raise UsageError(
            f"--format diffusers holds LoRA only, but the {adapter.part} adapter is {adapter.kind.upper()}; "
            "use --format kohya (a LyCORIS file for A1111 / ComfyUI / Forge) or --format peft"
        )


def module_key(part: str, module: str) -> str:
    # the text encoders are written with their 'text_model.' root, the spelling every diffusers release understands
    # (newer ones strip it again when transformers' CLIPTextModel is flattened; SDXL's CLIPTextModelWithProjection
    # keeps it)
    return module if part in DENOISERS else text_model_path(module)


def te_uses_linear_layer_names(adapter: Adapter) -> bool:
    """diffusers recognises a text-encoder state dict in PEFT spelling only through the attention projections
    (q/k/v/out_proj); one that adapts nothing but fc1/fc2 must use the older 'lora_linear_layer' spelling."""
    return not any(m.rsplit(".", 1)[-1] in TE_ATTENTION for m in adapter.modules)


def param_key(param: str, linear_layer_names: bool) -> str:
    if param == "lora_magnitude_vector":
        # DoRA: PEFT saves the magnitude without '.weight'; transformers 5's load_adapter (diffusers' text-encoder
        # path) only maps keys of the form '<param>.weight' and would silently drop it. PEFT's own loader (the UNet
        # path) accepts both spellings.
        return "lora_magnitude_vector.weight"
    if linear_layer_names:
        return param.replace("lora_A", "lora_linear_layer.down").replace("lora_B", "lora_linear_layer.up")
    return param


def lora_state_dict(adapter: Adapter) -> dict:
    linear_layer_names = adapter.part in TEXT_ENCODERS and te_uses_linear_layer_names(adapter)
    return {
        f"{adapter.part}.{module_key(adapter.part, module)}.{param_key(param, linear_layer_names)}": tensor
        for module, params in adapter.modules.items()
        for param, tensor in params.items()
    }


def lora_config_fields(adapter: Adapter) -> dict:
    """The LoraConfig arguments diffusers rebuilds this part with. Only long-standing fields are written, so that
    older PEFT releases on the loading side can still construct the config."""
    c = adapter.config
    # exact module paths (text encoder: without the 'text_model.' root, which PEFT's suffix match then finds in
    # both the flattened and the nested CLIPTextModel)
    targets = sorted(m.removeprefix("text_model.") for m in adapter.modules)
    fields = {
        "r": int(c["r"]),
        "lora_alpha": float(c["lora_alpha"]),
        "target_modules": targets,
        "rank_pattern": dict(c.get("rank_pattern") or {}),
        "alpha_pattern": dict(c.get("alpha_pattern") or {}),
        "use_rslora": bool(c.get("use_rslora", False)),
        "use_dora": bool(c.get("use_dora", False)),
        "lora_dropout": 0.0,  # inference only
        "bias": "none",
    }
    if c.get("lora_bias"):
        fields["lora_bias"] = True
    return fields


def diffusers_file(run: RunFolder) -> tuple[dict, dict[str, str]]:
    """(state dict, safetensors header) of the diffusers export of a run; UsageError for LoHa / LoKr."""
    for adapter in run.adapters.values():
        check_lora(adapter)
    tensors, fields = {}, {}
    for part, adapter in run.adapters.items():
        tensors.update(lora_state_dict(adapter))
        fields.update({f"{part}.{k}": v for k, v in lora_config_fields(adapter).items()})
    header = {"format": "pt", METADATA_KEY: json.dumps(fields, indent=2, sort_keys=True)}
    return tensors, header
