"""The diffusers pipeline of a family, the one place it is chosen: StableDiffusionPipeline without its safety
checker for SD 1.x / 2.x, StableDiffusionXLPipeline without its watermarker for SDXL, StableDiffusion3Pipeline for
SD3 / 3.5. ``loading.load_pipeline``
loads one from a folder; ``assemble`` builds one over components already in memory (class images, validation,
proxies), sharing their modules."""

from __future__ import annotations

from .components import Components


def pipeline_class(family: str) -> tuple[type, dict]:
    """(pipeline class, the keyword arguments that switch off its extras) of a family: never whatever class a
    model_index.json names."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sd3":
        return StableDiffusion3Pipeline, {}
    if family == "sdxl":
        return StableDiffusionXLPipeline, {"add_watermarker": False}
    return StableDiffusionPipeline, {"safety_checker": None, "feature_extractor": None,
                                     "requires_safety_checker": False}


def assemble(components: Components, scheduler):
    """A pipeline over `components`' own modules (shared, not copied) with `scheduler`."""
    c = components
    cls, extras = pipeline_class(c.family)
    modules = dict(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, scheduler=scheduler)
    modules[c.denoiser_part] = c.unet  # 'unet', or SD3's 'transformer'
    if c.text_encoder_2 is not None:
        modules.update(text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2)
    if c.is_sd3:  # T5 may be None (--no-t5); its tokenizer too then, the sequence length is in call_kwargs
        modules.update(text_encoder_3=c.text_encoder_3, tokenizer_3=c.tokenizer_3)
    pipe = cls(**modules, **extras)
    if c.is_sd3:
        pipe.max_sequence_length = c.max_sequence_length
    return pipe


def denoiser(pipe):
    """The pipeline's UNet, or SD3's transformer."""
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def call_kwargs(pipe) -> dict:
    """The keyword arguments every call of `pipe` needs beyond the prompt: SD3's T5 sequence length, the one the
    run was trained with (the pipeline's own default, 256, would give T5 other states, and without T5 zeros of
    another length)."""
    if not hasattr(pipe, "transformer"):
        return {}
    length = getattr(pipe, "max_sequence_length", None)
    if length is None:
        length = pipe.tokenizer_3.model_max_length if pipe.tokenizer_3 is not None else 77
    return {"max_sequence_length": int(length)}
