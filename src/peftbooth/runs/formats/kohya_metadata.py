"""The header of a kohya / LyCORIS file: the ss_* metadata fields A1111 / Forge / ComfyUI and model sites read.

Owns the network module, dim and alpha a run's adapters are reported with (``ss_network_args`` as the kohya /
LyCORIS command-line options), and the base-model and training fields (``ss_base_model_version = sdxl_base_v1-0``
for SDXL, as sd-scripts writes it).
"""

from __future__ import annotations

import json

from ...adapters.strength import kohya_alpha
from .common import Adapter, RunFolder
from .kohya_base import RunBase

NETWORK_MODULE = {"lora": "networks.lora", "loha": "lycoris.kohya", "lokr": "lycoris.kohya"}


def exported_alpha(adapter: Adapter) -> float:
    """The alpha a module of the config's own rank is exported with (kohya metadata reports one number)."""
    r, alpha = int(adapter.config["r"]), float(adapter.config["lora_alpha" if adapter.kind == "lora" else "alpha"])
    return kohya_alpha(adapter.kind, alpha, r, bool(adapter.config.get("use_rslora")))


def network_args(adapter: Adapter) -> dict:
    """ss_network_args as kohya and LyCORIS write them: the command-line options, as strings."""
    dim, alpha = str(adapter.config["r"]), f"{exported_alpha(adapter):g}"
    has_conv = any(t.dim() == 4 for params in adapter.modules.values() for t in params.values())
    args = {"conv_dim": dim, "conv_alpha": alpha} if has_conv else {}
    if adapter.kind != "lora":
        tucker = str(bool(adapter.config.get("use_effective_conv2d")))
        args = {"algo": adapter.kind, **args, "use_tucker": tucker, "use_cp": tucker}  # use_cp: LyCORIS < 2
        if adapter.kind == "lokr":
            args["decompose_both"] = str(bool(adapter.config.get("decompose_both")))
            args["factor"] = str(adapter.config.get("decompose_factor", -1))
    return args


def kohya_metadata(run: RunFolder, output_name: str, base: RunBase) -> dict[str, str]:
    """The ss_* header fields A1111 / Forge / ComfyUI and model sites read from kohya files (strings only)."""
    unet = run.adapters[run.denoiser]  # the UNet's, or SD3's transformer's
    res = run.setting("data", "resolution")
    meta = {
        "ss_network_module": NETWORK_MODULE[unet.kind],
        "ss_network_dim": str(unet.config["r"]),
        "ss_network_alpha": f"{exported_alpha(unet):g}",
        "ss_base_model_version": base.version,
        "ss_v2": str(base.version == "sd_v2"),
        "ss_output_name": output_name,
        "ss_sd_model_name": str(run.base_model or ""),
        "ss_training_comment": "exported by peftbooth from PEFT adapters",
        "ss_network_train_unet_only": str(set(run.adapters) == {run.denoiser}),
    }
    if base.v_prediction is not None:
        meta["ss_v_parameterization"] = str(base.v_prediction)
    steps = run.setting("train", "max_train_steps")
    if steps is not None:
        meta["ss_training_steps"] = meta["ss_max_train_steps"] = str(steps)
    if res is not None:
        meta["ss_resolution"] = f"({res}, {res})"
    args = network_args(unet)
    if args:
        meta["ss_network_args"] = json.dumps(args)
    return meta
