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
TE_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_ENCODER_PRESETS = {"attn": TE_ATTN, "attn-mlp": TE_ATTN + ["fc1", "fc2"]}


def target_modules(spec: str, presets: dict[str, list[str]]) -> list[str]:
    """A preset name or a comma-separated list of module names."""
    if spec in presets:
        return list(presets[spec])
    return [name.strip() for name in spec.split(",") if name.strip()]


def peft_config(a: AdapterArgs, targets: list[str], layers: list[int] | None = None):
    """Build the PEFT config of a resolved AdapterArgs (no None fields); `layers` limits a CLIP text encoder's
    adapter to those encoder layers."""
    only = {} if layers is None else {"layers_to_transform": layers, "layers_pattern": "layers"}
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
