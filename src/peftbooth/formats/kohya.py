"""kohya / LyCORIS single-file adapters (A1111, Forge, ComfyUI): export from PEFT, import into PEFT.

Key layout: ``<name>.<parameter>`` where ``name`` is

* SD 1.x / 2.x: ``lora_unet_`` + the diffusers module path of the UNet with dots turned into underscores (these
  files use diffusers paths, not the SGM ``input_blocks`` ones), or ``lora_te_`` + the CLIP path from
  ``text_model`` on (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``);
* SDXL: ``lora_unet_`` + the module path in the original SGM UNet (``lora_unet_input_blocks_4_1_transformer_blocks_0_
  attn1_to_q``, see :mod:`.sgm`), ``lora_te1_`` (text_encoder, CLIP ViT-L) and ``lora_te2_`` (text_encoder_2,
  OpenCLIP bigG) + the CLIP path; header ``ss_base_model_version = sdxl_base_v1-0``, as sd-scripts writes them.
  Import also accepts SDXL UNet modules under their diffusers paths (as diffusers' own kohya conversion writes).

Parameters and strength, per algorithm (readers scale each update by ``alpha / dim``, where ``dim`` is the rank
found in the tensors, and by 1 when no rank can be found or no alpha is stored):

* LoRA: ``lora_down.weight`` (PEFT lora_A), ``lora_up.weight`` (lora_B), ``alpha``. PEFT scales by alpha / r, or
  alpha / sqrt(r) with rsLoRA: the exported alpha is PEFT's scale * r, so the strength is the same either way.
* LoHa: ``hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b`` (+ ``hada_t1, hada_t2`` for the effective-conv / Tucker
  form), ``alpha``. PEFT uses LyCORIS's own names, shapes and alpha / r scale, so tensors are copied unchanged.
* LoKr: ``lokr_w1`` or ``lokr_w1_a/_b``, ``lokr_w2`` or ``lokr_w2_a/_b`` (+ ``lokr_t2``), ``alpha``. Names and shapes
  match PEFT, but where *both* Kronecker factors are full matrices readers find no rank and apply scale 1, while
  PEFT still applies alpha / r: that scale is multiplied into ``lokr_w1`` on export (a no-op when alpha == r) and
  such modules get alpha == rank on import.

DoRA has no exact kohya equivalent (LyCORIS normalises the other weight axis than PEFT), so it is refused.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import UsageError
from .base_models import SDXL_UNET, BaseConfigs, adaptable_modules, builtin_configs, meta_model, model_configs
from .common import (
    KOHYA_SDXL_TE_PREFIX,
    KOHYA_TE_PREFIX,
    PARAMS,
    PEFT_PREFIX,
    Adapter,
    RunFolder,
    examples,
    kohya_module_name,
    kohya_text_name,
    most_common,
)
from .sgm import SGM_ROOTS, SgmNames

NETWORK_MODULE = {"lora": "networks.lora", "loha": "lycoris.kohya", "lokr": "lycoris.kohya"}
SDXL_VERSION = "sdxl_base_v1-0"  # ss_base_model_version sd-scripts writes for SDXL 1.0 and its fine-tunes
ALPHA = "alpha"
LORA_NAMES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}  # PEFT -> kohya
KOHYA_PARAMS = {  # kohya parameter -> (algorithm, PEFT parameter)
    **{k: ("lora", p) for p, k in LORA_NAMES.items()},
    **{p: ("loha", p) for p in PARAMS["loha"]},
    **{p: ("lokr", p) for p in PARAMS["lokr"]},
}


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# export


def lora_module(adapter: Adapter, module: str, params: dict) -> dict:
    if "lora_magnitude_vector" in params:
        raise UsageError(
            f"--format kohya: the {adapter.part} adapter uses DoRA, which kohya/LyCORIS files cannot hold exactly "
            "(they normalise the weight along the other axis); use --format diffusers or --format peft"
        )
    if "lora_B.bias" in params:
        raise UsageError(f"--format kohya: the {adapter.part} adapter trains LoRA biases (lora_bias), which kohya "
                         "files cannot hold; use --format diffusers or --format peft")
    down = params["lora_A.weight"]
    return {"lora_down.weight": down, "lora_up.weight": params["lora_B.weight"],
            ALPHA: scalar(adapter.scale(module) * down.shape[0])}


def loha_module(adapter: Adapter, module: str, params: dict) -> dict:
    rank = params["hada_w1_b"].shape[0]  # what readers take as dim (also in the Tucker form)
    return {**params, ALPHA: scalar(adapter.scale(module) * rank)}


def lokr_rank(params: dict) -> int | None:
    """The rank a LyCORIS reader finds in a LoKr module: from a decomposed factor (w2 first), else none."""
    for name in ("lokr_w2_b", "lokr_w1_b"):
        if name in params:
            return params[name].shape[0]
    return None


def lokr_module(adapter: Adapter, module: str, params: dict) -> dict:
    scale = adapter.scale(module)
    rank = lokr_rank(params)
    if rank is not None:
        return {**params, ALPHA: scalar(scale * rank)}
    out = dict(params)
    if scale != 1.0:
        out["lokr_w1"] = params["lokr_w1"] * scale  # readers apply no scale to full-matrix LoKr: bake PEFT's in
    return {**out, ALPHA: scalar(adapter.rank(module))}  # LyCORIS writes alpha = dim for full-matrix modules


MODULE_EXPORTERS = {"lora": lora_module, "loha": loha_module, "lokr": lokr_module}


def kohya_state_dict(adapters: dict[str, Adapter], sgm: SgmNames | None = None) -> dict[str, torch.Tensor]:
    """All adapters as one kohya / LyCORIS state dict (pure: works on meta tensors too, for checking names).
    `sgm`: the UNet's SGM names, for an SDXL model (see `kohya_module_name`)."""
    out = {}
    for part, adapter in adapters.items():
        for module, params in adapter.modules.items():
            name = kohya_module_name(part, module, sgm)
            for param, tensor in MODULE_EXPORTERS[adapter.kind](adapter, module, params).items():
                out[f"{name}.{LORA_NAMES.get(param, param)}"] = tensor
    return out


def exported_alpha(adapter: Adapter) -> float:
    """The alpha a module of the config's own rank is exported with (kohya metadata reports one number)."""
    r, alpha = int(adapter.config["r"]), float(adapter.config["lora_alpha" if adapter.kind == "lora" else "alpha"])
    return alpha * math.sqrt(r) if adapter.kind == "lora" and adapter.config.get("use_rslora") else alpha


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
    unet = run.adapters["unet"]
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
        "ss_network_train_unet_only": str(set(run.adapters) == {"unet"}),
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


def sgm_names(unet_config: dict, source: str) -> SgmNames:
    return SgmNames(meta_model("unet", BaseConfigs(unet_config, {}, source)), source)


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
    from ..models import family_of

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


def kohya_file(run: RunFolder, output_name: str) -> tuple[dict, dict[str, str]]:
    base = run_base(run)
    return kohya_state_dict(run.adapters, base.sgm), kohya_metadata(run, output_name, base)


# ---------------------------------------------------------------------------------------------------------------
# import


KOHYA_PREFIXES = ("lora_unet_", *KOHYA_TE_PREFIX.values(), *KOHYA_SDXL_TE_PREFIX.values())


def group_kohya_keys(tensors: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """{'lora_unet_...': {'lora_down.weight': t, 'alpha': t}, ...}; UsageError naming keys of any other format."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        name, _, param = key.partition(".")
        if name.startswith(KOHYA_PREFIXES) and (param in KOHYA_PARAMS or param == ALPHA):
            groups.setdefault(name, {})[param] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise UsageError(f"{where}: {unknown_key_hint(unknown)}: {examples(unknown)}")
    empty = [name for name, params in groups.items() if set(params) == {ALPHA}]
    if empty:
        raise UsageError(f"{where}: alpha without weights for {examples(empty)}")
    if not groups:
        raise UsageError(f"{where}: holds no tensors")
    return groups


def unknown_key_hint(keys: list[str]) -> str:
    if any(k.endswith(".dora_scale") for k in keys):
        return "DoRA keys (dora_scale), which have no exact PEFT equivalent"
    if any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys):
        return "a diffusers-format file, not a kohya one; load it with load_lora_weights instead"
    return ("unknown key format (expected kohya / LyCORIS keys such as 'lora_unet_<module>.lora_down.weight', "
            "'.hada_w1_a' or '.lokr_w1' and '.alpha')")


def algorithm(name: str, params: dict, where: str) -> str:
    kinds = {KOHYA_PARAMS[p][0] for p in params if p != ALPHA}
    if len(kinds) != 1:
        raise UsageError(f"{where}: {name} mixes parameters of {', '.join(sorted(kinds))}")
    return kinds.pop()


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


@dataclass
class ImportedModule:
    path: str  # dotted module path in the base model
    name: str  # kohya name, for messages
    params: dict  # PEFT parameter name -> tensor
    rank: int | None  # None: a LoKr module with two full factors (no rank in the tensors)
    alpha: float | None  # None with rank None


def to_peft_module(kind: str, name: str, path: str, params: dict, where: str) -> ImportedModule:
    weights = {KOHYA_PARAMS[p][1]: t for p, t in params.items() if p != ALPHA}
    have = set(weights)
    if kind == "lora":
        if have != {"lora_A.weight", "lora_B.weight"}:
            raise UsageError(f"{where}: {name} needs lora_down.weight and lora_up.weight")
        rank = weights["lora_A.weight"].shape[0]
    elif kind == "loha":
        missing = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} - have
        if missing:
            raise UsageError(f"{where}: {name} misses {', '.join(sorted(missing))}")
        rank = weights["hada_w1_b"].shape[0]
    else:
        w1_ok = "lokr_w1" in have or {"lokr_w1_a", "lokr_w1_b"} <= have
        w2_ok = "lokr_w2" in have or {"lokr_w2_a", "lokr_w2_b"} <= have
        if not (w1_ok and w2_ok):
            raise UsageError(f"{where}: {name} needs lokr_w1 (or lokr_w1_a/_b) and lokr_w2 (or lokr_w2_a/_b)")
        rank = lokr_rank(weights)
    if rank is None:
        alpha = None  # full-matrix LoKr: readers ignore alpha; peft_config picks rank and alpha
    elif ALPHA in params:
        alpha = float(params[ALPHA].item())
    else:
        alpha = float(rank)  # kohya's convention: no alpha tensor means alpha == rank (scale 1)
    return ImportedModule(path, name, weights, rank, alpha)


def lokr_full_rank(m: ImportedModule, rank: int, decompose_both: bool) -> int:
    """A rank for which PEFT keeps both LoKr factors of this module full (as the file has them): PEFT decomposes w2
    when r < max(w2 dims) / 2, and w1 (with decompose_both) when r < max(w1 dims) / 2."""
    w1, w2 = m.params["lokr_w1"].shape, m.params["lokr_w2"].shape
    need = max(w2[0], w2[1], *((w1[0], w1[1]) if decompose_both else ()))
    return rank if rank >= need / 2 else math.ceil(need / 2)


def peft_config(kind: str, modules: list[ImportedModule], metadata: dict, options: dict):
    """The PEFT config that recreates exactly these modules: the commonest rank / alpha globally, the rest as
    per-module patterns (keys are escaped full paths, which PEFT matches on the whole name)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    ranks = [m.rank for m in modules if m.rank is not None]
    stated = str(metadata.get("ss_network_dim", ""))
    r = most_common(ranks) if ranks else (int(stated) if stated.isdigit() and int(stated) > 0 else 1)
    per_module = {}
    for m in modules:
        if m.rank is None:  # LoKr with two full factors: readers apply scale 1, so alpha = rank
            rank = lokr_full_rank(m, r, options.get("decompose_both", False))
            per_module[m.path] = (rank, float(rank))
        else:
            per_module[m.path] = (m.rank, m.alpha)
    alpha = most_common([a for _, a in per_module.values()])
    rank_pattern = {re.escape(p): rk for p, (rk, _) in per_module.items() if rk != r}
    alpha_pattern = {re.escape(p): a for p, (_, a) in per_module.items() if a != alpha}
    common = dict(r=r, target_modules=sorted(per_module), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    if kind == "lora":
        return LoraConfig(lora_alpha=alpha, **common)
    if kind == "loha":
        return LoHaConfig(alpha=alpha, use_effective_conv2d=options["use_effective_conv2d"], **common)
    return LoKrConfig(alpha=alpha, use_effective_conv2d=options["use_effective_conv2d"],
                      decompose_both=options["decompose_both"], decompose_factor=options["decompose_factor"], **common)


def expected_shapes(part: str, configs: BaseConfigs, config) -> dict[str, torch.Size]:
    """The parameter shapes PEFT creates for `config` on the base model (built on the meta device)."""
    from peft import get_peft_model, get_peft_model_state_dict

    peft_model = get_peft_model(meta_model(part, configs), config)
    return {k: v.shape for k, v in get_peft_model_state_dict(peft_model).items()}


def trailing_ones_stripped(shape) -> tuple:
    shape = tuple(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def match_shapes(modules: list[ImportedModule], expected: dict[str, torch.Size], base_model: str):
    """(PEFT state dict, list of problems). A 1x1 conv factor stored for a Linear layer (or the other way round)
    is reshaped: kohya writes SD 1.x's 1x1 proj_in/proj_out as 4-D, SD 2.x has Linear ones."""
    state, problems, seen = {}, [], set()
    for m in modules:
        for param, tensor in m.params.items():
            key = f"{PEFT_PREFIX}{m.path}.{param}"
            seen.add(key)
            want = expected.get(key)
            shown = LORA_NAMES.get(param, param)  # messages use the file's own parameter names
            if want is None:
                problems.append(f"{m.name}: {shown} is not part of the layer PEFT builds for {m.path} of {base_model}")
                continue
            if tuple(tensor.shape) != tuple(want):
                same = tensor.numel() == math.prod(want)
                if same and trailing_ones_stripped(tensor.shape) == trailing_ones_stripped(want):
                    tensor = tensor.reshape(want)
                else:
                    problems.append(f"{m.name}: {shown} has shape {tuple(tensor.shape)} but layer {m.path} of "
                                    f"{base_model} needs {tuple(want)}")
                    continue
            state[key] = tensor
    missing = [k[len(PEFT_PREFIX):] for k in expected if k not in seen]
    problems += [f"{k} (for {base_model}) is missing from the file" for k in missing]
    return state, problems


def w1_shape(params: dict) -> tuple[int, int]:
    if "lokr_w1" in params:
        return tuple(params["lokr_w1"].shape)
    return params["lokr_w1_a"].shape[0], params["lokr_w1_b"].shape[1]


def module_names(part: str, model: torch.nn.Module, configs: BaseConfigs) -> dict[str, str]:
    """kohya name -> module path of every adaptable layer of one part. An SDXL UNet answers to its SGM names (what
    sd-scripts writes) and to its diffusers paths (what diffusers' own kohya conversion writes); the two sets of
    names never overlap (input_blocks / down_blocks, ...)."""
    paths = adaptable_modules(model)
    if not configs.is_sdxl:
        return {kohya_module_name(part, path): path for path in paths}
    if part != "unet":
        return {kohya_text_name(part, path, sdxl=True): path for path in paths}
    sgm = SgmNames(model, configs.source)
    names = {kohya_module_name("unet", path): path for path in paths}
    names.update({"lora_unet_" + s.replace(".", "_"): path for s, path in sgm.sgm_paths(paths).items()})
    return names


def convert_part(part: str, groups: dict[str, dict], configs: BaseConfigs, metadata: dict, where: str):
    """(PEFT config, PEFT state dict) of one model part's kohya modules, checked against the base model."""
    model = meta_model(part, configs)
    by_name = module_names(part, model, configs)
    unresolved = [name for name in groups if name not in by_name]
    if unresolved:
        raise UsageError(f"{where}: {len(unresolved)} module name(s) match no layer of the {part} of {configs.source}: "
                         f"{examples(unresolved)}; is the file for another base model?")
    seen = {}
    for name in sorted(groups):
        if by_name[name] in seen:
            raise UsageError(f"{where}: {seen[by_name[name]]} and {name} are the same layer {by_name[name]}")
        seen[by_name[name]] = name
    kinds = {name: algorithm(name, params, where) for name, params in groups.items()}
    if len(set(kinds.values())) > 1:
        raise UsageError(f"{where}: the {part} mixes {' and '.join(sorted(set(kinds.values())))} modules; "
                         "a PEFT adapter holds one type per model")
    kind = next(iter(kinds.values()))
    modules = [to_peft_module(kind, name, by_name[name], params, where) for name, params in sorted(groups.items())]
    options = {}
    if kind != "lora":
        t = "hada_t1" if kind == "loha" else "lokr_t2"
        options["use_effective_conv2d"] = any(t in m.params for m in modules)
    factors = [-1]
    if kind == "lokr":
        options["decompose_both"] = any("lokr_w1_a" in m.params for m in modules)
        # LyCORIS' `factor` option fixes one side of every factorisation, so it shows up as a dimension of w1;
        # tried only if the automatic factorisation (-1) does not reproduce the file's shapes
        factors += sorted({d for m in modules for d in w1_shape(m.params) if d > 1})
    first_problems = None
    for factor in factors:
        config = peft_config(kind, modules, metadata, {**options, "decompose_factor": factor})
        state, problems = match_shapes(modules, expected_shapes(part, configs, config), configs.source)
        if not problems:
            return config, state
        first_problems = first_problems or problems
    more = f" (and {len(first_problems) - 1} more)" if len(first_problems) > 1 else ""
    hint = "; pass --model BASE if the file is for another base model" if configs.source.startswith("the built-in") else ""
    raise UsageError(f"{where}: {first_problems[0]}{more}{hint}")


def kohya_to_peft(tensors: dict, metadata: dict, model: str | None, where: str) -> dict:
    """{'unet': (config, state dict), 'text_encoder': ..., 'text_encoder_2': ...} of a kohya / LyCORIS file."""
    groups = group_kohya_keys(tensors, where)
    family, evidence = file_family(metadata, groups, where)
    configs = model_configs(model) if model else builtin_configs(guess_version(metadata, groups, family))
    if family is not None and (family == "sdxl") != configs.is_sdxl:
        named = "an SDXL" if family == "sdxl" else "an SD 1.x / 2.x"
        raise UsageError(f"{where}: is {named} adapter ({evidence}) but {configs.source} is {configs.family}; "
                         f"pass --model with {named} base model")
    if not any(n.startswith("lora_unet_") for n in groups):
        raise UsageError(f"{where}: holds no UNet weights (lora_unet_*); peftbooth adapters always adapt the UNet")
    prefixes = {"unet": "lora_unet_", **(KOHYA_SDXL_TE_PREFIX if configs.is_sdxl else KOHYA_TE_PREFIX)}
    parts = {part: {n: p for n, p in groups.items() if n.startswith(prefix)} for part, prefix in prefixes.items()}
    return {part: convert_part(part, g, configs, metadata, where) for part, g in parts.items() if g}
