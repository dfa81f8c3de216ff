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


# the tensors a guided step carries as [unconditional; conditional] halves, per family's pipeline
GUIDED_INPUTS = {"sd": ("prompt_embeds",), "sdxl": ("prompt_embeds", "add_text_embeds", "add_time_ids"),
                 "sd3": ("prompt_embeds", "pooled_prompt_embeds")}


def guidance_cutoff_kwargs(pipe, guidance_cutoff: float) -> dict:
    """The keyword arguments of a pipeline call that stop classifier-free guidance after the first
    `guidance_cutoff` share of the denoising steps (1.0: guided to the end): of n steps, steps 0 to
    int(n * guidance_cutoff) are guided, as in diffusers' own cutoff callbacks. Guidance at low noise, late in
    sampling, only exaggerates what is already drawn (the world model's boxes: corners pushed out into stars);
    past the cutoff a step is one conditional prediction, half the work of a guided one.

    diffusers' own CFG-cutoff callbacks keep row [-1:] of the prompt embeddings, one image's, and so fail for more
    than one image per call; this keeps the conditional half of the batch."""
    if not 0.0 <= guidance_cutoff <= 1.0:
        raise ValueError(f"guidance_cutoff must be in [0, 1], got {guidance_cutoff}")
    if guidance_cutoff == 1.0:
        return {}
    family = "sd3" if hasattr(pipe, "transformer") else "sdxl" if hasattr(pipe, "text_encoder_2") else "sd"
    names = list(GUIDED_INPUTS[family])

    def stop_guidance(pipeline, step_index: int, timestep, tensors: dict) -> dict:
        if pipeline.do_classifier_free_guidance and step_index == int(pipeline.num_timesteps * guidance_cutoff):
            tensors = {k: tensors[k].chunk(2)[1] for k in names}  # (2B, ...) -> the conditional (B, ...)
            pipeline._guidance_scale = 0.0  # the pipeline's next call sets its own again
        return tensors

    return {"callback_on_step_end": stop_guidance, "callback_on_step_end_tensor_inputs": names}


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
