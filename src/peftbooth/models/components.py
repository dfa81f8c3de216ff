"""A loaded base model's components (``Components``) and the one place prompts become the denoiser's conditioning
(``encode_text``, ``added_conditioning``): one code path for SD 1.x/2.x (one CLIP text encoder), SDXL (two, plus
micro-conditioning) and SD3 / 3.5 (two CLIPs and T5 joined along the sequence, plus both pooled embeddings)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# SD 1.x / 2.x (one CLIP text encoder), SDXL (two, plus micro-conditioning), SD3 / 3.5 (an MMDiT transformer
# trained by flow matching, two CLIPs and T5)
FAMILIES = ("sd", "sdxl", "sd3")


@dataclass
class Components:
    tokenizer: object
    noise_scheduler: object  # DDPMScheduler built from the model's scheduler config (keeps prediction_type)
    vae: torch.nn.Module
    unet: torch.nn.Module  # the denoiser: UNet2DConditionModel, or SD3's SD3Transformer2DModel
    text_encoder: torch.nn.Module
    model_path: str  # local folder or hub id, as passed to from_pretrained
    # SDXL and SD3: the second tokenizer and text encoder (CLIPTextModelWithProjection: gives the pooled embedding)
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None
    # SD3 only: T5 and its tokenizer (None with --no-t5: its states are zeros then, as the pipeline's); never trained
    tokenizer_3: object = None
    text_encoder_3: torch.nn.Module | None = None
    is_sd3: bool = False
    max_sequence_length: int = 77  # SD3: T5 tokens per prompt (--max-sequence-length)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None and not self.is_sd3

    @property
    def family(self) -> str:
        """One of FAMILIES: what the precision policy, the objective and the conditioning depend on."""
        return "sd3" if self.is_sd3 else "sdxl" if self.is_sdxl else "sd"

    @property
    def denoiser_part(self) -> str:
        """The run folder's name for the denoiser's adapter: 'transformer' for SD3, else 'unet'."""
        return "transformer" if self.is_sd3 else "unet"

    @property
    def tokenizers(self) -> list:
        """The CLIP tokenizers, then (SD3 with T5) T5's: one token-id tensor per entry in a batch."""
        clip = [self.tokenizer] + ([self.tokenizer_2] if self.text_encoder_2 is not None else [])
        return clip + ([self.tokenizer_3] if self.text_encoder_3 is not None else [])

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The CLIP text-encoder modules (they hold the adapter layers when a text-encoder adapter is trained);
        SD3's T5 is not among them: it is never trained (see `t5`)."""
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    @property
    def t5(self) -> "T5Conditioning | None":
        """SD3's T5 part of the conditioning (None for SD 1.x / 2.x / SDXL)."""
        if not self.is_sd3:
            return None
        return T5Conditioning(self.text_encoder_3, self.unet.config.joint_attention_dim, self.max_sequence_length)

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_shift(self) -> float:
        """SD3's VAE: latents = (mean - shift_factor) * scaling_factor; 0 for the 4-channel VAEs."""
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


@dataclass(frozen=True)
class T5Conditioning:
    """SD3's T5 encoder (None with --no-t5), the transformer's joint_attention_dim (T5's width) and the T5 tokens
    per prompt."""

    encoder: torch.nn.Module | None
    width: int
    max_sequence_length: int


def encode_text(text_encoders: list, input_ids: list[torch.Tensor], t5: T5Conditioning | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids (one (N, L) tensor per tokenizer) -> (context, pooled): what the denoiser is conditioned on.

    SD 1.x / 2.x: the last hidden states (N, 77, D) and no pooled embedding. SDXL: the penultimate hidden states of
    both encoders side by side (N, 77, D1 + D2), as SDXL was trained, and the second encoder's projected pooled
    embedding (N, P). SD3 (`t5` given): the CLIPs' penultimate states side by side, zero-padded to T5's width
    (N, 77, W), then T5's last states (N, S, W) after them along the sequence: (N, 77 + S, W); pooled: both CLIPs'
    projected embeddings side by side (N, P1 + P2). Without T5 its part is zeros, as StableDiffusion3Pipeline's.
    """
    if len(text_encoders) == 1:
        return text_encoders[0](input_ids[0])[0], None
    states, pooled = [], []
    for encoder, ids in zip(text_encoders, input_ids):
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out[0])  # CLIPTextModelWithProjection's text_embeds, (N, P)
    context = torch.cat(states, dim=-1)
    if t5 is None:
        return context, pooled[-1]  # SDXL: the second encoder's pooled embedding only
    n = context.shape[0]
    if t5.encoder is not None:
        t5_states = t5.encoder(input_ids[len(text_encoders)])[0]  # (N, S, W)
    else:
        t5_states = context.new_zeros(n, t5.max_sequence_length, t5.width)
    context = torch.nn.functional.pad(context, (0, t5_states.shape[-1] - context.shape[-1]))
    return torch.cat([context, t5_states.to(context.dtype)], dim=-2), torch.cat(pooled, dim=-1)


def added_conditioning(pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> dict | None:
    """The UNet's `added_cond_kwargs`: SDXL's pooled text embedding (N, P) and time ids (N, 6, moved beside the
    pooled embedding); None otherwise."""
    if pooled is None:
        return None
    return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}
