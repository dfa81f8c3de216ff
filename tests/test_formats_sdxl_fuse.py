"""SDXL fuse: fused StableDiffusionXLPipeline folders equal the adapter-wrapped model, unfuse restores the base
weights, and an SDXL run is refused on an SD 1.x model.

The run folders are built as `train` saves them, with seeded noise (formats_helpers `write_run`).
"""

from __future__ import annotations

import pytest
from formats_helpers import PARTS, assert_close, pipe_outputs, pipeline, sdxl_inputs, sdxl_make_run, tiny_sdxl_model
from formats_helpers import SDXL_LORA_VARIANTS as LORA_VARIANTS
from formats_helpers import SDXL_LYCORIS_VARIANTS as LYCORIS_VARIANTS
from formats_helpers import sdxl_peft_outputs as peft_outputs

from peftbooth.config.sections import UsageError
from peftbooth.inference.fuse import fuse_adapters, fuse_run, unfuse_adapters

# the shared fixtures (formats_helpers), under the names the tests ask for
sdxl_model, inputs, make_run = tiny_sdxl_model, sdxl_inputs, sdxl_make_run


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
