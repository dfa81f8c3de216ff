"""Reading adapter folders, safe file loading and checked outputs: shared by export / import / fuse and generate.

A run folder's adapters are read into :class:`Adapter` objects: the PEFT config plus the weights grouped by the
dotted module path they adapt (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` ->
``{'lora_A.weight': ..., 'lora_B.weight': ...}``). Every writer works from that grouping, and generation loads
the same object into a pipeline, so the PEFT key layout is parsed in exactly one place (:func:`read_adapter`).
Where the folders are is :class:`~peftbooth.runs.rundir.RunDir`'s business.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ...adapters.strength import peft_scale
from ...config.sections import UsageError
from ..atomic import atomic_dir as write_dir
from ..atomic import atomic_file as write_file
from ..rundir import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, DENOISERS, PICKLE_SUFFIXES, TEXT_ENCODERS, RunDir,
                      base_model_of)

PEFT_PREFIX = "base_model.model."  # PeftModel.save_pretrained keys: PREFIX + module path + "." + parameter
TEXT_MODEL_LEVEL = "text_model."  # CLIP's level that transformers 5 removed (see Adapter.state_dict_for)

# Parameter names PEFT saves per adapted module (the adapter name is already stripped from saved keys).
PARAMS = {
    "lora": ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
PEFT_TYPES = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr"}


@dataclass
class Adapter:
    """One PEFT adapter (of the UNet or of a text encoder), grouped by adapted module."""

    part: str  # 'unet' | 'transformer' (SD3) | 'text_encoder' | 'text_encoder_2' (SDXL, SD3)
    kind: str  # 'lora' | 'loha' | 'lokr'
    config: dict  # the adapter_config.json contents
    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module path -> {param: tensor}
    folder: Path | None = None  # where it was read from (None: built in memory, e.g. by the kohya import)
    tensors: dict[str, torch.Tensor] | None = None  # the weights as saved, PEFT keys (the same tensors as modules)

    def rank(self, module: str) -> int:
        return int(pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"]))

    def alpha(self, module: str) -> float:
        key = "lora_alpha" if self.kind == "lora" else "alpha"
        return float(pattern_value(self.config.get("alpha_pattern") or {}, module, self.config[key]))

    def scale(self, module: str) -> float:
        """The factor PEFT multiplies this module's update with (adapters.strength.peft_scale)."""
        return peft_scale(self.kind, self.alpha(module), self.rank(module), bool(self.config.get("use_rslora")))

    def peft_config(self):
        """The PEFT config object (LoraConfig, LoHaConfig, LoKrConfig), for inference."""
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        cls = PEFT_TYPE_TO_CONFIG_MAPPING[str(self.config["peft_type"]).upper()]
        # from the folder where there is one: from_pretrained knows how to read configs of other PEFT releases
        config = cls.from_pretrained(str(self.folder)) if self.folder is not None else cls(**self.config)
        config.inference_mode = True
        return config

    def state_dict_for(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The PEFT state dict with keys laid out like `model`'s modules, for set_peft_model_state_dict.

        CLIP text encoders saved with transformers < 5 have a `text_model.` level that transformers 5 removed (and
        the reverse): the PEFT example script's folders from either era are remapped instead of silently not
        loading."""
        state = self.tensors if self.tensors is not None else {
            f"{PEFT_PREFIX}{module}.{param}": t for module, params in self.modules.items() for param, t in params.items()}
        prefix, level = PEFT_PREFIX, TEXT_MODEL_LEVEL
        has_level = any(n == "text_model" for n, _ in model.named_children())
        keys_have_level = any(k.startswith(prefix + level) for k in state)
        if keys_have_level and not has_level:
            return {k.replace(prefix + level, prefix, 1): v for k, v in state.items()}
        if has_level and not keys_have_level and any(k.startswith(prefix + "encoder.") for k in state):
            return {k.replace(prefix, prefix + level, 1): v for k, v in state.items()}
        return state


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key is a regex that must match the end of the module path,
    on a dot boundary (so 'to_q' hits 'attn1.to_q', and a full path hits only itself)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def most_common(values) -> float:
    """The most frequent value (ties: the first seen); the global r / alpha of a config built from per-module values."""
    return Counter(values).most_common(1)[0][0]


# ---------------------------------------------------------------------------------------------------------------
# reading files


def check_not_pickle(path: Path, what: str) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UsageError(
            f"{what} {path}: is a pickle file ({path.suffix}), which is never loaded because unpickling can run "
            "arbitrary code; convert it to .safetensors with a tool you trust"
        )


def load_safetensors(path: str | Path, what: str = "FILE") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a .safetensors file; UsageError for pickles, other files and broken files."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    check_not_pickle(path, what)
    if not path.is_file():
        raise UsageError(f"{what} {path}: no such file")
    if path.suffix.lower() != ".safetensors":
        raise UsageError(f"{what} {path}: not a .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:  # a truncated file, a renamed pickle, random bytes
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{what} {path}: not a valid safetensors file ({first[:200]})") from e
    return tensors, metadata


def examples(keys, n: int = 3) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def split_peft_key(key: str, kind: str) -> tuple[str, str] | None:
    """'base_model.model.<module>.<param>' -> (module, param) for a parameter of `kind`, else None."""
    if not key.startswith(PEFT_PREFIX):
        return None
    rest = key[len(PEFT_PREFIX):]
    if kind == "lora" and rest.endswith(".lora_magnitude_vector.weight"):  # DoRA as saved by older PEFT releases
        rest = rest[: -len(".weight")]
    for param in PARAMS[kind]:
        if rest.endswith("." + param):
            return rest[: -len(param) - 1], param
    return None


def group_peft_state_dict(tensors: dict[str, torch.Tensor], kind: str, where: str) -> dict[str, dict]:
    """{module path: {parameter: tensor}} of a PEFT adapter state dict; UsageError naming keys of another format."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        split = split_peft_key(key, kind)
        if split is None:
            unknown.append(key)
            continue
        module, param = split
        modules.setdefault(module, {})[param] = tensor
    if unknown:
        raise UsageError(
            f"{where}: unknown key format for a {kind} adapter: {examples(unknown)}; expected PEFT keys such as "
            f"'base_model.model.<module>.{PARAMS[kind][0]}'"
        )
    if not modules:
        raise UsageError(f"{where}: holds no adapter weights")
    return modules


def read_adapter(folder: Path, part: str) -> Adapter:
    """Read a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) of one model part: the one
    reader of adapter folders (export, fuse and generate alike)."""
    folder = Path(folder)
    cfg_path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{cfg_path}: not a readable adapter config ({e})") from e
    kind = PEFT_TYPES.get(str(config.get("peft_type", "")).upper())
    if kind is None:
        raise UsageError(f"{cfg_path}: adapter type {config.get('peft_type')!r} is not supported; "
                         f"supported: {', '.join(PEFT_TYPES)}")
    tensors, _ = load_safetensors(folder / ADAPTER_WEIGHTS, "adapter")
    return Adapter(part, kind, config, group_peft_state_dict(tensors, kind, str(folder / ADAPTER_WEIGHTS)),
                   folder=folder, tensors=tensors)


@dataclass
class RunFolder:
    """A run's adapters as read and checked by :func:`read_run` (the folder's layout is :class:`RunDir`'s)."""

    path: Path
    adapters: dict[str, Adapter]  # 'unet' (or SD3's 'transformer') -> Adapter, optional text encoders
    train_config: dict  # config.yaml as a dict ({} if the folder has none, e.g. the PEFT example's layout)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    def setting(self, section: str, name: str, default=None):
        value = (self.train_config.get(section) or {}).get(name)
        return default if value is None else value

    @property
    def denoiser(self) -> str:
        """'unet', or 'transformer' for an SD3 run (read_run has checked that there is exactly one)."""
        return next(p for p in DENOISERS if p in self.adapters)

    @property
    def base_model(self) -> str | None:
        """The base model the adapters were trained on: config.yaml, else the denoiser adapter config's record."""
        return base_model_of(self.train_config, self.adapters[self.denoiser].config)


def read_run(run_dir: str | Path) -> RunFolder:
    """A run folder (ours or the PEFT DreamBooth example's layout): adapters and, if present, config.yaml."""
    run = RunDir(run_dir)
    folders = run.adapter_folders("RUN_DIR")  # refuses missing folders and pickle-only adapters
    adapters = {part: read_adapter(folder, part) for part, folder in folders.items()}
    # lenient: config.yaml is only descriptive metadata here; the adapters themselves are self-describing
    return RunFolder(run.path, adapters, run.read_config())


# ---------------------------------------------------------------------------------------------------------------
# module names


def text_model_path(module: str) -> str:
    """The CLIP text-encoder path with its 'text_model.' root: transformers 5 flattened CLIPTextModel (modules are
    'encoder.layers.0...'; CLIPTextModelWithProjection keeps the level), older releases and every file format
    outside PEFT spell 'text_model.encoder.layers.0...'."""
    return module if module.startswith("text_model.") else "text_model." + module


# kohya prefixes of the text encoders: one CLIP in SD 1.x / 2.x, two in SDXL (sd-scripts' te1 = CLIP ViT-L =
# diffusers' text_encoder, te2 = OpenCLIP bigG = text_encoder_2)
KOHYA_TE_PREFIX = {TEXT_ENCODERS[0]: "lora_te_"}
KOHYA_SDXL_TE_PREFIX = dict(zip(TEXT_ENCODERS, ("lora_te1_", "lora_te2_")))


def kohya_module_name(part: str, module: str, sgm=None) -> str:
    """kohya / LyCORIS name of a module: 'lora_unet_' + the UNet path, or the text encoder's prefix + its path
    from 'text_model' on, dots as underscores.

    `sgm` (an :class:`~peftbooth.runs.formats.sgm.SgmNames`) marks an SDXL model: its UNet paths are written in the
    original SGM layout (``input_blocks_4_1_...``) and the text encoders as lora_te1_ / lora_te2_, as sd-scripts
    names them. Without it (SD 1.x / 2.x) the UNet keeps its diffusers path and the text encoder is lora_te_.
    """
    if part == "unet":
        return "lora_unet_" + (module if sgm is None else sgm.to_sgm(module)).replace(".", "_")
    return kohya_text_name(part, module, sdxl=sgm is not None)


def kohya_text_name(part: str, module: str, sdxl: bool) -> str:
    """kohya name of a text-encoder module: lora_te_ (SD 1.x / 2.x) or lora_te1_ / lora_te2_ (SDXL) + its path."""
    prefixes = KOHYA_SDXL_TE_PREFIX if sdxl else KOHYA_TE_PREFIX
    if part not in prefixes:
        raise UsageError(f"a {part} adapter belongs to an SDXL model, but the base model is SD 1.x / 2.x")
    return prefixes[part] + text_model_path(module).replace(".", "_")


# ---------------------------------------------------------------------------------------------------------------
# checked, atomic outputs (the writing itself is rundir's)


def check_output(path: Path, overwrite: bool, flag: str = "--output") -> None:
    """Refuse to replace an existing output unless asked: checked before any slow work starts."""
    if path.exists() and not overwrite:
        if path.is_dir() and not any(path.iterdir()):
            return  # an empty folder is as good as none
        raise UsageError(f"{flag} {path}: already exists; pass --overwrite or choose another path")


@contextmanager
def atomic_file(path: Path, overwrite: bool = False, flag: str = "--output") -> Iterator[Path]:
    """:func:`peftbooth.runs.atomic.atomic_file` after :func:`check_output`: an existing file is only replaced when
    asked."""
    check_output(path, overwrite, flag)
    with write_file(path) as tmp:
        yield tmp


@contextmanager
def atomic_dir(path: Path, overwrite: bool = False, flag: str = "--output") -> Iterator[Path]:
    """:func:`peftbooth.runs.atomic.atomic_dir` after :func:`check_output`."""
    check_output(path, overwrite, flag)
    with write_dir(path) as tmp:
        yield tmp


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    # contiguous copies: saved tensors must not share storage (views of one LoKr factor, sliced magnitudes)
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path), metadata=metadata)
