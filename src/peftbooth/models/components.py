"""A loaded base model's components (``Components``) and the one place prompts become the UNet's conditioning
(``encode_text``, ``added_conditioning``): one code path for SD 1.x/2.x (one CLIP text encoder) and SDXL (two,
plus micro-conditioning)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

FAMILIES = ("sd", "sdxl")  # SD 1.x / 2.x (one CLIP text encoder) and SDXL (two, plus micro-conditioning)


@dataclass
class Components:
    tokenizer: object
    noise_scheduler: object  # DDPMScheduler built from the model's scheduler config (keeps prediction_type)
    vae: torch.nn.Module
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    model_path: str  # local folder or hub id, as passed to from_pretrained
    # SDXL only: the second tokenizer and text encoder (CLIPTextModelWithProjection: gives the pooled embedding)
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def family(self) -> str:
        """One of FAMILIES: what the precision policy and the conditioning depend on."""
        return "sdxl" if self.is_sdxl else "sd"

    @property
    def tokenizers(self) -> list:
        return [self.tokenizer] + ([self.tokenizer_2] if self.is_sdxl else [])

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The base text-encoder modules (they hold the adapter layers when a text-encoder adapter is trained)."""
        return [self.text_encoder] + ([self.text_encoder_2] if self.is_sdxl else [])

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def encode_text(text_encoders: list, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids (one (N, 77) tensor per text encoder) -> (context, pooled): what the UNet is conditioned on.

    SD 1.x / 2.x: the last hidden states (N, 77, D) and no pooled embedding. SDXL: the penultimate hidden states of
    both encoders side by side (N, 77, D1 + D2), as SDXL was trained, and the second encoder's projected pooled
    embedding (N, P).
    """
    if len(text_encoders) == 1:
        return text_encoders[0](input_ids[0])[0], None
    states, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids):
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # of the last encoder (CLIPTextModelWithProjection): text_embeds, (N, P)
    return torch.cat(states, dim=-1), pooled


def added_conditioning(pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> dict | None:
    """The UNet's `added_cond_kwargs`: SDXL's pooled text embedding (N, P) and time ids (N, 6, moved beside the
    pooled embedding); None otherwise."""
    if pooled is None:
        return None
    return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}
