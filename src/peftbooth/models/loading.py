"""Loading a base model: resolving its name ('world', 'tiny', a hub id or a folder), reading its family from
``model_index.json``, loading the components separately with ``from_pretrained``, and the whole pipeline."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from ..config.sections import UsageError
from ..world import MODEL_DIR as WORLD_MODEL_DIR
from ..world import SD3_MODEL_DIR, WORLD_NAME, WORLD_SD3_NAME
from .components import Components
from .pipeline import pipeline_class
from .tiny import build_tiny_model

# Sub-folders a Stable Diffusion (1.x / 2.x) diffusers folder must hold for training; SDXL adds its second text
# encoder and tokenizer.
REQUIRED_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_SUBFOLDERS = REQUIRED_SUBFOLDERS + ("text_encoder_2", "tokenizer_2")
# SD3 / 3.5: an MMDiT transformer instead of the UNet; T5 (text_encoder_3/) is optional (--no-t5)
SD3_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
TINY_NAME = "tiny"


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTBOOTH_CACHE", Path.home() / ".cache" / "peftbooth"))


def resolve_model(model: str) -> str:
    """'tiny' -> the cached tiny model folder (built on first use); 'world' / 'world-sd3' -> the pretrained world
    models shipped with the package (SD-shaped, SD3-shaped); a local folder is checked; else a hub id."""
    if model == TINY_NAME:
        path = cache_dir() / "tiny-sd"
        if not (path / "model_index.json").exists():
            build_tiny_model(path)
        return str(path)
    if model in (WORLD_NAME, WORLD_SD3_NAME):
        folder, build = (WORLD_MODEL_DIR, "build") if model == WORLD_NAME else (SD3_MODEL_DIR, "build_sd3")
        if not (folder / "model_index.json").is_file():
            raise UsageError(f"--model {model}: the world model is missing from {folder}; rebuild it with "
                             f"'python -m peftbooth.world.{build}'")
        return str(folder)
    if os.path.exists(model):
        check_model_folder(model)
        return model
    if looks_like_path(model):
        raise UsageError(f"--model {model}: no such folder")
    return model  # a hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'


def looks_like_path(name: str) -> bool:
    """A local path rather than an 'owner/name' hub id (which has exactly one slash and no leading dot or slash)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def check_vae_arg(vae: str | None) -> None:
    """--vae: a missing local folder, or a file, is refused before anything is loaded."""
    if vae and os.path.isfile(vae):
        raise UsageError(f"--vae {vae}: is a file; pass a diffusers AutoencoderKL folder (config.json + "
                         "diffusion_pytorch_model.safetensors) or hub id")
    if vae and not os.path.exists(vae) and looks_like_path(vae):
        raise UsageError(f"--vae {vae}: no such folder; pass an AutoencoderKL folder or hub id")


def check_model_folder(path: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"--model {path}: not a folder; pass a diffusers model folder or a hub id")
    has_index = (p / "model_index.json").is_file()
    family = family_of(read_model_index(path)) if has_index else "sd"
    needed = {"sdxl": SDXL_SUBFOLDERS, "sd3": SD3_SUBFOLDERS}.get(family, REQUIRED_SUBFOLDERS)
    missing = [s for s in needed if not (p / s).is_dir()]
    if not has_index or missing:
        what = f"missing {', '.join(s + '/' for s in missing)}" if missing else "missing model_index.json"
        raise UsageError(f"--model {path}: not a diffusers Stable Diffusion folder ({what})")


def read_model_index(path: str, revision: str | None = None) -> dict:
    """model_index.json of a local folder or hub id (one small file: the family is known before any weights)."""
    local = Path(path) / "model_index.json"
    try:
        if local.is_file():
            return json.loads(local.read_text())
        from diffusers import DiffusionPipeline

        return dict(DiffusionPipeline.load_config(path, revision=revision))
    except (OSError, ValueError) as e:  # not found, offline, or not JSON
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {path}: could not read model_index.json ({first})") from e


def family_of(index: dict) -> str:
    """'sd3' when the pipeline has an SD3 transformer, 'sdxl' when it has a second text encoder, else 'sd' (1.x /
    2.x); refiners are refused."""
    def present(name):
        value = index.get(name)
        return isinstance(value, list) and any(v is not None for v in value)

    if present("transformer"):
        if index.get("transformer")[-1] != "SD3Transformer2DModel":
            raise UsageError(f"--model: a {index.get('_class_name', 'transformer')} model; of the transformer "
                             "families only Stable Diffusion 3 / 3.5 (SD3Transformer2DModel) is supported")
        return "sd3"
    if present("text_encoder_2"):
        if not present("text_encoder"):
            raise UsageError("--model: an SDXL refiner (no first text encoder) cannot be trained; use an SDXL base model")
        return "sdxl"
    return "sd"


def has_t5(index: dict) -> bool:
    """Whether an SD3 model_index.json names a T5 encoder (a folder may be saved without one)."""
    return any(v is not None for v in (index.get("text_encoder_3") or [None]))


def load_components(model: str, revision: str | None = None, variant: str | None = None,
                    vae: str | None = None, t5: bool = True, max_sequence_length: int = 77) -> Components:
    """Tokenizer(s), training scheduler, VAE, UNet and text encoder(s), frozen; `vae` replaces the model's VAE
    (a folder or hub id holding one AutoencoderKL, e.g. an fp16-safe SDXL VAE). An SD3 model gives its
    transformer (as `unet`), two CLIPs and, unless `t5` is False, T5 with `max_sequence_length` tokens."""
    path = resolve_model(model)
    index = read_model_index(path, revision)
    if family_of(index) == "sd3":
        from .sd3 import load_sd3_components

        # a folder saved without T5 (model_index.json names no class for it) is conditioned as with --no-t5
        return load_sd3_components(path, model, revision, variant, None if vae is None else load_vae(vae),
                                   t5 and has_t5(index), max_sequence_length)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    sdxl = family_of(index) == "sdxl"
    # use_safetensors: weights are never read from pickles (a model with only .bin files is refused)
    kw = dict(revision=revision)
    wkw = dict(revision=revision, variant=variant, use_safetensors=True)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        # The training scheduler comes from the model's own config: prediction_type (epsilon or v_prediction),
        # beta schedule and timestep count are kept instead of being hard-coded.
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **wkw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **wkw)
        tokenizer_2 = text_encoder_2 = None
        if sdxl:
            tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **wkw)
        if vae is None:
            vae_model = AutoencoderKL.from_pretrained(path, subfolder="vae", **wkw)
        else:
            vae_model = load_vae(vae)
    except OSError as e:  # hub id not found, offline, or a weights variant that is not there
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {model}: could not load ({first})") from e
    for m in (vae_model, unet, text_encoder, text_encoder_2):
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    return Components(tokenizer, noise_scheduler, vae_model, unet, text_encoder, path, tokenizer_2, text_encoder_2)


def load_vae(vae: str):
    """--vae: an AutoencoderKL folder or hub id (its config.json at the top, or in a vae/ subfolder)."""
    from diffusers import AutoencoderKL

    check_vae_arg(vae)
    subfolder = "vae" if (Path(vae) / "vae" / "config.json").is_file() else None
    try:
        return AutoencoderKL.from_pretrained(vae, subfolder=subfolder, use_safetensors=True)
    except (OSError, ValueError, TypeError) as e:  # missing files, or the config of another kind of model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--vae {vae}: could not load an AutoencoderKL ({first[:200]})") from e


def vae_config_force_upcast(model: str, revision: str | None = None, vae: str | None = None) -> bool:
    """`force_upcast` of the VAE a pipeline of `model` (with `vae` replacing its own) will have, read from its
    config before any weights are loaded: the precision policy needs it to choose the VAE's dtype."""
    from diffusers import AutoencoderKL

    if vae is not None:
        subfolder = "vae" if (Path(vae) / "vae" / "config.json").is_file() else None
        config = AutoencoderKL.load_config(vae, subfolder=subfolder)
    else:
        config = AutoencoderKL.load_config(resolve_model(model), subfolder="vae", revision=revision)
    return bool(config.get("force_upcast", True))


def load_pipeline(model: str, revision: str | None = None, variant: str | None = None, torch_dtype=None,
                  vae: str | None = None, vae_dtype=None, t5: bool = True, max_sequence_length: int = 77):
    """The full pipeline for generation: StableDiffusionPipeline (no safety checker) or, for an SDXL model,
    StableDiffusionXLPipeline (no watermarker) or StableDiffusion3Pipeline (without T5 when `t5` is False), the
    class models.pipeline chooses from model_index.json, never by importing whatever class the file names.
    `torch_dtype`: the UNet's and text encoders'; `vae_dtype`: the VAE's, when the precision policy keeps it apart
    (it is loaded on its own then, never rounded to half first)."""
    from diffusers import AutoencoderKL

    path = resolve_model(model)
    extra = {}
    if vae is not None:
        extra["vae"] = load_vae(vae).to(vae_dtype or torch_dtype)
    elif vae_dtype is not None and vae_dtype != torch_dtype:
        extra["vae"] = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision, variant=variant,
                                                     use_safetensors=True).to(vae_dtype)
    index = read_model_index(path, revision)
    family = family_of(index)
    cls, extras = pipeline_class(family)
    extra = {**extra, **extras}
    # without T5, or a folder saved without it, its states are zeros, as in training
    if family == "sd3" and not (t5 and has_t5(index)):
        extra.update(text_encoder_3=None, tokenizer_3=None)
    try:
        with warnings.catch_warnings():
            # newer diffusers rename torch_dtype to dtype; the old name keeps older releases working
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = cls.from_pretrained(path, revision=revision, variant=variant, torch_dtype=torch_dtype,
                                       use_safetensors=True, **extra)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {model}: could not load ({first})") from e
    if family == "sd3":
        pipe.max_sequence_length = max_sequence_length  # models.pipeline.call_kwargs passes it to every call
    return pipe
