"""Per-algorithm tensor conversion between PEFT and kohya / LyCORIS modules (LoRA, LoHa, LoKr), both ways.

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

Export: one PEFT module's parameters -> its kohya tensors (`MODULE_EXPORTERS`). Import: one kohya module -> an
`ImportedModule` (PEFT names, rank, alpha), and the file's tensors fitted to the shapes PEFT builds (`match_shapes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...config.sections import UsageError
from .common import PEFT_PREFIX, Adapter
from .kohya_names import ALPHA, KOHYA_PARAMS, LORA_NAMES


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


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


def algorithm(name: str, params: dict, where: str) -> str:
    kinds = {KOHYA_PARAMS[p][0] for p in params if p != ALPHA}
    if len(kinds) != 1:
        raise UsageError(f"{where}: {name} mixes parameters of {', '.join(sorted(kinds))}")
    return kinds.pop()


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
