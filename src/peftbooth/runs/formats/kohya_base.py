"""Which base model a kohya / LyCORIS adapter is for: SD 1.x, SD 2.x or SDXL.

On export, from a run's local model folder or else its adapters (`run_base`: the ss_base_model_version to write and,
for SDXL, the UNet's SGM names); on import, from a file's key names and header (`file_family`, `guess_version`).
The evidence in the tensors is the cross-attention width (768: SD 1.x, 1024: SD 2.x, 2048: SDXL).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ...config.sections import UsageError
from .base_models import SDXL_UNET
from .common import KOHYA_SDXL_TE_PREFIX, KOHYA_TE_PREFIX, RunFolder
from .kohya_names import sgm_names
from .sgm import SGM_ROOTS, SgmNames

SDXL_VERSION = "sdxl_base_v1-0"  # ss_base_model_version sd-scripts writes for SDXL 1.0 and its fine-tunes


def in_features(params: dict) -> int | None:
    """Input width of a Linear layer from its adapter factors (PEFT or kohya names), for guessing the base model."""
    for name in ("lora_A.weight", "lora_down.weight", "hada_w1_b"):
        if name in params and params[name].dim() == 2:
            return params[name].shape[1]
    w1 = params.get("lokr_w1", params.get("lokr_w1_b"))
    w2 = params.get("lokr_w2", params.get("lokr_w2_b"))
    if w1 is not None and w2 is not None and w2.dim() == 2 and "lokr_t2" not in params:
        return w1.shape[1] * w2.shape[1]
    return None


def cross_attention_width(groups: dict[str, dict]) -> int | None:
    """The text-embedding width the UNet's cross-attention takes (768: SD 1.x, 1024: SD 2.x, 2048: SDXL), from
    attn2.to_k."""
    for name, params in groups.items():
        if name.replace(".", "_").endswith("attn2_to_k"):
            width = in_features(params)
            if width:
                return width
    return None


@dataclass
class RunBase:
    """What the kohya export needs to know of a run's base model."""

    version: str  # ss_base_model_version: 'sd_v1' | 'sd_v2' | SDXL_VERSION
    v_prediction: bool | None  # None: unknown (no local model folder)
    sgm: SgmNames | None = None  # SDXL: the UNet's SGM module names


def looks_sdxl(run: RunFolder) -> bool:
    """An SDXL run, judged from the adapters alone: a second text encoder, SDXL's 2048-wide cross-attention, the
    pooled-text embedding layers only SDXL's UNet has, or a second transformer layer in a block (SD 1.x / 2.x have
    one per block, SDXL 2 or 10)."""
    modules = run.adapters["unet"].modules
    return ("text_encoder_2" in run.adapters or cross_attention_width(modules) == 2048
            or any(m.startswith("add_embedding.") or ".transformer_blocks.1." in m for m in modules))


def run_base(run: RunFolder) -> RunBase:
    """The run's base model: from the local model folder's configs when there is one, else from the adapters
    (an SDXL run is then named by the published SDXL UNet layout)."""
    from ...models.loading import family_of

    model = run.base_model
    folder = Path(model) if model else None
    if folder is not None and (folder / "unet" / "config.json").is_file():
        unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
        sched = folder / "scheduler" / "scheduler_config.json"
        v_pred = json.loads(sched.read_text()).get("prediction_type") == "v_prediction" if sched.is_file() else None
        index = folder / "model_index.json"
        sdxl = (family_of(json.loads(index.read_text())) == "sdxl" if index.is_file()
                else (folder / "text_encoder_2" / "config.json").is_file())
        if sdxl:
            return RunBase(SDXL_VERSION, v_pred, sgm_names(unet_cfg, f"base model {model}"))
        if "text_encoder_2" in run.adapters:
            raise UsageError(f"RUN_DIR {run.path}: has a text_encoder_2 adapter (SDXL) but its base model {model} "
                             "is SD 1.x / 2.x (no second text encoder)")
        return RunBase("sd_v2" if unet_cfg.get("cross_attention_dim") == 1024 else "sd_v1", v_pred)
    if looks_sdxl(run):
        return RunBase(SDXL_VERSION, None, sgm_names(dict(SDXL_UNET), "the built-in SDXL config"))
    width = cross_attention_width(run.adapters["unet"].modules)
    is_v2 = width == 1024 or (width is None and model is not None and "stable-diffusion-2" in model)
    return RunBase("sd_v2" if is_v2 else "sd_v1", None)


def file_family(metadata: dict, groups: dict[str, dict], where: str) -> tuple[str | None, str]:
    """('sdxl' | 'sd' | None, the evidence in words) of a kohya file: its text-encoder prefixes (lora_te1_/lora_te2_
    are SDXL's, lora_te_ SD 1.x / 2.x's), else SGM UNet names (input_blocks... is how SDXL files name the UNet),
    else the header's ss_base_model_version; None when nothing tells (a UNet-only file with diffusers names and no
    header)."""
    sdxl_te = sorted({p for p in KOHYA_SDXL_TE_PREFIX.values() for n in groups if n.startswith(p)})
    sd_te = any(n.startswith(KOHYA_TE_PREFIX["text_encoder"]) for n in groups)
    if sdxl_te and sd_te:
        raise UsageError(f"{where}: mixes lora_te_ (SD 1.x / 2.x) and {'/'.join(sdxl_te)} (SDXL) text-encoder keys")
    if sdxl_te:
        return "sdxl", f"it has {'/'.join(sdxl_te)} keys"
    if sd_te:
        return "sd", "it has lora_te_ keys"
    # root + '_': diffusers' time_embedding must not pass for SGM's time_embed
    sgm = [n for n in groups if n.startswith(tuple(f"lora_unet_{root}_" for root in SGM_ROOTS))]
    if sgm:
        return "sdxl", f"its UNet modules have SDXL's input_blocks / middle_block / output_blocks names ({sgm[0]})"
    stated = str(metadata.get("ss_base_model_version", ""))
    if stated.startswith("sdxl"):
        return "sdxl", f"its header says ss_base_model_version={stated}"
    if stated.startswith(("sd_v1", "sd_v2")):
        return "sd", f"its header says ss_base_model_version={stated}"
    return None, ""


def guess_version(metadata: dict, groups: dict[str, dict], family: str | None) -> str:
    """'sd_v1' | 'sd_v2' | 'sdxl' for a file imported without --model: its family, else the header, else the
    cross-attention width."""
    width = cross_attention_width(groups)
    if family == "sdxl" or (family is None and width == 2048):
        return "sdxl"
    stated = str(metadata.get("ss_base_model_version", ""))
    if stated.startswith(("sd_v1", "sd_v2")):
        return stated[:5]
    return "sd_v2" if width == 1024 else "sd_v1"
