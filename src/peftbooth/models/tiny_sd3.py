"""Tiny random Stable Diffusion 3 / 3.5 models, built in code and saved as ordinary diffusers folders
(``StableDiffusion3Pipeline.save_pretrained``), so tests load them through the same ``from_pretrained`` path as
stabilityai/stable-diffusion-3.5-medium.

The layout is SD3's: an MMDiT transformer (``SD3Transformer2DModel``) on 16-channel latents, two CLIP text
encoders with projections (L and G), a T5 encoder, a VAE with a shift and a scaling factor, and the flow-matching
Euler scheduler. ``sd3.5`` adds what SD 3.5 Medium adds: the MMDiT-X extra self-attention (``attn2``) in the first
blocks and RMS qk-norm. The CLIP tokenizers are the tiny models' character-level BPE; T5's is a character-level
Unigram vocabulary written here, as a real one would be without sentencepiece.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .tiny import _write_tokenizer

T5_MAX_LENGTH = 32  # the tiny T5 tokenizer's model_max_length (SD3's real one: 256 tokens by default, up to 512)

# Widths: CLIP-L 32 + CLIP-G 32 = 64, padded to T5's 64 (joint_attention_dim), as 768 + 1280 = 2048 is padded to
# T5-XXL's 4096; pooled 32 + 32 = pooled_projection_dim 64 (real: 768 + 1280 = 2048).
SD3_SHAPES = {
    "tiny-sd3": dict(
        transformer=dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                         attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                         caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=64),
        t5=dict(d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4),
    ),
    # SD 3.5 Medium's differences: MMDiT-X blocks (a second self-attention, attn2, in the first layers) and
    # qk-norm (RMS) in every attention.
    "tiny-sd3.5": dict(
        transformer=dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                         attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                         caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=64,
                         dual_attention_layers=(0,), qk_norm="rms_norm"),
        t5=dict(d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4),
    ),
}
CLIP = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            projection_dim=32, max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)
# SD3's VAE: 16 latent channels, no quant convs, latents = (mean - shift_factor) * scaling_factor
VAE = dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16, sample_size=64, latent_channels=16,
           scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
           force_upcast=False)


def t5_tokenizer():
    """A character-level T5 tokenizer (transformers' tokenizers-backed T5Tokenizer over a Unigram vocabulary):
    <pad> 0, </s> 1, <unk> 2, then '▁' and every printable ASCII character, alone and after '▁'."""
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.model_max_length = T5_MAX_LENGTH
    return tok


def random_sd3_components(shape: str = "tiny-sd3", seed: int = 0) -> dict:
    """The pipeline's modules, randomly initialised from SD3_SHAPES[shape]: a dict of StableDiffusion3Pipeline's
    keyword arguments, tokenizers excepted."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    cfg = SD3_SHAPES[shape]
    torch.manual_seed(seed)
    return dict(
        transformer=SD3Transformer2DModel(**cfg["transformer"]),
        vae=AutoencoderKL(in_channels=3, out_channels=3, **VAE),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP, hidden_act="gelu")),
        text_encoder_3=T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer()), **cfg["t5"])),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    )


def build_tiny_sd3_model(path: str | Path, shape: str = "tiny-sd3", seed: int = 0) -> Path:
    """Write a random SD3 (or, shape 'tiny-sd3.5', SD 3.5) pipeline folder at `path` atomically."""
    import shutil

    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    from ..runs.atomic import atomic_dir

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tiny-", dir=path.parent) as work, atomic_dir(path) as model:
        tmp = Path(work)
        _write_tokenizer(tmp / "_tok")
        tokenizer = CLIPTokenizer.from_pretrained(str(tmp / "_tok"))
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(tmp / "_tok"), pad_token="!")  # G pads with '!', as SD3's
        for tok in (tokenizer, tokenizer_2):
            tok.model_max_length = 77
        pipe = StableDiffusion3Pipeline(tokenizer=tokenizer, tokenizer_2=tokenizer_2, tokenizer_3=t5_tokenizer(),
                                        **random_sd3_components(shape, seed))
        pipe.save_pretrained(str(model), safe_serialization=True)
        for folder in ("tokenizer", "tokenizer_2"):
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(tmp / "_tok" / name, model / folder / name)
    return path
