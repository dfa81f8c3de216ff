"""The precision and placement policy (precision.py) as tables, and the faults it fixes, each checked through
the code that consumes it: Accelerate's configured precision, class images in the compute dtype, the VAE's
bounded chunks, an fp32 VAE beside half-precision weights in generation, and no dtype decision elsewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from peftbooth.config.sections import UsageError
from peftbooth.precision import (
    Precision,
    check_training,
    for_fuse,
    for_inference,
    for_training,
    place_frozen,
    vae_dtype,
)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CPU, CUDA = torch.device("cpu"), torch.device("cuda")

# family, VAE config's force_upcast, --upcast-vae, --mixed-precision -> (frozen weights, VAE)
TRAINING = [
    ("sd", True, None, "no", F32, F32),
    ("sd", True, None, "fp16", F16, F16),  # SD 1.x / 2.x VAEs leave force_upcast at True and do not overflow
    ("sd", True, None, "bf16", BF16, BF16),
    ("sd", True, True, "bf16", BF16, F32),  # asked for
    ("sdxl", True, None, "no", F32, F32),
    ("sdxl", True, None, "fp16", F16, F32),  # SDXL's own VAE, or the original one given as --vae: NaN in fp16
    ("sdxl", True, None, "bf16", BF16, F32),
    ("sdxl", False, None, "fp16", F16, F16),  # an fp16-fixed VAE
    ("sdxl", True, False, "fp16", F16, F16),  # --no-upcast-vae
    ("sdxl", False, True, "bf16", BF16, F32),
    ("sdxl", False, True, "no", F32, F32),
]


@pytest.mark.parametrize("family,force_upcast,upcast,mixed,compute,vae", TRAINING)
@pytest.mark.parametrize("device", [CPU, CUDA], ids=["cpu", "cuda"])
def test_training_dtypes(family, force_upcast, upcast, mixed, compute, vae, device):
    p = for_training(mixed, device, family, force_upcast, upcast)
    assert (p.device, p.compute, p.vae, p.adapter) == (device, compute, vae, F32)
    assert vae_dtype(compute, family, force_upcast, upcast) == vae


# device, has bf16, family, force_upcast -> (UNet and text encoders, VAE) for generate / eval / UI / class-images
INFERENCE = [
    (CPU, None, "sd", True, F32, F32),  # half precision is slow on the CPU
    (CPU, None, "sdxl", True, F32, F32),
    (CUDA, True, "sd", True, BF16, BF16),
    (CUDA, True, "sdxl", True, BF16, F32),
    (CUDA, True, "sdxl", False, BF16, BF16),
    (CUDA, False, "sd", True, F16, F16),
    (CUDA, False, "sdxl", True, F16, F32),
    (CUDA, False, "sdxl", False, F16, F16),
]


@pytest.mark.parametrize("device,bf16,family,force_upcast,compute,vae", INFERENCE)
def test_inference_dtypes(device, bf16, family, force_upcast, compute, vae):
    p = for_inference(device, family, force_upcast, bf16_supported=bf16)
    assert (p.device, p.compute, p.vae) == (device, compute, vae)


def test_fuse_merges_in_fp32_on_the_cpu():
    assert for_fuse() == Precision(CPU, F32, F32)


# --mixed-precision, device, has bf16 -> the refusal (None: accepted)
CHECKS = [
    ("no", CPU, None, None), ("bf16", CPU, None, None), ("no", CUDA, False, None), ("fp16", CUDA, False, None),
    ("bf16", CUDA, True, None),
    ("fp16", CPU, None, "--mixed-precision fp16: needs a GPU (on the CPU there is no fp16 autocast or gradient "
                        "scaler); use --mixed-precision bf16 or no"),
    ("bf16", CUDA, False, "--mixed-precision bf16: this GPU has no bf16 support; use --mixed-precision fp16"),
]


@pytest.mark.parametrize("mixed,device,bf16,error", CHECKS)
def test_training_precision_checks(mixed, device, bf16, error):
    if error is None:
        check_training(mixed, device, bf16)
    else:
        with pytest.raises(UsageError) as e:
            check_training(mixed, device, bf16)
        assert str(e.value) == error


@pytest.mark.parametrize("compute,bf16,expected", [(F32, True, BF16), (F32, False, F16), (F16, True, F16),
                                                   (BF16, True, BF16)])
def test_class_images_on_a_gpu_run_under_half_autocast(compute, bf16, expected, monkeypatch):
    """Class images during training: the weights are in `compute`; on a GPU the matmuls run in half precision
    (an fp32 run's weights stay fp32 for training), on the CPU nothing is autocast."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    with pytest.warns(UserWarning, match="CUDA is not available"):  # this machine has no GPU to enable it on
        autocast = Precision(CUDA, compute, compute).sampling_autocast()
    assert (autocast.device, autocast.fast_dtype) == ("cuda", expected)
    assert not isinstance(Precision(CPU, compute, compute).sampling_autocast(), torch.autocast)


def test_place_frozen_keeps_adapter_weights_fp32():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].requires_grad_(False)
    model[0].requires_grad_(True)
    place_frozen(model, Precision(CPU, BF16, BF16))
    assert [p.dtype for p in model[0].parameters()] == [F32, F32]
    assert [p.dtype for p in model[1].parameters()] == [BF16, BF16]


# ---------------------------------------------------------------------------------------------------------------
# No dtype or device decision outside the policy

SRC = Path(__file__).resolve().parents[1] / "src" / "peftbooth"
DECISION = re.compile(r"torch\.(float16|bfloat16|half)\b|\.half\(\)|is_bf16_supported|cuda\.is_available\(\)")
# Lines that name a half dtype or ask for CUDA without choosing where or in what anything computes:
NOT_DECISIONS = {
    "world/build.py": "the shipped world model's weights are stored in fp16 (a file format, not a compute dtype)",
    "world/evaluator.py": "the evaluator's weights are stored in fp16 (a file format)",
    "world/judge.py": "the judge's weights are stored in fp16 (a file format)",
    "world/build_sd3.py": "the SD3-shaped world model's weights are stored in fp16 (a file format)",
    "training/checkpoint.py": "saves and restores the CUDA RNG states that exist",
}


def test_no_half_precision_or_device_decisions_outside_the_policy():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "precision.py" or rel in NOT_DECISIONS:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if DECISION.search(line.split("#")[0]):
                found.append(f"{rel}:{n}: {line.strip()}")
    assert found == []


# ---------------------------------------------------------------------------------------------------------------
# Accelerate's configured precision


def read_saved_precision(out: Path) -> str:
    return yaml.safe_load((out / "config.yaml").read_text())["train"]["mixed_precision"]


@pytest.mark.parametrize("env,flag,expected", [("bf16", None, "bf16"), ("bf16", "no", "no"), (None, None, "no")])
def test_accelerate_precision_is_used_unless_the_flag_says_otherwise(env, flag, expected, tiny_model, photos,
                                                                     tmp_path, monkeypatch, fresh_accelerator_state):
    """`accelerate launch --config_file` with mixed_precision: bf16 hands the workers ACCELERATE_MIXED_PRECISION;
    the flag wins when given; the saved config.yaml records what the run used."""
    from test_cli import train_argv

    from peftbooth.cli import main

    if env is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    out = tmp_path / "run"
    argv = train_argv(tiny_model, photos, out)
    assert main(argv + (["--mixed-precision", flag] if flag else [])) == 0
    assert read_saved_precision(out) == expected


def test_a_bad_accelerate_precision_is_refused_naming_the_variable(tiny_model, photos, tmp_path, monkeypatch,
                                                                    capsys):
    from test_cli import train_argv

    from peftbooth.cli import main

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    assert main(train_argv(tiny_model, photos, tmp_path / "run")) == 2
    assert capsys.readouterr().err.strip() == (
        "peftbooth train: error: ACCELERATE_MIXED_PRECISION=fp8: not one of no, fp16, bf16; fix the Accelerate "
        "config or environment, or pass --mixed-precision")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------
# Class images: frozen weights in the compute dtype, the VAE in bounded chunks


def recording_decode(monkeypatch) -> list[int]:
    """Batch sizes the VAE's own decode is called with (inside models.vae_calls' chunking)."""
    from diffusers import AutoencoderKL

    sizes, real = [], AutoencoderKL.decode

    def decode(self, z, *args, **kwargs):
        sizes.append(z.shape[0])
        return real(self, z, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "decode", decode)
    return sizes


def test_class_images_are_made_in_the_compute_dtype_and_decoded_in_bounded_chunks(tiny_model, photos, tmp_path,
                                                                                  monkeypatch,
                                                                                  fresh_accelerator_state):
    """A bf16 run makes its class images with the frozen UNet and text encoder already in bf16 (not fp32 weights
    under autocast: SDXL's would take 14 GB of a GPU), and a batch of 3 images of 32 px decodes one image per VAE
    call when a call may hold one 32-px image."""
    from conftest import tiny_config

    import peftbooth.inference.sampling as sampling
    import peftbooth.models.vae as vae_module
    from peftbooth.training.checkpoint import release_lock
    from peftbooth.training.setup import setup

    seen, real_sample = [], sampling.sample_images

    def sample_images(pipe, prompt, seeds, *args, **kwargs):
        seen.append((pipe.unet.dtype, pipe.text_encoder.dtype, len(seeds)))
        return real_sample(pipe, prompt, seeds, *args, **kwargs)

    monkeypatch.setattr(sampling, "sample_images", sample_images)
    monkeypatch.setattr(vae_module, "VAE_PIXELS_PER_CALL", 32 * 32)
    decoded = recording_decode(monkeypatch)
    run = setup(tiny_config(tiny_model, photos, tmp_path / "run", **{
        "train.mixed_precision": "bf16", "data.with_prior_preservation": True, "data.class_prompt": "a photo of dog",
        "data.num_class_images": 3, "data.sample_batch_size": 3, "data.class_image_steps": 1}))
    release_lock(run.lock)
    assert seen == [(BF16, BF16, 3)]
    assert decoded == [1, 1, 1]
    assert len(list((tmp_path / "run" / "class_images").glob("class-*.png"))) == 3
    assert run.weight_dtype == BF16 and next(run.components.vae.parameters()).dtype == BF16


def test_vae_calls_split_large_batches_and_give_the_same_latents(tiny_model, monkeypatch):
    import peftbooth.models.vae as vae_module
    from peftbooth.models.loading import load_components
    from peftbooth.models.vae import vae_calls

    vae = load_components(tiny_model).vae
    pixels = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        whole = vae.encode(pixels).latent_dist
        monkeypatch.setattr(vae_module, "VAE_PIXELS_PER_CALL", 2 * 32 * 32)  # two 32-px images per call
        decoded = recording_decode(monkeypatch)
        with vae_calls(vae):
            parts = vae.encode(pixels).latent_dist
            images = vae.decode(parts.mean).sample
            (tuple_images,) = vae.decode(parts.mean, return_dict=False)
    torch.testing.assert_close(parts.mean, whole.mean)
    torch.testing.assert_close(parts.std, whole.std)
    assert decoded == [2, 2, 1, 2, 2, 1] and images.shape == (5, 3, 32, 32)
    assert torch.equal(images, tuple_images)
    assert "encode" not in vae.__dict__ and "decode" not in vae.__dict__  # the wrappers are gone afterwards


# ---------------------------------------------------------------------------------------------------------------
# Generation: the VAE kept in fp32 beside half-precision weights


def test_generation_keeps_an_overflowing_vae_in_fp32_beside_half_weights(tmp_path):
    """An SDXL model generating in half precision (bf16 here: the CPU's half type; fp16 on a GPU without bf16)
    loads its VAE in fp32, from the file's own weights, and decodes the half-precision latents with it."""
    from peftbooth.cli import main
    from peftbooth.inference.pipeline import AdapterPipeline
    from peftbooth.models.loading import load_components

    model = tmp_path / "tiny-sdxl"
    assert main(["tiny-model", str(model), "--kind", "sdxl"]) == 0
    pipe = AdapterPipeline(str(model), device="cpu", dtype=BF16)
    assert (pipe.pipe.unet.dtype, pipe.pipe.text_encoder_2.dtype, pipe.pipe.vae.dtype) == (BF16, BF16, F32)
    stored = load_components(str(model)).vae.state_dict()
    assert all(torch.equal(v, stored[k]) for k, v in pipe.pipe.vae.state_dict().items())  # never rounded to bf16
    images = pipe.generate("a photo of sks dog", num_images=2, steps=2, height=64, width=64)
    assert len(images) == 2 and images[0].size == (64, 64)
