"""The world model's component configs: one place, read by the build script and by the test that checks the
shipped weights were made by this version of it."""

from __future__ import annotations

from .scenes import SIZE, vocabulary
from .tokenizer import MAX_LENGTH, vocab_and_merges

BUILD_SEED = 0
LATENT_SIZE = SIZE // 4  # the VAE halves the size twice: 32 px -> 8 x 8 x 4 latents


def vocab_size() -> int:
    return len(vocab_and_merges(vocabulary())[0])


def unet_config() -> dict:
    return dict(sample_size=LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
                up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=64, attention_head_dim=8,
                norm_num_groups=16)


def vae_config() -> dict:
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64),
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                layers_per_block=1, norm_num_groups=16, sample_size=SIZE)


def text_config() -> dict:
    n = vocab_size()  # ... the last two ids are <|startoftext|> and <|endoftext|>
    return dict(vocab_size=n, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=MAX_LENGTH, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1)


def scheduler_config() -> dict:
    # SD 1.x's training schedule: the same betas and epsilon prediction as the real models
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                prediction_type="epsilon", clip_sample=False, steps_offset=1)
