"""Module trees of Stable Diffusion 1.x / 2.x and SDXL, built on the meta device (no weights, no memory, no download).

Importing a kohya file needs the real dotted module paths (underscores are ambiguous: ``to_out_0`` is
``to_out.0``, ``time_emb_proj`` is one name) and the layer shapes to check the file against. Both come from the
model *config*: the base model's own (``--model``) or, without one, the published SD 1.5 / SD 2.x / SDXL configs
below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config.sections import UsageError

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
# stable-diffusion-xl-base-1.0: a UNet without attention in its first block, 1 / 2 / 10 transformer layers per
# block, conditioned on the pooled text embedding and 6 size / crop numbers; CLIP ViT-L (text_encoder) and OpenCLIP
# ViT-bigG with its projection (text_encoder_2), whose penultimate states together are 768 + 1280 = 2048 wide.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
SDXL_TEXT_ENCODER = dict(SD1_TEXT_ENCODER)
SDXL_TEXT_ENCODER_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
BUILTIN = {
    "sd_v1": (SD1_UNET, SD1_TEXT_ENCODER, None),
    "sd_v2": (SD2_UNET, SD2_TEXT_ENCODER, None),
    "sdxl": (SDXL_UNET, SDXL_TEXT_ENCODER, SDXL_TEXT_ENCODER_2),
}
BUILTIN_NAMES = {"sd_v1": "SD 1.x", "sd_v2": "SD 2.x", "sdxl": "SDXL"}


@dataclass
class BaseConfigs:
    unet: dict
    text_encoder: dict
    source: str  # shown in messages: the --model given, or 'built-in SD 1.x config'
    text_encoder_2: dict | None = None  # SDXL's second text encoder (CLIPTextModelWithProjection); None before SDXL

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def family(self) -> str:
        """'SDXL' or 'SD 1.x / 2.x', for messages."""
        return "SDXL" if self.is_sdxl else "SD 1.x / 2.x"


def builtin_configs(version: str) -> BaseConfigs:
    unet, te, te2 = BUILTIN[version]
    return BaseConfigs(dict(unet), dict(te), f"the built-in {BUILTIN_NAMES[version]} config",
                       None if te2 is None else dict(te2))


def model_configs(model: str) -> BaseConfigs:
    """The UNet and text-encoder configs of a local diffusers folder or hub id (only the small JSON files);
    an SDXL model (model_index.json names a text_encoder_2) also gives its second text encoder's."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    from ...models.loading import family_of, read_model_index, resolve_model

    path = resolve_model(model)
    sdxl = family_of(read_model_index(path)) == "sdxl"
    try:
        unet = dict(UNet2DConditionModel.load_config(path, subfolder="unet"))
        te = CLIPTextConfig.from_pretrained(path, subfolder="text_encoder").to_dict()
        te2 = CLIPTextConfig.from_pretrained(path, subfolder="text_encoder_2").to_dict() if sdxl else None
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {model}: could not read its unet / text_encoder config ({first[:200]})") from e
    return BaseConfigs(unet, te, f"--model {model}", te2)


def meta_model(part: str, configs: BaseConfigs) -> torch.nn.Module:
    """A fresh UNet or CLIP text encoder with every tensor on the meta device: the real module tree and shapes."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        if part == "unet":
            cfg = {k: v for k, v in configs.unet.items() if not k.startswith("_")}
            return UNet2DConditionModel.from_config(cfg)
        if part == "text_encoder_2":
            if configs.text_encoder_2 is None:
                raise UsageError(f"{configs.source} has no second text encoder (text_encoder_2): it is not SDXL")
            # the class SDXL pipelines load: it keeps the 'text_model.' level and adds text_projection
            return CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs.text_encoder_2))
        return CLIPTextModel(CLIPTextConfig.from_dict(configs.text_encoder))


def adaptable_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module path -> layer, for the layer types PEFT's LoRA, LoHa and LoKr wrap in a Stable Diffusion model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
