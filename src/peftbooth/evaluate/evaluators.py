"""The evaluator models of the protocol: CLIP (image and text towers) and DINO, each from a hub id or a folder."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config.sections import UsageError
from .protocol import DEFAULT_CLIP, DEFAULT_DINO, metrics_from_embeddings

# ---------------------------------------------------------------------------------------------------------------
# evaluator models


def _features(output) -> torch.Tensor:
    """transformers < 5 return the projected embeddings; 5.x return an output whose pooler_output holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _load(flag: str, what: str, loader, *args, **kwargs):
    try:
        return loader(*args, **kwargs)
    except (OSError, ValueError) as e:  # not cached and offline, not found, or not that kind of model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{flag} {what}: could not load ({first[:300]}); pass a local model folder, or a hub id "
                         "that is in the Hugging Face cache or reachable") from e


@dataclass
class Evaluators:
    """CLIP (image + text towers) and DINO, each from a hub id or a local folder."""

    clip: torch.nn.Module
    clip_processor: object
    clip_tokenizer: object
    dino: torch.nn.Module
    dino_processor: object
    device: torch.device
    names: dict = field(default_factory=dict)
    batch_size: int = 32

    @classmethod
    def load(cls, clip: str = DEFAULT_CLIP, dino: str = DEFAULT_DINO, device: str | torch.device | None = None
             ) -> "Evaluators":
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel, ViTModel

        from ..precision import default_device

        device = default_device(device)  # evaluator models stay fp32: embeddings are compared across runs
        clip_model = _load("--clip-model", clip, CLIPModel.from_pretrained, clip)
        clip_processor = _load("--clip-model", clip, AutoImageProcessor.from_pretrained, clip)
        clip_tokenizer = _load("--clip-model", clip, AutoTokenizer.from_pretrained, clip)
        config = _load("--dino-model", dino, AutoConfig.from_pretrained, dino)
        if config.model_type == "vit":
            # DINO checkpoints have no pooler weights: without this a randomly initialised pooler would be built
            dino_model = _load("--dino-model", dino, ViTModel.from_pretrained, dino, add_pooling_layer=False)
        else:  # e.g. a DINOv2 checkpoint: the CLS token is read the same way
            dino_model = _load("--dino-model", dino, AutoModel.from_pretrained, dino)
        dino_processor = _load("--dino-model", dino, AutoImageProcessor.from_pretrained, dino)
        for m in (clip_model, dino_model):
            m.to(device).eval().requires_grad_(False)
        return cls(clip_model, clip_processor, clip_tokenizer, dino_model, dino_processor, device,
                   {"clip": clip, "dino": dino})

    def _batches(self, items):
        for start in range(0, len(items), self.batch_size):
            yield items[start : start + self.batch_size]

    @torch.no_grad()
    def clip_image(self, images: list) -> torch.Tensor:
        out = []
        for batch in self._batches(images):
            pixels = self.clip_processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(_features(self.clip.get_image_features(pixel_values=pixels)).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def clip_text(self, texts: list[str]) -> torch.Tensor:
        out = []
        for batch in self._batches(texts):
            tokens = self.clip_tokenizer(batch, padding=True, truncation=True, return_tensors="pt").to(self.device)
            out.append(_features(self.clip.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def dino_embed(self, images: list) -> torch.Tensor:
        """The CLS token of the last layer: DINO's image embedding."""
        out = []
        for batch in self._batches(images):
            pixels = self.dino_processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(self.dino(pixel_values=pixels).last_hidden_state[:, 0].float().cpu())
        return torch.cat(out)


def protocol_metrics(ev: Evaluators, generated: list, real: list, texts: list[str]) -> dict:
    """{'dino', 'clip_i', 'clip_t'} of generated images against real images and (image i <-> texts[i])."""
    if len(texts) != len(generated):
        raise ValueError(f"{len(generated)} generated images but {len(texts)} texts")
    real_dino, real_clip = ev.dino_embed(real), ev.clip_image(real)
    return metrics_from_embeddings(ev.dino_embed(generated), ev.clip_image(generated), ev.clip_text(texts),
                                   real_dino, real_clip)

