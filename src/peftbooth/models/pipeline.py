"""The diffusers pipeline of a family, the one place it is chosen: StableDiffusionPipeline without its safety
checker for SD 1.x / 2.x, StableDiffusionXLPipeline without its watermarker for SDXL. ``loading.load_pipeline``
loads one from a folder; ``assemble`` builds one over components already in memory (class images, validation,
proxies), sharing their modules."""

from __future__ import annotations

from .components import Components


def pipeline_class(family: str) -> tuple[type, dict]:
    """(pipeline class, the keyword arguments that switch off its extras) of a family: never whatever class a
    model_index.json names."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        return StableDiffusionXLPipeline, {"add_watermarker": False}
    return StableDiffusionPipeline, {"safety_checker": None, "feature_extractor": None,
                                     "requires_safety_checker": False}


def assemble(components: Components, scheduler):
    """A pipeline over `components`' own modules (shared, not copied) with `scheduler`."""
    c = components
    cls, extras = pipeline_class(c.family)
    modules = dict(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, scheduler=scheduler)
    if c.is_sdxl:
        modules.update(text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2)
    return cls(**modules, **extras)
