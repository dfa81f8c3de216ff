"""The VAE's calls: its own dtype (``force_upcast``), and encodes and decodes in chunks of at most
``VAE_PIXELS_PER_CALL`` output pixels, so a batch of large images never decodes in one call."""

from __future__ import annotations

import contextlib

import torch

# The VAE's activations at full resolution dominate memory outside the UNet: a 512-px image's decoder holds
# (128, 512, 512) maps in several copies, about 640 MiB in half precision (benchmarks/memory_estimate.py). One
# call sees at most this many output pixels, so memory does not grow with --sample-batch-size: one image per call
# at 512 px and above, small images are not split (the world's 32-px ones go 256 to a call).
VAE_PIXELS_PER_CALL = 512 * 512


def vae_rows_per_call(height: int, width: int) -> int:
    """Images of height x width pixels one VAE call may take."""
    return max(1, VAE_PIXELS_PER_CALL // (height * width))


@contextlib.contextmanager
def vae_calls(vae: torch.nn.Module):
    """Every encode/decode of `vae` inside the block (a pipeline's included) runs in the VAE's own dtype, and in
    bounded chunks of images.

    Own dtype: the policy (precision.py) may keep the VAE in fp32 beside half-precision weights, where it would
    overflow; inputs are cast to it, and an fp32 VAE runs outside any autocast region (validation and the proxies
    run under the training autocast, which would run its convolutions in half precision anyway). Chunks: at most
    VAE_PIXELS_PER_CALL output pixels per call; below that the call is passed through unchanged.
    """
    from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput

    dtype = next(vae.parameters()).dtype
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent pixel, per side (8 for SD)
    originals = {name: getattr(vae, name) for name in ("encode", "decode")}

    def run(fn, x, scale, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False) if dtype == torch.float32 else contextlib.nullcontext():
            x = x.to(dtype)
            rows = vae_rows_per_call(x.shape[-2] * scale, x.shape[-1] * scale)
            if x.shape[0] <= rows:
                return fn(x, *args, **kwargs)
            return [fn(chunk, *args, **kwargs) for chunk in x.split(rows)]

    def encode(x, *args, return_dict: bool = True, **kwargs):  # x (N, 3, H, W)
        out = run(originals["encode"], x, 1, *args, return_dict=False, **kwargs)
        # one posterior over all rows: its parameters are (mean, logvar) side by side, (N, 2C, H/f, W/f)
        posterior = out[0] if isinstance(out, tuple) else DiagonalGaussianDistribution(
            torch.cat([part[0].parameters for part in out]))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(z, *args, return_dict: bool = True, **kwargs):  # z (N, C, H/f, W/f)
        out = run(originals["decode"], z, factor, *args, return_dict=False, **kwargs)
        sample = out[0] if isinstance(out, tuple) else torch.cat([part[0] for part in out])
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    vae.encode, vae.decode = encode, decode
    try:
        yield vae
    finally:
        for name in originals:
            delattr(vae, name)  # the class's methods show through again


def vae_force_upcast(vae: torch.nn.Module) -> bool:
    """diffusers' mark of a VAE that overflows in fp16 (default True, as in diffusers' AutoencoderKL)."""
    return bool(getattr(vae.config, "force_upcast", True))
