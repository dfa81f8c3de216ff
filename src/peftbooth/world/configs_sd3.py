"""The SD3-shaped world model's component configs (`python -m peftbooth.world.build_sd3`): one place, read by the
build and by the test that checks the shipped weights were made by this version of it.

The layout is Stable Diffusion 3's without T5: a 16-channel AutoencoderKL (no quant convs, latents
(z - shift_factor) * scaling_factor), two CLIP text encoders with projections sharing the world's word-level
tokenizer, an MMDiT transformer (SD3Transformer2DModel) and the flow-matching Euler scheduler.
"""

from __future__ import annotations

from . import configs
from .scenes import SIZE

BUILD_SEED = 0
LATENT_SIZE = SIZE // 4  # 32 px -> 8 x 8 x 16 latents
TEXT_WIDTH = 64  # each CLIP's hidden size; the transformer sees both side by side (128)
PROJECTION = 64  # each CLIP's pooled projection; pooled = both side by side (128)
# The zero rows that stand for T5 (the folder has none): peftbooth's --max-sequence-length default, so that
# `peftbooth train` / `generate` condition the transformer exactly as it was pretrained.
T5_ROWS = 77
# shift 1.0: SD3's 3.0 moves training and sampling towards high noise for 1024 px images, where a given sigma
# still leaves much of the picture legible; on 8 x 8 latents the picture is gone at far lower sigma, so the
# resolution-dependent shift of the SD3 paper (sqrt(m / n) against its 256 px reference) is below 1 here, and
# 1.0 (no shift) is the nearest of the two values SD3 uses.
SHIFT = 1.0


def vae_config() -> dict:
    """The SD world's VAE (channels 32, 32, 64) with SD3's 16 latent channels and without its quant convs;
    scaling_factor and shift_factor are measured on the data by the build."""
    cfg = configs.vae_config()
    cfg.update(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, force_upcast=False)
    return cfg


def text_config(index: int) -> dict:
    """CLIP-L / CLIP-G stand-ins: the SD world's text encoder (2 layers, width 64) with a projection; the second
    uses gelu, as CLIP-G does."""
    cfg = configs.text_config()
    cfg.update(projection_dim=PROJECTION)
    if index == 2:
        cfg.update(hidden_act="gelu")
    return cfg


def transformer_config() -> dict:
    return dict(sample_size=LATENT_SIZE, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
                attention_head_dim=32, num_attention_heads=4, joint_attention_dim=2 * TEXT_WIDTH,
                caption_projection_dim=128, pooled_projection_dim=2 * PROJECTION, pos_embed_max_size=LATENT_SIZE)


def scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, shift=SHIFT)
