"""SDXL import: both UNet spellings (SGM and diffusers names), SD / SDXL family detection and the one-line
mismatch errors (also on the command line), mixed and duplicate names, the built-in layout without a model.

The run folders are built as `train` saves them, with seeded noise (formats_helpers `write_run`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from formats_helpers import SDXL_KOHYA_LORA_VARIANTS as KOHYA_LORA_VARIANTS
from formats_helpers import assert_same_adapters, sdxl_inputs, sdxl_make_run, tiny_sdxl_model
from safetensors.torch import load_file, save_file

from peftbooth.config.sections import UsageError
from peftbooth.runs.formats import export_run, import_kohya

# the shared fixtures (formats_helpers), under the names the tests ask for
sdxl_model, inputs, make_run = tiny_sdxl_model, sdxl_inputs, sdxl_make_run


# ---------------------------------------------------------------------------------------------------------------
# import: family detection, mismatches, both UNet spellings


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
