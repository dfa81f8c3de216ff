"""AdapterArgs -> PEFT ``LoraConfig`` | ``LoHaConfig`` | ``LoKrConfig``, and the target-module presets."""

from __future__ import annotations

from peft import LoHaConfig, LoKrConfig, LoraConfig

from ..config.sections import AdapterArgs, UsageError

# PEFT matches a target name against the end of each module's dotted path ('to_q' hits '...attn1.to_q').
UNET_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_FF = ["ff.net.0.proj", "ff.net.2"]


# 'all' adds the transformer in/out projections, the ResNet convs and time projections, the down/up-sampler
# convs ('conv') and the time embedding MLP ('linear_1', 'linear_2'): the LoCon-style full coverage.
UNET_REST = ["proj_in", "proj_out", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv", "linear_1", "linear_2"]
UNET_PRESETS = {"attn": UNET_ATTN, "attn-ff": UNET_ATTN + UNET_FF, "all": UNET_ATTN + UNET_FF + UNET_REST}
# SD3's MMDiT: each joint block attends over image and text tokens at once; to_* project the image stream, add_*
# and to_add_out the text stream (SD 3.5's extra image self-attention, attn2, has to_* too, so 'attn' covers it).
TRANSFORMER_ATTN = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
TRANSFORMER_FF = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
# 'all' adds the AdaLN modulation ('linear' of norm1, norm1_context, norm_out), the timestep and pooled-text
# embedders ('linear_1', 'linear_2'), the patch embedding ('proj'), the caption projection and the output layer
TRANSFORMER_REST = ["linear", "linear_1", "linear_2", "proj", "context_embedder", "proj_out"]
TRANSFORMER_PRESETS = {"attn": TRANSFORMER_ATTN, "attn-ff": TRANSFORMER_ATTN + TRANSFORMER_FF,
                       "all": TRANSFORMER_ATTN + TRANSFORMER_FF + TRANSFORMER_REST}
TE_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_ENCODER_PRESETS = {"attn": TE_ATTN, "attn-mlp": TE_ATTN + ["fc1", "fc2"]}


def target_modules(spec: str, presets: dict[str, list[str]]) -> list[str]:
    """A preset name or a comma-separated list of module names."""
    if spec in presets:
        return list(presets[spec])
    return [name.strip() for name in spec.split(",") if name.strip()]


def denoiser_presets(family: str) -> dict[str, list[str]]:
    """The --target-modules presets of a family's denoiser: the UNet's, or SD3's transformer's."""
    return TRANSFORMER_PRESETS if family == "sd3" else UNET_PRESETS


def peft_config(a: AdapterArgs, targets: list[str], layers: list[int] | None = None, layers_pattern: str = "layers",
                exclude: list[str] | None = None):
    """Build the PEFT config of a resolved AdapterArgs (no None fields); `layers` limits the adapter to those
    numbered children of `layers_pattern` (a CLIP text encoder's 'layers', SD3's 'transformer_blocks');
    `exclude`: full module paths that match a target but must get no adapter (their output is never used)."""
    only = {} if layers is None else {"layers_to_transform": layers, "layers_pattern": layers_pattern}
    if exclude:
        only["exclude_modules"] = list(exclude)
    if a.adapter == "lora":
        cfg = LoraConfig(
            r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=targets,
            use_dora=a.use_dora, use_rslora=a.use_rslora, init_lora_weights=True, **only,
        )
    elif a.adapter == "loha":
        cfg = LoHaConfig(
            r=a.rank, alpha=a.alpha, rank_dropout=a.dropout, module_dropout=a.module_dropout,
            target_modules=targets, use_effective_conv2d=a.use_effective_conv2d, init_weights=True, **only,
        )
    elif a.adapter == "lokr":
        cfg = LoKrConfig(
            r=a.rank, alpha=a.alpha, rank_dropout=a.dropout, module_dropout=a.module_dropout,
            target_modules=targets, use_effective_conv2d=a.use_effective_conv2d,
            decompose_both=a.decompose_both, decompose_factor=a.decompose_factor, init_weights=True, **only,
        )
    else:
        raise UsageError(f"--adapter must be one of lora, loha, lokr (got {a.adapter!r})")
    return cfg
