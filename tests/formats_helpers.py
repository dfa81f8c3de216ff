"""Helpers and fixtures shared by the format tests (tests/test_formats_*.py): export (diffusers, kohya/LyCORIS,
peft), import (kohya -> PEFT) and fuse, checked on model outputs.

Every adapter is perturbed with seeded noise, so it is far from the identity and a wrong strength, a dropped tensor
or a mis-mapped module shows up as a large output difference. SD 1.x runs are trained for one step by `train`;
SDXL run folders are built the way `peftbooth train` saves them, without training (see `write_run`).

A test file uses a fixture from here by binding it under the name its tests ask for, e.g.
`inputs, make_run = sd_inputs, sd_make_run`. Each file that does so sets the fixture up again, so what is
expensive (trained runs, the tiny SDXL model) is built once per test session through `shared`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import draw_photos, tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peftbooth.adapters.strength import set_strength

TOL = 1e-4  # fp32, max abs difference
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # a kohya module name of every UNet here
PARTS = ("unet", "text_encoder", "text_encoder_2")  # SDXL
TEXT_PARTS = ("text_encoder", "text_encoder_2")

warnings.filterwarnings("ignore", message=".*(base_model_name_or_path|Found missing adapter keys).*")

_SHARED = pytest.StashKey[dict]()


def shared(request, key: str, build):
    """build()'s value, made once per test session: a fixture imported into several test files is set up once per
    file, so the values those files share are kept on the session's config."""
    values = request.config.stash.setdefault(_SHARED, {})
    if key not in values:
        values[key] = build()
    return values[key]


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


# ---------------------------------------------------------------------------------------------------------------
# SD 1.x: the tiny SD model of conftest, runs trained for one step


@pytest.fixture(scope="module")
def sd_inputs():
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
def sd_make_run(request, tiny_model, tmp_path_factory):
    """make_run(name, **{'section.field': value}) -> a trained, perturbed run folder (cached per test session)."""
    from peftbooth.training.loop import train

    def maker():
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

    return shared(request, "sd_make_run", maker)


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
            set_strength(PeftModel.from_pretrained(getattr(c, part), run / part), {"default": scale})
    return outputs(c.unet, c.text_encoder, inputs)


def base_outputs(model: str, inputs) -> dict:
    from peftbooth.models.loading import load_components

    c = load_components(model)
    return outputs(c.unet, c.text_encoder, inputs)


LORA_VARIANTS = {
    "plain": {},
    "alpha_ne_rank": {"unet_adapter.alpha": 16.0, "text_encoder_adapter.alpha": 2.0},
    "rslora": {"unet_adapter.use_rslora": True, "unet_adapter.alpha": 8.0},
    "dora": {"unet_adapter.use_dora": True, "unet_adapter.alpha": 8.0},
    "dora_all_targets_conv": {"unet_adapter.use_dora": True, "unet_adapter.alpha": 2.0,
                              "unet_adapter.target_modules": "all", "text_encoder_adapter.target_modules": "attn-mlp"},
}

KOHYA_LORA_VARIANTS = {
    "plain": {"train.train_text_encoder": True},
    "alpha_ne_rank": {"train.train_text_encoder": True, "unet_adapter.alpha": 16.0, "text_encoder_adapter.alpha": 2.0},
    "rslora": {"train.train_text_encoder": True, "unet_adapter.use_rslora": True, "unet_adapter.alpha": 8.0},
    "all_targets_conv": {"train.train_text_encoder": True, "unet_adapter.target_modules": "all",
                         "text_encoder_adapter.target_modules": "attn-mlp", "unet_adapter.alpha": 2.0},
}

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


# ---------------------------------------------------------------------------------------------------------------
# SDXL: a tiny SDXL model, run folders written without training


@pytest.fixture(scope="module")
def tiny_sdxl_model(request, tmp_path_factory) -> str:
    from peftbooth.models.tiny import build_tiny_model

    return shared(request, "tiny_sdxl_model", lambda: str(
        build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", shape="tiny-sdxl")))


@pytest.fixture(scope="module")
def sdxl_inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(1, 4, 8, 8, generator=g),
        "timestep": torch.tensor([500]),
        "context": torch.randn(1, 8, 64, generator=g),  # both text encoders' states side by side: 32 + 32
        "added": {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])},
        "ids": torch.randint(0, 500, (1, 12), generator=g),
    }


def write_run(model: str, folder: Path, seed: int, **overrides) -> Path:
    """An SDXL run folder as `peftbooth train` saves one; overrides are 'section.field' -> value of TrainConfig."""
    from peftbooth.adapters.inject import attach
    from peftbooth.adapters.peft_config import TEXT_ENCODER_PRESETS, UNET_PRESETS
    from peftbooth.config.dicts import to_dict
    from peftbooth.config.sections import TrainConfig
    from peftbooth.models.loading import load_components

    cfg = TrainConfig()
    cfg.model.model = model
    cfg.data.instance_prompt = "a photo of sks dog"
    cfg.data.resolution = 32
    cfg.train.output_dir = str(folder)
    cfg.train.max_train_steps = 1
    cfg.train.train_text_encoder = True
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    cfg = cfg.resolved()

    c = load_components(model)
    parts = {"unet": (c.unet, cfg.unet_adapter, UNET_PRESETS)}
    if cfg.train.train_text_encoder:
        for part in TEXT_PARTS:
            parts[part] = (getattr(c, part), cfg.text_encoder_adapter, TEXT_ENCODER_PRESETS)
    g = torch.Generator().manual_seed(seed)
    for part, (module, args, presets) in parts.items():
        peft_model = attach(module, args, presets, "", base_model=model)
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad:  # the adapter's own tensors (LoRA B and LoKr w1 start at zero)
                    p.add_(0.2 * torch.randn(p.shape, generator=g))
        peft_model.save_pretrained(folder / part, save_embedding_layers=False)
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def sdxl_make_run(request, sdxl_model, tmp_path_factory):
    """make_run(**{'section.field': value}) -> an SDXL run folder (cached per test session)."""

    def maker():
        root = tmp_path_factory.mktemp("runs")
        cache = {}

        def make(**overrides) -> Path:
            key = tuple(sorted(overrides.items()))
            if key not in cache:
                cache[key] = write_run(sdxl_model, root / f"run-{len(cache)}", seed=len(cache), **overrides)
            return cache[key]

        return make

    return shared(request, "sdxl_make_run", maker)


@torch.no_grad()
def sdxl_outputs(unet, text_encoder, text_encoder_2, inputs) -> dict:
    return {
        "unet": unet(inputs["sample"], inputs["timestep"], inputs["context"], added_cond_kwargs=inputs["added"]).sample,
        "text_encoder": text_encoder(inputs["ids"])[0],
        "text_encoder_2": text_encoder_2(inputs["ids"]).last_hidden_state,
    }


def component_outputs(c, inputs) -> dict:
    return sdxl_outputs(c.unet, c.text_encoder, c.text_encoder_2, inputs)


def sdxl_peft_outputs(model: str, run: Path, inputs, scale: float = 1.0) -> dict:
    """Outputs of the base model wrapped with the run's PEFT adapters (the reference for every format)."""
    from peft import PeftModel

    from peftbooth.models.loading import load_components

    c = load_components(model)
    for part in PARTS:
        if (run / part).is_dir():
            set_strength(PeftModel.from_pretrained(getattr(c, part), run / part), {"default": scale})
    return component_outputs(c, inputs)


def sdxl_base_outputs(model: str, inputs) -> dict:
    from peftbooth.models.loading import load_components

    return component_outputs(load_components(model), inputs)


def assert_close(got: dict, want: dict, tol: float = TOL, parts=PARTS) -> None:
    for part in parts:
        assert max_diff(got, want, part) <= tol, part


def pipe_outputs(pipe, inputs) -> dict:
    return sdxl_outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, inputs)


def assert_same_adapters(a: Path, b: Path) -> None:
    for part in PARTS:
        assert (a / part).is_dir() == (b / part).is_dir(), part
        if (a / part).is_dir():
            ta, tb = tensors_of(a, part), tensors_of(b, part)
            assert ta.keys() == tb.keys(), part
            assert all(torch.equal(ta[k], tb[k]) for k in ta), part


SDXL_LORA_VARIANTS = {
    "plain": {},
    "alpha_ne_rank": {"unet_adapter.alpha": 16.0, "text_encoder_adapter.alpha": 2.0},
    "rslora": {"unet_adapter.use_rslora": True, "unet_adapter.alpha": 8.0},
    "dora": {"unet_adapter.use_dora": True, "unet_adapter.alpha": 8.0},
    "all_targets_conv": {"unet_adapter.target_modules": "all", "text_encoder_adapter.target_modules": "attn-mlp",
                         "unet_adapter.alpha": 2.0},
}

SDXL_KOHYA_LORA_VARIANTS = {
    "attn": {},
    "alpha_ne_rank_rslora": {"unet_adapter.use_rslora": True, "unet_adapter.alpha": 8.0,
                             "text_encoder_adapter.alpha": 2.0},
    "all_targets_conv": SDXL_LORA_VARIANTS["all_targets_conv"],
}

SDXL_LYCORIS_VARIANTS = {
    "loha": {"unet_adapter.adapter": "loha"},
    "loha_effective_conv": {"unet_adapter.adapter": "loha", "unet_adapter.use_effective_conv2d": True},
    "lokr": {"unet_adapter.adapter": "lokr"},
    # rank 2: some factors full, some decomposed, so the file carries a rank for them and alpha != rank survives
    "lokr_rank2_alpha3_decompose_both": {"unet_adapter.adapter": "lokr", "unet_adapter.rank": 2,
                                         "unet_adapter.decompose_both": True, "unet_adapter.alpha": 3.0},
    "lokr_decompose_both_effective_conv": {"unet_adapter.adapter": "lokr", "unet_adapter.rank": 1,
                                           "unet_adapter.decompose_both": True,
                                           "unet_adapter.use_effective_conv2d": True},
}
