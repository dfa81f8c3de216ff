"""Estimated peak GPU memory of peftbooth's training step, on a machine without a GPU.

    python benchmarks/memory_estimate.py                      # SD 1.5 shapes, 512 px, bf16, LoRA r16 'all'
    python benchmarks/memory_estimate.py --adapters lora,loha,lokr --resolution 512
    python benchmarks/memory_estimate.py --adapters loha,lokr --checkpointing off --peft-output-dtype

What is on the GPU during peftbooth's training (latents and text states cached, VAE and text encoder moved off
the GPU): the UNet's frozen weights in the compute dtype, the fp32 adapter weights, their gradients and AdamW's two
moment buffers, one batch (1 instance + 1 class row: latents, noise, context) and the step's activations. This
script builds exactly that, with SD 1.5's shapes, under FakeTensorMode (tensors with shapes and dtypes but no data,
so no compute and no memory), and runs two optimizer steps (the second with AdamW's state in place) inside
torch's MemTracker, which adds up the storage of every live tensor (rounded up to the CUDA caching allocator's
512-byte blocks) and keeps the peak. A first line estimates the caching phase before training (the VAE encoding
the photos, the text encoder the prompts).
The step runs under CPU autocast with CUDA autocast's fp32 rule for GroupNorm and LayerNorm added (CPU autocast
keeps them in bf16/fp16; CUDA autocast runs them in fp32, so the next layer gets fp32 input): the activation
dtypes are a GPU run's.
About 3 minutes per line on 2 CPU cores (the tracker's bookkeeping per operation, not the maths).

It is an estimate of `torch.cuda.max_memory_allocated`, not a measurement. Not counted: the caching allocator's
fragmentation, cuBLAS/cuDNN workspaces, and kernels that keep different intermediates on a GPU than on the CPU
(the fake tensors follow the CPU's operator choices; SDPA on both keeps the output and the log-sum-exp, not the
attention matrix). The GPU check in benchmarks/gpu_session.sh measures the real figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

RANKS = {"lora": 16, "loha": 8, "lokr": 8}


def make_fake(model, mode) -> None:
    """Every parameter and buffer of `model` becomes a fake tensor of the same shape and dtype: from here on
    nothing is computed and no memory is taken."""
    import torch

    for module in model.modules():
        for name, t in list(module._parameters.items()):
            if t is not None:
                module._parameters[name] = torch.nn.Parameter(mode.from_tensor(t.detach()), t.requires_grad)
        for name, t in list(module._buffers.items()):
            if t is not None:
                module._buffers[name] = mode.from_tensor(t)


def estimate_caching(resolution: int, dtype_name: str, batch: int) -> dict:
    """Peak while the caches are built: the VAE encoding `batch` photos (--sample-batch-size) and the text encoder
    encoding the prompts, both in the compute dtype, with the UNet's weights off the device (it moves there after
    the caches; before, its frozen weights sat beside them: `with_unet_mb`)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import CLIPTextConfig, CLIPTextModel

    from peftbooth.models import SHAPES
    from peftbooth.train import weight_dtype_for

    dtype = weight_dtype_for(dtype_name)
    shapes = SHAPES["sd15"]
    with torch.device("meta"):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **shapes["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(max_position_embeddings=77, **shapes["text"]))
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **shapes["unet"])
    unet_mb = sum(p.numel() for p in unet.parameters()) * torch.empty((), dtype=dtype).element_size() / 2**20
    mode = FakeTensorMode()
    for model in (vae, text_encoder):
        model.to_empty(device="cpu").to(dtype=dtype).eval()
        make_fake(model, mode)
    with mode, torch.no_grad():
        pixels = torch.randn(batch, 3, resolution, resolution, dtype=dtype)
        ids = torch.zeros(2, 77, dtype=torch.long)  # instance and class prompt
        tracker = MemTracker()
        tracker.track_external(vae, text_encoder, pixels, ids)
        with tracker:
            dist = vae.encode(pixels).latent_dist
            kept = (dist.mean, dist.std)  # what the cache keeps; the rest is freed
            del dist
            states = text_encoder(ids)[0]
        total = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"] / 2**20
    del kept, states
    return {"phase": "caching", "resolution": resolution, "dtype": dtype_name, "sample_batch_size": batch,
            "peak_mb_estimate": round(total, 1), "with_unet_mb": round(total + unet_mb, 1)}


def norms_in_fp32():
    """A context in which group_norm and layer_norm run in fp32, as under CUDA autocast.

    nn.GroupNorm / nn.LayerNorm look `F.group_norm` / `F.layer_norm` up at each call, so replacing those two
    functions reaches every norm, also when gradient checkpointing reruns the forward inside backward (a torch
    function mode would not: backward runs inside the mode's own handler, where the mode is off)."""
    import contextlib
    from unittest import mock

    import torch
    import torch.nn.functional as F

    def up(t):
        return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    def in_fp32(fn):
        return lambda *args, **kwargs: fn(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(F, "group_norm", in_fp32(F.group_norm)))
    stack.enter_context(mock.patch.object(F, "layer_norm", in_fp32(F.layer_norm)))
    return stack


def peft_output_dtype(model) -> None:
    """Give the LoHa/LoKr layers PEFT's output dtype rule (the input's dtype) on top of peftbooth's forward.
    (PEFT's forward itself cannot run here: its module-dropout coin needs a real random number.)"""
    from peftbooth import factored

    for module in model.modules():
        if hasattr(module, factored.ORIGINAL_FORWARD):
            module.forward = lambda x, *a, _ours=module.forward, **k: _ours(x, *a, **k).to(x.dtype)


def estimate(adapter: str, resolution: int, dtype_name: str, checkpointing: bool, input_dtype: bool = False) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from peftbooth import adapters as ad
    from peftbooth import factored
    from peftbooth.config import TrainConfig
    from peftbooth.models import SHAPES
    from peftbooth.train import to_compute_dtype, weight_dtype_for

    start = time.perf_counter()
    dtype = weight_dtype_for(dtype_name)
    cfg = TrainConfig()
    cfg.unet_adapter.adapter, cfg.unet_adapter.rank, cfg.unet_adapter.target_modules = adapter, RANKS[adapter], "all"
    # The model is made on the meta device and given uninitialised CPU memory (no init maths for 860M weights);
    # PEFT then attaches the adapters as in train.build_run: frozen weights in the compute dtype, adapters fp32.
    with torch.device("meta"):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **SHAPES["sd15"]["unet"])
    unet.to_empty(device="cpu")
    model = ad.attach(unet, cfg.resolved().unet_adapter, ad.UNET_PRESETS, "")
    factored.install(model)  # as training does
    if input_dtype:
        peft_output_dtype(model)
    to_compute_dtype(model, torch.device("cpu"), dtype)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    model.train()
    print(f"model ready at {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    mode = FakeTensorMode()
    make_fake(model, mode)
    with mode:
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=False)
        h = resolution // 8
        latents = torch.randn(2, 4, h, h, dtype=dtype)  # 1 instance + 1 class row
        noise = torch.randn(2, 4, h, h, dtype=dtype)
        context = torch.randn(2, 77, 768, dtype=dtype)
        timesteps = torch.tensor([100, 800])
        tracker = MemTracker()
        # MemTracker hooks every parameter's gradient, which a frozen weight refuses; without the hooks every
        # tensor is still counted (it tracks all storages made under it), gradients land under Temp
        track = tracker._track_module_params_and_buffers
        tracker._track_module_params_and_buffers = lambda module, install_grad_hooks=True: track(module, False)
        tracker.track_external(model, optimizer, latents, noise, context, timesteps)
        with tracker:
            for step in range(2):  # the second step holds the optimizer state from the start: the steady peak
                if step:
                    tracker.reset_mod_stats()  # per-module stats are per iteration; the overall peak is kept
                print(f"step {step} at {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
                with norms_in_fp32():  # around backward too: gradient checkpointing reruns the forward there
                    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                        pred = model(latents, timesteps, context).sample
                    loss = F.mse_loss(pred.float(), noise.float())
                    loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        peak = tracker.get_tracker_snapshot("peak")
    by_kind = next(iter(peak.values()))
    mib = {k: round(v / 2**20, 1) for k, v in by_kind.items()}
    return {"adapter": adapter, "rank": RANKS[adapter], "resolution": resolution, "dtype": dtype_name,
            "gradient_checkpointing": checkpointing, "peft_output_dtype": input_dtype,
            "trainable_params": sum(p.numel() for p in trainable),
            "peak_mb_estimate": mib.pop("Total"), "peak_breakdown_mb": mib}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", default="lora")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="bf16")
    p.add_argument("--sample-batch-size", type=int, default=4, help="photos per VAE call while caching (default 4)")
    p.add_argument("--checkpointing", choices=("both", "off", "on"), default="both",
                   help="rows without and/or with gradient checkpointing (default both)")
    p.add_argument("--peft-output-dtype", action="store_true",
                   help="LoHa/LoKr layers return the input's dtype, as PEFT's forward does (fp32 after a norm)")
    p.add_argument("--no-caching-row", action="store_true", help="skip the caching-phase line")
    args = p.parse_args()
    from peftbooth.cli import quiet_libraries

    quiet_libraries()
    if not args.no_caching_row:
        print(json.dumps(estimate_caching(args.resolution, args.mixed_precision, args.sample_batch_size)), flush=True)
    settings = {"both": (False, True), "off": (False,), "on": (True,)}[args.checkpointing]
    for adapter in args.adapters.split(","):
        for checkpointing in settings:
            row = estimate(adapter, args.resolution, args.mixed_precision, checkpointing, args.peft_output_dtype)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
