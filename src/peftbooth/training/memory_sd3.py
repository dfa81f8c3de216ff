"""SD3 / 3.5 (MMDiT) in the memory estimate (peftbooth.training.memory): the transformer's activations by token.

An MMDiT block runs every token of the joint sequence, image patches ((resolution / 8 / patch)^2: 4096 at 1024 px)
and text tokens (77 CLIP + max_sequence_length T5; with --no-t5 the T5 part is zeros of the same length, so the
sequence is as long), through its own width-wide layers; SDPA keeps no attention matrix, so activations grow
linearly with tokens, blocks and width. The constants below are bytes per token per block per channel of the
transformer's width (inner_dim), per batch row, at a 2-byte compute dtype (fp32: twice as much).

Method (BENCHMARKS.md, "SD 3.5 Medium memory estimate (1024 px)"; no GPU ran it): fake-tensor traces under torch's
MemTracker, as benchmarks/memory_estimate.py does for the UNets (`--shape sd3.5-medium`): SD 3.5 Medium's
transformer (width 1536, qk rms-norm) with LoRA r16 'all', bf16 frozen weights, CPU autocast with CUDA's fp32 norm
rule, 2 rows, 333 text tokens. Small traces (2 and 4 blocks, 0 or 2 MMDiT-X blocks, 16 and 32 latents) gave the
shape of the formula: an image token costs 75.3 B/channel/block, a text token 47.4 (the adapter's fp32 copies of
its layers' inputs: 'all' adapts the image stream's layers only), an MMDiT-X block's second attention 32.5 more per
image token. Those small traces overstate the full model by 9 % (the backward's first transient divided over 4
blocks, not 24), so the three are scaled by one factor to reproduce the full trace: all 24 blocks (13 MMDiT-X) at
1024 px, 2 rows of 4096 + 333 tokens: 25396 MiB of activations without checkpointing (339 s on 2 CPU cores).
With gradient checkpointing each block keeps its two inputs (hidden and context states) and one block's
activations are rebuilt at a time in backward: KEEP per token per block, plus RECOMPUTE x one block's
no-checkpointing figure; the small traces give 1.15-1.26 for that factor (the full 24-block trace with
checkpointing did not finish on the shared VM, so this side rests on the small traces alone).
"""

from __future__ import annotations

from dataclasses import dataclass

SCALE = 25396.1 / 27880.6  # the full 24-block trace over the small traces' formula (see above)
IMAGE, TEXT, DUAL = 75.33 * SCALE, 47.38 * SCALE, 32.53 * SCALE  # bytes / token / block / channel, per row
KEEP = 3.0  # checkpointing: bytes / token / block / channel kept (bf16 hidden + context states, 4622 B at 1536)
RECOMPUTE = 1.25  # checkpointing: one block's activations rebuilt at a time, with the backward's transients
# One no-grad transformer call (class images): 23.3 B/token/channel per row (2 blocks, 16 latents) and 23.0
# (4 blocks, 2 MMDiT-X, 32 latents): one block's transients, whatever the depth.
SAMPLE = 23.5
T5_ACTIVATION = 256 * 2**20  # T5-XXL encoding a few prompts of up to 512 tokens (4096 wide, 64 heads): bounded


@dataclass(frozen=True)
class DiT:
    """What the estimate needs of an SD3 transformer and its prompt length."""

    blocks: int
    dual_blocks: int  # MMDiT-X blocks (SD 3.5 Medium: 13 of 24)
    width: int  # num_attention_heads x attention_head_dim
    patch: int
    text_tokens: int  # 77 CLIP + T5's max_sequence_length

    def image_tokens(self, resolution: int) -> int:
        return (resolution // 8 // self.patch) ** 2


def dit_of(transformer, max_sequence_length: int) -> DiT:
    c = transformer.config
    return DiT(c.num_layers, len(c.dual_attention_layers or ()), c.num_attention_heads * c.attention_head_dim,
               c.patch_size, 77 + max_sequence_length)


def train_activation(d: DiT, resolution: int, checkpointing: bool) -> float:
    """Bytes per batch row of one forward + backward at a 2-byte compute dtype."""
    image, text = d.image_tokens(resolution), d.text_tokens
    block = image * (IMAGE + DUAL * d.dual_blocks / d.blocks) + text * TEXT  # one average block
    if not checkpointing:
        return d.width * d.blocks * block
    return d.width * ((image + text) * KEEP * d.blocks + RECOMPUTE * (image * (IMAGE + DUAL) + text * TEXT))


def sample_activation(d: DiT, resolution: int) -> float:
    """Bytes per batch row of one no-grad transformer call at a 2-byte compute dtype."""
    return d.width * (d.image_tokens(resolution) + d.text_tokens) * SAMPLE
