"""Tiny random Stable Diffusion models (SD 1.x, SD 2.x v-prediction, SDXL layouts), built in code and saved as
ordinary diffusers folders, so tests and demos load them through the same ``from_pretrained`` path."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch


def _write_tokenizer(folder: Path) -> None:
    """A byte-level CLIP BPE vocabulary with no merges: every character is a token, words end with '</w>'."""
    from ..world.tokenizer import byte_chars

    chars = byte_chars()  # each of the 256 bytes as a printable character (the GPT-2 / CLIP convention)
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")
    tok.model_max_length = 77
    tok.save_pretrained(str(folder))  # tokenizer.json + config; vocab.json / merges.txt stay for slow tokenizers


# Component configs of the random models: 'tiny' for tests and the demo, 'sd15' with the shapes of SD 1.5
# (860M-parameter UNet) for benchmarks. Both use the SD 1.x layout and the locally written tokenizer.
SHAPES = {
    "tiny": dict(
        unet=dict(sample_size=32, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16),
        vae=dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16, sample_size=64),
        text=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    ),
    # SD 2.x differences that matter to the code: linear (not 1x1 conv) transformer projections, per-block head
    # dims, a GELU text encoder; paired with a v-prediction scheduler it is a tiny SD 2.x 768-v.
    "tiny-sd2": dict(
        unet=dict(sample_size=32, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=16),
        vae=dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16, sample_size=64),
        text=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="gelu"),
    ),
    # SDXL layout: no attention in the first block, several transformer layers per block, linear projections, a
    # UNet conditioned on the pooled text embedding and 6 micro-conditioning numbers ("text_time"), and two text
    # encoders whose penultimate states are concatenated (32 + 32 = cross_attention_dim 64).
    "tiny-sdxl": dict(
        unet=dict(sample_size=32, block_out_channels=(32, 64), layers_per_block=2,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
                  cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=16),
        vae=dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16, sample_size=64,
                 scaling_factor=0.13025, force_upcast=True),
        text=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4),
        text_2=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    hidden_act="gelu", projection_dim=32),
    ),
    "sd15": dict(
        unet=dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
        vae=dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512, layers_per_block=2),
        text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, hidden_act="quick_gelu"),
    ),
}


def random_components(shape: str = "tiny", prediction_type: str = "epsilon", seed: int = 0):
    """Randomly initialised SD components built from the configs in SHAPES: (unet, vae, text_encoder, scheduler,
    text_encoder_2), the last None except for SDXL shapes."""
    from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = SHAPES[shape]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **cfg["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **cfg["vae"])
    ids = dict(max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    text_encoder = CLIPTextModel(CLIPTextConfig(**ids, **cfg["text"]))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **cfg["text_2"])) if "text_2" in cfg else None
    # SDXL ships an Euler sampler config; training reads it as DDPM (same betas), as for any model
    sched_cls = EulerDiscreteScheduler if text_encoder_2 is not None else DDPMScheduler
    extra = {"timestep_spacing": "leading"} if text_encoder_2 is not None else {"clip_sample": False}
    scheduler = sched_cls(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type=prediction_type, steps_offset=1, **extra,
    )
    return unet, vae, text_encoder, scheduler, text_encoder_2


def build_tiny_model(path: str | Path, prediction_type: str = "epsilon", seed: int = 0, shape: str = "tiny") -> Path:
    """Write a random SD pipeline folder (tiny by default) at `path` atomically: built in a temp folder, renamed."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from ..runs.atomic import atomic_dir

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the tokenizer files are staged beside it, the model is written in a hidden folder and renamed into place
    with tempfile.TemporaryDirectory(prefix=".tiny-", dir=path.parent) as work, atomic_dir(path) as model:
        tmp = Path(work)
        unet, vae, text_encoder, scheduler, text_encoder_2 = random_components(shape, prediction_type, seed)
        _write_tokenizer(tmp / "_tok")
        tokenizer = CLIPTokenizer.from_pretrained(str(tmp / "_tok"))
        tokenizer.model_max_length = 77
        if text_encoder_2 is None:
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        else:
            # SDXL's second tokenizer pads with '!' (id 0) instead of the end token, as the real one does
            tokenizer_2 = CLIPTokenizer.from_pretrained(str(tmp / "_tok"), pad_token="!")
            tokenizer_2.model_max_length = 77
            pipe = StableDiffusionXLPipeline(
                vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
            )
        pipe.save_pretrained(str(model), safe_serialization=True)
        for folder in ("tokenizer", "tokenizer_2") if text_encoder_2 is not None else ("tokenizer",):
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(tmp / "_tok" / name, model / folder / name)
    return path
