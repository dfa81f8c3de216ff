"""SD3 / SD 3.5 single-file adapters, the format kohya's sd-scripts (networks/lora_sd3.py) writes and ComfyUI reads:
export of an SD3 run (``--format kohya``) and import of such a file into PEFT adapter folders.

Keys are ``<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` with the MMDiT names of :mod:`.sd3_names`
(``lora_unet_joint_blocks_N_...``) and ``lora_te1_`` / ``lora_te2_`` for CLIP-L / CLIP-G. Readers add
``up @ down * alpha / dim`` to the layer, ``dim`` being ``lora_down``'s row count.

Fused q, k, v. A run adapts diffusers' separate to_q / to_k / to_v (A_i: r_i x in, B_i: width x r_i, scale s_i);
the file has one LoRA on the fused qkv (out = 3 x width). It is written the way sd-scripts' ``split_qkv`` saves::

    lora_down = cat(A_q, A_k, A_v)                     (r_q + r_k + r_v) x in
    lora_up   = block-diagonal(B_q, B_k, B_v)          3 width x (r_q + r_k + r_v), a zero block for a slot not adapted
    alpha     = s_q * (r_q + r_k + r_v)                so that alpha / dim = PEFT's scale of to_q

(B_k, B_v multiplied by s_k / s_q, s_v / s_q where their scales differ), which makes ``up @ down * alpha / dim``
exactly the three updates stacked. Import reverses it: a fused LoRA whose rank splits into three equal parts
with zero off-diagonal blocks (ours with equal ranks; sd-scripts' split_qkv files) gives back three LoRAs of
rank R / 3, tensor for tensor; any other fused LoRA (trained on qkv itself) becomes three LoRAs of the full rank
R sharing ``lora_down``, each with its third of ``lora_up``: the same update, B_i @ A_i = (rows i of up) @ down.
A slot whose block is all zero (while others are not) was not adapted and is left out.

LoHa and LoKr: written and read unchanged for every one-to-one layer (projections, MLPs, adaLN, embedders; and
the text encoders), as ComfyUI applies LyCORIS modules to any layer. On a fused q / k / v they are refused: a
Hadamard or Kronecker product of one qkv layer is not three such products of q, k and v (nor the reverse), so
no exact file exists. Train LoHa / LoKr without to_q/to_k/to_v/add_*_proj targets, or export --format peft.

Import needs ``--model``, the SD3 base model (its transformer and CLIP configs give the module tree and shapes;
only the JSON configs are read); a T5 (``lora_te3_``) adapter is refused, as peftbooth never adapts T5.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...config.sections import UsageError
from ..rundir import TEXT_ENCODERS, TRANSFORMER
from .base_models import adaptable_modules
from .common import KOHYA_SDXL_TE_PREFIX, KOHYA_TE_PREFIX, Adapter, RunFolder, examples, kohya_text_name
from .kohya_base import RunBase
from .kohya_import import convert_groups
from .kohya_metadata import kohya_metadata
from .kohya_names import ALPHA, LORA_NAMES
from .kohya_tensors import MODULE_EXPORTERS, lora_module, scalar
from .sd3_names import QKV, SD3_PREFIX, T5_PREFIX, fused_groups, is_sd3_name, slot_of

SD3_VERSION = "sd3"  # ss_base_model_version; sd-scripts writes 'sd3_m' for SD3 Medium (24 blocks)
DOWN, UP = LORA_NAMES["lora_A.weight"], LORA_NAMES["lora_B.weight"]

# ---------------------------------------------------------------------------------------------------------------
# export


def fused_lora(adapter: Adapter, slots: dict[int, str]) -> dict[str, torch.Tensor]:
    """One fused-qkv kohya LoRA from the PEFT LoRAs of its q / k / v slots ({slot: module path}): down stacked,
    up block-diagonal (zero blocks for slots not adapted), alpha giving the first slot's scale (module docstring)."""
    modules = {s: lora_module(adapter, m, adapter.modules[m]) for s, m in sorted(slots.items())}  # DoRA refused
    widths = {t[UP].shape[0] for t in modules.values()}
    if len(widths) != 1:
        raise UsageError(f"--format kohya: q / k / v of {', '.join(slots.values())} have different widths")
    width = widths.pop()
    scales = {s: adapter.scale(slots[s]) for s in modules}
    ref = scales[min(modules)]
    down = torch.cat([t[DOWN] for t in modules.values()])
    up = torch.zeros(len(QKV) * width, down.shape[0], dtype=down.dtype)
    col = 0
    for s, t in modules.items():
        rank = t[DOWN].shape[0]
        up[s * width:(s + 1) * width, col:col + rank] = t[UP] * (scales[s] / ref)
        col += rank
    return {DOWN: down, UP: up, ALPHA: scalar(ref * down.shape[0])}


def transformer_tensors(adapter: Adapter, last_block: int | None) -> dict[str, torch.Tensor]:
    """The kohya tensors of an SD3 transformer adapter, keyed '<MMDiT name>.<parameter>'."""
    where = f"--format kohya: the {TRANSFORMER} adapter"
    names: dict[str, dict[int | None, str]] = {}
    for module in adapter.modules:
        found = slot_of(module, where, last_block)
        names.setdefault(found.name, {})[found.slot] = module
    out = {}
    for name, slots in names.items():
        if None in slots:
            tensors = MODULE_EXPORTERS[adapter.kind](adapter, slots[None], adapter.modules[slots[None]])
        elif adapter.kind != "lora":
            raise UsageError(f"{where} is {adapter.kind.upper()} on {', '.join(sorted(slots.values()))}, which SD3 "
                             "files hold as one fused qkv layer: no exact LoHa / LoKr of it exists; export --format "
                             "peft, or train without the q/k/v targets")
        else:
            tensors = fused_lora(adapter, slots)
        out.update({f"{name}.{LORA_NAMES.get(p, p)}": t for p, t in tensors.items()})
    return out


def sd3_state_dict(adapters: dict[str, Adapter], last_block: int | None) -> dict[str, torch.Tensor]:
    """All adapters of an SD3 run as one kohya / ComfyUI state dict."""
    out = {}
    for part, adapter in adapters.items():
        if part == TRANSFORMER:
            out.update(transformer_tensors(adapter, last_block))
            continue
        for module, params in adapter.modules.items():
            name = kohya_text_name(part, module, sdxl=True)  # lora_te1_ / lora_te2_, as SDXL
            for param, tensor in MODULE_EXPORTERS[adapter.kind](adapter, module, params).items():
                out[f"{name}.{LORA_NAMES.get(param, param)}"] = tensor
    return out


def local_transformer_config(model: str | None) -> dict | None:
    """transformer/config.json of a local base model folder, else None (nothing is downloaded)."""
    path = Path(model) / TRANSFORMER / "config.json" if model else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def sd3_kohya_file(run: RunFolder, output_name: str) -> tuple[dict, dict[str, str]]:
    """(state dict, ss_* header) of the kohya / ComfyUI export of an SD3 run."""
    config = local_transformer_config(run.base_model)
    layers = int(config["num_layers"]) if config and "num_layers" in config else None
    version = "sd3_m" if layers == 24 else SD3_VERSION
    tensors = sd3_state_dict(run.adapters, None if layers is None else layers - 1)
    meta = kohya_metadata(run, output_name, RunBase(version, None))
    meta.pop("ss_v2", None)  # an SD 1.x / 2.x field (sd-scripts drops it for SDXL and SD3)
    return tensors, meta


# ---------------------------------------------------------------------------------------------------------------
# import


def refuse_t5(tensors: dict, where: str) -> None:
    t5 = [k for k in tensors if k.startswith(T5_PREFIX)]
    if t5:
        raise UsageError(f"{where}: holds a T5 text-encoder adapter ({examples(t5, 1)}), which peftbooth never trains "
                         "or loads; remove the lora_te3_ keys to import the rest")


def model_is_sd3(model: str) -> bool:
    from ...models.loading import family_of, read_model_index, resolve_model

    return family_of(read_model_index(resolve_model(model))) == "sd3"


def is_sd3_file(groups: dict, metadata: dict, model: str | None, where: str) -> bool:
    """Whether a kohya file is for SD3: MMDiT module names, or a header saying so. Refuses an SD3 file without an
    SD3 --model and an SD 1.x / 2.x / SDXL file with one."""
    names = [n for n in groups if is_sd3_name(n)]
    stated = str(metadata.get("ss_base_model_version", ""))
    sd3 = bool(names) or stated.startswith("sd3")
    evidence = f"its MMDiT module names ({names[0]})" if names else f"its header says ss_base_model_version={stated}"
    if sd3 and not model:
        raise UsageError(f"{where}: is an SD3 adapter ({evidence}); pass --model with its SD3 / SD 3.5 base model "
                         "(a diffusers folder or hub id: the module shapes are read from its configs)")
    if model and model_is_sd3(model) != sd3:
        what = f"an SD3 adapter ({evidence})" if sd3 else "not an SD3 adapter (no joint_blocks names)"
        raise UsageError(f"{where}: is {what} but --model {model} is {'not ' if sd3 else ''}an SD3 model")
    return sd3


def sd3_configs(model: str) -> dict[str, dict]:
    """{'transformer': config, 'text_encoder': CLIP-L config, 'text_encoder_2': CLIP-G config} of an SD3 model
    (only the JSON files)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig

    from ...models.loading import resolve_model

    path = resolve_model(model)
    try:
        configs = {TRANSFORMER: dict(SD3Transformer2DModel.load_config(path, subfolder=TRANSFORMER))}
        for part in TEXT_ENCODERS:
            configs[part] = CLIPTextConfig.from_pretrained(path, subfolder=part).to_dict()
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {model}: could not read its transformer / text encoder configs ({first[:200]})") from e
    return configs


def sd3_meta_model(part: str, configs: dict[str, dict]) -> torch.nn.Module:
    """A fresh SD3 transformer or CLIP text encoder (with projection, as SD3 pipelines load both) on the meta
    device: the real module tree and shapes, no weights."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with torch.device("meta"):
        if part == TRANSFORMER:
            return SD3Transformer2DModel.from_config({k: v for k, v in configs[part].items() if not k.startswith("_")})
        return CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs[part]))


def block_split(rows: list[torch.Tensor], rank: int) -> bool:
    """Whether a fused lora_up, cut into its q / k / v rows (each width x rank), is block-diagonal with three equal
    rank / 3 blocks: the layout of a fused file written from three separate LoRAs."""
    if rank % len(rows):
        return False
    r = rank // len(rows)
    return all(not row[:, j * r:(j + 1) * r].any() for i, row in enumerate(rows) for j in range(len(rows)) if i != j)


def split_fused(name: str, params: dict, slots: dict[int, str], where: str) -> dict[str, tuple[str, dict]]:
    """{virtual kohya name: (module path, kohya params)}: the fused qkv LoRA `name` as one LoRA per q / k / v slot
    (`slots`: slot -> diffusers path), each giving exactly its rows of up @ down * alpha / dim (module docstring)."""
    if set(params) - {DOWN, UP, ALPHA} or not {DOWN, UP} <= set(params):
        found = ", ".join(sorted(set(params) - {ALPHA}))
        raise UsageError(f"{where}: {name} is a fused qkv layer with {found}; only a LoRA (lora_down / lora_up) of "
                         "it can be split into the separate to_q / to_k / to_v layers of diffusers' SD3")
    down, up = params[DOWN].flatten(1), params[UP].flatten(1)
    rank = down.shape[0]
    if up.shape[0] % len(QKV) or up.shape[1] != rank:
        raise UsageError(f"{where}: {name}: lora_up has shape {tuple(up.shape)}, which is no fused qkv of rank {rank}")
    alpha = float(params[ALPHA].item()) if ALPHA in params else float(rank)
    width = up.shape[0] // len(QKV)
    rows = [up[i * width:(i + 1) * width] for i in range(len(QKV))]
    blocks = block_split(rows, rank)
    r = rank // len(QKV) if blocks else rank
    out = {}
    for slot, path in sorted(slots.items()):
        cols = slice(slot * r, (slot + 1) * r) if blocks else slice(None)
        a, b = down[cols], rows[slot][:, cols]
        if not b.any() and up.any():
            continue  # this slot was not adapted
        out[f"{name}[{QKV[slot]}]"] = (path, {DOWN: a, UP: b, ALPHA: scalar(alpha * r / rank)})
    return out


def transformer_groups(groups: dict[str, dict], model: torch.nn.Module, where: str):
    """(kohya groups with fused layers split, {name: module path}) of a file's transformer modules."""
    paths = list(adaptable_modules(model))
    last = max((int(p.split(".")[1]) for p in paths if p.startswith("transformer_blocks.")), default=None)
    table = fused_groups(paths, last)
    unresolved = [n for n in groups if n not in table]
    if unresolved:
        raise UsageError(f"{where}: {len(unresolved)} module name(s) match no layer of the SD3 transformer of the "
                         f"base model: {examples(unresolved)}; is the file for another base model?")
    out, by_name = {}, {}
    for name, params in sorted(groups.items()):
        slots = table[name]
        if None in slots:
            out[name], by_name[name] = params, slots[None]
            continue
        for virtual, (path, split) in split_fused(name, params, slots, where).items():
            out[virtual], by_name[virtual] = split, path
    return out, by_name


def sd3_to_peft(groups: dict[str, dict], metadata: dict, model: str, where: str) -> dict:
    """{'transformer': (PEFT config, state dict), 'text_encoder': ..., 'text_encoder_2': ...} of an SD3 kohya /
    ComfyUI file, checked against `model`'s configs."""
    stray = [n for n in groups if n.startswith(KOHYA_TE_PREFIX[TEXT_ENCODERS[0]])]
    if stray:
        raise UsageError(f"{where}: has SD 1.x / 2.x text-encoder keys (lora_te_) in an SD3 file: {examples(stray)}")
    if not any(n.startswith(SD3_PREFIX) for n in groups):
        raise UsageError(f"{where}: holds no transformer weights (lora_unet_joint_blocks_*); peftbooth adapters "
                         "always adapt the denoiser")
    configs = sd3_configs(model)
    source = f"--model {model}"
    parts = {}
    for part, prefix in {TRANSFORMER: SD3_PREFIX, **KOHYA_SDXL_TE_PREFIX}.items():
        mine = {n: p for n, p in groups.items() if n.startswith(prefix)}
        if not mine:
            continue
        meta = sd3_meta_model(part, configs)
        if part == TRANSFORMER:
            mine, by_name = transformer_groups(mine, meta, where)
        else:
            by_name = {kohya_text_name(part, path, sdxl=True): path for path in adaptable_modules(meta)}
        parts[part] = convert_groups(part, mine, lambda p=part: sd3_meta_model(p, configs), by_name, source,
                                     metadata, where)
    return parts
