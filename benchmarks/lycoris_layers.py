"""LoHa / LoKr layer cost: PEFT's forward (rebuild the full delta weight, then a full-size matmul/conv) against
peftbooth's factored forward (factored.py), on layers shaped like SD 1.5's, forward + backward, in one process.

    python benchmarks/lycoris_layers.py                 # CPU: under a minute
    python benchmarks/lycoris_layers.py --device cuda   # GPU (bf16 autocast)

Batch 2 (1 instance + 1 class row) at 512 px: 64x64 latents. One JSON line per (adapter, layer) with the seconds
per forward+backward of the frozen layer alone, PEFT's adapter layer and the factored one, and the adapter's
overhead (adapter layer time / frozen layer time - 1) each way.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

# (name, module, input shape): SD 1.5 UNet layers at 512 px, batch 2
LAYERS = [
    ("attn1.to_q 320 @64x64", lambda: torch.nn.Linear(320, 320, bias=False), (2, 4096, 320)),
    ("ff.net.0.proj 640->5120 @32x32", lambda: torch.nn.Linear(640, 5120), (2, 1024, 640)),
    ("attn1.to_out 1280 @16x16", lambda: torch.nn.Linear(1280, 1280), (2, 256, 1280)),
    ("resnet conv1 640 3x3 @32x32", lambda: torch.nn.Conv2d(640, 640, 3, padding=1), (2, 640, 32, 32)),
    ("resnet conv2 1280 3x3 @16x16", lambda: torch.nn.Conv2d(1280, 1280, 3, padding=1), (2, 1280, 16, 16)),
]
RANK = 8


def config(adapter: str):
    from peft import LoHaConfig, LoKrConfig

    cls = {"loha": LoHaConfig, "lokr": LoKrConfig}[adapter]
    return cls(r=RANK, alpha=RANK, target_modules=["layer"])


def measure(model, x, device, dtype, repeats: int) -> float:
    """Best seconds of one forward + backward over `repeats` timed runs (after one warm-up)."""
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            out = model(x)
        out.float().pow(2).mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first run is the warm-up
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    from peft import get_peft_model

    from peftbooth.adapters import factored

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--adapters", default="loha,lokr")
    p.add_argument("--layers", type=int, default=len(LAYERS), help="only the first N layers of the table (CI: 1)")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    for adapter in args.adapters.split(","):
        for name, make, shape in LAYERS[:args.layers]:
            frozen = torch.nn.Sequential()
            frozen.add_module("layer", make())
            frozen.to(device, dtype=dtype).requires_grad_(False)
            x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)  # a gradient flows on
            peft_model = get_peft_model(copy.deepcopy(frozen), config(adapter))
            for q in peft_model.parameters():
                if q.requires_grad:  # fp32 adapter weights over frozen compute-dtype ones, as in training
                    q.data = (torch.randn_like(q, dtype=torch.float32) * 0.01)
            fast = copy.deepcopy(peft_model)
            factored.install(fast)
            base_s = measure(frozen, x, device, dtype, args.repeats)
            peft_s = measure(peft_model, x, device, dtype, args.repeats)
            fast_s = measure(fast, x, device, dtype, args.repeats)
            print(json.dumps({
                "adapter": adapter, "rank": RANK, "layer": name, "device": device.type, "dtype": str(dtype)[6:],
                "frozen_ms": round(base_s * 1e3, 2), "peft_ms": round(peft_s * 1e3, 2),
                "factored_ms": round(fast_s * 1e3, 2), "speedup": round(peft_s / fast_s, 2),
                "overhead_peft": round(peft_s / base_s - 1, 2), "overhead_factored": round(fast_s / base_s - 1, 2),
            }), flush=True)


if __name__ == "__main__":
    main()
