"""LoHa and LoKr applied through their factors, without building the full delta weight every step.

PEFT's LoHa/LoKr layers rebuild the layer-sized delta weight ΔW (out × in, or out × in × k × k) at every forward
and then run a second full-size matmul or convolution ``x @ ΔWᵀ`` beside the frozen one: the adapter costs about as
much compute as the layer it adapts. Both updates have structure that makes this unnecessary:

* LoHa: ΔW = s · (A₁B₁) ⊙ (A₂B₂) with A (out × r), B (r × in). An elementwise product of two rank-r matrices is a
  rank-r² matrix: ΔW = s · P Q with P[i, (k,l)] = A₁[i,k] A₂[i,l] (out × r²) and Q[(k,l), j] = B₁[k,j] B₂[l,j]
  (r² × in), so ``x @ ΔWᵀ = s · (x @ Qᵀ) @ Pᵀ``: two thin matmuls instead of one layer-sized one.
  For a convolution Q is an (r², in, k, k) kernel and P a 1×1 one.
* LoKr: ΔW = s · W₁ ⊗ W₂ (Kronecker) with W₁ (out_l × in_m), W₂ (out_k × in_n [× k × k]). With x viewed as
  (in_m, in_n), ``ΔW x = s · W₁ X W₂ᵀ``: a matmul (or a convolution per in_m group) with the small W₂, then one
  with the small W₁.

Both are the same linear map as PEFT's, so results agree to floating-point rounding and the saved adapters are
PEFT's own parameters, untouched (only ``_get_delta_activations`` and ``forward`` of each layer instance are
replaced). Each call compares the multiply-adds of both ways and takes the cheaper (per position for LoHa, where
both scale alike; for the actual input for LoKr, whose full way also pays for building the weight); small layers
(below MIN_WEIGHT weights) and anything unusual (rank dropout while training, the Tucker/effective-conv form,
grouped convolutions) go to PEFT's own code.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F

ORIGINAL = "_peftbooth_original_delta"
ORIGINAL_FORWARD = "_peftbooth_original_forward"
# Below this many weights (out x in x k x k) a layer keeps PEFT's forward: on small layers the extra reshapes and
# thin products cost more time than the multiply-adds they save (measured: the tiny test model's 32/64-channel
# LoKr layers trained 17 % slower factored; SD 1.5's smallest adapted layers, 320 x 320, run 1.4-1.5x faster).
MIN_WEIGHT = 256 * 256


def install(model: torch.nn.Module) -> int:
    """Route the LoHa/LoKr Linear and Conv2d layers of `model` through the factored forward; return how many.

    Every such layer also gets `forward_without_coin` (see there), whatever its size.
    """
    from peft.tuners.loha import layer as loha
    from peft.tuners.lokr import layer as lokr

    kinds = {loha.Linear: loha_delta, loha.Conv2d: loha_delta, lokr.Linear: lokr_delta, lokr.Conv2d: lokr_delta}
    count = 0
    for module in model.modules():
        fn = kinds.get(type(module))
        if fn is None or hasattr(module, ORIGINAL):
            continue
        setattr(module, ORIGINAL, module._get_delta_activations)  # PEFT's bound methods: the fallbacks
        setattr(module, ORIGINAL_FORWARD, module.forward)
        module._get_delta_activations = types.MethodType(fn, module)
        module.forward = types.MethodType(forward_without_coin, module)
        count += 1
    return count


def uninstall(model: torch.nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, ORIGINAL):
            del module._get_delta_activations, module.forward  # the class's methods show through again
            delattr(module, ORIGINAL)
            delattr(module, ORIGINAL_FORWARD)


def forward_without_coin(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's LoHa/LoKr forward, minus the module-dropout coin when module dropout is off.

    PEFT decides per layer and step whether to drop the whole update with ``torch.rand(1) > module_dropout``. At
    the default module_dropout = 0 the update is always kept, but the coin is still tossed: a CPU RNG call and a
    tensor comparison per layer, and, under torch.compile, a data-dependent branch that splits the compiled UNet
    into a graph per adapted layer (measured: LoHa/LoKr graph breaks at every layer, and the recompile limit hit
    so the rest ran eagerly; LoRA has no coin and compiles to one graph). Training with module dropout on, PEFT's
    own forward runs, coin and all; so it does for disabled or merged adapters.

    The output has the frozen layer's output dtype, on every path, as LoRA's and the un-adapted layer's do.
    PEFT's LoHa/LoKr forward casts it to the input's dtype instead. Without autocast the two are the same dtype.
    Under CUDA autocast they are not: GroupNorm and LayerNorm run in fp32 there, so the next layer gets fp32 input
    and PEFT would hand fp32 activations to every later elementwise op (residual adds, GEGLU) and to the tensors
    saved for backward.
    The values would still be only bf16/fp16-precise: the adapted layer's convolution or matmul ran in the autocast
    dtype.
    """
    adapters = [a for a in self.active_adapters if a in self._available_adapters]
    if self.disable_adapters or self.merged or (self.training and any(self.module_dropout[a] for a in adapters)):
        # PEFT's forward: it unmerges a disabled merged layer, and tosses the coin (only while training, as here)
        result = getattr(self, ORIGINAL_FORWARD)(x, *args, **kwargs)  # in x's dtype
        device = x.device.type
        return result.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else result
    result = self.base_layer(x, *args, **kwargs)  # in the autocast dtype under autocast, else x's dtype
    result_dtype = result.dtype
    for adapter in adapters:
        result = result + self._get_delta_activations(adapter, x, *args, **kwargs)
    return result.to(result_dtype)


def _fallback(layer, adapter: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return getattr(layer, ORIGINAL)(adapter, x, *args, **kwargs)


def _positions(layer, x: torch.Tensor) -> int:
    """How many times the layer's weight is applied: tokens for a Linear, output pixels x batch for a Conv2d."""
    if isinstance(layer.get_base_layer(), torch.nn.Conv2d):
        base = layer.get_base_layer()
        h, w = x.shape[-2:]
        oh = (h + 2 * base.padding[0] - base.dilation[0] * (base.kernel_size[0] - 1) - 1) // base.stride[0] + 1
        ow = (w + 2 * base.padding[1] - base.dilation[1] * (base.kernel_size[1] - 1) - 1) // base.stride[1] + 1
        return x.shape[0] * oh * ow
    return math.prod(x.shape[:-1])


def _usable(layer) -> bool:
    base = layer.get_base_layer()
    if base.weight.numel() < MIN_WEIGHT:
        return False
    if isinstance(base, torch.nn.Conv2d):
        return base.groups == 1 and isinstance(base.padding, tuple)  # padding='same' strings: PEFT's own path
    return isinstance(base, torch.nn.Linear)


def loha_delta(self, adapter: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """s · (A₁B₁ ⊙ A₂B₂) applied to x as s · P (Q x); see the module docstring."""
    if (self.training and self.rank_dropout[adapter]) or adapter in self.hada_t1 or not _usable(self):
        return _fallback(self, adapter, x, *args, **kwargs)
    a1, b1 = self.hada_w1_a[adapter], self.hada_w1_b[adapter]  # (out, r), (r, in·k·k)
    a2, b2 = self.hada_w2_a[adapter], self.hada_w2_b[adapter]
    out, fan_in, rr = a1.shape[0], b1.shape[1], a1.shape[1] * a2.shape[1]
    if rr * (fan_in + out) >= fan_in * out:  # the full weight is the cheaper way for this layer
        return _fallback(self, adapter, x, *args, **kwargs)
    p = (a1[:, :, None] * a2[:, None, :]).reshape(out, rr)  # (out, r²)
    q = (b1[:, None, :] * b2[None, :, :]).reshape(rr, fan_in)  # (r², in·k·k)
    x = self._cast_input_dtype(x, p.dtype)
    scale = self.scaling[adapter]
    base = self.get_base_layer()
    if isinstance(base, torch.nn.Conv2d):
        # Q as an (r², in, k, k) convolution with the layer's stride/padding, then P as a 1x1 convolution
        h = F.conv2d(x, q.reshape(rr, *base.weight.shape[1:]), stride=base.stride, padding=base.padding,
                     dilation=base.dilation)
        return F.conv2d(h, p[:, :, None, None]) * scale
    return F.linear(F.linear(x, q), p) * scale  # (..., in) -> (..., r²) -> (..., out)


def lokr_delta(self, adapter: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """s · (W₁ ⊗ W₂) applied to x as s · W₁ X W₂ᵀ; see the module docstring."""
    if (self.training and self.rank_dropout[adapter]) or adapter in self.lokr_t2 or not _usable(self):
        return _fallback(self, adapter, x, *args, **kwargs)
    w1 = self.lokr_w1[adapter] if adapter in self.lokr_w1 else self.lokr_w1_a[adapter] @ self.lokr_w1_b[adapter]
    w2 = self.lokr_w2[adapter] if adapter in self.lokr_w2 else self.lokr_w2_a[adapter] @ self.lokr_w2_b[adapter]
    base = self.get_base_layer()
    (out_l, in_m), out_k = w1.shape, w2.shape[0]
    out = out_l * out_k
    fan_in = base.weight[0].numel()  # in·k·k
    in_n_kk = fan_in // in_m  # in_n·k·k: one in_m group's share of the fan-in
    n = _positions(self, x)
    full = n * fan_in * out + fan_in * out  # the delta-weight product per position, plus building the weight
    factored = n * in_m * in_n_kk * out_k + n * out_l * in_m * out_k
    if factored >= full:
        return _fallback(self, adapter, x, *args, **kwargs)
    x = self._cast_input_dtype(x, w1.dtype)
    scale = self.scaling[adapter]
    if isinstance(base, torch.nn.Conv2d):
        batch, _, h, w = x.shape
        kernel = w2.reshape(out_k, -1, *base.kernel_size)  # (out_k, in_n, k, k)
        # each of the in_m channel groups is convolved with W₂ on its own: groups become batch entries
        t = F.conv2d(x.reshape(batch * in_m, -1, h, w), kernel, stride=base.stride, padding=base.padding,
                     dilation=base.dilation)  # (batch·in_m, out_k, h', w')
        t = t.reshape(batch, in_m, out_k, *t.shape[-2:])
        y = torch.einsum("ij,bjkhw->bikhw", w1, t)  # mix the groups with W₁: (batch, out_l, out_k, h', w')
        return y.reshape(batch, out, *y.shape[-2:]) * scale
    lead = x.shape[:-1]
    t = x.reshape(*lead, in_m, -1) @ w2.T  # X W₂ᵀ: (..., in_m, out_k)
    return (w1 @ t).reshape(*lead, out) * scale  # W₁ X W₂ᵀ: (..., out_l, out_k) -> (..., out)
