"""Estimated peak GPU memory of a peftbooth run, phase by phase, on a machine without a GPU.

    python benchmarks/memory_estimate.py --shape sd15 --resolution 512                 # LoRA r16 + text encoder
    python benchmarks/memory_estimate.py --shape sdxl --resolution 1024 --settings low-memory
    python benchmarks/memory_estimate.py --shape tiny --resolution 64                  # CI's smallest mode, seconds
    python benchmarks/memory_estimate.py --sd3-table         # SD 3.5 Medium, 1024 px: the formula's table, instant
    python benchmarks/memory_estimate.py --sd3-trace 4,2,32,333,1,1   # blocks,MMDiT-X,latents,text,checkpoint,grad

Each row is one phase of a run with prior preservation and a text-encoder adapter, under one setting: `default`
(train's defaults, at --mixed-precision) or `low-memory` (the preset, peftbooth.training.memory.LOW_MEMORY):
  caching       the VAE encodes the photos at full resolution, min(--sample-batch-size, VAE chunk) per call, and
                the text encoder(s) the two prompts; the UNet is not on the device yet (train.build_run moves it
                there after the caches)
  class-images  the base model (UNet, text encoder(s), VAE) with its frozen weights in the compute dtype (the VAE
                in fp32 where its config says force_upcast, as SDXL's does): one denoising step of
                --sample-batch-size images under classifier-free guidance (2 rows each), then the VAE decoding them
                in chunks (models.vae_rows_per_call: 1 image at 1024 px, 4 at 512 px; an fp32 VAE outside
                autocast). This models training as changed for issue 22 item 2: frozen weights in the compute
                dtype, the VAE in bounded chunks (before, the frozen weights stayed fp32 under autocast).
  training      the UNet's frozen weights in the compute dtype with a LoRA (fp32), the text encoder(s) likewise
                (trained: they stay on the device), AdamW's state already allocated, one step of 1 instance +
                1 class row (x --train-batch-size): text encoder(s) forward, UNet forward + backward, AdamW step.
                The VAE is off the device (its latents are cached).
Method: the models are built from their configs on the meta device and given fake tensors (FakeTensorMode: shapes
and dtypes, no data, no memory), then run inside torch's MemTracker, which adds up the storage of every live
tensor (rounded up to the CUDA caching allocator's 512-byte blocks) and keeps the peak. Autocast is CPU autocast
with CUDA autocast's fp32 rule for GroupNorm and LayerNorm added, so the activation dtypes are a GPU run's.
It estimates `torch.cuda.max_memory_allocated`, not a measurement: the allocator's fragmentation, the CUDA
context (~0.3-0.5 GiB, outside PyTorch's count), cuBLAS/cuDNN workspaces and kernel choices are not in it.
A training row takes minutes for sd15 and longer for sdxl on 2 CPU cores (the tracker's bookkeeping per op).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from unittest import mock

# SDXL base 1.0's component configs (its unet/, text_encoder/, text_encoder_2/ and vae/ config.json): the shapes
# only; the weights are never made. UNet 2.57 B parameters, text encoders 123 M + 695 M, VAE 84 M.
SDXL = dict(
    unet=dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
              cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
              projection_class_embeddings_input_dim=2816, norm_num_groups=32),
    vae=dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=1024, layers_per_block=2,
             scaling_factor=0.13025, force_upcast=True),
    text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, hidden_act="quick_gelu"),
    text_2=dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                num_attention_heads=20, hidden_act="gelu", projection_dim=1280),
)
PHASES = ("caching", "class-images", "training")


def shapes(name: str) -> dict:
    from peftbooth.models.tiny import SHAPES

    return SDXL if name == "sdxl" else SHAPES[name]


def build(shape: dict, parts: tuple[str, ...]) -> dict:
    """The named components (unet, vae, text, text_2) on the meta device: no memory, no init maths."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = {}
    with torch.device("meta"):
        if "unet" in parts:
            out["unet"] = UNet2DConditionModel(in_channels=4, out_channels=4, **shape["unet"])
        if "vae" in parts:
            out["vae"] = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **shape["vae"])
        if "text" in parts:
            out["text"] = CLIPTextModel(CLIPTextConfig(max_position_embeddings=77, **shape["text"]))
        if "text" in parts and "text_2" in shape:
            out["text_2"] = CLIPTextModelWithProjection(CLIPTextConfig(max_position_embeddings=77, **shape["text_2"]))
    for model in out.values():
        model.requires_grad_(False)  # frozen: only adapters attached later are trained
    return out


def make_fake(model, mode, dtype) -> None:
    """Every parameter and buffer of the (meta) `model` becomes a fake CPU tensor of its shape: frozen floating
    weights in `dtype`, trainable ones (adapters) in fp32, as precision.place_frozen leaves them."""
    import torch

    def fake(t, to):
        with mode:
            return torch.empty(t.shape, dtype=to if t.is_floating_point() else t.dtype)

    for module in model.modules():
        for name, t in list(module._parameters.items()):
            if t is not None:
                to = torch.float32 if t.requires_grad else dtype
                module._parameters[name] = torch.nn.Parameter(fake(t, to), t.requires_grad)
        for name, t in list(module._buffers.items()):
            if t is not None:
                module._buffers[name] = fake(t, dtype)


def norms_in_fp32():
    """group_norm and layer_norm in fp32, as under CUDA autocast (CPU autocast keeps them in bf16).

    nn.GroupNorm / nn.LayerNorm look `F.group_norm` / `F.layer_norm` up at each call, so replacing those two
    functions reaches every norm, also when gradient checkpointing reruns the forward inside backward."""
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


def tracker_for(*external):
    """A MemTracker counting `external` (modules, optimizer, inputs). It hooks every parameter's gradient, which a
    frozen weight refuses; without the hooks every tensor is still counted (gradients land under Temp)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    track = tracker._track_module_params_and_buffers
    tracker._track_module_params_and_buffers = lambda module, install_grad_hooks=True: track(module, False)
    tracker.track_external(*external)
    return tracker


def peak_mib(tracker) -> dict:
    by_kind = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return {k: round(v / 2**20, 1) for k, v in by_kind.items()}


def encode(encoders: list, ids):
    """models.encode_text on fake ids: (context (N, 77, D), pooled (N, P) or None)."""
    from peftbooth.models.components import encode_text

    return encode_text(encoders, [ids] * len(encoders))


def added(pooled, rows: int, dtype):
    import torch

    return None if pooled is None else {"text_embeds": pooled, "time_ids": torch.zeros(rows, 6, dtype=dtype)}


def vae_dtype(shape: dict, dtype):
    import torch

    return torch.float32 if shape["vae"].get("force_upcast") else dtype  # speed.upcast_vae's default


def estimate_caching(shape: dict, resolution: int, dtype, chunk: int) -> dict:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    m = build(shape, ("vae", "text"))
    mode = FakeTensorMode()
    vdt = vae_dtype(shape, dtype)
    make_fake(m["vae"], mode, vdt)
    encoders = [m[k] for k in ("text", "text_2") if k in m]
    for e in encoders:
        make_fake(e, mode, dtype)
    with mode, torch.no_grad():
        pixels = torch.empty(chunk, 3, resolution, resolution, dtype=vdt)
        ids = torch.zeros(2, 77, dtype=torch.long)  # instance and class prompt
        tracker = tracker_for(m["vae"], *encoders, pixels, ids)
        with tracker:
            dist = m["vae"].encode(pixels).latent_dist
            kept = (dist.mean, dist.std)  # what the latent cache keeps; the rest is freed
            del dist
            states = encode(encoders, ids)
        del kept, states
    return peak_mib(tracker)


def estimate_class_images(shape: dict, resolution: int, dtype, batch: int, chunk: int) -> dict:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    m = build(shape, ("unet", "vae", "text"))
    mode = FakeTensorMode()
    vdt = vae_dtype(shape, dtype)
    make_fake(m["vae"], mode, vdt)
    encoders = [m[k] for k in ("text", "text_2") if k in m]
    for model in (m["unet"], *encoders):
        make_fake(model, mode, dtype)
    h = resolution // 8
    with mode, torch.no_grad():
        ids = torch.zeros(2, 77, dtype=torch.long)  # the class prompt and the empty prompt
        latents = torch.empty(batch, 4, h, h, dtype=dtype)
        tracker = tracker_for(m["unet"], m["vae"], *encoders, ids, latents)
        # the frozen weights in the compute dtype under CUDA's autocast (precision.Precision.sampling_autocast)
        autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
        with tracker, norms_in_fp32(), autocast:
            context, pooled = encode(encoders, ids)
            context = context.repeat_interleave(batch, 0)  # (2 * batch, 77, D): guided and unguided rows
            pooled = None if pooled is None else pooled.repeat_interleave(batch, 0)
            pred = m["unet"](torch.cat([latents] * 2), torch.tensor([500]), context,
                             added_cond_kwargs=added(pooled, 2 * batch, dtype)).sample
            latents = latents - pred[:batch] * 0.1  # the scheduler's update (shape only)
            del pred, context, pooled
            images = []
            # an fp32 VAE runs outside autocast (models.vae_calls); chunks of `chunk` images per call
            with torch.autocast("cpu", enabled=False) if vdt == torch.float32 else contextlib.nullcontext():
                for part in latents.split(chunk):
                    tracker.reset_mod_stats()  # per-module stats are per call; the overall peak is kept
                    images.append(m["vae"].decode(part.to(vdt)).sample.float())
            del images
    return peak_mib(tracker)


def estimate_training(shape: dict, resolution: int, dtype, rows: int, checkpointing: bool, rank: int,
                      train_text_encoder: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    from peftbooth.adapters.inject import attach
    from peftbooth.adapters.peft_config import TEXT_ENCODER_PRESETS, UNET_PRESETS
    from peftbooth.config.sections import TrainConfig

    cfg = TrainConfig()
    cfg.unet_adapter.adapter, cfg.unet_adapter.rank, cfg.unet_adapter.target_modules = "lora", rank, "all"
    cfg = cfg.resolved()
    m = build(shape, ("unet", "text"))
    unet = attach(m["unet"], cfg.unet_adapter, UNET_PRESETS, "")
    encoders = [m[k] for k in ("text", "text_2") if k in m]
    if train_text_encoder:  # SDXL's first encoder: not its last layer (train.used_text_layers)
        last = encoders[0].config.num_hidden_layers - 1
        encoders = [attach(e, cfg.text_encoder_adapter, TEXT_ENCODER_PRESETS, "text-encoder-",
                              layers=list(range(last)) if len(encoders) == 2 and i == 0 else None)
                    for i, e in enumerate(encoders)]
    mode = FakeTensorMode()
    for model in (unet, *encoders):
        make_fake(model, mode, dtype)
    if checkpointing:
        m["unet"].enable_gradient_checkpointing()
        if train_text_encoder:
            for e in encoders:
                e.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    unet.train()
    h = resolution // 8
    with mode:
        trainable = [p for model in (unet, *encoders) for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=False)
        for p in trainable:  # AdamW's two moment buffers exist from the second step on: make them before tracking
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        latents, noise = torch.empty(rows, 4, h, h, dtype=dtype), torch.empty(rows, 4, h, h, dtype=dtype)
        ids, timesteps = torch.zeros(rows, 77, dtype=torch.long), torch.tensor([100, 800] * (rows // 2))
        tracker = tracker_for(unet, *encoders, optimizer, latents, noise, ids)
        with tracker, norms_in_fp32():  # around backward too: gradient checkpointing reruns the forward there
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                if train_text_encoder:
                    context, pooled = encode(encoders, ids)
                else:  # cached text states
                    context = torch.empty(rows, 77, shape["unet"]["cross_attention_dim"], dtype=dtype)
                    pooled = torch.empty(rows, shape["text_2"]["projection_dim"], dtype=dtype) if "text_2" in shape else None
                pred = unet(latents, timesteps, context, added_cond_kwargs=added(pooled, rows, dtype)).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            del pred, loss, context, pooled
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    row = peak_mib(tracker)
    row["trainable_params"] = sum(p.numel() for p in trainable)
    return row


def settings(name: str, mixed_precision: str):
    """(TrainConfig of the setting): train's defaults at --mixed-precision, or the low-memory preset over them."""
    from peftbooth.config.sections import TrainConfig
    from peftbooth.training.memory import LOW_MEMORY, apply_preset

    cfg = TrainConfig()
    cfg.train.mixed_precision = mixed_precision
    if name == "low-memory":
        apply_preset(cfg, LOW_MEMORY)
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=("tiny", "tiny-sdxl", "sd15", "sdxl"), default="sd15")
    p.add_argument("--resolution", type=int, default=None, help="default 512 (sd15), 1024 (sdxl), 64 (tiny)")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="bf16",
                   help="the `default` setting's (the low-memory preset sets its own)")
    p.add_argument("--settings", default="default,low-memory")
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--no-text-encoder", action="store_true", help="no text-encoder adapter (cached text states)")
    p.add_argument("--vae-chunk", type=int, default=None,
                   help="images per VAE call, encode and decode (default: training's, models.vae_rows_per_call)")
    p.add_argument("--output", help="also append the JSON rows to this file")
    p.add_argument("--sd3-table", action="store_true", help="print SD 3.5 Medium's estimate table (the formula)")
    p.add_argument("--sd3-trace", help="BLOCKS,DUAL,LATENT,TEXT,CHECKPOINTING,GRAD: one SD3 calibration trace")
    args = p.parse_args()
    if args.sd3_table or args.sd3_trace:
        from memory_sd3_trace import sd3_table, sd3_trace  # this folder: SD 3.5 Medium's rows

        if args.sd3_trace:
            b, d, lat, txt, gc, grad = map(int, args.sd3_trace.split(","))
            rows = [{"sd3_trace": args.sd3_trace, **sd3_trace(b, d, lat, txt, bool(gc), bool(grad))}]
        else:
            rows = sd3_table()
        for row in rows:
            print(json.dumps(row), flush=True)
            if args.output:
                with open(args.output, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if args.sd3_table:
            print("| T5 | gradient checkpointing | caching | class images | training | peak + margin |", file=sys.stderr)
            for r in rows:
                print(f"| {'yes' if r['t5'] else 'no (--no-t5)'} | {'yes' if r['gradient_checkpointing'] else 'no'} | "
                      f"{r['caching_gib']} | {r['class-images_gib']} | {r['training_gib']} | "
                      f"{r['peak_with_margin_gib']} ({r['peak_phase']}) |", file=sys.stderr)
        return
    resolution = args.resolution or {"sd15": 512, "sdxl": 1024}.get(args.shape, 64)
    if args.vae_chunk is None:
        from peftbooth.models.vae import vae_rows_per_call

        args.vae_chunk = vae_rows_per_call(resolution, resolution)
    from peftbooth.cli import quiet_libraries
    from peftbooth.precision import DTYPES

    quiet_libraries()
    shape = shapes(args.shape)
    for setting in args.settings.split(","):
        cfg = settings(setting, args.mixed_precision)
        t, d = cfg.train, cfg.data
        dtype = DTYPES[t.mixed_precision]
        chunk = min(d.sample_batch_size, args.vae_chunk)  # models.vae_calls splits a batch into such calls
        for phase in args.phases.split(","):
            start = time.perf_counter()
            if phase == "caching":
                mib = estimate_caching(shape, resolution, dtype, chunk)
            elif phase == "class-images":
                mib = estimate_class_images(shape, resolution, dtype, d.sample_batch_size, chunk)
            else:
                mib = estimate_training(shape, resolution, dtype, 2 * d.train_batch_size, t.gradient_checkpointing,
                                        args.rank, not args.no_text_encoder)
            row = {"shape": args.shape, "resolution": resolution, "setting": setting, "phase": phase,
                   "mixed_precision": t.mixed_precision, "gradient_checkpointing": t.gradient_checkpointing,
                   "train_batch_size": d.train_batch_size, "sample_batch_size": d.sample_batch_size,
                   "vae_chunk": chunk, "rank": args.rank, "text_encoder_adapter": not args.no_text_encoder,
                   "trainable_params": mib.pop("trainable_params", None),
                   "peak_mb_estimate": mib.pop("Total"), "peak_breakdown_mb": mib,
                   "seconds": round(time.perf_counter() - start, 1)}
            line = json.dumps(row)
            print(line, flush=True)
            if args.output:
                with open(args.output, "a") as f:
                    f.write(line + "\n")
            print(f"{setting} {phase}: {row['peak_mb_estimate']} MiB in {row['seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
