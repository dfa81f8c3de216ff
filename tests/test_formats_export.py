"""SD 1.x export to a diffusers file (one load_lora_weights call at the trained strength), and the export
refusals: formats that cannot hold the adapter, pickle output, unknown keys, outputs that already exist.

The adapters carry seeded noise (formats_helpers), so a wrong strength or a dropped tensor shows up large.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from formats_helpers import (
    KOHYA_LORA_VARIANTS,
    LORA_VARIANTS,
    LYCORIS_VARIANTS,
    TOL,
    base_outputs,
    header,
    max_diff,
    outputs,
    peft_outputs,
    pipeline,
    sd_inputs,
    sd_make_run,
    tensors_of,
)
from safetensors.torch import save_file

from peftbooth.config.sections import UsageError
from peftbooth.runs.formats import export_run

# the shared fixtures (formats_helpers), under the names the tests ask for
inputs, make_run = sd_inputs, sd_make_run


# ---------------------------------------------------------------------------------------------------------------
# diffusers export: one load_lora_weights call, trained strength, UNet and text encoder


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
# bad input: export

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
