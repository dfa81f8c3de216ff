"""The defaults that follow the base model: one owner of "what a run on this model trains with unless told".

A flag's dataclass default cannot suit every model: 1e-4 for 400 steps on attention only is the community's
choice for SD 1.5 LoRA, and learns nothing on the 32-px world model; 512 px halves SDXL and makes the world
model 256 times slower. So the family of the base model is read from its folder (a few small JSON files, before
torch or the weights are touched) and its defaults fill the settings the user did not give: not a flag, not a key
of --config YAML, not a field edited in the UI. What the user gives always wins, and the saved config.yaml records
the values used. Sources of each family's values: docs/training.md, "Defaults that follow the model".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# SD 1.x / 2.x / SDXL: diffusers' DreamBooth LoRA examples (examples/dreambooth/README.md, LoRA section, and
# README_sdxl.md): LoRA rank 4 on the UNet's attention, AdamW at 1e-4, constant schedule, batch 1, 500 steps, at
# the model's own resolution. Only the step count differs from the flags' defaults; the rest is listed so the
# run's line says what it trained with.
COMMUNITY = {"unet_adapter.rank": 4, "unet_adapter.target_modules": "attn", "train.learning_rate": 1e-4,
             "train.max_train_steps": 500}
# SD 3 / 3.5: diffusers' SD3 DreamBooth LoRA script (examples/dreambooth/train_dreambooth_lora_sd3.py) and its
# README_sd3.md (LoRA section): rank 4 on the transformer's joint attention (the script's default --lora_layers,
# both streams, so not SD 3.5's extra attn2), AdamW at 4e-4, constant schedule, 500 steps, T5 at 77 tokens, the
# logit-normal timestep weighting and the preconditioned (x0) target. The resolution stays the model's own 1024
# (README_sd3's LoRA command trains at 512; --resolution 512 is the user's to give).
SD3_TARGETS = ("attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,"
               "attn.add_q_proj,attn.add_k_proj,attn.add_v_proj,attn.to_add_out")
SD3_RECIPE = {"unet_adapter.rank": 4, "unet_adapter.target_modules": SD3_TARGETS, "train.learning_rate": 4e-4,
              "train.max_train_steps": 500, "model.max_sequence_length": 77, "train.weighting_scheme": "logit_normal",
              "train.precondition_outputs": True}
SD3_FAMILIES = ("sd3", "sd3.5")
SD3_VAE_FACTOR = 8  # every SD3 / 3.5 VAE (4 blocks); used when the VAE's config cannot be read
TINY_RESOLUTION = 64  # the tiny random model (models.build_tiny_model, kind sd1): UNet sample 32 x VAE factor 2


@dataclass(frozen=True)
class ModelInfo:
    family: str  # world | tiny | sd1 | sd2 | sd2-v | sdxl | sd3 | sd3.5
    resolution: int | None  # the UNet's (SD3: the transformer's) sample_size x the VAE's downsampling factor


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _vae_factor(vae: dict) -> int | None:
    blocks = vae.get("block_out_channels")
    return 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else None


def sd3_info(index: dict, transformer: dict, vae: dict) -> ModelInfo | None:
    """SD 3 or 3.5 (SD 3.5 Medium's MMDiT-X dual attention layers, or 3.5's RMS qk-norm: Medium and Large);
    None for a pipeline with another transformer (not a family here)."""
    cls = str(transformer.get("_class_name") or (index.get("transformer") or [None, ""])[-1] or "")
    if cls and cls != "SD3Transformer2DModel":
        return None
    sd35 = bool(transformer.get("dual_attention_layers")) or bool(transformer.get("qk_norm"))
    sample = transformer.get("sample_size")
    resolution = sample * (_vae_factor(vae) or SD3_VAE_FACTOR) if isinstance(sample, int) else None
    return ModelInfo("sd3.5" if sd35 else "sd3", resolution)


def info_from_configs(index: dict, unet: dict, vae: dict, scheduler: dict,
                      transformer: dict | None = None) -> ModelInfo | None:
    """Family and native resolution from model_index.json and the UNet (SD3: transformer), VAE and scheduler
    configs."""
    transformer = transformer or {}
    if not index and not unet and not transformer:
        return None
    cls = str(index.get("_class_name", ""))
    if cls.startswith("StableDiffusion3") or "transformer" in index or (transformer and not unet):
        return sd3_info(index, transformer, vae)
    if "XL" in cls or unet.get("addition_embed_type") == "text_time":
        family = "sdxl"
    elif scheduler.get("prediction_type") == "v_prediction":
        family = "sd2-v"
    elif unet.get("cross_attention_dim") == 1024:
        family = "sd2"  # SD 2.x base (epsilon, 512 px): SD 1.x's recipe
    else:
        family = "sd1"
    sample, factor = unet.get("sample_size"), _vae_factor(vae)
    resolution = sample * factor if isinstance(sample, int) and factor else None
    return ModelInfo(family, resolution)


def read_folder(folder: Path) -> ModelInfo | None:
    return info_from_configs(_json(folder / "model_index.json"), _json(folder / "unet" / "config.json"),
                             _json(folder / "vae" / "config.json"),
                             _json(folder / "scheduler" / "scheduler_config.json"),
                             _json(folder / "transformer" / "config.json"))


def read_hub(repo: str, revision: str | None) -> ModelInfo | None:
    """The same small files through the hub cache (offline: what is cached); None when none can be had. The
    denoiser's config is the UNet's or, where model_index.json names one (SD3), the transformer's."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None

    def get(name: str) -> dict:
        try:
            return _json(Path(hf_hub_download(repo, name, revision=revision)))
        except Exception:  # offline and not cached, no such repo, no network: the name is all there is
            return {}

    index = get("model_index.json")
    transformer = get("transformer/config.json") if not index or "transformer" in index else {}
    unet = get("unet/config.json") if not transformer else {}
    return info_from_configs(index, unet, get("vae/config.json"), get("scheduler/scheduler_config.json"),
                             transformer)


def guess_from_name(repo: str) -> ModelInfo | None:
    """Last resort for a hub id whose configs cannot be read: the naming the families' repos use."""
    name = repo.lower()
    if "stable-diffusion-3" in name:  # stable-diffusion-3-medium-diffusers, stable-diffusion-3.5-medium / -large
        return ModelInfo("sd3.5" if "stable-diffusion-3.5" in name or "stable-diffusion-3-5" in name else "sd3", 1024)
    if "xl" in name:
        return ModelInfo("sdxl", 1024)
    if "stable-diffusion-2" in name:
        return ModelInfo("sd2", 512) if "base" in name else ModelInfo("sd2-v", 768)
    if "stable-diffusion" in name:
        return ModelInfo("sd1", 512)
    return None


def model_info(model: str | None, revision: str | None = None) -> ModelInfo | None:
    """What family `--model` is and its native resolution; None when it cannot be told (no defaults then)."""
    if not model:
        return None
    from ..world import MODEL_DIR, is_world_model

    if is_world_model(model):
        info = read_folder(MODEL_DIR)
        return ModelInfo("world", info.resolution if info else 32)
    if model == "tiny":
        return ModelInfo("tiny", TINY_RESOLUTION)
    path = Path(model).expanduser()
    if path.is_dir():
        return read_folder(path)
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return read_hub(model, revision) or guess_from_name(model)
    return None


def family_defaults(info: ModelInfo, adapter: str | None, prior: bool, has_masks: bool,
                    class_images: bool = True) -> dict[str, object]:
    """{"section.field": value} for a family; `adapter` is the adapter type given (None: LoRA); `class_images`:
    the prior's mode is class-images."""
    values: dict[str, object] = {}
    if info.resolution:
        values["data.resolution"] = info.resolution
    if info.family == "world":
        from ..world.recipe import recipe_defaults

        values.update(recipe_defaults(adapter or "lora", prior=prior, masks=has_masks, class_images=class_images))
    elif info.family in ("sd1", "sd2", "sd2-v", "sdxl"):
        values.update(COMMUNITY)
    elif info.family in SD3_FAMILIES:
        values.update(SD3_RECIPE)
    return values


def photos_have_masks(folder: str | None) -> bool:
    """Every photo in the folder has its NAME.mask.png (so --masked-loss can be a default, never an error)."""
    if not folder or not Path(folder).is_dir():
        return False
    suffixes, mask = (".jpg", ".jpeg", ".png", ".webp"), ".mask.png"  # as data.IMAGE_EXTENSIONS / MASK_SUFFIX
    photos = [f for f in Path(folder).iterdir()
              if f.suffix.lower() in suffixes and not f.name.lower().endswith(mask)]
    return bool(photos) and all(f.with_name(f.stem + mask).is_file() for f in photos)


def defaults_for(cfg) -> tuple[ModelInfo | None, dict[str, object]]:
    """The model's defaults for a TrainConfig as given so far (its adapter type, prior switch and photos)."""
    info = model_info(cfg.model.model, cfg.model.revision)
    if info is None:
        return None, {}
    return info, family_defaults(info, cfg.unet_adapter.adapter, cfg.data.with_prior_preservation,
                                 photos_have_masks(cfg.data.instance_data_dir), cfg.data.prior_mode == "class-images")


def apply_model_defaults(cfg, given) -> tuple[ModelInfo | None, list[str]]:
    """Set the model's defaults on `cfg` for every "section.field" not in `given`; returns the keys set."""
    info, values = defaults_for(cfg)
    taken = []
    for key, value in values.items():
        if key not in given:
            section, name = key.split(".", 1)
            setattr(getattr(cfg, section), name, value)
            taken.append(key)
    return info, taken


def describe(info: ModelInfo | None, cfg, taken: list[str]) -> str:
    """The run's one line: which defaults came from the model."""
    if not taken or info is None:
        return ""
    from ..config.dicts import SECTIONS

    parts = []
    for key in taken:
        section, name = key.split(".", 1)
        value = getattr(getattr(cfg, section), name)
        flag = f"--{SECTIONS[section][1]}{name.replace('_', '-')}"
        parts.append((flag if value else flag.replace("--", "--no-", 1)) if isinstance(value, bool) else f"{flag} {value}")
    return f"defaults from the {info.family} model (flags you give win; docs/training.md): {', '.join(parts)}"


# The run's line waits here between the CLI's config resolution and train's setup, which prints it after the
# input checks: a run refused for bad input says one line, its error, and --print-config prints YAML only.
_PENDING: list[str] = []


def pending(line: str) -> None:
    _PENDING[:] = [line] if line else []


def announce() -> None:
    import sys

    for line in _PENDING:
        print(line, file=sys.stderr, flush=True)
    _PENDING.clear()
