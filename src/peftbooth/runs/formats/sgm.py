"""UNet module names in the original SDXL (SGM / LDM) layout, computed from a diffusers UNet's structure.

kohya's sd-scripts trains SDXL on the original Stability UNet, so SDXL kohya / LyCORIS files name UNet modules by
its state-dict paths (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``), and A1111, Forge and ComfyUI look them
up under those names. diffusers nests the same layers differently (``down_blocks.1.attentions.0...``). The two
layouts number layers differently:

* ``input_blocks``: 0 is ``conv_in``; then, per down block, one entry per layer (``.0`` ResNet, ``.1`` its
  transformer) and one more for the block's downsampler (``.0.op``).
* ``middle_block``: ResNet, transformer, ResNet as ``.0``, ``.1``, ``.2``.
* ``output_blocks``: per up block, one entry per layer (``.0`` ResNet, ``.1`` transformer); the upsampler sits in
  the block's last entry after them (``.2.conv`` with a transformer, ``.1.conv`` without).
* ResNet layers: ``in_layers.2`` (conv1), ``emb_layers.1`` (time_emb_proj), ``out_layers.3`` (conv2),
  ``skip_connection`` (conv_shortcut); norms ``in_layers.0`` / ``out_layers.0``.
* Outside the blocks: ``time_embed.0/.2`` (time_embedding.linear_1/_2), ``label_emb.0.0/.0.2``
  (add_embedding.linear_1/_2), ``out.0`` / ``out.2`` (conv_norm_out / conv_out).

The numbering is read off the UNet built from the model's config (how many ResNets each block has, which blocks
have transformers, down- or upsamplers), so any layers_per_block or block count is mapped, not one fixed size.
Transformer internals (proj_in, transformer_blocks.N.attn1.to_q, ff.net.0.proj, ...) are spelled alike in both.
"""

from __future__ import annotations

import torch

from ...config.sections import UsageError

RESNET_LAYERS = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
OUTSIDE_BLOCKS = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0", "conv_out": "out.2",
}
SGM_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")


def block_prefixes(unet: torch.nn.Module) -> dict[str, str]:
    """diffusers sub-block path -> SGM path: {'down_blocks.1.attentions.0': 'input_blocks.4.1', ...}."""
    prefixes = {}
    entry = 1  # input_blocks.0 is conv_in
    for i, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            prefixes[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{entry}.0"
            if attentions is not None:
                prefixes[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{entry}.1"
            entry += 1
        for k in range(len(block.downsamplers or [])):
            prefixes[f"down_blocks.{i}.downsamplers.{k}"] = f"input_blocks.{entry}.0"
            entry += 1
    mid = unet.mid_block
    if mid is not None:
        # one running index over ResNet 0, transformer 0, ResNet 1, ... (SDXL: .0, .1, .2)
        attentions = list(getattr(mid, "attentions", None) or [])
        order = ["mid_block.resnets.0"]
        for j in range(1, len(mid.resnets)):
            if j - 1 < len(attentions) and attentions[j - 1] is not None:
                order.append(f"mid_block.attentions.{j - 1}")
            order.append(f"mid_block.resnets.{j}")
        prefixes.update({path: f"middle_block.{n}" for n, path in enumerate(order)})
    entry = 0
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            prefixes[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{entry}.0"
            if attentions is not None:
                prefixes[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{entry}.1"
            entry += 1
        for k in range(len(block.upsamplers or [])):
            # in the block's last entry, after its ResNet (.0) and transformer (.1) if it has one
            slot = 2 if attentions is not None else 1
            prefixes[f"up_blocks.{i}.upsamplers.{k}"] = f"output_blocks.{entry - 1}.{slot}"
    return prefixes


class SgmNames:
    """diffusers module path <-> SGM module path for one UNet (built from its config, on the meta device)."""

    def __init__(self, unet: torch.nn.Module, source: str):
        self.source = source  # for messages: which config the layout came from
        self.prefixes = block_prefixes(unet)
        self.modules = {name for name, _ in unet.named_modules()}

    def to_sgm(self, path: str) -> str:
        """'down_blocks.1.attentions.0.proj_in' -> 'input_blocks.4.1.proj_in'; UsageError for a module the UNet of
        `source` does not have (or that has no SGM counterpart)."""
        if path in OUTSIDE_BLOCKS:
            return OUTSIDE_BLOCKS[path]
        parts = path.split(".")
        # down_blocks.1.attentions.0 / mid_block.resnets.0: the sub-block is the first 4 or 3 path components
        depth = 3 if parts[0] == "mid_block" else 4
        prefix, rest = ".".join(parts[:depth]), parts[depth:]
        if prefix in self.prefixes and path in self.modules and rest:
            kind = parts[depth - 2]
            inner = ".".join(rest)
            if kind == "resnets" and inner in RESNET_LAYERS:
                return f"{self.prefixes[prefix]}.{RESNET_LAYERS[inner]}"
            if kind == "downsamplers" and inner == "conv":
                return f"{self.prefixes[prefix]}.op"
            if kind in ("attentions", "upsamplers"):
                return f"{self.prefixes[prefix]}.{inner}"
        raise UsageError(f"UNet module {path} has no name in the SDXL (SGM) layout of {self.source}; "
                         "is the adapter for another base model?")

    def sgm_paths(self, paths) -> dict[str, str]:
        """{SGM path: diffusers path} of the given diffusers paths that have an SGM name (the rest are skipped)."""
        out = {}
        for path in paths:
            try:
                out[self.to_sgm(path)] = path
            except UsageError:
                continue
        return out
