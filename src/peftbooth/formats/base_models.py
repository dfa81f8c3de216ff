"""Module trees of Stable Diffusion 1.x / 2.x, built on the meta device (no weights, no memory, no download).

Importing a kohya file needs the real dotted module paths (underscores are ambiguous: ``to_out_0`` is
``to_out.0``, ``time_emb_proj`` is one name) and the layer shapes to check the file against. Both come from the
model *config*: the base model's own (``--model``) or, without one, the published SD 1.5 / SD 2.x configs below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import UsageError

# The published configs of the SD 1.x (stable-diffusion-v1-5) and SD 2.x (stable-diffusion-2-1) UNets and CLIP
# text encoders: only fields that change module names or shapes are spelled out.
SD1_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD2_UNET = dict(SD1_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True)
SD1_TEXT_ENCODER = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SD2_TEXT_ENCODER = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                        num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
BUILTIN = {"sd_v1": (SD1_UNET, SD1_TEXT_ENCODER), "sd_v2": (SD2_UNET, SD2_TEXT_ENCODER)}


@dataclass
class BaseConfigs:
    unet: dict
    text_encoder: dict
    source: str  # shown in messages: the --model given, or 'built-in SD 1.x config'


def builtin_configs(version: str) -> BaseConfigs:
    unet, te = BUILTIN[version]
    return BaseConfigs(dict(unet), dict(te), f"the built-in {'SD 1.x' if version == 'sd_v1' else 'SD 2.x'} config")


def model_configs(model: str) -> BaseConfigs:
    """The UNet and text-encoder configs of a local diffusers folder or hub id (only the small JSON files)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    from ..models import resolve_model

    path = resolve_model(model)
    try:
        unet = dict(UNet2DConditionModel.load_config(path, subfolder="unet"))
        te = CLIPTextConfig.from_pretrained(path, subfolder="text_encoder").to_dict()
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {model}: could not read its unet / text_encoder config ({first[:200]})") from e
    return BaseConfigs(unet, te, f"--model {model}")


def meta_model(part: str, configs: BaseConfigs) -> torch.nn.Module:
    """A fresh UNet or CLIP text encoder with every tensor on the meta device: the real module tree and shapes."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        if part == "unet":
            cfg = {k: v for k, v in configs.unet.items() if not k.startswith("_")}
            return UNet2DConditionModel.from_config(cfg)
        return CLIPTextModel(CLIPTextConfig.from_dict(configs.text_encoder))


def adaptable_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module path -> layer, for the layer types PEFT's LoRA, LoHa and LoKr wrap in a Stable Diffusion model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
