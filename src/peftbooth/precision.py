"""The one precision and placement policy: which device, and which dtype for each component, in every consumer.

Training, class images, validation, the proxies, `eval`, `generate`, `fuse` and the UI all ask here; no other
module picks a half-precision dtype or a device. The policy is a pure function of

- the model family ("sd" for SD 1.x / 2.x, "sdxl"),
- the VAE's config (`force_upcast`: diffusers' mark of a VAE that overflows in fp16),
- the precision asked for (`--mixed-precision` for training; the device's best half type for generation),
- the device, and whether it has bf16,

so it is tested as a table (tests/test_precision.py) without a GPU.

| consumer                         | device            | UNet, text encoders       | VAE                          |
|----------------------------------|-------------------|---------------------------|------------------------------|
| training (frozen weights)        | Accelerate's      | --mixed-precision's dtype | fp32 if it would overflow    |
| training (adapter weights)       | Accelerate's      | fp32 (exact optimizer)    |                              |
| class images during training     | Accelerate's      | the training compute dtype, under half autocast on a GPU |  |
| generate, eval, UI, class-images | cuda if any, else cpu | bf16 (fp16 without bf16) on a GPU, fp32 on the CPU | as training |
| fuse                             | cpu               | fp32 (the merge is exact; the saved pipeline is fp32) | fp32 |
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .config.sections import UsageError

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --mixed-precision -> dtype


@dataclass(frozen=True)
class Precision:
    """Where and in which dtypes a pipeline's components run."""

    device: torch.device
    compute: torch.dtype  # frozen UNet and text-encoder weights; the autocast dtype when it is half
    vae: torch.dtype  # fp32 where the VAE overflows in half precision, else `compute`
    adapter: torch.dtype = torch.float32  # trained weights: the optimizer sees exact fp32 values and gradients

    @property
    def is_half(self) -> bool:
        return self.compute != torch.float32

    def sampling_autocast(self):
        """The autocast region for sampling with the run's frozen weights (class images during training).

        The weights are already in `compute`; on a GPU whose run trains in fp32, the frozen weights stay fp32
        (training needs them so) and the matmuls run in the device's half type, as the class-images command's
        half-precision pipeline does. On the CPU nothing is autocast: the images equal the command's bit for bit.
        """
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.compute if self.is_half else half_dtype(self.device))


def default_device(device: str | torch.device | None = None) -> torch.device:
    """The device of commands that are not launched by Accelerate: the one asked for, else cuda when present."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def accelerate_device(environ=None) -> torch.device:
    """The device type Accelerate will train on, known without building its state: cuda when present, unless
    ACCELERATE_USE_CPU is set (what `--num-processes` sets on a machine without a GPU, or a user who wants the CPU)."""
    import os

    use_cpu = (os.environ if environ is None else environ).get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return torch.device("cpu") if use_cpu else default_device()


def half_dtype(device: torch.device, bf16_supported: bool | None = None) -> torch.dtype:
    """The half type to generate in on `device`: bf16 where the GPU has it (fp16's range overflows in SDXL's VAE
    and in some text encoders), else fp16. The CPU generates in fp32: half precision is slow there."""
    if device.type != "cuda":
        return torch.float32
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported else torch.float16


def vae_dtype(compute: torch.dtype, family: str, force_upcast: bool, upcast_vae: bool | None = None) -> torch.dtype:
    """The VAE's dtype beside frozen weights in `compute`.

    `--upcast-vae` decides when given. Otherwise an SDXL-family VAE whose config has `force_upcast` (SDXL's own,
    or the original SDXL VAE given as --vae) runs in fp32: in fp16 it overflows to NaN latents, and in bf16 its
    decoded images lose detail. diffusers' SDXL pipeline reads the same flag; an fp16-fixed VAE sets it False.
    SD 1.x / 2.x VAEs run in half precision (their configs leave `force_upcast` at diffusers' default, True,
    though they do not overflow; diffusers' SD pipeline ignores it too).
    """
    if compute == torch.float32:
        return torch.float32
    if upcast_vae is not None:
        return torch.float32 if upcast_vae else compute
    return torch.float32 if family == "sdxl" and force_upcast else compute


def check_training(mixed_precision: str, device: torch.device | None = None, bf16_supported: bool | None = None
                   ) -> None:
    """Refuse a --mixed-precision the training device cannot run, before anything is loaded. `device` None:
    Accelerate's, asked only for fp16 (asking builds Accelerate's state; bf16 is refused without touching a GPU)."""
    if mixed_precision == "bf16" and (torch.cuda.is_available() if device is None else device.type == "cuda"):
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
        if not bf16_supported:
            raise UsageError("--mixed-precision bf16: this GPU has no bf16 support; use --mixed-precision fp16")
    if mixed_precision == "fp16":
        if device is None:
            from accelerate import PartialState

            device = PartialState().device
        if device.type == "cpu":
            # Accelerate runs fp16 on the CPU with neither autocast nor a gradient scaler: fp16 gradients would
            # underflow unseen
            raise UsageError("--mixed-precision fp16: needs a GPU (on the CPU there is no fp16 autocast or "
                             "gradient scaler); use --mixed-precision bf16 or no")


def for_training(mixed_precision: str, device: torch.device, family: str, force_upcast: bool,
                 upcast_vae: bool | None = None) -> Precision:
    """Training (and the class images, validation and proxies made inside it) with `--mixed-precision`."""
    compute = DTYPES[mixed_precision]
    return Precision(torch.device(device), compute, vae_dtype(compute, family, force_upcast, upcast_vae))


def for_inference(device: torch.device, family: str, force_upcast: bool, upcast_vae: bool | None = None,
                  bf16_supported: bool | None = None, compute: torch.dtype | None = None) -> Precision:
    """Generation from a model loaded from disk: generate, eval, the UI's "try it", the class-images command.
    `compute` overrides the device's half type (a caller that asks for fp32 on a GPU)."""
    device = torch.device(device)
    compute = compute or half_dtype(device, bf16_supported)
    return Precision(device, compute, vae_dtype(compute, family, force_upcast, upcast_vae))


def for_fuse() -> Precision:
    """Merging adapters into the base weights: fp32 on the CPU, so the merge adds no rounding of its own and the
    saved pipeline can be loaded in any dtype afterwards."""
    return Precision(torch.device("cpu"), torch.float32, torch.float32)


def place_frozen(model: torch.nn.Module, precision: Precision) -> None:
    """Move `model` to the policy's device with its frozen weights in `compute` and its trainable (adapter)
    weights in fp32."""
    model.to(precision.device, dtype=precision.compute)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(precision.adapter)


def place_pipeline(pipe, precision: Precision):
    """A pipeline loaded from disk, on the policy's device and dtypes (the VAE possibly fp32 beside half weights)."""
    pipe.to(precision.device, dtype=precision.compute)
    pipe.vae.to(dtype=precision.vae)
    return pipe
