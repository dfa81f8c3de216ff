"""SD 1.x fuse: fused pipelines equal the adapter-wrapped model, the run's VAE is kept, and unfuse restores the
base weights.

The adapters carry seeded noise (formats_helpers), so a wrong strength or a dropped tensor shows up large.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from formats_helpers import (
    LORA_VARIANTS,
    LYCORIS_VARIANTS,
    TOL,
    max_diff,
    outputs,
    peft_outputs,
    pipeline,
    sd_inputs,
    sd_make_run,
)

from peftbooth.config.sections import UsageError
from peftbooth.inference.fuse import fuse_adapters, fuse_run, unfuse_adapters

# the shared fixtures (formats_helpers), under the names the tests ask for
inputs, make_run = sd_inputs, sd_make_run


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
