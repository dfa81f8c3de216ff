"""SD 3.5 Medium in the memory estimate (`memory_estimate.py --sd3-table` / `--sd3-trace`): its component shapes,
one fake-tensor trace of its transformer (the calibration of peftbooth.training.memory_sd3) and the formula's
table at 1024 px, with and without T5."""

from __future__ import annotations

from memory_estimate import make_fake, norms_in_fp32, peak_mib, tracker_for

# SD 3.5 Medium's component configs (transformer/, vae/, text_encoder*/ config.json): shapes only. Counted on the meta
# device: transformer 2.47 B (2.24 B parameters + the 384^2 x 1536 position table), CLIP-L 124 M, CLIP-G 695 M,
# T5-XXL encoder 4.76 B, VAE 84 M.
SD35M = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
             qk_norm="rms_norm")
SD35M_FOOTPRINT = dict(unet=2_469_663_936, text_encoders=(123_650_381, 694_659_917), vae=83_819_683,
                       unet_adapter=13_382_656, text_adapter=6_422_528, t5=4_762_310_656)


def sd3_trace(blocks: int, dual: int, latent: int, text: int, checkpointing: bool, grad: bool) -> dict:
    """SD 3.5 Medium's transformer with `blocks` blocks (the first `dual` MMDiT-X) and LoRA r16 'all', bf16, one
    forward (+ backward with `grad`) of 2 rows of `latent`^2 latents and `text` text tokens: MemTracker's peak
    (memory_sd3's calibration)."""
    import torch
    from diffusers import SD3Transformer2DModel
    from torch._subclasses.fake_tensor import FakeTensorMode

    from peftbooth.adapters.inject import attach
    from peftbooth.adapters.peft_config import UNET_PRESETS
    from peftbooth.config.sections import TrainConfig

    cfg = TrainConfig()
    cfg.unet_adapter.adapter, cfg.unet_adapter.rank, cfg.unet_adapter.target_modules = "lora", 16, "all"
    cfg, dtype = cfg.resolved(), torch.bfloat16
    with torch.device("meta"):
        t = SD3Transformer2DModel(**{**SD35M, "num_layers": blocks, "dual_attention_layers": tuple(range(dual))})
    t.requires_grad_(False)
    model = attach(t, cfg.unet_adapter, UNET_PRESETS, "") if grad else t
    mode = FakeTensorMode()
    make_fake(model, mode, dtype)
    if checkpointing:
        t.enable_gradient_checkpointing()
    model.train(grad)
    with mode:
        x, ctx = torch.empty(2, 16, latent, latent, dtype=dtype), torch.empty(2, text, 4096, dtype=dtype)
        pooled, timesteps = torch.empty(2, 2048, dtype=dtype), torch.tensor([100.0, 800.0])
        tracker = tracker_for(model, x, ctx, pooled)
        with tracker, norms_in_fp32(), torch.set_grad_enabled(grad):
            with torch.autocast("cpu", dtype=dtype):
                pred = model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                             timestep=timesteps).sample
            if grad:
                torch.nn.functional.mse_loss(pred.float(), x.float()).backward()
            del pred
    return peak_mib(tracker)


def sd3_table() -> list[dict]:
    """peftbooth.training.memory.estimate for SD 3.5 Medium at 1024 px (LoRA r16 'all' + text-encoder adapter,
    prior preservation, bf16, --sample-batch-size 4, --max-sequence-length 77), with and without T5 and
    gradient checkpointing: GiB per phase and the peak with the check's margin."""
    from peftbooth.training import memory
    from peftbooth.training.memory_sd3 import DiT

    out = []
    for t5 in (True, False):
        fp = memory.Footprint("sd3", **{**SD35M_FOOTPRINT, "t5": SD35M_FOOTPRINT["t5"] if t5 else 0},
                              dit=DiT(24, 13, 1536, 2, 77 + 77))
        for checkpointing in (False, True):
            p = memory.Plan(1024, 1, True, 4, True, checkpointing, 2, 2, train_text_encoder=True)
            phases = {k: round(v / 2**30, 2) for k, v in memory.estimate(fp, p).items()}
            need, phase = memory.peak(fp, p)
            out.append({"model": "sd3.5-medium", "resolution": 1024, "t5": t5, "gradient_checkpointing": checkpointing,
                        **{f"{k}_gib": v for k, v in phases.items()}, "peak_with_margin_gib": round(need / 2**30, 2),
                        "peak_phase": phase})
    return out
