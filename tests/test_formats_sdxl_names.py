"""kohya names and shapes on the published SDXL layout, built on the meta device (no memory, no download): they
match sd-scripts and diffusers' converter, import back without a model, and follow the UNet config.
"""

from __future__ import annotations

import pytest
import torch
from formats_helpers import PARTS, TEXT_PARTS

from peftbooth.config.sections import UsageError

# ---------------------------------------------------------------------------------------------------------------
# names and shapes on the published SDXL layout (meta device: no memory, no download)


def sdxl_adapters(kind: str, **extra) -> dict:
    """PEFT adapters on the meta-device SDXL base UNet ('all' targets) and both text encoders ('attn-mlp')."""
    from peft import get_peft_model, get_peft_model_state_dict

    from peftbooth.adapters.peft_config import TEXT_ENCODER_PRESETS, UNET_PRESETS, peft_config
    from peftbooth.config.sections import UNET_ADAPTER_DEFAULTS, AdapterArgs
    from peftbooth.runs.formats.base_models import builtin_configs, meta_model
    from peftbooth.runs.formats.common import Adapter, group_peft_state_dict

    configs = builtin_configs("sdxl")
    args = AdapterArgs(**{**UNET_ADAPTER_DEFAULTS, "alpha": 4.0, "adapter": kind, **extra})
    out = {}
    for part in PARTS:
        targets = UNET_PRESETS["all"] if part == "unet" else TEXT_ENCODER_PRESETS["attn-mlp"]
        state = get_peft_model_state_dict(get_peft_model(meta_model(part, configs), peft_config(args, targets)))
        out[part] = Adapter(part, kind, peft_config(args, targets).to_dict(),
                            group_peft_state_dict(state, kind, part))
    return out


def builtin_sgm():
    from peftbooth.runs.formats.base_models import SDXL_UNET
    from peftbooth.runs.formats.kohya_names import sgm_names

    return sgm_names(dict(SDXL_UNET), "the built-in SDXL config")


# kohya key -> shape, as sd-scripts names SDXL base 1.0 modules (the original UNet's state-dict paths)
SDXL_LORA_NAMES = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": (4, 640),
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_down.weight": (4, 2048),
    "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2.lora_up.weight": (1280, 4),
    "lora_unet_input_blocks_7_1_proj_in.lora_down.weight": (4, 1280),
    "lora_unet_middle_block_1_transformer_blocks_9_attn1_to_out_0.lora_up.weight": (1280, 4),
    "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_v.lora_down.weight": (4, 2048),
    "lora_unet_output_blocks_5_1_proj_out.lora_up.weight": (640, 4),
    "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": (4, 320, 3, 3),
    "lora_unet_input_blocks_1_0_emb_layers_1.lora_down.weight": (4, 1280),
    "lora_unet_input_blocks_4_0_skip_connection.lora_down.weight": (4, 320, 1, 1),
    "lora_unet_input_blocks_3_0_op.lora_down.weight": (4, 320, 3, 3),
    "lora_unet_input_blocks_6_0_op.lora_up.weight": (640, 4, 1, 1),
    "lora_unet_middle_block_2_out_layers_3.lora_down.weight": (4, 1280, 3, 3),
    "lora_unet_output_blocks_2_2_conv.lora_down.weight": (4, 1280, 3, 3),
    "lora_unet_output_blocks_5_2_conv.lora_up.weight": (640, 4, 1, 1),
    "lora_unet_output_blocks_8_0_skip_connection.lora_down.weight": (4, 640, 1, 1),
    "lora_unet_time_embed_0.lora_down.weight": (4, 320),
    "lora_unet_time_embed_2.lora_up.weight": (1280, 4),
    "lora_unet_label_emb_0_0.lora_down.weight": (4, 2816),
    "lora_unet_label_emb_0_2.lora_up.weight": (1280, 4),
    "lora_te1_text_model_encoder_layers_11_self_attn_q_proj.lora_down.weight": (4, 768),
    "lora_te2_text_model_encoder_layers_31_mlp_fc1.lora_up.weight": (5120, 4),
    "lora_te2_text_model_encoder_layers_0_self_attn_out_proj.lora_down.weight": (4, 1280),
}


def test_sdxl_lora_names_match_sd_scripts_and_diffusers_converter():
    from conftest import modules_diffusers_reads
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    from peftbooth.runs.formats.base_models import builtin_configs, meta_model
    from peftbooth.runs.formats.kohya import kohya_state_dict

    adapters = sdxl_adapters("lora")
    exported = {k: tuple(v.shape) for k, v in kohya_state_dict(adapters, builtin_sgm()).items()}
    for key, shape in SDXL_LORA_NAMES.items():
        assert exported.get(key) == shape, key
    names = {k.split(".")[0] for k in exported}
    assert len(names) == sum(len(a.modules) for a in adapters.values())  # one distinct name per adapted module

    # diffusers' own SDXL reader (SGM block renumbering from the UNet config, then the kohya renames) must map
    # every name back to exactly the module PEFT adapted
    unet_config = meta_model("unet", builtin_configs("sdxl")).config
    fake = {k: torch.zeros(1) if k.endswith(".alpha") else torch.empty(0) for k in exported}
    converted, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(fake, unet_config))
    back = modules_diffusers_reads(converted, PARTS)
    assert back["unet"] == set(adapters["unet"].modules)
    for part in TEXT_PARTS:
        assert {m.removeprefix("text_model.") for m in back[part]} == \
            {m.removeprefix("text_model.") for m in adapters[part].modules}, part


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_sdxl_names_import_back_without_a_model(kind):
    """SDXL kohya names + shapes of every module resolve against the built-in SDXL config (no --model, detected
    from the lora_te1_/lora_te2_ keys), giving back exactly PEFT's keys and shapes for all three parts."""
    from peftbooth.runs.formats.kohya import kohya_state_dict, kohya_to_peft

    extra = {} if kind == "lora" else {"use_effective_conv2d": True, "decompose_both": kind == "lokr"}
    adapters = sdxl_adapters(kind, **extra)
    back = kohya_to_peft(kohya_state_dict(adapters, builtin_sgm()), {}, None, "test")
    assert set(back) == set(PARTS)
    for part, adapter in adapters.items():
        want = {f"base_model.model.{m}.{p}": tuple(t.shape) for m, ps in adapter.modules.items() for p, t in ps.items()}
        assert {k: tuple(v.shape) for k, v in back[part][1].items()} == want, part


def test_sgm_names_follow_the_unet_config():
    """The numbering comes from the UNet's structure: 3 ResNets per block put the second block at input_blocks 5,
    and a block without transformers moves the upsampler to slot 1."""
    from peftbooth.runs.formats.base_models import SDXL_UNET
    from peftbooth.runs.formats.kohya_names import sgm_names

    sgm = sgm_names(dict(SDXL_UNET, layers_per_block=3, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D",
                                                                        "UpBlock2D")), "test")
    assert sgm.to_sgm("down_blocks.0.downsamplers.0.conv") == "input_blocks.4.0.op"
    assert sgm.to_sgm("down_blocks.1.attentions.2.proj_in") == "input_blocks.7.1.proj_in"
    assert sgm.to_sgm("down_blocks.1.resnets.0.conv_shortcut") == "input_blocks.5.0.skip_connection"
    assert sgm.to_sgm("up_blocks.0.upsamplers.0.conv") == "output_blocks.3.1.conv"
    assert sgm.to_sgm("up_blocks.1.resnets.3.time_emb_proj") == "output_blocks.7.0.emb_layers.1"
    assert sgm.to_sgm("up_blocks.1.upsamplers.0.conv") == "output_blocks.7.2.conv"
    with pytest.raises(UsageError, match=r"UNet module down_blocks\.0\.attentions\.0\.proj_in has no name"):
        sgm.to_sgm("down_blocks.0.attentions.0.proj_in")  # the first block has no transformer
