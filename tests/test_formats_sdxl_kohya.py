"""SDXL kohya / LyCORIS files: kohya LoRA export with SDXL (SGM) names read by diffusers' own converter, a
generation through it, kohya -> import round trips, LoHa / LoKr round trips, and every module's update as a
LyCORIS / A1111 / ComfyUI reader computes it from the file.

The run folders are built as `train` saves them, with seeded noise (formats_helpers `write_run`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from formats_helpers import (
    PARTS,
    assert_close,
    assert_same_adapters,
    header,
    lycoris_reader_delta,
    pipe_outputs,
    pipeline,
    sdxl_inputs,
    sdxl_make_run,
    tiny_sdxl_model,
)
from formats_helpers import SDXL_KOHYA_LORA_VARIANTS as KOHYA_LORA_VARIANTS
from formats_helpers import SDXL_LYCORIS_VARIANTS as LYCORIS_VARIANTS
from formats_helpers import sdxl_peft_outputs as peft_outputs
from safetensors.torch import load_file

from peftbooth.runs.formats import export_run, import_kohya

# the shared fixtures (formats_helpers), under the names the tests ask for
sdxl_model, inputs, make_run = tiny_sdxl_model, sdxl_inputs, sdxl_make_run


# ---------------------------------------------------------------------------------------------------------------
# kohya LoRA export: SDXL names, read by diffusers' own kohya / SGM converter

# kohya names of the tiny SDXL UNet (layers_per_block 2; down: DownBlock2D, CrossAttnDownBlock2D with 2
# transformer layers; up: CrossAttnUpBlock2D, UpBlock2D), spelled as in the original SGM UNet
TINY_SDXL_ATTN_NAMES = [
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",  # down_blocks.1.attentions.0
    "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k",  # down_blocks.1.attentions.1, 2nd layer
    "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0",  # mid_block.attentions.0
    "lora_unet_output_blocks_0_1_transformer_blocks_1_attn2_to_v",  # up_blocks.0.attentions.0
    "lora_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_q",  # up_blocks.0.attentions.2
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te2_text_model_encoder_layers_2_self_attn_out_proj",
]
TINY_SDXL_ALL_NAMES = [
    "lora_unet_input_blocks_1_0_in_layers_2",  # down_blocks.0.resnets.0.conv1
    "lora_unet_input_blocks_2_0_out_layers_3",  # down_blocks.0.resnets.1.conv2
    "lora_unet_input_blocks_1_0_emb_layers_1",  # down_blocks.0.resnets.0.time_emb_proj
    "lora_unet_input_blocks_3_0_op",  # down_blocks.0.downsamplers.0.conv
    "lora_unet_input_blocks_4_0_skip_connection",  # down_blocks.1.resnets.0.conv_shortcut (32 -> 64 channels)
    "lora_unet_input_blocks_4_1_proj_in",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj",
    "lora_unet_middle_block_0_in_layers_2",  # mid_block.resnets.0.conv1
    "lora_unet_middle_block_2_out_layers_3",  # mid_block.resnets.1.conv2
    "lora_unet_output_blocks_2_2_conv",  # up_blocks.0.upsamplers.0.conv: after ResNet and transformer
    "lora_unet_output_blocks_5_0_skip_connection",  # up_blocks.1.resnets.2.conv_shortcut
    "lora_unet_output_blocks_3_0_emb_layers_1",
    "lora_unet_time_embed_0", "lora_unet_time_embed_2",  # time_embedding.linear_1 / _2
    "lora_unet_label_emb_0_0", "lora_unet_label_emb_0_2",  # add_embedding.linear_1 / _2
    "lora_te2_text_model_encoder_layers_1_mlp_fc1",
]


@pytest.mark.parametrize("variant", KOHYA_LORA_VARIANTS)
def test_kohya_lora_export_loads_in_diffusers(variant, make_run, sdxl_model, inputs, tmp_path):
    run = make_run(**KOHYA_LORA_VARIANTS[variant])
    path = export_run(run, "kohya", tmp_path / "adapter.safetensors")
    exported = load_file(path)
    names = {k.split(".")[0] for k in exported}
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                             "lora_unet_time_embed_", "lora_unet_label_emb_", "lora_te1_text_model_encoder_",
                             "lora_te2_text_model_encoder_")) for n in names), sorted(names)[:5]
    assert not any("down_blocks" in n or "up_blocks" in n or "mid_block" in n for n in names)
    expected = TINY_SDXL_ATTN_NAMES + (TINY_SDXL_ALL_NAMES if variant == "all_targets_conv" else [])
    assert not [n for n in expected if n not in names]
    assert all(f"{n}.alpha" in exported for n in names)
    meta = header(path)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_train_unet_only"] == "False"

    check_reader_deltas(sdxl_model, run, exported)
    pipe = pipeline(sdxl_model)
    pipe.load_lora_weights(str(path))  # diffusers maps the SGM names back with the UNet's config itself
    assert_close(pipe_outputs(pipe, inputs), peft_outputs(sdxl_model, run, inputs))


def test_kohya_lora_generation_matches_peft(make_run, sdxl_model, tmp_path):
    """A 2-step SDXL generation with a fixed generator: PEFT adapters on the pipeline == the kohya file loaded by
    load_lora_weights (the whole path: both text encoders, pooled embedding, UNet)."""
    from peft import PeftModel

    run = make_run(**KOHYA_LORA_VARIANTS["all_targets_conv"])
    path = export_run(run, "kohya", tmp_path / "adapter.safetensors")

    def generate(pipe):
        return pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    pipe = pipeline(sdxl_model)
    base = generate(pipe)
    for part in PARTS:
        PeftModel.from_pretrained(getattr(pipe, part), run / part)
    want = generate(pipe)
    pipe = pipeline(sdxl_model)
    pipe.load_lora_weights(str(path))
    got = generate(pipe)
    assert abs(want - base).max() > 1e-2
    assert abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("variant", KOHYA_LORA_VARIANTS)
def test_kohya_lora_round_trip(variant, make_run, sdxl_model, inputs, tmp_path):
    """SDXL kohya LoRA -> import -> the same PEFT tensors in unet/, text_encoder/ and text_encoder_2/ (rsLoRA
    arrives as plain LoRA with alpha * sqrt(r): same strength)."""
    run = make_run(**KOHYA_LORA_VARIANTS[variant])
    exported = export_run(run, "kohya", tmp_path / "a.safetensors")
    imported = import_kohya(exported, tmp_path / "imported", model=sdxl_model)
    assert_same_adapters(run, imported)
    assert_close(peft_outputs(sdxl_model, imported, inputs), peft_outputs(sdxl_model, run, inputs), tol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# LoHa / LoKr (attention + conv) round trip through the LyCORIS file


@pytest.mark.parametrize("variant", LYCORIS_VARIANTS)
def test_lycoris_round_trip(variant, make_run, sdxl_model, inputs, tmp_path):
    from peftbooth.inference.pipeline import AdapterPipeline

    run = make_run(**{"unet_adapter.target_modules": "all", "text_encoder_adapter.target_modules": "attn-mlp",
                      **LYCORIS_VARIANTS[variant]})
    kind = LYCORIS_VARIANTS[variant]["unet_adapter.adapter"]
    path = export_run(run, "kohya", tmp_path / "lyco.safetensors")
    meta = header(path)
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == kind
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    exported = load_file(path)
    param = ".hada_w1_a" if kind == "loha" else ".lokr_w1"
    assert any(k.startswith("lora_unet_input_blocks_1_0_in_layers_2" + param) for k in exported)  # a conv
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_mlp_fc2" + param) for k in exported)

    imported = import_kohya(path, tmp_path / "imported", model=sdxl_model)
    assert_same_adapters(run, imported)
    ref = peft_outputs(sdxl_model, run, inputs)
    assert_close(peft_outputs(sdxl_model, imported, inputs), ref, tol=1e-6)
    check_reader_deltas(sdxl_model, run, exported)

    pipe = AdapterPipeline(sdxl_model, device="cpu")  # what 'peftbooth generate --adapter' uses
    pipe.load_adapter(imported)
    assert_close(pipe_outputs(pipe.pipe, inputs), ref)


def check_reader_deltas(model: str, run: Path, exported: dict) -> None:
    """Every module's update as a LyCORIS / A1111 / ComfyUI reader computes it from the file (under its SDXL name)
    equals PEFT's own delta weight."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    from peftbooth.models.loading import load_components
    from peftbooth.runs.formats.common import kohya_module_name
    from peftbooth.runs.formats.kohya_names import sgm_names

    c = load_components(model)
    sgm = sgm_names(json.loads((Path(model) / "unet" / "config.json").read_text()), "test")
    checked = set()
    for part in PARTS:
        peft_model = PeftModel.from_pretrained(getattr(c, part), run / part)
        for name, layer in peft_model.base_model.model.named_modules():
            if not isinstance(layer, BaseTunerLayer):
                continue
            prefix = kohya_module_name(part, name, sgm) + "."
            params = {k[len(prefix):]: v for k, v in exported.items() if k.startswith(prefix)}
            want = layer.get_delta_weight("default").double()
            assert torch.allclose(lycoris_reader_delta(params, want.shape), want, atol=1e-6, rtol=1e-5), name
            checked.add(prefix)
    assert {k.split(".")[0] + "." for k in exported} == checked  # every module of the file, none twice
