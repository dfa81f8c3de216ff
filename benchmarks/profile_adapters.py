"""Where the step time of each adapter type goes: torch.profiler over the `floor` step (UNet forward + backward +
AdamW on fixed tensors), grouped into the adapter's own work and the base model's.

    python benchmarks/profile_adapters.py --model tiny            # CPU
    python benchmarks/profile_adapters.py --model sd15            # GPU

Prints, per adapter type, the share of self time in the top operators and in PEFT's adapter modules (LoRA:
two thin matmuls per layer; LoHa / LoKr: the full delta weight is rebuilt every forward, then one more matmul or
convolution with it, and the same again in backward).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--adapters", default="lora,loha,lokr")
    args = p.parse_args()
    args.resolution = args.resolution or (64 if args.model == "tiny" else 512)

    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile, record_function
    from train_throughput import RANKS

    from peftbooth.adapters.inject import attach
    from peftbooth.adapters.peft_config import UNET_PRESETS
    from peftbooth.cli import quiet_libraries
    from peftbooth.config.sections import TrainConfig
    from peftbooth.models.loading import cache_dir, load_components
    from peftbooth.models.tiny import build_tiny_model

    quiet_libraries()
    path = cache_dir() / ("tiny-sd" if args.model == "tiny" else "sd15-random")
    if not (path / "model_index.json").exists():
        build_tiny_model(path, shape=args.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    for adapter in args.adapters.split(","):
        cfg = TrainConfig()
        cfg.unet_adapter.adapter, cfg.unet_adapter.rank, cfg.unet_adapter.target_modules = adapter, RANKS[adapter], "all"
        cfg = cfg.resolved()
        c = load_components(str(path))
        unet = attach(c.unet, cfg.unet_adapter, UNET_PRESETS, "").to(device, dtype=dtype)
        for prm in unet.parameters():
            if prm.requires_grad:
                prm.data = prm.data.float()
        opt = torch.optim.AdamW([q for q in unet.parameters() if q.requires_grad], lr=1e-4)
        h = args.resolution // 2 ** (len(c.vae.config.block_out_channels) - 1)
        x = torch.randn(2, 4, h, h, device=device, dtype=dtype)
        ctx = torch.randn(2, 77, c.text_encoder.config.hidden_size, device=device, dtype=dtype)
        t = torch.tensor([100, 800], device=device)

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = F.mse_loss(unet(x, t, ctx).sample.float(), x.float())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                with record_function("step"):
                    step()
        events = prof.key_averages()
        attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        total = sum(getattr(e, attr) for e in events) or 1
        top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:6]
        print(json.dumps({
            "adapter": adapter, "device": device.type, "trainable": sum(q.numel() for q in unet.parameters() if q.requires_grad),
            "top_ops_share": {e.key: round(getattr(e, attr) / total, 3) for e in top},
        }))


if __name__ == "__main__":
    main()
