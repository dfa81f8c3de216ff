"""Export (diffusers, kohya/LyCORIS, peft), import (kohya -> PEFT) and fuse, checked on model outputs.

Every adapter is trained for one step and then perturbed with seeded noise, so it is far from the identity and a
wrong strength, a dropped tensor or a mis-mapped module shows up as a large output difference.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import draw_photos, modules_diffusers_reads, tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peftbooth.config.sections import UsageError
from peftbooth.inference.fuse import fuse_adapters, fuse_run, set_strength, unfuse_adapters
from peftbooth.runs.formats import add_commands, export_run, import_kohya

TOL = 1e-4  # fp32, max abs difference
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # a kohya module name of every UNet here

warnings.filterwarnings("ignore", message=".*(base_model_name_or_path|Found missing adapter keys).*")


# ---------------------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(1, 4, 8, 8, generator=g),
        "timestep": torch.tensor([500]),
        "context": torch.randn(1, 8, 32, generator=g),  # the tiny UNet's cross-attention width is 32
        "ids": torch.randint(0, 500, (1, 12), generator=g),
    }


def perturb(run: Path, seed: int = 0) -> None:
    """Add seeded noise to every adapter tensor: LoRA B (and LoKr w1) start at zero, so after one step the adapter
    would still be nearly the identity and strength errors would hide below the tolerance."""
    g = torch.Generator().manual_seed(seed)
    for part in ("unet", "text_encoder"):
        f = run / part / "adapter_model.safetensors"
        if f.exists():
            sd = load_file(f)
            save_file({k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in sd.items()}, f,
                      metadata={"format": "pt"})


@pytest.fixture(scope="module")
def make_run(tiny_model, tmp_path_factory):
    """make_run(name, **{'section.field': value}) -> a trained, perturbed run folder (cached per module)."""
    from peftbooth.training.loop import train

    photos = draw_photos(tmp_path_factory.mktemp("photos"))
    root = tmp_path_factory.mktemp("runs")
    cache = {}

    def make(name: str, **overrides) -> Path:
        key = tuple(sorted(overrides.items()))  # the same settings share one run, whatever the test calls it
        if key not in cache:
            cfg = tiny_config(tiny_model, photos, root / f"{name}-{len(cache)}",
                              **{"train.max_train_steps": 1, **overrides})
            cache[key] = Path(train(cfg))
            perturb(cache[key], seed=len(cache))
        return cache[key]

    return make


@torch.no_grad()
def outputs(unet, text_encoder, inputs) -> dict:
    return {
        "unet": unet(inputs["sample"], inputs["timestep"], inputs["context"]).sample,
        "text_encoder": text_encoder(inputs["ids"])[0],
    }


def peft_outputs(model: str, run: Path, inputs, scale: float = 1.0) -> dict:
    """Outputs of the base model wrapped with the run's PEFT adapters (the reference for every format)."""
    from peft import PeftModel

    from peftbooth.models.loading import load_components

    c = load_components(model)
    for part in ("unet", "text_encoder"):
        if (run / part).is_dir():
            set_strength(PeftModel.from_pretrained(getattr(c, part), run / part), scale)
    return outputs(c.unet, c.text_encoder, inputs)


def base_outputs(model: str, inputs) -> dict:
    from peftbooth.models.loading import load_components

    c = load_components(model)
    return outputs(c.unet, c.text_encoder, inputs)


def max_diff(a: dict, b: dict, part: str) -> float:
    return (a[part] - b[part]).abs().max().item()


def pipeline(model: str):
    from peftbooth.models.loading import load_pipeline

    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def header(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def tensors_of(folder: Path, part: str) -> dict:
    return load_file(folder / part / "adapter_model.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# (a) diffusers export: one load_lora_weights call, trained strength, UNet and text encoder

LORA_VARIANTS = {
    "plain": {},
    "alpha_ne_rank": {"unet_adapter.alpha": 16.0, "text_encoder_adapter.alpha": 2.0},
    "rslora": {"unet_adapter.use_rslora": True, "unet_adapter.alpha": 8.0},
    "dora": {"unet_adapter.use_dora": True, "unet_adapter.alpha": 8.0},
    "dora_all_targets_conv": {"unet_adapter.use_dora": True, "unet_adapter.alpha": 2.0,
                              "unet_adapter.target_modules": "all", "text_encoder_adapter.target_modules": "attn-mlp"},
}


@pytest.mark.parametrize("variant", LORA_VARIANTS)
def test_diffusers_export_loads_at_trained_strength(variant, make_run, tiny_model, inputs, tmp_path):
    run = make_run(f"lora-{variant}", **{"train.train_text_encoder": True, **LORA_VARIANTS[variant]})
    ref, base = peft_outputs(tiny_model, run, inputs), base_outputs(tiny_model, inputs)
    assert max_diff(ref, base, "unet") > 1e-2 and max_diff(ref, base, "text_encoder") > 1e-2  # far from identity

    path = export_run(run, "diffusers", tmp_path / "export")
    assert path == tmp_path / "export" / "pytorch_lora_weights.safetensors"
    fields = json.loads(header(path)["lora_adapter_metadata"])
    cfg = json.loads((run / "unet" / "adapter_config.json").read_text())
    assert fields["unet.lora_alpha"] == cfg["lora_alpha"] and fields["unet.r"] == cfg["r"]
    assert fields["unet.use_rslora"] == cfg["use_rslora"] and fields["unet.use_dora"] == cfg["use_dora"]

    pipe = pipeline(tiny_model)
    pipe.load_lora_weights(str(path))  # one call, default strength
    got = outputs(pipe.unet, pipe.text_encoder, inputs)
    assert max_diff(got, ref, "unet") <= TOL
    assert max_diff(got, ref, "text_encoder") <= TOL


def test_diffusers_export_of_folder_loads_by_folder(make_run, tiny_model, inputs, tmp_path):
    """load_lora_weights(folder) finds pytorch_lora_weights.safetensors by name; an explicit file path works too."""
    run = make_run("lora-plain", **{"train.train_text_encoder": True})
    folder = export_run(run, "diffusers", tmp_path / "out").parent
    pipe = pipeline(tiny_model)
    pipe.load_lora_weights(str(folder))
    assert max_diff(outputs(pipe.unet, pipe.text_encoder, inputs), peft_outputs(tiny_model, run, inputs), "unet") <= TOL


# ---------------------------------------------------------------------------------------------------------------
# (b) kohya LoRA export read by diffusers' own kohya converter

KOHYA_LORA_VARIANTS = {
    "plain": {"train.train_text_encoder": True},
    "alpha_ne_rank": {"train.train_text_encoder": True, "unet_adapter.alpha": 16.0, "text_encoder_adapter.alpha": 2.0},
    "rslora": {"train.train_text_encoder": True, "unet_adapter.use_rslora": True, "unet_adapter.alpha": 8.0},
    "all_targets_conv": {"train.train_text_encoder": True, "unet_adapter.target_modules": "all",
                         "text_encoder_adapter.target_modules": "attn-mlp", "unet_adapter.alpha": 2.0},
}


@pytest.mark.parametrize("variant", KOHYA_LORA_VARIANTS)
def test_kohya_lora_export_loads_in_diffusers(variant, make_run, tiny_model, inputs, tmp_path):
    run = make_run(f"kohya-lora-{variant}", **KOHYA_LORA_VARIANTS[variant])
    path = export_run(run, "kohya", tmp_path / "adapter.safetensors")
    keys = load_file(path)
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in keys)
    meta = header(path)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_output_name"] == "adapter" and meta["ss_training_steps"] == "1"

    check_reader_deltas(tiny_model, run, keys)
    pipe = pipeline(tiny_model)
    pipe.load_lora_weights(str(path))  # diffusers detects lora_unet_/lora_te_ keys and converts them itself
    got, ref = outputs(pipe.unet, pipe.text_encoder, inputs), peft_outputs(tiny_model, run, inputs)
    assert max_diff(got, ref, "unet") <= TOL
    assert max_diff(got, ref, "text_encoder") <= TOL


@pytest.mark.parametrize("variant", ["plain", "rslora", "all_targets_conv"])
def test_kohya_lora_round_trip(variant, make_run, tiny_model, inputs, tmp_path):
    """kohya LoRA -> import -> the same weights; strength kept (rsLoRA arrives as plain LoRA with alpha * sqrt(r))."""
    run = make_run(f"kohya-lora-{variant}", **KOHYA_LORA_VARIANTS[variant])
    exported = export_run(run, "kohya", tmp_path / "a.safetensors")
    imported = import_kohya(exported, tmp_path / "imported", model=tiny_model)
    for part in ("unet", "text_encoder"):
        a, b = tensors_of(run, part), tensors_of(imported, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    got, ref = peft_outputs(tiny_model, imported, inputs), peft_outputs(tiny_model, run, inputs)
    assert max_diff(got, ref, "unet") <= 1e-5 and max_diff(got, ref, "text_encoder") <= 1e-5


def with_per_module_ranks(sd: dict, alphas: bool) -> dict:
    """A copy of a kohya LoRA state dict in which two modules have other ranks (kohya's block-wise dims) and,
    with `alphas`, three modules other alphas."""
    sd = dict(sd)
    g = torch.Generator().manual_seed(3)
    for name, rank, alpha in [(Q, 2, 1.0), (Q.replace("attn1_to_q", "attn2_to_v"), 6, 12.0)]:
        down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, down.shape[1], generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(up.shape[0], rank, generator=g)
        if alphas:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
    if alphas:
        sd[f"{Q.replace('attn1_to_q', 'attn1_to_k')}.alpha"] = torch.tensor(0.5)  # same rank, other alpha
    return sd


@pytest.mark.parametrize("alphas", [False, True], ids=["ranks", "ranks_and_alphas"])
def test_import_keeps_per_module_rank_and_alpha(alphas, make_run, tiny_model, inputs, tmp_path):
    """Per-module ranks and alphas become rank_pattern / alpha_pattern; each imported module then has the update a
    LyCORIS reader computes from the file. (diffusers agrees on per-module ranks; it drops per-module alphas of
    attention layers, hence the reader formula as the reference.)"""
    run = make_run("kohya-lora-plain", **KOHYA_LORA_VARIANTS["plain"])
    sd = with_per_module_ranks(load_file(export_run(run, "kohya", tmp_path / "a.safetensors")), alphas)
    mixed = tmp_path / "mixed.safetensors"
    save_file(sd, mixed)
    imported = import_kohya(mixed, tmp_path / "imported", model=tiny_model)
    cfg = json.loads((imported / "unet" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and len(cfg["rank_pattern"]) == 2 and len(cfg["alpha_pattern"]) == (3 if alphas else 0)
    check_reader_deltas(tiny_model, imported, sd)
    if not alphas:
        pipe = pipeline(tiny_model)
        pipe.load_lora_weights(str(mixed))
        got, want = peft_outputs(tiny_model, imported, inputs), outputs(pipe.unet, pipe.text_encoder, inputs)
        assert max_diff(got, want, "unet") <= TOL and max_diff(got, want, "text_encoder") <= TOL
    # and out again: the patterns survive a kohya re-export
    again = load_file(export_run(imported, "kohya", tmp_path / "again.safetensors"))
    assert again.keys() == sd.keys() and all(torch.allclose(again[k], sd[k]) for k in sd)


# ---------------------------------------------------------------------------------------------------------------
# (c) LoHa / LoKr (attention + conv) round trip through the LyCORIS file

LYCORIS_VARIANTS = {
    "loha": {"unet_adapter.adapter": "loha", "train.train_text_encoder": True},
    "loha_effective_conv": {"unet_adapter.adapter": "loha", "unet_adapter.use_effective_conv2d": True},
    "lokr": {"unet_adapter.adapter": "lokr", "train.train_text_encoder": True},
    # rank 1 < every factor / 2: both Kronecker factors decomposed, and the Tucker core (lokr_t2) on 3x3 convs
    "lokr_decompose_both_effective_conv": {"unet_adapter.adapter": "lokr", "unet_adapter.rank": 1,
                                           "unet_adapter.decompose_both": True,
                                           "unet_adapter.use_effective_conv2d": True},
    # rank 2: on the 32-wide layers w2 is decomposed and w1 full, on the 64-wide ones both are decomposed
    "lokr_mixed_rank2_decompose_both": {"unet_adapter.adapter": "lokr", "unet_adapter.rank": 2,
                                        "unet_adapter.decompose_both": True, "unet_adapter.alpha": 3.0},
}


@pytest.mark.parametrize("variant", LYCORIS_VARIANTS)
def test_lycoris_round_trip(variant, make_run, tiny_model, inputs, tmp_path):
    from peftbooth.inference.pipeline import AdapterPipeline

    run = make_run(variant, **{"unet_adapter.target_modules": "all", **LYCORIS_VARIANTS[variant]})
    kind = LYCORIS_VARIANTS[variant]["unet_adapter.adapter"]
    path = export_run(run, "kohya", tmp_path / "lyco.safetensors")
    meta = header(path)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == kind
    exported = load_file(path)
    assert any(".hada_w1_a" in k or ".lokr_w1" in k for k in exported)
    assert any(k.endswith("_resnets_0_conv1.alpha") for k in exported)  # conv layers are in the file

    imported = import_kohya(path, tmp_path / "imported", model=tiny_model)
    for part in ("unet", "text_encoder"):
        if (run / part).is_dir():
            a, b = tensors_of(run, part), tensors_of(imported, part)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    ref = peft_outputs(tiny_model, run, inputs)
    got = peft_outputs(tiny_model, imported, inputs)
    assert max_diff(got, ref, "unet") <= 1e-6 and max_diff(got, ref, "text_encoder") <= 1e-6

    pipe = AdapterPipeline(tiny_model, device="cpu")  # what 'peftbooth generate --adapter' uses
    pipe.load_adapter(imported)
    assert max_diff(outputs(pipe.pipe.unet, pipe.pipe.text_encoder, inputs), ref, "unet") <= TOL

    check_reader_deltas(tiny_model, run, exported)


def lycoris_reader_delta(params: dict, shape: torch.Size) -> torch.Tensor:
    """The weight update A1111 / ComfyUI / LyCORIS compute from one module of a kohya file: the product of the
    factors, times alpha / dim with dim the rank found in the tensors (1 if none, or no alpha stored)."""
    p = {k: v.double() for k, v in params.items()}
    dim = None
    if "lora_down.weight" in p:
        dim = p["lora_down.weight"].shape[0]
        delta = p["lora_up.weight"].flatten(1) @ p["lora_down.weight"].flatten(1)
    elif "hada_w1_a" in p:
        dim = p["hada_w1_b"].shape[0]
        if "hada_t1" in p:
            cp = "i j k l, j r, i p -> p r k l"
            delta = (torch.einsum(cp, p["hada_t1"], p["hada_w1_b"], p["hada_w1_a"])
                     * torch.einsum(cp, p["hada_t2"], p["hada_w2_b"], p["hada_w2_a"]))
        else:
            delta = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
    else:
        w1 = p.get("lokr_w1")
        if w1 is None:
            dim, w1 = p["lokr_w1_b"].shape[0], p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p.get("lokr_w2")
        if w2 is None:
            dim = p["lokr_w2_b"].shape[0]
            if "lokr_t2" in p:
                w2 = torch.einsum("i j k l, j r, i p -> p r k l", p["lokr_t2"], p["lokr_w2_b"], p["lokr_w2_a"])
            else:
                w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1.contiguous(), w2.contiguous())
    scale = p["alpha"].item() / dim if dim is not None and "alpha" in p else 1.0
    return (delta * scale).reshape(shape)


def check_reader_deltas(model: str, run: Path, exported: dict) -> None:
    """Every module's update as a LyCORIS reader computes it from the file equals PEFT's own delta weight."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    from peftbooth.models.loading import load_components
    from peftbooth.runs.formats.common import kohya_module_name

    c = load_components(model)
    checked = 0
    for part in ("unet", "text_encoder"):
        if not (run / part).is_dir():
            continue
        peft_model = PeftModel.from_pretrained(getattr(c, part), run / part)
        for name, layer in peft_model.base_model.model.named_modules():
            if not isinstance(layer, BaseTunerLayer):
                continue
            prefix = kohya_module_name(part, name) + "."
            params = {k[len(prefix):]: v for k, v in exported.items() if k.startswith(prefix)}
            want = layer.get_delta_weight("default").double()
            got = lycoris_reader_delta(params, want.shape)
            assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), name
            checked += 1
    assert checked > 10


def test_lokr_full_factors_bake_scale(make_run, tiny_model, inputs, tmp_path):
    """Rank 4 on the tiny model keeps both LoKr factors full: readers apply no alpha there, so PEFT's alpha / r is
    multiplied into lokr_w1 on export; the import then gets alpha == rank and the same outputs."""
    run = make_run("lokr_full_alpha", **{"unet_adapter.adapter": "lokr", "unet_adapter.target_modules": "all",
                                         "unet_adapter.alpha": 2.0})
    path = export_run(run, "kohya", tmp_path / "lokr.safetensors")
    trained, exported = tensors_of(run, "unet"), load_file(path)
    key = "down_blocks.0.resnets.0.conv1"
    assert torch.allclose(exported[f"lora_unet_{key.replace('.', '_')}.lokr_w1"],
                          trained[f"base_model.model.{key}.lokr_w1"] * 0.5)
    imported = import_kohya(path, tmp_path / "imported", model=tiny_model)
    assert max_diff(peft_outputs(tiny_model, imported, inputs), peft_outputs(tiny_model, run, inputs), "unet") <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# (d) key names and shapes on the real SD 1.5 layout (meta device: no memory, no download)

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


# ---------------------------------------------------------------------------------------------------------------
# (e) the PEFT DreamBooth example's layout (unet/, text_encoder/, base_model.model. keys, no config.yaml)


def write_peft_example_run(model: str, folder: Path, old_text_layout: bool) -> None:
    """What peft/examples/lora_dreambooth/train_dreambooth.py saves: unet/ and text_encoder/ via save_pretrained.
    With transformers < 5 the text-encoder keys read 'base_model.model.text_model.encoder...'."""
    from peft import LoraConfig, get_peft_model

    from peftbooth.models.loading import load_components

    torch.manual_seed(0)
    c = load_components(model)
    targets = {"unet": ["to_q", "to_v", "query", "value"], "text_encoder": ["q_proj", "v_proj"]}
    for part in ("unet", "text_encoder"):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets[part], lora_dropout=0.0, bias="none",
                            init_lora_weights=False)
        get_peft_model(getattr(c, part), config).save_pretrained(folder / part)
    if old_text_layout:
        f = folder / "text_encoder" / "adapter_model.safetensors"
        sd = {k.replace("base_model.model.", "base_model.model.text_model."): v for k, v in load_file(f).items()}
        save_file(sd, f, metadata={"format": "pt"})


def new_layout_reference(model: str, old: Path, new: Path) -> Path:
    """The same adapters with the text-encoder keys in the running transformers' layout (for reference outputs)."""
    shutil.copytree(old, new)
    f = new / "text_encoder" / "adapter_model.safetensors"
    save_file({k.replace(".text_model.", "."): v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    return new


def test_peft_example_layout_loads_in_adapter_pipeline(tiny_model, inputs, tmp_path):
    from peftbooth.inference.pipeline import AdapterPipeline

    run = tmp_path / "example"
    write_peft_example_run(tiny_model, run, old_text_layout=False)
    ref = peft_outputs(tiny_model, run, inputs)
    assert max_diff(ref, base_outputs(tiny_model, inputs), "text_encoder") > 1e-2
    pipe = AdapterPipeline(tiny_model, device="cpu")
    pipe.load_adapter(run)
    got = outputs(pipe.pipe.unet, pipe.pipe.text_encoder, inputs)
    assert max_diff(got, ref, "unet") <= TOL and max_diff(got, ref, "text_encoder") <= TOL


def test_peft_example_old_text_layout_exports_and_reimports(tiny_model, inputs, tmp_path):
    """A run saved with transformers < 5 ('text_model.' in the text-encoder keys): the exports spell the text
    encoder the standard way, and importing the kohya file gives folders this transformers loads in full."""
    from peftbooth.inference.pipeline import AdapterPipeline

    old = tmp_path / "old"
    write_peft_example_run(tiny_model, old, old_text_layout=True)
    ref = peft_outputs(tiny_model, new_layout_reference(tiny_model, old, tmp_path / "new"), inputs)

    kohya = export_run(old, "kohya", tmp_path / "old.safetensors")
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in load_file(kohya)
    assert header(kohya)["ss_sd_model_name"] == ""  # no config.yaml, no base model recorded
    imported = import_kohya(kohya, tmp_path / "imported", model=tiny_model)
    pipe = AdapterPipeline(tiny_model, device="cpu")
    pipe.load_adapter(imported)
    got = outputs(pipe.pipe.unet, pipe.pipe.text_encoder, inputs)
    assert max_diff(got, ref, "unet") <= TOL and max_diff(got, ref, "text_encoder") <= TOL

    diffusers_file = export_run(old, "diffusers", tmp_path / "d.safetensors")
    dpipe = pipeline(tiny_model)
    dpipe.load_lora_weights(str(diffusers_file))
    assert max_diff(outputs(dpipe.unet, dpipe.text_encoder, inputs), ref, "text_encoder") <= TOL


def test_peft_example_old_text_layout_in_adapter_pipeline(tiny_model, inputs, tmp_path):
    from peftbooth.inference.pipeline import AdapterPipeline

    old = tmp_path / "old"
    write_peft_example_run(tiny_model, old, old_text_layout=True)
    ref = peft_outputs(tiny_model, new_layout_reference(tiny_model, old, tmp_path / "new"), inputs)
    pipe = AdapterPipeline(tiny_model, device="cpu")
    pipe.load_adapter(old)
    assert max_diff(outputs(pipe.pipe.unet, pipe.pipe.text_encoder, inputs), ref, "text_encoder") <= TOL


# ---------------------------------------------------------------------------------------------------------------
# (f) fuse


@pytest.mark.parametrize("variant,scale", [("lora-dora", 1.0), ("loha", 0.5)])
def test_fused_pipeline_equals_adapter_wrapped(variant, scale, make_run, tiny_model, inputs, tmp_path):
    overrides = (LORA_VARIANTS["dora"] if variant == "lora-dora" else LYCORIS_VARIANTS["loha"])
    run = make_run(variant, **{"train.train_text_encoder": True, **overrides})
    out = fuse_run(None, run, tmp_path / "fused", scale=scale)  # None: the base model named in config.yaml
    assert (out / "model_index.json").is_file() and list((out / "unet").glob("*.safetensors"))
    assert not list(out.rglob("*.bin"))
    fused = pipeline(str(out))
    got, ref = outputs(fused.unet, fused.text_encoder, inputs), peft_outputs(tiny_model, run, inputs, scale=scale)
    assert max_diff(got, ref, "unet") <= TOL and max_diff(got, ref, "text_encoder") <= TOL


def test_fuse_takes_the_runs_vae_unless_told(make_run, tiny_model, tmp_path):
    """A run trained with --vae fuses with that VAE (its config.yaml records it), so the fused folder decodes as
    the run's samples did; `vae=` names another; a missing one is refused before anything is loaded."""
    from diffusers import AutoencoderKL

    replacement = AutoencoderKL.from_pretrained(Path(tiny_model) / "vae")
    with torch.no_grad():
        for p in replacement.parameters():
            p.add_(0.01)
    replacement.save_pretrained(tmp_path / "vae2")
    run = make_run("lora-vae", **{"model.vae": str(tmp_path / "vae2")})

    def fused_vae(out) -> dict:
        return AutoencoderKL.from_pretrained(out / "vae").state_dict()

    out = fuse_run(None, run, tmp_path / "fused")
    assert all(torch.equal(v, replacement.state_dict()[k]) for k, v in fused_vae(out).items())
    assert f"with the VAE `{tmp_path / 'vae2'}`" in (out / "README.md").read_text()
    base = AutoencoderKL.from_pretrained(Path(tiny_model) / "vae").state_dict()
    out = fuse_run(None, run, tmp_path / "fused-base-vae", vae=str(Path(tiny_model) / "vae"))
    assert all(torch.equal(v, base[k]) for k, v in fused_vae(out).items())
    with pytest.raises(UsageError, match=f"^--vae {tmp_path / 'nope'}: no such folder"):
        fuse_run(None, run, tmp_path / "fused-missing", vae=str(tmp_path / "nope"))
    assert not (tmp_path / "fused-missing").exists()


@pytest.mark.parametrize("variant", ["lora-dora", "lokr"])
def test_fuse_then_unfuse_restores_base_weights(variant, make_run, tiny_model, inputs):
    overrides = LORA_VARIANTS["dora"] if variant == "lora-dora" else LYCORIS_VARIANTS["lokr"]
    run = make_run(variant, **{"train.train_text_encoder": True, "unet_adapter.target_modules": "all", **overrides})
    pipe = pipeline(tiny_model)
    parts = ("unet", "text_encoder")
    base = {part: {k: v.clone() for k, v in getattr(pipe, part).state_dict().items()} for part in parts}
    base_out = outputs(pipe.unet, pipe.text_encoder, inputs)

    handles = fuse_adapters(pipe, run)
    fused_out = outputs(pipe.unet, pipe.text_encoder, inputs)
    ref = peft_outputs(tiny_model, run, inputs)
    assert max_diff(fused_out, ref, "unet") <= TOL and max_diff(fused_out, ref, "text_encoder") <= TOL

    unfuse_adapters(handles)
    for part in ("unet", "text_encoder"):
        now = getattr(pipe, part).state_dict()
        assert now.keys() == base[part].keys()  # no adapter layers left behind
        assert max((now[k] - base[part][k]).abs().max().item() for k in now) <= 1e-5
    assert max_diff(outputs(pipe.unet, pipe.text_encoder, inputs), base_out, "unet") <= TOL


# ---------------------------------------------------------------------------------------------------------------
# (g) bad input


def kohya_export(make_run, tmp_path) -> tuple[Path, dict]:
    run = make_run("kohya-lora-plain", **KOHYA_LORA_VARIANTS["plain"])
    path = export_run(run, "kohya", tmp_path / "good.safetensors")
    return path, load_file(path)


def bad_import_file(case: str, tmp_path: Path, good: dict) -> Path:
    """Write the input file of one bad-input case."""
    if case in ("pickle_ckpt", "pickle_bin"):
        path = tmp_path / ("model.ckpt" if case == "pickle_ckpt" else "adapter.bin")
        torch.save({"x": torch.zeros(1)}, path)
    elif case == "not_safetensors":
        path = tmp_path / "notes.txt"
        path.write_text("hello")
    elif case == "pickle_renamed":
        path = tmp_path / "sneaky.safetensors"
        torch.save({"x": torch.zeros(1)}, path)  # a pickle (zip) under a safetensors name: must not be unpickled
    elif case == "unknown_keys":
        path = tmp_path / "unknown.safetensors"
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, path)
    elif case == "diffusers_file":
        path = tmp_path / "diffusers.safetensors"
        save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 2)}, path)
    elif case == "sdxl_file":
        path = tmp_path / "sdxl.safetensors"
        save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 2)}, path)
    elif case == "unknown_module":
        path = tmp_path / "module.safetensors"
        save_file({**good, "lora_unet_no_such_block_to_q.lora_down.weight": torch.zeros(4, 32),
                   "lora_unet_no_such_block_to_q.lora_up.weight": torch.zeros(32, 4)}, path)
    elif case == "shape_mismatch":
        path = tmp_path / "shape.safetensors"
        save_file({**good, f"{Q}.lora_down.weight": torch.zeros(4, 48)}, path)
    elif case == "rank_mismatch":
        path = tmp_path / "rank.safetensors"
        save_file({**good, f"{Q}.lora_up.weight": torch.zeros(32, 2)}, path)
    else:
        raise AssertionError(case)
    return path


BAD_IMPORTS = {
    "pickle_ckpt": "is a pickle file (.ckpt), which is never loaded",
    "pickle_bin": "is a pickle file (.bin)",
    "not_safetensors": "not a .safetensors file",
    "pickle_renamed": "not a valid safetensors file",
    "unknown_keys": "unknown key format",
    "diffusers_file": "a diffusers-format file",
    "sdxl_file": "SDXL",
    "unknown_module": "lora_unet_no_such_block_to_q",
    "shape_mismatch": f"{Q}: lora_down.weight has shape (4, 48) but",
    "rank_mismatch": f"{Q}: lora_up.weight has shape (32, 2) but",
}


@pytest.mark.parametrize("case", BAD_IMPORTS)
def test_import_refuses_bad_input(case, make_run, tiny_model, tmp_path):
    _, good = kohya_export(make_run, tmp_path)
    path = bad_import_file(case, tmp_path, good)
    with pytest.raises(UsageError) as e:
        import_kohya(path, tmp_path / "out", model=tiny_model)
    assert BAD_IMPORTS[case] in str(e.value)
    if case == "unknown_keys":
        assert "model.diffusion_model.input_blocks.0.0.weight" in str(e.value)  # names an example key
    if case == "shape_mismatch":
        assert "needs (4, 32)" in str(e.value)
        assert "layer down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q of" in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_import_without_model_uses_sd1_layout_and_reports_the_mismatch(make_run, tmp_path):
    """A tiny-model file checked against the built-in SD 1.x layout: the first mismatch names module and shapes."""
    path, _ = kohya_export(make_run, tmp_path)
    expected = r"has shape \(4, 32\) but layer .* of the built-in SD 1\.x config needs \(4, 320\)"
    with pytest.raises(UsageError, match=expected):
        import_kohya(path, tmp_path / "out")


BAD_EXPORTS = {
    "loha_as_diffusers": ("loha", "diffusers", "use --format kohya"),
    "dora_as_kohya": ("lora-dora", "kohya", "DoRA"),
    "unknown_format": ("kohya-lora-plain", "ckpt", "--format must be one of diffusers, kohya, peft"),
    "pickle_output": ("kohya-lora-plain", "kohya", "never as pickles"),
}


@pytest.mark.parametrize("case", BAD_EXPORTS)
def test_export_refuses_bad_input(case, make_run, tmp_path):
    name, fmt, message = BAD_EXPORTS[case]
    overrides = {"lora-dora": {"train.train_text_encoder": True, **LORA_VARIANTS["dora"]},
                 "loha": {"unet_adapter.target_modules": "all", **LYCORIS_VARIANTS["loha"]},
                 "kohya-lora-plain": KOHYA_LORA_VARIANTS["plain"]}[name]
    run = make_run(name, **overrides)
    output = tmp_path / ("out.ckpt" if case == "pickle_output" else "out.safetensors")
    with pytest.raises(UsageError) as e:
        export_run(run, fmt, output)
    assert message in str(e.value)
    assert not output.exists() and not list(tmp_path.glob(".*"))  # no output, no temp file left


def test_export_refuses_pickle_only_run_and_unknown_keys(make_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(make_run("kohya-lora-plain", **KOHYA_LORA_VARIANTS["plain"]), run)
    weights = run / "unet" / "adapter_model.safetensors"
    save_file({"base_model.model.x.lora_embedding_A": torch.zeros(2)}, weights)
    with pytest.raises(UsageError, match="unknown key format.*base_model.model.x.lora_embedding_A"):
        export_run(run, "kohya", tmp_path / "a.safetensors")
    weights.unlink()
    torch.save({}, run / "unet" / "adapter_model.bin")
    with pytest.raises(UsageError, match="only pickle weights"):
        export_run(run, "kohya", tmp_path / "a.safetensors")
    with pytest.raises(UsageError, match="no such folder"):
        export_run(tmp_path / "missing", "peft", tmp_path / "p")


def test_outputs_are_not_replaced_without_overwrite(make_run, tmp_path):
    run = make_run("kohya-lora-plain", **KOHYA_LORA_VARIANTS["plain"])
    path = export_run(run, "kohya", tmp_path / "a.safetensors")
    path.write_bytes(b"previous")
    with pytest.raises(UsageError, match="already exists; pass --overwrite"):
        export_run(run, "kohya", path)
    assert path.read_bytes() == b"previous"
    assert export_run(run, "kohya", path, overwrite=True) == path and header(path)["ss_output_name"] == "a"
    peft_dir = export_run(run, "peft", tmp_path / "peft")
    assert sorted(p.name for p in peft_dir.iterdir()) == ["README.md", "config.yaml", "text_encoder", "unet"]
    assert export_run(run, "peft", peft_dir, overwrite=True) == peft_dir
    assert tensors_of(peft_dir, "unet").keys() == tensors_of(run, "unet").keys()


# ---------------------------------------------------------------------------------------------------------------
# command line


def test_cli_commands(make_run, tiny_model, tmp_path, capsys):
    from peftbooth.cli import Parser

    parser = Parser(prog="peftbooth")
    add_commands(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    run = make_run("kohya-lora-plain", **KOHYA_LORA_VARIANTS["plain"])

    def call(*argv) -> int:
        args = parser.parse_args([str(a) for a in argv])
        return args.func(args)

    kohya = tmp_path / "a.safetensors"
    assert call("export", run, "--format", "kohya", "--output", kohya) == 0 and kohya.is_file()
    assert call("import", kohya, "--output", tmp_path / "imp", "--model", tiny_model) == 0
    assert (tmp_path / "imp" / "unet" / "adapter_config.json").is_file()
    assert call("fuse", run, "--output", tmp_path / "fused", "--scale", "0.5") == 0
    assert (tmp_path / "fused" / "model_index.json").is_file()
    assert "written to" in capsys.readouterr().out
    with pytest.raises(UsageError, match="use --format kohya"):
        call("export", make_run("loha", **{"unet_adapter.target_modules": "all", **LYCORIS_VARIANTS["loha"]}),
             "--format", "diffusers", "--output", tmp_path / "x")
    with pytest.raises(SystemExit) as e:  # argparse refuses an unknown format with exit code 2
        call("export", run, "--format", "ckpt", "--output", tmp_path / "y")
    assert e.value.code == 2
