"""SD 1.x kohya / LyCORIS files: kohya LoRA export read by diffusers' own kohya converter, kohya -> import round
trips (per-module ranks and alphas included), LoHa / LoKr round trips, and every module's update as a LyCORIS
reader computes it from the file.

The adapters carry seeded noise (formats_helpers), so a wrong strength or a dropped tensor shows up large.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from formats_helpers import (
    KOHYA_LORA_VARIANTS,
    LYCORIS_VARIANTS,
    TOL,
    Q,
    header,
    lycoris_reader_delta,
    max_diff,
    outputs,
    peft_outputs,
    pipeline,
    sd_inputs,
    sd_make_run,
    tensors_of,
)
from safetensors.torch import load_file, save_file

from peftbooth.runs.formats import export_run, import_kohya

# the shared fixtures (formats_helpers), under the names the tests ask for
inputs, make_run = sd_inputs, sd_make_run


# ---------------------------------------------------------------------------------------------------------------
# kohya LoRA export read by diffusers' own kohya converter


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
# LoHa / LoKr (attention + conv) round trip through the LyCORIS file


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
