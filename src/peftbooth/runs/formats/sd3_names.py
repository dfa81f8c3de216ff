"""SD3 / SD 3.5 module names: diffusers' ``SD3Transformer2DModel`` paths <-> the original MMDiT paths that
kohya's sd-scripts (networks/lora_sd3.py) and ComfyUI use in single-file LoRAs.

A kohya SD3 key is ``lora_unet_`` + the MMDiT path with dots as underscores, e.g.
``lora_unet_joint_blocks_3_context_block_attn_qkv.lora_down.weight``. The MMDiT keeps q, k and v in one fused
linear layer (``attn.qkv``, out = 3 x width) where diffusers has three (``to_q``, ``to_k``, ``to_v``; the text
stream's ``add_q_proj`` ...). Every other adapted layer maps one to one::

    transformer_blocks.N.attn.to_q|to_k|to_v          joint_blocks.N.x_block.attn.qkv        rows 0 | 1 | 2 of 3
    transformer_blocks.N.attn.add_q|k|v_proj          joint_blocks.N.context_block.attn.qkv  rows 0 | 1 | 2 of 3
    transformer_blocks.N.attn2.to_q|to_k|to_v  (3.5)  joint_blocks.N.x_block.attn2.qkv       rows 0 | 1 | 2 of 3
    transformer_blocks.N.attn.to_out.0                joint_blocks.N.x_block.attn.proj
    transformer_blocks.N.attn.to_add_out              joint_blocks.N.context_block.attn.proj
    transformer_blocks.N.attn2.to_out.0        (3.5)  joint_blocks.N.x_block.attn2.proj
    transformer_blocks.N.ff.net.0.proj | net.2        joint_blocks.N.x_block.mlp.fc1 | fc2
    transformer_blocks.N.ff_context.net.0.proj | 2    joint_blocks.N.context_block.mlp.fc1 | fc2
    transformer_blocks.N.norm1.linear                 joint_blocks.N.x_block.adaLN_modulation.1
    transformer_blocks.N.norm1_context.linear         joint_blocks.N.context_block.adaLN_modulation.1
    context_embedder, proj_out, pos_embed.proj        context_embedder, final_layer.linear, x_embedder.proj
    time_text_embed.timestep_embedder.linear_1 | 2    t_embedder.mlp.0 | 2
    time_text_embed.text_embedder.linear_1 | 2        y_embedder.mlp.0 | 2

(the table diffusers' single-file loader, ``convert_sd3_transformer_checkpoint_to_diffusers``, inverts). The last
block's ``norm1_context`` and ``norm_out`` are not mapped: diffusers stores their (shift, scale) rows swapped, which
no adapter factorisation can follow in general.

The text encoders are named as in SDXL files: ``lora_te1_`` (CLIP-L, text_encoder) and ``lora_te2_`` (CLIP-G,
text_encoder_2) + the CLIP path from ``text_model`` on. ``lora_te3_`` (T5) is never trained here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...config.sections import UsageError

SD3_PREFIX = "lora_unet_"
T5_PREFIX = "lora_te3_"  # sd-scripts' T5-XXL prefix
QKV = ("q", "k", "v")  # slot order of a fused qkv layer

# diffusers path inside transformer_blocks.N -> (MMDiT path inside joint_blocks.N, slot in a fused qkv or None)
BLOCK_NAMES = {
    **{f"attn.to_{s}": ("x_block.attn.qkv", i) for i, s in enumerate(QKV)},
    **{f"attn.add_{s}_proj": ("context_block.attn.qkv", i) for i, s in enumerate(QKV)},
    **{f"attn2.to_{s}": ("x_block.attn2.qkv", i) for i, s in enumerate(QKV)},
    "attn.to_out.0": ("x_block.attn.proj", None),
    "attn.to_add_out": ("context_block.attn.proj", None),
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None),
    "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None),
    "ff_context.net.2": ("context_block.mlp.fc2", None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None),
}
TOP_NAMES = {
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
}
BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)")


@dataclass(frozen=True)
class MmditSlot:
    """Where a diffusers layer lives in the MMDiT: its kohya name and, for q / k / v, its third of a fused qkv."""

    name: str  # 'lora_unet_joint_blocks_0_x_block_attn_qkv'
    slot: int | None  # 0 | 1 | 2 for q | k | v of a fused layer; None for a one-to-one layer

    @property
    def fused(self) -> bool:
        return self.slot is not None


def kohya_name(mmdit_path: str) -> str:
    return SD3_PREFIX + mmdit_path.replace(".", "_")


def mmdit_slot(path: str, last_block: int | None = None) -> MmditSlot | None:
    """The MMDiT place of a diffusers transformer module path; None for a layer the table does not map (or the
    last block's norm1_context, whose rows diffusers swaps). `last_block`: the model's last block index, when known
    (without it, the last block's norm1_context cannot be told apart and is refused by the caller's check)."""
    if path in TOP_NAMES:
        return MmditSlot(kohya_name(TOP_NAMES[path]), None)
    m = BLOCK.fullmatch(path)
    if m is None or m.group(2) not in BLOCK_NAMES:
        return None
    block, rest = int(m.group(1)), m.group(2)
    if rest == "norm1_context.linear" and (last_block is None or block == last_block):
        return None
    mmdit, slot = BLOCK_NAMES[rest]
    return MmditSlot(kohya_name(f"joint_blocks.{block}.{mmdit}"), slot)


def slot_of(path: str, where: str, last_block: int | None = None) -> MmditSlot:
    """mmdit_slot, or a UsageError naming the layer that has no place in an SD3 single file."""
    found = mmdit_slot(path, last_block)
    if found is None:
        raise UsageError(f"{where}: the transformer layer {path} has no name in SD3 single files (kohya / ComfyUI "
                         "map the attention, MLP, adaLN and embedding layers of the MMDiT); use --format diffusers "
                         "or --format peft")
    return found


def fused_groups(paths, last_block: int | None) -> dict[str, dict[int | None, str]]:
    """{kohya name: {slot: diffusers path}} of the given transformer module paths: a fused qkv name gathers up to
    three paths (slots 0, 1, 2), a one-to-one name one (slot None). Unmapped paths are left out."""
    groups: dict[str, dict[int | None, str]] = {}
    for path in paths:
        found = mmdit_slot(path, last_block)
        if found is not None:
            groups.setdefault(found.name, {})[found.slot] = path
    return groups


def is_sd3_name(name: str) -> bool:
    """A kohya module name only SD3 files have (the MMDiT's joint blocks and embedders)."""
    roots = ("joint_blocks_", "context_embedder", "final_layer_", "x_embedder_", "t_embedder_", "y_embedder_")
    return name.startswith(tuple(SD3_PREFIX + r for r in roots))
