"""SDXL in export (diffusers, kohya/LyCORIS, peft), import (kohya -> PEFT) and fuse, checked on model outputs.

Most run folders here are built the way `peftbooth train` saves them, without training (fast, and any adapter
option can be set): the project's own adapter configs attached to the tiny SDXL model's UNet and both text encoders
(`adapters.attach`), `save_pretrained(save_embedding_layers=False)`, and config.yaml as yaml of the resolved
TrainConfig; one test uses a run really trained by `train`. Every adapter tensor gets seeded noise, so the adapters
are far from the identity and a wrong strength, a dropped tensor or a mis-mapped module shows up as a large output
difference.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peftbooth.config.sections import UsageError
from peftbooth.inference.fuse import fuse_adapters, fuse_run, set_strength, unfuse_adapters
from peftbooth.runs.formats import export_run, import_kohya

TOL = 1e-4  # fp32, max abs difference
PARTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_PARTS = ("text_encoder", "text_encoder_2")

warnings.filterwarnings("ignore", message=".*(base_model_name_or_path|Found missing adapter keys).*")


# ---------------------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory) -> str:
    from peftbooth.models.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", shape="tiny-sdxl"))


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(1, 4, 8, 8, generator=g),
        "timestep": torch.tensor([500]),
        "context": torch.randn(1, 8, 64, generator=g),  # both text encoders' states side by side: 32 + 32
        "added": {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])},
        "ids": torch.randint(0, 500, (1, 12), generator=g),
    }


def write_run(model: str, folder: Path, seed: int, **overrides) -> Path:
    """An SDXL run folder as `peftbooth train` saves one; overrides are 'section.field' -> value of TrainConfig."""
    from peftbooth.adapters.inject import attach
    from peftbooth.adapters.peft_config import TEXT_ENCODER_PRESETS, UNET_PRESETS
    from peftbooth.config.dicts import to_dict
    from peftbooth.config.sections import TrainConfig
    from peftbooth.models.loading import load_components

    cfg = TrainConfig()
    cfg.model.model = model
    cfg.data.instance_prompt = "a photo of sks dog"
    cfg.data.resolution = 32
    cfg.train.output_dir = str(folder)
    cfg.train.max_train_steps = 1
    cfg.train.train_text_encoder = True
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    cfg = cfg.resolved()

    c = load_components(model)
    parts = {"unet": (c.unet, cfg.unet_adapter, UNET_PRESETS)}
    if cfg.train.train_text_encoder:
        for part in TEXT_PARTS:
            parts[part] = (getattr(c, part), cfg.text_encoder_adapter, TEXT_ENCODER_PRESETS)
    g = torch.Generator().manual_seed(seed)
    for part, (module, args, presets) in parts.items():
        peft_model = attach(module, args, presets, "", base_model=model)
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad:  # the adapter's own tensors (LoRA B and LoKr w1 start at zero)
                    p.add_(0.2 * torch.randn(p.shape, generator=g))
        peft_model.save_pretrained(folder / part, save_embedding_layers=False)
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def make_run(sdxl_model, tmp_path_factory):
    """make_run(**{'section.field': value}) -> an SDXL run folder (cached per module)."""
    root = tmp_path_factory.mktemp("runs")
    cache = {}

    def make(**overrides) -> Path:
        key = tuple(sorted(overrides.items()))
        if key not in cache:
            cache[key] = write_run(sdxl_model, root / f"run-{len(cache)}", seed=len(cache), **overrides)
        return cache[key]

    return make


@torch.no_grad()
def outputs(unet, text_encoder, text_encoder_2, inputs) -> dict:
    return {
        "unet": unet(inputs["sample"], inputs["timestep"], inputs["context"], added_cond_kwargs=inputs["added"]).sample,
        "text_encoder": text_encoder(inputs["ids"])[0],
        "text_encoder_2": text_encoder_2(inputs["ids"]).last_hidden_state,
    }


def component_outputs(c, inputs) -> dict:
    return outputs(c.unet, c.text_encoder, c.text_encoder_2, inputs)


def peft_outputs(model: str, run: Path, inputs, scale: float = 1.0) -> dict:
    """Outputs of the base model wrapped with the run's PEFT adapters (the reference for every format)."""
    from peft import PeftModel

    from peftbooth.models.loading import load_components

    c = load_components(model)
    for part in PARTS:
        if (run / part).is_dir():
            set_strength(PeftModel.from_pretrained(getattr(c, part), run / part), scale)
    return component_outputs(c, inputs)


def base_outputs(model: str, inputs) -> dict:
    from peftbooth.models.loading import load_components

    return component_outputs(load_components(model), inputs)


def max_diff(a: dict, b: dict, part: str) -> float:
    return (a[part] - b[part]).abs().max().item()


def assert_close(got: dict, want: dict, tol: float = TOL, parts=PARTS) -> None:
    for part in parts:
        assert max_diff(got, want, part) <= tol, part


def pipeline(model: str):
    from peftbooth.models.loading import load_pipeline

    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipe_outputs(pipe, inputs) -> dict:
    return outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, inputs)


def header(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def tensors_of(folder: Path, part: str) -> dict:
    return load_file(folder / part / "adapter_model.safetensors")


def assert_same_adapters(a: Path, b: Path) -> None:
    for part in PARTS:
        assert (a / part).is_dir() == (b / part).is_dir(), part
        if (a / part).is_dir():
            ta, tb = tensors_of(a, part), tensors_of(b, part)
            assert ta.keys() == tb.keys(), part
            assert all(torch.equal(ta[k], tb[k]) for k in ta), part


# ---------------------------------------------------------------------------------------------------------------
# (a) diffusers export: StableDiffusionXLPipeline.load_lora_weights, trained strength, all three parts

LORA_VARIANTS = {
    "plain": {},
    "alpha_ne_rank": {"unet_adapter.alpha": 16.0, "text_encoder_adapter.alpha": 2.0},
    "rslora": {"unet_adapter.use_rslora": True, "unet_adapter.alpha": 8.0},
    "dora": {"unet_adapter.use_dora": True, "unet_adapter.alpha": 8.0},
    "all_targets_conv": {"unet_adapter.target_modules": "all", "text_encoder_adapter.target_modules": "attn-mlp",
                         "unet_adapter.alpha": 2.0},
}


@pytest.mark.parametrize("variant", LORA_VARIANTS)
def test_diffusers_export_loads_in_sdxl_pipeline(variant, make_run, sdxl_model, inputs, tmp_path):
    run = make_run(**LORA_VARIANTS[variant])
    ref, base = peft_outputs(sdxl_model, run, inputs), base_outputs(sdxl_model, inputs)
    for part in PARTS:
        assert max_diff(ref, base, part) > 1e-2, part  # far from the identity

    path = export_run(run, "diffusers", tmp_path / "export")
    keys = load_file(path).keys()
    assert {k.split(".")[0] for k in keys} == set(PARTS)
    assert any(k.startswith("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.") for k in keys)
    fields = json.loads(header(path)["lora_adapter_metadata"])
    cfg = json.loads((run / "text_encoder_2" / "adapter_config.json").read_text())
    assert fields["text_encoder_2.r"] == cfg["r"] and fields["text_encoder_2.lora_alpha"] == cfg["lora_alpha"]

    pipe = pipeline(sdxl_model)
    pipe.load_lora_weights(str(path))  # one call, default strength
    assert_close(pipe_outputs(pipe, inputs), ref)


# ---------------------------------------------------------------------------------------------------------------
# (b) kohya LoRA export: SDXL names, read by diffusers' own kohya / SGM converter

KOHYA_LORA_VARIANTS = {
    "attn": {},
    "alpha_ne_rank_rslora": {"unet_adapter.use_rslora": True, "unet_adapter.alpha": 8.0,
                             "text_encoder_adapter.alpha": 2.0},
    "all_targets_conv": LORA_VARIANTS["all_targets_conv"],
}

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
# (c) LoHa / LoKr (attention + conv) round trip through the LyCORIS file

LYCORIS_VARIANTS = {
    "loha": {"unet_adapter.adapter": "loha"},
    "loha_effective_conv": {"unet_adapter.adapter": "loha", "unet_adapter.use_effective_conv2d": True},
    "lokr": {"unet_adapter.adapter": "lokr"},
    # rank 2: some factors full, some decomposed, so the file carries a rank for them and alpha != rank survives
    "lokr_rank2_alpha3_decompose_both": {"unet_adapter.adapter": "lokr", "unet_adapter.rank": 2,
                                         "unet_adapter.decompose_both": True, "unet_adapter.alpha": 3.0},
    "lokr_decompose_both_effective_conv": {"unet_adapter.adapter": "lokr", "unet_adapter.rank": 1,
                                           "unet_adapter.decompose_both": True,
                                           "unet_adapter.use_effective_conv2d": True},
}


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
    from test_formats import lycoris_reader_delta

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


# ---------------------------------------------------------------------------------------------------------------
# (d) names and shapes on the published SDXL layout (meta device: no memory, no download)


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


# ---------------------------------------------------------------------------------------------------------------
# (e) import: family detection, mismatches, both UNet spellings


def test_import_accepts_diffusers_unet_names(make_run, sdxl_model, tmp_path):
    """SDXL files from diffusers' own kohya conversion name the UNet by diffusers paths (lora_unet_down_blocks_...)
    with lora_te1_/lora_te2_: they import to the same adapters as the SGM-named file."""
    from peftbooth.runs.formats.common import read_run
    from peftbooth.runs.formats.kohya import kohya_state_dict

    run = make_run(**KOHYA_LORA_VARIANTS["all_targets_conv"])
    sd = kohya_state_dict({"unet": read_run(run).adapters["unet"]})  # no SGM names: the UNet's diffusers paths
    sd.update({k: v for k, v in load_file(export_run(run, "kohya", tmp_path / "sgm.safetensors")).items()
               if k.startswith(("lora_te1_", "lora_te2_"))})
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_") for k in sd)
    save_file(sd, tmp_path / "diffusers_names.safetensors")
    imported = import_kohya(tmp_path / "diffusers_names.safetensors", tmp_path / "imported", model=sdxl_model)
    assert_same_adapters(run, imported)


def sdxl_kohya(make_run, tmp_path) -> tuple[Path, dict]:
    path = export_run(make_run(), "kohya", tmp_path / "sdxl.safetensors")
    return path, load_file(path)


def test_import_sdxl_file_into_sd1_model_names_the_mismatch(make_run, tiny_model, tmp_path):
    path, _ = sdxl_kohya(make_run, tmp_path)
    with pytest.raises(UsageError) as e:
        import_kohya(path, tmp_path / "out", model=tiny_model)
    assert str(e.value) == (f"FILE {path}: is an SDXL adapter (it has lora_te1_/lora_te2_ keys) but --model "
                            f"{tiny_model} is SD 1.x / 2.x; pass --model with an SDXL base model")
    assert not (tmp_path / "out").exists()


def test_import_sd1_file_into_sdxl_model_names_the_mismatch(sdxl_model, tmp_path):
    path = tmp_path / "sd1.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 4)}, path)
    with pytest.raises(UsageError) as e:
        import_kohya(path, tmp_path / "out", model=sdxl_model)
    assert str(e.value) == (f"FILE {path}: is an SD 1.x / 2.x adapter (it has lora_te_ keys) but --model "
                            f"{sdxl_model} is SDXL; pass --model with an SD 1.x / 2.x base model")


@pytest.mark.parametrize("case", ["unet_sgm_names", "header_only"])
def test_sdxl_detected_without_text_encoder_keys(case, make_run, tiny_model, tmp_path):
    """A UNet-only SDXL file is still recognised: by its SGM module names, or by the header alone."""
    _, good = sdxl_kohya(make_run, tmp_path)
    path = tmp_path / f"{case}.safetensors"
    if case == "unet_sgm_names":
        save_file({k: v for k, v in good.items() if k.startswith("lora_unet_")}, path)
        evidence = "its UNet modules have SDXL's input_blocks / middle_block / output_blocks names"
    else:
        save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, path,
                  metadata={"ss_base_model_version": "sdxl_base_v1-0"})
        evidence = "its header says ss_base_model_version=sdxl_base_v1-0"
    with pytest.raises(UsageError) as e:
        import_kohya(path, tmp_path / "out", model=tiny_model)
    assert f"is an SDXL adapter ({evidence}" in str(e.value)
    assert str(e.value).endswith(f"but --model {tiny_model} is SD 1.x / 2.x; pass --model with an SDXL base model")


@pytest.mark.parametrize("names,metadata,family", [
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1"], {"ss_base_model_version": "sd_v1"}, "sdxl"),  # keys first
    (["lora_te_text_model_encoder_layers_0_mlp_fc1"], {}, "sd"),
    (["lora_unet_output_blocks_2_2_conv"], {}, "sdxl"),
    (["lora_unet_time_embed_0"], {}, "sdxl"),
    (["lora_unet_time_embedding_linear_1", "lora_unet_up_blocks_0_upsamplers_0_conv"], {}, None),  # diffusers names
    (["lora_unet_down_blocks_0_resnets_0_conv1"], {"ss_base_model_version": "sd_v2"}, "sd"),
])
def test_file_family(names, metadata, family):
    from peftbooth.runs.formats.kohya_base import file_family

    assert file_family(metadata, {n: {} for n in names}, "test")[0] == family


def test_cli_import_mismatch_exits_2_with_one_line(make_run, tiny_model, tmp_path, capsys):
    from peftbooth.cli import main

    path, _ = sdxl_kohya(make_run, tmp_path)
    rc = main(["import", str(path), "--output", str(tmp_path / "out"), "--model", tiny_model])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err == (f"peftbooth import: error: FILE {path}: is an SDXL adapter (it has lora_te1_/lora_te2_ keys) "
                   f"but --model {tiny_model} is SD 1.x / 2.x; pass --model with an SDXL base model")
    assert not (tmp_path / "out").exists()


def test_import_refuses_mixed_and_duplicate_names(make_run, sdxl_model, tmp_path):
    _, good = sdxl_kohya(make_run, tmp_path)
    te1 = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    mixed = tmp_path / "mixed.safetensors"
    save_file({**good, **{k.replace(te1, "lora_te_text_model_encoder_layers_0_self_attn_q_proj"): v.clone()
                          for k, v in good.items() if k.startswith(te1)}}, mixed)
    with pytest.raises(UsageError, match=r"mixes lora_te_ \(SD 1\.x / 2\.x\) and lora_te1_/lora_te2_ \(SDXL\)"):
        import_kohya(mixed, tmp_path / "out", model=sdxl_model)

    sgm = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    twice = tmp_path / "twice.safetensors"
    diffusers_name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({**good, **{k.replace(sgm, diffusers_name): v.clone() for k, v in good.items() if k.startswith(sgm)}},
              twice)
    with pytest.raises(UsageError) as e:
        import_kohya(twice, tmp_path / "out", model=sdxl_model)
    assert str(e.value) == (f"FILE {twice}: {diffusers_name} and {sgm} are the same layer "
                            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")


def test_import_without_model_uses_sdxl_layout_and_reports_the_mismatch(make_run, tmp_path):
    """The tiny SDXL file checked against the built-in SDXL layout (picked from its keys): shapes differ."""
    path, _ = sdxl_kohya(make_run, tmp_path)
    with pytest.raises(UsageError) as e:
        import_kohya(path, tmp_path / "out")
    assert ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k: lora_down.weight has shape (4, 64) but layer "
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k of the built-in SDXL config needs (4, 640)"
            ) in str(e.value)
    assert str(e.value).endswith("; pass --model BASE if the file is for another base model")


# ---------------------------------------------------------------------------------------------------------------
# (f) export details: base model not on disk, family mismatch, peft copy


@pytest.mark.parametrize("unet_only", [False, True], ids=["with_text_encoders", "unet_only"])
def test_export_without_local_base_model_uses_published_sdxl_layout(unet_only, make_run, tmp_path):
    """A run whose base model is a hub id (no local configs): SDXL is recognised from the adapters (text_encoder_2,
    or in a UNet-only run the second transformer layer per block) and named by the published SDXL UNet layout,
    which numbers the tiny UNet's blocks the same way."""
    run = tmp_path / "run"
    shutil.copytree(make_run(), run)
    if unet_only:
        for part in TEXT_PARTS:
            shutil.rmtree(run / part)
    local_path = export_run(run, "kohya", tmp_path / "local.safetensors")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["model"] = "stabilityai/stable-diffusion-xl-base-1.0"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    hub_path = export_run(run, "kohya", tmp_path / "hub.safetensors")
    local, hub = load_file(local_path), load_file(hub_path)
    assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in hub)
    assert hub.keys() == local.keys() and all(torch.equal(hub[k], local[k]) for k in hub)
    meta = header(hub_path)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_sd_model_name"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert meta["ss_network_train_unet_only"] == str(unet_only)


def test_export_refuses_text_encoder_2_on_sd1_base(make_run, tiny_model, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(make_run(), run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["model"] = tiny_model
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UsageError) as e:
        export_run(run, "kohya", tmp_path / "a.safetensors")
    assert str(e.value) == (f"RUN_DIR {run}: has a text_encoder_2 adapter (SDXL) but its base model {tiny_model} is "
                            "SD 1.x / 2.x (no second text encoder)")
    assert not (tmp_path / "a.safetensors").exists()


def test_peft_export_copies_text_encoder_2(make_run, tmp_path):
    run = make_run()
    out = export_run(run, "peft", tmp_path / "peft")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "text_encoder", "text_encoder_2", "unet"]
    assert_same_adapters(run, out)


def test_loha_refused_by_diffusers_export(make_run, tmp_path):
    run = make_run(**LYCORIS_VARIANTS["loha"])
    with pytest.raises(UsageError, match="--format diffusers holds LoRA only, but the unet adapter is LOHA"):
        export_run(run, "diffusers", tmp_path / "x.safetensors")


def test_run_trained_by_peftbooth_train_exports_and_imports(sdxl_model, inputs, tmp_path):
    """The hand-built run folders above stand in for `peftbooth train`'s; this one is trained for real (one step,
    both text encoders), then perturbed (one step leaves LoRA B near zero) and exported both ways."""
    from conftest import draw_photos, tiny_config

    from peftbooth.training.loop import train

    cfg = tiny_config(sdxl_model, draw_photos(tmp_path / "photos"), tmp_path / "run",
                      **{"train.max_train_steps": 1, "train.train_text_encoder": True,
                         "unet_adapter.target_modules": "all", "text_encoder_adapter.target_modules": "attn-mlp"})
    run = Path(train(cfg))
    g = torch.Generator().manual_seed(5)
    for part in PARTS:
        f = run / part / "adapter_model.safetensors"
        save_file({k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in load_file(f).items()}, f,
                  metadata={"format": "pt"})
    ref = peft_outputs(sdxl_model, run, inputs)

    pipe = pipeline(sdxl_model)
    pipe.load_lora_weights(str(export_run(run, "diffusers", tmp_path / "d.safetensors")))
    assert_close(pipe_outputs(pipe, inputs), ref)
    kohya = export_run(run, "kohya", tmp_path / "k.safetensors")
    pipe = pipeline(sdxl_model)
    pipe.load_lora_weights(str(kohya))
    assert_close(pipe_outputs(pipe, inputs), ref)
    assert_same_adapters(run, import_kohya(kohya, tmp_path / "imported", model=sdxl_model))


# ---------------------------------------------------------------------------------------------------------------
# (g) fuse


@pytest.mark.parametrize("variant,scale", [("lora_dora", 1.0), ("lokr", 0.5)])
def test_fused_sdxl_pipeline_equals_adapter_wrapped(variant, scale, make_run, sdxl_model, inputs, tmp_path):
    overrides = LORA_VARIANTS["dora"] if variant == "lora_dora" else LYCORIS_VARIANTS["lokr"]
    run = make_run(**{"unet_adapter.target_modules": "all", **overrides})
    out = fuse_run(None, run, tmp_path / "fused", scale=scale)  # None: the base model named in config.yaml
    assert (out / "text_encoder_2" / "model.safetensors").is_file() and not list(out.rglob("*.bin"))
    assert "StableDiffusionXLPipeline.from_pretrained" in (out / "README.md").read_text()
    fused = pipeline(str(out))
    assert type(fused).__name__ == "StableDiffusionXLPipeline"
    assert_close(pipe_outputs(fused, inputs), peft_outputs(sdxl_model, run, inputs, scale=scale))


def test_sdxl_fuse_then_unfuse_restores_base_weights(make_run, sdxl_model, inputs):
    run = make_run(**{"unet_adapter.target_modules": "all", **LYCORIS_VARIANTS["loha"]})
    pipe = pipeline(sdxl_model)
    base = {part: {k: v.clone() for k, v in getattr(pipe, part).state_dict().items()} for part in PARTS}
    handles = fuse_adapters(pipe, run)
    assert set(handles) == set(PARTS)
    assert_close(pipe_outputs(pipe, inputs), peft_outputs(sdxl_model, run, inputs))
    unfuse_adapters(handles)
    for part in PARTS:
        now = getattr(pipe, part).state_dict()
        assert now.keys() == base[part].keys(), part  # no adapter layers left behind
        assert max((now[k] - base[part][k]).abs().max().item() for k in now) <= 1e-5, part


def test_fuse_sdxl_run_into_sd1_model_is_refused(make_run, tiny_model, tmp_path):
    run = make_run()
    with pytest.raises(UsageError) as e:
        fuse_run(tiny_model, run, tmp_path / "fused")
    assert str(e.value) == (f"RUN_DIR {run}: has a text_encoder_2 adapter (SDXL) but the base model is "
                            "StableDiffusionPipeline, without a second text encoder; pass an SDXL base model as --model")
    assert not (tmp_path / "fused").exists()
