"""Smoke test of the whole path (train, generate, export) on layers as wide as SD 1.5's, for LoRA, LoHa and LoKr.

The tiny test model's layers are below factored.MIN_WEIGHT, so the rest of the suite never runs the factored
LoHa/LoKr maths inside a real training run; here every adapted UNet layer of the first block (320 channels, the
width of SD 1.5's first block) and every text-encoder layer (768, SD 1.5's CLIP width) is wide enough to take it.
`scripts/lowest_versions.sh` runs this file in an environment at the lowest versions pyproject.toml allows
(CI does too), where it caught LoHa/LoKr crashing on PEFT < 0.16 (`_cast_input_dtype` is missing there).
"""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from peftbooth.adapters import factored
from peftbooth.cli import main
from peftbooth.models.tiny import SHAPES, build_tiny_model
from peftbooth.training.loop import finish, fit
from peftbooth.training.setup import setup

ROOT = Path(__file__).resolve().parents[1]


def test_lowest_constraints_are_the_lower_bounds():
    """constraints-lowest.txt pins each library at its pyproject.toml lower bound, and every pinned library has one."""
    lower = dict(re.findall(r'^\s*"([\w-]+)>=([\d.]+)', (ROOT / "pyproject.toml").read_text(), re.M))
    pins = dict(line.split("==") for line in (ROOT / "constraints-lowest.txt").read_text().split("\n")
                if line and not line.startswith("#"))
    assert set(pins) == {"diffusers", "peft", "transformers", "accelerate"}
    assert pins == {name: lower[name] for name in pins}


# SD 1.5's widths (320-channel UNet block, 768-wide cross attention and text encoder) in one block and one text
# layer: about 20M parameters, a few seconds per step on 2 CPU cores at 32 px
SD15_WIDTH = dict(
    unet=dict(sample_size=32, block_out_channels=(320,), layers_per_block=1,
              down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
              cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
    vae=SHAPES["tiny"]["vae"],
    text=dict(vocab_size=514, hidden_size=768, intermediate_size=3072, num_hidden_layers=1, num_attention_heads=12,
              hidden_act="quick_gelu"),
)


@pytest.fixture(scope="module")
def sd15_width_model(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SHAPES, "sd15-width", SD15_WIDTH)
        return str(build_tiny_model(tmp_path_factory.mktemp("models") / "sd15-width", shape="sd15-width"))


def factored_calls(monkeypatch) -> list[str]:
    """Record each forward that really runs the factored LoHa/LoKr maths (not PEFT's fallback)."""
    calls = []
    for name in ("loha_delta", "lokr_delta"):
        real = getattr(factored, name)

        def spy(self, adapter, x, *a, _real=real, **k):
            before = len(fallbacks)
            out = _real(self, adapter, x, *a, **k)
            if len(fallbacks) == before:
                calls.append(type(self).__name__)
            return out

        monkeypatch.setattr(factored, name, spy)
    fallbacks = []
    real_fallback = factored._fallback
    monkeypatch.setattr(factored, "_fallback", lambda *a, **k: fallbacks.append(1) or real_fallback(*a, **k))
    return calls


@pytest.mark.parametrize("adapter", ["lora", "loha", "lokr"])
def test_train_generate_export_at_sd15_width(adapter, sd15_width_model, photos, tmp_path, monkeypatch):
    from peftbooth.inference.pipeline import AdapterPipeline

    calls = factored_calls(monkeypatch)
    out = tmp_path / "run"
    run = setup(tiny_config(sd15_width_model, photos, out, **{
        "unet_adapter.adapter": adapter, "unet_adapter.rank": 4, "unet_adapter.target_modules": "all",
        "train.train_text_encoder": True, "text_encoder_adapter.adapter": adapter,
        "train.max_train_steps": 2, "train.learning_rate": 1e-2}))
    trainable = [p for p in run.unet.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    stats = fit(run)
    assert stats["steps"] == 2 and torch.isfinite(torch.tensor(stats["final_loss"]))
    assert any(not torch.equal(p.detach(), b) for p, b in zip(trainable, before))
    if adapter != "lora":
        # the factored maths ran in the UNet and in the text encoder (Linear and Conv2d layers)
        assert {"Linear", "Conv2d"} <= set(calls), set(calls)
    finish(run, stats)
    assert (out / "unet" / "adapter_model.safetensors").is_file()
    assert (out / "text_encoder" / "adapter_model.safetensors").is_file()

    pipe = AdapterPipeline(sd15_width_model)
    base = pipe.generate("a photo of sks dog", steps=2, height=32, width=32, seed=0)
    pipe.load_adapter(out)
    adapted = pipe.generate("a photo of sks dog", steps=2, height=32, width=32, seed=0)
    assert adapted[0].size == (32, 32) and list(base[0].getdata()) != list(adapted[0].getdata())

    for fmt in ["kohya"] + (["diffusers"] if adapter == "lora" else []):
        target = tmp_path / f"{fmt}.safetensors"
        assert main(["export", str(out), "--format", fmt, "--output", str(target)]) == 0
        tensors = load_file(target)
        assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    config = json.loads((out / "unet" / "adapter_config.json").read_text())
    assert config["peft_type"] == adapter.upper()
