"""How training runs fast without changing what it computes: offloading cached models, torch.compile and the
optimizer's kernel. train.build_run decides when each applies; these say how. Dtypes are precision.py's.
"""

from __future__ import annotations

import shutil
import warnings

import torch


def offload(model: torch.nn.Module, device: torch.device) -> None:
    """Move a model whose outputs are cached off the GPU for the rest of training."""
    if device.type == "cuda":
        model.to("cpu")
        torch.cuda.empty_cache()


def maybe_compile(unet: torch.nn.Module, accelerator, mode: str = "default") -> torch.nn.Module:
    """torch.compile the UNet; where compiling cannot work, warn and train eagerly instead of failing.

    With the adapters in place the UNet compiles to one graph for LoRA, and for LoHa/LoKr through
    factored.forward_without_coin (PEFT's own LoHa/LoKr forward splits it at every adapted layer).
    """
    import torch._dynamo

    why = None
    if not torch._dynamo.is_dynamo_supported():
        why = "torch.compile is not supported on this Python/platform"
    elif accelerator.device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++")):
        why = "no C++ compiler found for the CPU backend"
    if why:
        warnings.warn(f"--compile: {why}; training eagerly", stacklevel=2)
        return unet
    if mode in ("reduce-overhead", "max-autotune") and accelerator.device.type != "cuda":
        warnings.warn(f"--compile-mode {mode}: CUDA graphs need a CUDA device; compiled without them on "
                      f"{accelerator.device.type}", stacklevel=2)
    compiled = torch.compile(unet, mode=None if mode == "default" else mode)
    # An op the compiler cannot handle falls back to eager for that graph, with a warning, instead of crashing:
    # suppress_errors only while this UNet runs (compiling happens inside its calls), not for the whole process.
    compiled.forward = suppress_compile_errors(compiled.forward)
    return compiled


def suppress_compile_errors(forward):
    import functools

    import torch._dynamo

    @functools.wraps(forward)
    def scoped(*args, **kwargs):
        with torch._dynamo.config.patch(suppress_errors=True):
            return forward(*args, **kwargs)

    return scoped


def make_optimizer(params: list[dict], t, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the parameter groups with the --adam-* settings of `t` (TrainArgs); 8-bit with --use-8bit-adam."""
    kw = dict(betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
    if t.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kw)
    # fused AdamW: one kernel for all parameters on CUDA instead of a handful per tensor
    return torch.optim.AdamW(params, fused=device.type == "cuda", **kw)
