"""kohya key names and shapes on the real SD 1.5 and SD 2.x layouts, built on the meta device (no memory, no
download): they match kohya sd-scripts and diffusers' converter and import back without a model.
"""

from __future__ import annotations

import pytest
import torch
from conftest import modules_diffusers_reads
from formats_helpers import Q

# ---------------------------------------------------------------------------------------------------------------
# key names and shapes on the real SD 1.5 layout (meta device: no memory, no download)

SD15_UNET = dict(  # stable-diffusion-v1-5 unet/config.json, fields that shape the module tree
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, vocab_size=49408)


def sd15_adapters(kind: str, **extra) -> dict:
    """PEFT adapters on a meta-device SD 1.5 UNet ('all' targets) and CLIP text encoder ('attn-mlp'), as Adapters."""
    from diffusers import UNet2DConditionModel
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import CLIPTextConfig, CLIPTextModel

    from peftbooth.adapters.peft_config import TEXT_ENCODER_PRESETS, UNET_PRESETS, peft_config
    from peftbooth.config.sections import UNET_ADAPTER_DEFAULTS, AdapterArgs
    from peftbooth.runs.formats.common import Adapter, group_peft_state_dict

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**SD15_UNET), "text_encoder": CLIPTextModel(CLIPTextConfig(**SD15_TEXT))}
    args = AdapterArgs(**{**UNET_ADAPTER_DEFAULTS, "alpha": 4.0, "adapter": kind, **extra})
    targets = {"unet": UNET_PRESETS["all"], "text_encoder": TEXT_ENCODER_PRESETS["attn-mlp"]}
    out = {}
    for part, model in models.items():
        config = peft_config(args, targets[part])
        state = get_peft_model_state_dict(get_peft_model(model, config))
        out[part] = Adapter(part, kind, config.to_dict(), group_peft_state_dict(state, kind, part))
    return out


def shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


SD15_LORA_NAMES = {  # kohya key -> shape, as A1111 / ComfyUI / kohya sd-scripts name SD 1.5 modules
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": (4, 320),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 768),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight": (320, 4),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_up.weight": (2560, 4),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2.lora_down.weight": (4, 5120),
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320, 1, 1),
    "lora_unet_up_blocks_3_attentions_2_proj_out.lora_up.weight": (320, 4, 1, 1),
    "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": (4, 320, 3, 3),
    "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": (320, 4, 1, 1),
    "lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight": (4, 1280),
    "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight": (4, 320, 3, 3),
    "lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight": (4, 1280, 3, 3),
    "lora_unet_up_blocks_1_resnets_0_conv_shortcut.lora_down.weight": (4, 2560, 1, 1),
    "lora_unet_mid_block_resnets_1_conv2.lora_down.weight": (4, 1280, 3, 3),
    "lora_unet_time_embedding_linear_1.lora_down.weight": (4, 320),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768),
    "lora_te_text_model_encoder_layers_11_self_attn_out_proj.lora_up.weight": (768, 4),
    "lora_te_text_model_encoder_layers_5_mlp_fc1.lora_down.weight": (4, 768),
}
SD15_LYCORIS_NAMES = {
    "loha": {  # PEFT and LyCORIS share LoHa names and shapes; with use_effective_conv2d the 3x3 convs get hada_t1/t2
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_a": (320, 4),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w2_b": (4, 320),
        "lora_unet_down_blocks_0_resnets_0_conv1.hada_t1": (4, 4, 3, 3),
        "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": (4, 320),
        "lora_unet_down_blocks_0_resnets_0_conv1.hada_w2_b": (4, 320),
        "lora_te_text_model_encoder_layers_0_mlp_fc2.hada_w1_b": (4, 3072),
    },
    "lokr": {  # 320 = 16 x 20; rank 4 < 16/2: w1 decomposed (decompose_both), w2 decomposed, Tucker core on 3x3
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w1_a": (16, 4),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w2_b": (4, 20),
        "lora_unet_down_blocks_0_resnets_0_conv1.lokr_t2": (4, 4, 3, 3),
        "lora_unet_down_blocks_0_resnets_0_conv1.lokr_w2_a": (4, 20),
        "lora_unet_up_blocks_1_resnets_0_conv_shortcut.lokr_w1_b": (4, 40),
    },
}


def test_sd15_lora_names_match_kohya_and_diffusers_converter():
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    from peftbooth.runs.formats.kohya import kohya_state_dict

    adapters = sd15_adapters("lora")
    exported = shapes(kohya_state_dict(adapters))
    for key, shape in SD15_LORA_NAMES.items():
        assert exported.get(key) == shape, key
    names = {k.split(".")[0] for k in exported}
    assert len(names) == sum(len(a.modules) for a in adapters.values())  # one distinct name per adapted module
    assert all(f"{n}.alpha" in exported for n in names)

    # diffusers' own kohya reader must map every name back to exactly the module PEFT adapted
    fake = {k: torch.zeros(1) if k.endswith(".alpha") else torch.empty(0) for k in exported}
    converted, _ = _convert_non_diffusers_lora_to_diffusers(fake)
    back = modules_diffusers_reads(converted, ("unet", "text_encoder"))
    for part, adapter in adapters.items():
        assert back[part] == set(adapter.modules), part


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_sd15_names_import_back_without_a_model(kind, tmp_path):
    """kohya names + shapes of every module resolve against the built-in SD 1.x config (no --model), giving back
    exactly PEFT's keys and shapes."""
    from peftbooth.runs.formats.kohya import kohya_state_dict, kohya_to_peft

    extra = {} if kind == "lora" else {"use_effective_conv2d": True, "decompose_both": kind == "lokr"}
    adapters = sd15_adapters(kind, **extra)
    exported = kohya_state_dict(adapters)
    for key, shape in SD15_LYCORIS_NAMES.get(kind, {}).items():
        assert tuple(exported[key].shape) == shape, key
    back = kohya_to_peft(exported, {"ss_base_model_version": "sd_v1"}, None, "test")
    for part, adapter in adapters.items():
        _, state = back[part]
        want = {f"base_model.model.{m}.{p}": tuple(t.shape) for m, ps in adapter.modules.items() for p, t in ps.items()}
        assert shapes(state) == want


def test_sd2_layout_without_model(tmp_path):
    """SD 2.x: Linear proj_in/proj_out, 1024-wide cross-attention, 23 CLIP layers. The version is guessed from the
    shapes when the header does not say, and a 1x1-conv-shaped factor (an SD 1.x habit) is reshaped for a Linear."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from peftbooth.adapters.peft_config import TEXT_ENCODER_PRESETS, UNET_PRESETS
    from peftbooth.runs.formats.base_models import builtin_configs, meta_model
    from peftbooth.runs.formats.common import Adapter, group_peft_state_dict
    from peftbooth.runs.formats.kohya import kohya_state_dict, kohya_to_peft

    configs = builtin_configs("sd_v2")
    adapters = {}
    for part, targets in [("unet", UNET_PRESETS["attn-ff"] + ["proj_in", "proj_out"]),
                          ("text_encoder", TEXT_ENCODER_PRESETS["attn"])]:
        config = LoraConfig(r=4, lora_alpha=4, target_modules=targets)
        state = get_peft_model_state_dict(get_peft_model(meta_model(part, configs), config))
        adapters[part] = Adapter(part, "lora", config.to_dict(), group_peft_state_dict(state, "lora", part))
    exported = kohya_state_dict(adapters)
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
    assert tuple(exported[proj_in].shape) == (4, 320)
    assert tuple(exported[f"{Q.replace('attn1_to_q', 'attn2_to_k')}.lora_down.weight"].shape) == (4, 1024)
    assert "lora_te_text_model_encoder_layers_22_self_attn_v_proj.lora_up.weight" in exported
    exported[proj_in] = exported[proj_in][:, :, None, None]
    back = kohya_to_peft(exported, {}, None, "test")
    state = back["unet"][1]
    assert tuple(state["base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.weight"].shape) == (4, 320)
    assert len(back["text_encoder"][1]) == len(adapters["text_encoder"].modules) * 2
