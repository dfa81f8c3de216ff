"""Image transforms without torchvision: resize, crop and flip (their geometry drawn from a generator),
SDXL's micro-conditioning from that geometry, PIL -> tensor."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def resize_and_crop(img: Image.Image, resolution: int, center_crop: bool, flip: bool,
                    rng: torch.Generator | None = None) -> Image.Image:
    """Resize the short side to `resolution`, crop a square (center, or random from `rng`), optionally flip."""
    return resize_crop_coords(img, resolution, center_crop, flip, rng)[0]


def resize_crop_coords(img: Image.Image, resolution: int, center_crop: bool, flip: bool,
                       rng: torch.Generator | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """resize_and_crop, also returning the crop's (top, left) in the resized image as the model sees it: after a
    flip the crop's left edge is measured in the flipped image (SDXL's crop conditioning)."""
    resized, left_top = crop_geometry(img.size, resolution, center_crop, rng)
    return apply_geometry(img, resized, left_top, resolution, flip), crop_top_left(resized, left_top, resolution, flip)


def crop_top_left(resized: tuple[int, int], left_top: tuple[int, int], resolution: int, flip: bool
                  ) -> tuple[int, int]:
    """The crop's (top, left) as the model sees it: after a flip its left edge is measured in the flipped image
    (the pixels cut from the left of it)."""
    left, top = left_top
    return top, (resized[0] - resolution - left if flip else left)


def crop_geometry(size: tuple[int, int], resolution: int, center_crop: bool, rng: torch.Generator | None = None
                  ) -> tuple[tuple[int, int], tuple[int, int]]:
    """For an image of `size` (w, h): its resized size (short side = `resolution`) and the (left, top) of the
    square crop, centred or drawn from `rng` (left first, then top)."""
    w, h = size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if center_crop:
        return (nw, nh), ((nw - resolution) // 2, (nh - resolution) // 2)
    left = int(torch.randint(0, nw - resolution + 1, (1,), generator=rng))
    top = int(torch.randint(0, nh - resolution + 1, (1,), generator=rng))
    return (nw, nh), (left, top)


def apply_geometry(img: Image.Image, resized: tuple[int, int], left_top: tuple[int, int], resolution: int,
                   flip: bool, resample=Image.Resampling.BICUBIC) -> Image.Image:
    """Resize to `resized`, crop the `resolution` square at `left_top`, optionally flip: what crop_geometry chose,
    applied to a photo or (with another `resample`) to its mask."""
    left, top = left_top
    img = img.resize(resized, resample).crop((left, top, left + resolution, top + resolution))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img


def micro_conditioning(original_size: tuple[int, int], top_left: tuple[int, int], resolution: int) -> torch.Tensor:
    """SDXL's per-image time ids, (6,): original (height, width), crop (top, left), target (height, width).

    `original_size` is (width, height) as PIL gives it.
    """
    w, h = original_size
    return torch.tensor([h, w, *top_left, resolution, resolution], dtype=torch.float32)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB (H, W, 3) uint8 -> float tensor (3, H, W) in [-1, 1]."""
    arr = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)
