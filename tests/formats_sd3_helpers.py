"""Helpers of the SD3 format tests (tests/test_formats_sd3.py), beside formats_helpers.py's SD / SDXL ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from formats_helpers import TEXT_PARTS, lycoris_reader_delta, shared
from safetensors.torch import load_file

# ---------------------------------------------------------------------------------------------------------------
# SD3 / SD 3.5: the tiny SD 3.5 model (MMDiT-X, so attn2 is covered too), run folders of PEFT adapters written
# without training, and ComfyUI's way of reading an SD3 single file

SD3_PARTS = ("transformer", "text_encoder", "text_encoder_2")
SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]  # to_q etc. match attn2.* too
SD3_TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
SD3_PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def tiny_sd3_model(request, tmp_path_factory) -> str:
    from peftbooth.models.tiny_sd3 import build_tiny_sd3_model

    return shared(request, "tiny_sd3_model", lambda: str(
        build_tiny_sd3_model(tmp_path_factory.mktemp("models") / "tiny-sd3.5", shape="tiny-sd3.5")))


def sd3_adapter(kind: str = "lora", targets=None, r: int = 4, alpha: float = 8.0, **extra):
    """A PEFT config of `kind` ('lora' | 'loha' | 'lokr') for the SD3 transformer (default targets) or, with
    targets=SD3_TE_TARGETS, a CLIP text encoder."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    targets = list(targets or SD3_TARGETS)
    if kind == "lora":
        return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **extra)
    cls = LoHaConfig if kind == "loha" else LoKrConfig
    return cls(r=r, alpha=alpha, target_modules=targets, **extra)


def write_sd3_run(model: str, folder: Path, transformer, text_encoders=None, seed: int = 0) -> Path:
    """An SD3 run folder as training saves one (transformer/, text_encoder*/ PEFT folders, config.yaml), the
    adapters' tensors perturbed with seeded noise so that they change every output."""
    from diffusers import SD3Transformer2DModel
    from peft import get_peft_model
    from transformers import CLIPTextModelWithProjection

    parts = {"transformer": (SD3Transformer2DModel.from_pretrained(model, subfolder="transformer"), transformer)}
    for part in TEXT_PARTS if text_encoders is not None else ():
        parts[part] = (CLIPTextModelWithProjection.from_pretrained(model, subfolder=part), text_encoders)
    g = torch.Generator().manual_seed(seed)
    for part, (module, config) in parts.items():
        peft_model = get_peft_model(module, config)
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn(p.shape, generator=g))
        peft_model.save_pretrained(folder / part)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"model": model}}))
    return folder


def sd3_pipeline(model: str):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sd3_images(pipe):
    """Two denoising steps at 64 x 64 from a fixed seed, as float images (1, 64, 64, 3)."""
    return torch.from_numpy(pipe(SD3_PROMPT, height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                                 output_type="np", generator=torch.Generator().manual_seed(0)).images)


def sd3_peft_images(model: str, run: Path):
    """Images of the base pipeline with the run's PEFT adapters applied directly (the reference)."""
    from peft import PeftModel

    pipe = sd3_pipeline(model)
    for part in SD3_PARTS:
        if (run / part).is_dir():
            PeftModel.from_pretrained(getattr(pipe, part), run / part)  # wraps the pipeline's module in place
    return sd3_images(pipe)


class MmditCheckpoint(dict):
    """An original-layout (MMDiT) SD3 checkpoint for diffusers' single-file converter: the tensors given, and a
    zero stand-in for every other weight it asks for (recorded in `asked`)."""

    def __init__(self, tensors: dict, config: dict):
        super().__init__(tensors)
        self.asked = []
        stand_in = torch.zeros(6, 1)
        for i in range(config["num_layers"]):  # the converter counts blocks, attn2 layers and qk-norm by key
            self.setdefault(f"joint_blocks.{i}.x_block.attn.qkv.bias", stand_in)
        for i in config.get("dual_attention_layers") or ():
            self.setdefault(f"joint_blocks.{i}.x_block.attn2.qkv.bias", stand_in)
        if config.get("qk_norm"):
            self.setdefault("joint_blocks.0.x_block.attn.ln_q.weight", stand_in)

    def pop(self, key, *default):
        self.asked.append(key)
        return super().pop(key) if key in self else torch.zeros(6, 1)

    def __getitem__(self, key):
        return super().__getitem__(key) if key in self else torch.zeros(6, 1)


def mmdit_to_diffusers(tensors: dict, config: dict) -> tuple[dict, list[str]]:
    """(diffusers transformer tensors, every MMDiT key) by diffusers' own single-file SD3 converter."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    ckpt = MmditCheckpoint(tensors, config)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(ckpt)
    return converted, ckpt.asked


@torch.no_grad()
def comfy_apply(pipe, file: Path) -> None:
    """Merge an SD3 single file into the pipeline the way ComfyUI reads it: every module 'lora_unet_' + an MMDiT
    weight's path (dots as underscores) gets the reader's update (up @ down * alpha / dim, or the LyCORIS product),
    lora_te1_ / lora_te2_ modules the CLIP layers'; the MMDiT weights are then placed in diffusers' transformer by
    diffusers' single-file converter (which splits qkv). Every key of the file must be used."""
    tensors = load_file(file)
    config = dict(pipe.transformer.config)
    _, mmdit_keys = mmdit_to_diffusers({}, config)
    targets = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): ("mmdit", k)
               for k in mmdit_keys if k.endswith(".weight")}
    for part, prefix in zip(TEXT_PARTS, ("lora_te1_", "lora_te2_")):
        for name, module in getattr(pipe, part).named_modules():
            if isinstance(module, torch.nn.Linear):
                targets[prefix + name.replace(".", "_")] = (part, name)
    modules = {}
    for key, t in tensors.items():
        name, _, param = key.partition(".")
        modules.setdefault(name, {})[param] = t
    unknown = sorted(set(modules) - set(targets))
    assert not unknown, unknown
    mmdit = {}
    for name, params in modules.items():
        where, path = targets[name]
        if where == "mmdit":  # a LoRA keeps its rows (the converter cuts qkv into thirds); the rest is flattened
            rows = params["lora_up.weight"].shape[0] if "lora_up.weight" in params else -1
            mmdit[path] = lycoris_reader_delta(params, (rows, -1) if rows > 0 else (-1,))
        else:
            weight = getattr(pipe, where).get_submodule(path).weight
            weight += lycoris_reader_delta(params, weight.shape).to(weight.dtype)
    converted, _ = mmdit_to_diffusers(mmdit, config)
    own = dict(pipe.transformer.named_parameters())
    for key, delta in converted.items():
        if key in own and delta.any():  # the stand-ins are zeros
            own[key] += delta.reshape(own[key].shape).to(own[key].dtype)
