"""The DreamBooth dataset (instance rows and, with prior preservation, class rows), its epoch order
(``EpochSampler``: a permutation drawn from (seed, epoch) alone) and the batches (``collate``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import ORIGINAL_SIZE, load_image
from .transforms import apply_geometry, crop_geometry, crop_top_left, micro_conditioning, to_tensor


class DreamBoothDataset(Dataset):
    """Item i pairs instance image i % N_inst with class image i % N_class, each with its own prompt.

    Every item carries a key per image, ('instance' | 'class', index, flipped), naming exactly which pixels it
    stands for; with `load_pixels=False` (latents cached by key) the images are not decoded at all.
    An item's randomness (flips, random crops) comes from its own generator seeded by (seed, epoch, index), and by
    the repeat number for an item used again to pad the epoch: the same item is the same with or without caching,
    in a worker process or not, and after a resume, and a padding repeat is not a copy of its first use.
    Instance images are few (3-10) and held in memory; class images are read from disk when needed.
    `instance_masks` (--masked-loss): one 'L' mask per instance image, cropped and flipped with it.
    `class_prompts`: one prompt per class image (captions beside class images, as beside the photos).
    """

    def __init__(
        self,
        instance_images: list[Image.Image],
        instance_prompts: list[str],
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        class_paths: list[Path] | None = None,
        class_prompt: str | None = None,
        load_pixels: bool = True,
        seed: int = 0,
        class_prompt_dropout: float = 0.0,
        instance_masks: list[Image.Image] | None = None,
        class_prompts: list[str] | None = None,
    ):
        self.instance_images, self.instance_prompts = instance_images, instance_prompts
        self.class_paths, self.class_prompt = class_paths or [], class_prompt
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.load_pixels, self.seed, self.epoch = load_pixels, seed, 0
        self.class_prompt_dropout = class_prompt_dropout
        self.instance_masks = instance_masks
        # class image j's own prompt (its NAME.txt caption), else class_prompt
        self.class_prompts = class_prompts or [class_prompt] * len(self.class_paths)

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_paths))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def pixels(self, key: tuple, rng: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, H, W) in [-1, 1] and the (6,) SDXL time ids of a key ('instance' | 'class', index, flipped);
        `rng` draws random crops. Class images keep their own size and crop in their time ids."""
        return self.sample(key, rng)[:2]

    def sample(self, key: tuple, rng: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """pixels(key, rng) and the key's loss mask, (1, H, W) in [0, 1] cropped and flipped as the pixels were;
        None for class images and without masks."""
        kind, index, flip = key
        img = self.instance_images[index] if kind == "instance" else load_image(self.class_paths[index], 2 * self.resolution)
        resized, left_top = crop_geometry(img.size, self.resolution, self.center_crop, rng)  # one draw
        cropped = apply_geometry(img, resized, left_top, self.resolution, flip)
        mask = None
        if kind == "instance" and self.instance_masks:  # the same crop and flip as the pixels
            m = apply_geometry(self.instance_masks[index], resized, left_top, self.resolution, flip,
                               Image.Resampling.BILINEAR)
            mask = torch.from_numpy(np.array(m, dtype=np.float32, copy=True))[None] / 255.0
        top_left = crop_top_left(resized, left_top, self.resolution, flip)
        time_ids = micro_conditioning(img.info.get(ORIGINAL_SIZE, img.size), top_left, self.resolution)
        return to_tensor(cropped), time_ids, mask

    def all_keys(self) -> list[tuple]:
        """Every distinct (image, flip) the dataset can produce; what a latent cache must hold."""
        flips = (False, True) if self.random_flip else (False,)
        keys = [("instance", k, f) for k in range(len(self.instance_images)) for f in flips]
        return keys + [("class", j, f) for j in range(len(self.class_paths)) for f in flips]

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        """Item `index`, or (index, repeat) as EpochSampler gives it: the repeat-th extra use of the item in this
        epoch (epoch padding) draws its own flips, crop, noise and timestep instead of the original's."""
        i, repeat = index if isinstance(index, tuple) else (index, 0)
        parts = (self.seed, self.epoch, i) + ((repeat,) if repeat else ())  # repeat 0: the item's own seed
        rng = torch.Generator().manual_seed(mix_seed(*parts))
        flips = [self.random_flip and bool(torch.rand((), generator=rng) < 0.5) for _ in range(2)]
        key = ("instance", i % len(self.instance_images), flips[0])
        # each row's noise, timestep and latent sample are drawn from its own seed in the training step, so a
        # row trains the same whatever batch or process it lands in
        item = {"instance_key": key, "instance_prompt": self.instance_prompts[key[1]],
                "instance_seed": mix_seed(*parts, 0)}
        if self.load_pixels:
            item["instance_pixels"], item["instance_time_ids"], mask = self.sample(key, rng)
            if mask is not None:
                item["instance_mask"] = mask
        if self.class_paths:
            key = ("class", i % len(self.class_paths), flips[1])
            item.update(class_key=key, class_prompt=self.class_prompts[key[1]], class_seed=mix_seed(*parts, 1))
            # --class-prompt-dropout: this row teaches the empty prompt instead, from a seed of its own, so the
            # draws above (and every run without dropout) are unchanged
            if self.class_prompt_dropout and mix_seed(*parts, 2) / 2**63 < self.class_prompt_dropout:
                item["class_prompt"] = ""
            if self.load_pixels:
                item["class_pixels"], item["class_time_ids"] = self.pixels(key, rng)
        return item


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (hash-mixed: nearby inputs give unrelated streams)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpochSampler(torch.utils.data.Sampler):
    """A fresh permutation per epoch, drawn from (seed, epoch) alone; can start part-way into an epoch.

    Unlike a shuffling DataLoader's running generator, the order of epoch e can be rebuilt without replaying
    epochs 0..e-1, which is what an exact resume needs.
    """

    def __init__(self, n: int, seed: int, multiple: int = 1):
        # multiple = batch size x processes: each epoch is padded (with its own first items) to whole global
        # batches here, so no later stage pads it differently after a resume has cut it at `start`
        self.n, self.seed, self.multiple, self.epoch, self.start = n, seed, multiple, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[tuple[int, int]]:
        """The whole epoch's (item, repeat) order, padded to a multiple of `multiple` by using items again: repeat
        r > 0 marks an item's r-th extra use, so the dataset gives it draws of its own (not a copy of the first)."""
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))).tolist()
        pad = -len(order) % self.multiple
        return [(order[p % self.n], p // self.n) for p in range(len(order) + pad)]

    def __iter__(self):
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return max(len(self.order()) - self.start, 0)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Prompts -> (N, 77) token ids, padded and truncated to the tokenizer's max length."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def collate(examples: list[dict], tokenizers: list | None = None) -> dict:
    """One batch for one UNet forward: instance rows first, then class rows, each with its own prompt.

    pixel_values (when loaded): (B, 3, H, W), or (2B, 3, H, W) with prior preservation; time_ids (with the pixels)
    (B or 2B, 6); keys, prompts and input_ids (one (B or 2B, 77) tensor per tokenizer, when tokenizers are given)
    have the same leading size and order; loss_masks (with pixels and masks) (B, 1, H, W), instance rows only.
    """
    halves = ["instance"] + (["class"] if "class_key" in examples[0] else [])
    batch = {
        "keys": [e[f"{h}_key"] for h in halves for e in examples],
        "prompts": [e[f"{h}_prompt"] for h in halves for e in examples],
        "seeds": [e[f"{h}_seed"] for h in halves for e in examples],
        "num_instance": len(examples),
    }
    if "instance_pixels" in examples[0]:
        batch["pixel_values"] = torch.stack([e[f"{h}_pixels"] for h in halves for e in examples]).contiguous()
        batch["time_ids"] = torch.stack([e[f"{h}_time_ids"] for h in halves for e in examples])
    if "instance_mask" in examples[0]:
        batch["loss_masks"] = torch.stack([e["instance_mask"] for e in examples])
    if tokenizers:
        batch["input_ids"] = [tokenize(tok, batch["prompts"]) for tok in tokenizers]
    return batch
