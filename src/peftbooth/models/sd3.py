"""Loading the Stable Diffusion 3 / 3.5 family's components for training: the MMDiT transformer, CLIP-L and
CLIP-G (both with projections: SD3 is conditioned on both pooled embeddings), T5 unless it is left out, the
16-channel VAE and the flow-matching scheduler. Each is loaded on its own with ``from_pretrained`` from a folder or
hub id, safetensors only, as models.loading does for SD 1.x / 2.x and SDXL."""

from __future__ import annotations

from ..config.sections import UsageError
from .components import Components


def load_sd3_components(path: str, model: str, revision: str | None, variant: str | None, vae_model,
                        t5: bool, max_sequence_length: int) -> Components:
    """Components of an SD3 pipeline folder or hub id at `path` (`model` as the user named it, for errors);
    `vae_model`: a replacement VAE already loaded (--vae), else None for the model's own.

    `t5` False leaves T5 (4.7B parameters in SD 3.5) unloaded: the conditioning then holds zeros in its place,
    as StableDiffusion3Pipeline's does without it. T5's tokenizer pads and truncates to `max_sequence_length`.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    kw = dict(revision=revision)
    wkw = dict(revision=revision, variant=variant, use_safetensors=True)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw)
        # the model's own flow-matching config (its shift: 3.0 for SD3 / 3.5 Medium) is kept, never hard-coded
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", **wkw)
        text_encoder = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", **wkw)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **wkw)
        tokenizer_3 = text_encoder_3 = None
        if t5:
            tokenizer_3 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_3", **kw)
            tokenizer_3.model_max_length = max_sequence_length
            text_encoder_3 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", **wkw)
        if vae_model is None:
            vae_model = AutoencoderKL.from_pretrained(path, subfolder="vae", **wkw)
    except OSError as e:  # hub id not found, offline, a missing T5, or a weights variant that is not there
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = " (without T5: --no-t5)" if t5 and "text_encoder_3" in str(e) else ""
        raise UsageError(f"--model {model}: could not load ({first}){hint}") from e
    for m in (vae_model, transformer, text_encoder, text_encoder_2, text_encoder_3):
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    return Components(tokenizer, scheduler, vae_model, transformer, text_encoder, path, tokenizer_2, text_encoder_2,
                      tokenizer_3, text_encoder_3, is_sd3=True, max_sequence_length=max_sequence_length)
