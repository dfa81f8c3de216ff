"""SD 1.x import: the PEFT DreamBooth example's run layout (old and new text-encoder keys) loaded, exported and
re-imported, and the import refusals (pickles, unknown or mismatched keys, other base models).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from formats_helpers import (
    KOHYA_LORA_VARIANTS,
    TOL,
    Q,
    base_outputs,
    header,
    max_diff,
    outputs,
    peft_outputs,
    pipeline,
    sd_inputs,
    sd_make_run,
)
from safetensors.torch import load_file, save_file

from peftbooth.config.sections import UsageError
from peftbooth.runs.formats import export_run, import_kohya

# the shared fixtures (formats_helpers), under the names the tests ask for
inputs, make_run = sd_inputs, sd_make_run


# ---------------------------------------------------------------------------------------------------------------
# the PEFT DreamBooth example's layout (unet/, text_encoder/, base_model.model. keys, no config.yaml)


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
# bad input: import


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
