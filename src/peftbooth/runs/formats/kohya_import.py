"""Reading kohya / LyCORIS modules into PEFT: a group of one part's modules (LoRA, LoHa or LoKr) -> a PEFT config
and state dict, their shapes checked against the base model's (meta-device) module. Used by :mod:`.kohya` for SD
1.x / 2.x / SDXL files and by :mod:`.sd3` for SD3 files."""

from __future__ import annotations

import math
import re
from typing import Callable

import torch

from ...config.sections import UsageError
from .base_models import BaseConfigs, meta_model
from .common import examples, most_common
from .kohya_names import module_names
from .kohya_tensors import ImportedModule, algorithm, match_shapes, to_peft_module


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


def expected_shapes(build: Callable[[], torch.nn.Module], config) -> dict[str, torch.Size]:
    """The parameter shapes PEFT creates for `config` on the base model part `build()` makes (on the meta
    device; a fresh one per call, since PEFT wraps the model it is given)."""
    from peft import get_peft_model, get_peft_model_state_dict

    peft_model = get_peft_model(build(), config)
    return {k: v.shape for k, v in get_peft_model_state_dict(peft_model).items()}


def w1_shape(params: dict) -> tuple[int, int]:
    if "lokr_w1" in params:
        return tuple(params["lokr_w1"].shape)
    return params["lokr_w1_a"].shape[0], params["lokr_w1_b"].shape[1]


def convert_part(part: str, groups: dict[str, dict], configs: BaseConfigs, metadata: dict, where: str):
    """(PEFT config, PEFT state dict) of one model part's kohya modules, checked against the base model."""
    by_name = module_names(part, meta_model(part, configs), configs)
    return convert_groups(part, groups, lambda: meta_model(part, configs), by_name, configs.source, metadata, where)


def convert_groups(part: str, groups: dict[str, dict], build: Callable[[], torch.nn.Module], by_name: dict[str, str],
                   source: str, metadata: dict, where: str):
    """(PEFT config, PEFT state dict) of kohya modules ({kohya name: {kohya parameter: tensor}}) of one model part:
    `by_name` maps each name to its module path in the part `build()` makes (on the meta device), whose layers
    the tensors are checked against; `source` names the base model in messages."""
    unresolved = [name for name in groups if name not in by_name]
    if unresolved:
        raise UsageError(f"{where}: {len(unresolved)} module name(s) match no layer of the {part} of {source}: "
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
        state, problems = match_shapes(modules, expected_shapes(build, config), source)
        if not problems:
            return config, state
        first_problems = first_problems or problems
    more = f" (and {len(first_problems) - 1} more)" if len(first_problems) > 1 else ""
    hint = "; pass --model BASE if the file is for another base model" if source.startswith("the built-in") else ""
    raise UsageError(f"{where}: {first_problems[0]}{more}{hint}")
