"""SDXL export: diffusers files loaded by StableDiffusionXLPipeline.load_lora_weights at the trained strength,
export without a local base model, family mismatches, the peft copy, and a run really trained by `train`.

The run folders are built as `train` saves them, with seeded noise (formats_helpers `write_run`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from formats_helpers import (
    PARTS,
    TEXT_PARTS,
    assert_close,
    assert_same_adapters,
    header,
    max_diff,
    pipe_outputs,
    pipeline,
    sdxl_inputs,
    sdxl_make_run,
    tiny_sdxl_model,
)
from formats_helpers import SDXL_LORA_VARIANTS as LORA_VARIANTS
from formats_helpers import SDXL_LYCORIS_VARIANTS as LYCORIS_VARIANTS
from formats_helpers import sdxl_base_outputs as base_outputs
from formats_helpers import sdxl_peft_outputs as peft_outputs
from safetensors.torch import load_file, save_file

from peftbooth.config.sections import UsageError
from peftbooth.runs.formats import export_run, import_kohya

# the shared fixtures (formats_helpers), under the names the tests ask for
sdxl_model, inputs, make_run = tiny_sdxl_model, sdxl_inputs, sdxl_make_run


# ---------------------------------------------------------------------------------------------------------------
# diffusers export: StableDiffusionXLPipeline.load_lora_weights, trained strength, all three parts


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
# export details: base model not on disk, family mismatch, peft copy


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
