"""Instance and class images: listing, safe loading, PIL/torch transforms and the paired DreamBooth batch."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .config import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
MASK_SUFFIX = ".mask.png"  # NAME.mask.png beside NAME.jpg: the photo's loss mask for --masked-loss (white: subject)
ORIGINAL_SIZE = "peftbooth_original_size"  # key in a loaded image's .info: (width, height) of the file itself


def list_images(folder: str | Path, flag: str) -> list[Path]:
    """Image files of `folder`, sorted; other files are skipped with a warning that names them.

    Hidden files (such as the temp files of an interrupted class-image write), caption files (NAME.txt beside
    NAME.jpg) and mask files (NAME.mask.png beside NAME.jpg) are ignored silently.
    """
    p = Path(folder)
    if not p.exists():
        raise UsageError(f"{flag} {folder}: no such folder")
    if not p.is_dir():
        raise UsageError(f"{flag} {folder}: is a file, not a folder of images")
    images, skipped = [], []
    for f in sorted(p.iterdir()):
        if f.name.startswith(".") or f.is_dir():
            continue
        if f.name.lower().endswith(MASK_SUFFIX) and photo_beside(f, len(MASK_SUFFIX)) is not None:
            continue
        if f.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(f)
        elif not (f.suffix.lower() == ".txt" and photo_beside(f, len(".txt")) is not None):
            skipped.append(f.name)
    if skipped:
        warnings.warn(f"{flag} {folder}: skipping non-image files: {', '.join(skipped)}", stacklevel=2)
    return images


def _all_case(exts):
    return [e for ext in exts for e in (ext, ext.upper())]


def photo_beside(f: Path, suffix_len: int) -> Path | None:
    """The photo NAME.<image extension> beside `f` (NAME + a suffix of `suffix_len` characters), or None."""
    stem = f.name[:-suffix_len]
    return next((f.parent / (stem + e) for e in _all_case(IMAGE_EXTENSIONS) if (f.parent / (stem + e)).exists()),
                None)


def mask_path(photo: Path) -> Path:
    """Where the loss mask of `photo` lies: NAME.mask.png beside NAME.jpg."""
    return photo.with_name(photo.stem + MASK_SUFFIX)


def mask_problem(mask: Image.Image, photo: Image.Image) -> str | None:
    """What is wrong with `mask` (from load_image) as the loss mask of `photo`, or None."""
    if mask.info[ORIGINAL_SIZE] != photo.info[ORIGINAL_SIZE]:
        (w, h), (pw, ph) = mask.info[ORIGINAL_SIZE], photo.info[ORIGINAL_SIZE]
        return f"mask is {w}x{h} px but its photo is {pw}x{ph} px; make them the same size"
    if mask.convert("L").getextrema()[1] == 0:
        return "mask is black everywhere, so nothing of the photo would be learned; paint the subject white"
    return None


def load_masks(photos: list[Path], images: list[Image.Image]) -> list[Image.Image]:
    """The loss mask of each photo ('L', the size of the loaded photo): NAME.mask.png, white where the subject is.

    Raises UsageError naming the file when a mask is missing, unreadable, of another size than its photo, or
    black everywhere (nothing would be learned from that photo).
    """
    masks = []
    for photo, img in zip(photos, images):
        path = mask_path(photo)
        if not path.is_file():
            raise UsageError(f"--masked-loss: {photo.name} has no mask; add {path.name} beside it (white where the "
                             "subject is, black elsewhere) or train without --masked-loss")
        mask = load_image(path)
        if problem := mask_problem(mask, img):
            raise UsageError(f"{path}: {problem}")
        mask = mask.convert("L")
        # a JPEG photo may have been decoded smaller (draft mode): the mask follows it
        masks.append(mask if mask.size == img.size else mask.resize(img.size, Image.Resampling.BILINEAR))
    return masks


def load_image(path: str | Path, max_side: int | None = None) -> Image.Image:
    """Open an image, apply its EXIF orientation and convert to RGB; raise UsageError naming the file if unreadable.

    `max_side` lets JPEG decoding downscale while reading (PIL's draft mode), so a huge photo does not have to be
    decoded at full size.
    """
    try:
        with Image.open(path) as img:
            original_size = img.size  # before draft mode shrinks it: SDXL is conditioned on the photo's own size
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that swap width and height
                original_size = original_size[::-1]
            if max_side and img.format == "JPEG":
                img.draft("RGB", (max_side, max_side))
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit grayscale: 0..65535 -> 0..255 (convert('L') would clip everything above 255 to white);
                # a 32-bit 'I' image whose values exceed 16 bits is scaled by its own maximum
                arr = np.asarray(img, dtype=np.float64)
                top = 65535.0 if arr.max() <= 65535 else arr.max()
                img = Image.fromarray(np.round(arr / top * 255).astype(np.uint8), "L")
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                # composite transparency on white rather than letting convert('RGB') turn it black
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            img = img.convert("RGB")
            img.info[ORIGINAL_SIZE] = original_size  # (width, height)
            return img
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UsageError(f"{path}: not a readable image ({type(e).__name__}: {e}); remove or replace it") from e


def load_captions(images: list[Path], default_prompt: str) -> list[str]:
    """Per-image prompt: the text of NAME.txt beside NAME.jpg if present, else `default_prompt`."""
    prompts = []
    for path in images:
        caption = path.with_suffix(".txt")
        try:
            text = caption.read_text(encoding="utf-8").strip() if caption.exists() else ""
        except (UnicodeDecodeError, OSError) as e:
            raise UsageError(f"{caption}: caption is not readable UTF-8 text ({type(e).__name__}); fix or remove it") from e
        prompts.append(text or default_prompt)
    return prompts


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


class DreamBoothDataset(Dataset):
    """Item i pairs instance image i % N_inst with class image i % N_class, each with its own prompt.

    Every item carries a key per image, ('instance' | 'class', index, flipped), naming exactly which pixels it
    stands for; with `load_pixels=False` (latents cached by key) the images are not decoded at all.
    An item's randomness (flips, random crops) comes from its own generator seeded by (seed, epoch, index), and by
    the repeat number for an item used again to pad the epoch: the same item is the same with or without caching,
    in a worker process or not, and after a resume, and a padding repeat is not a copy of its first use.
    Instance images are few (3-10) and held in memory; class images are read from disk when needed.
    `instance_masks` (--masked-loss): one 'L' mask per instance image, cropped and flipped with it.
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
    ):
        self.instance_images, self.instance_prompts = instance_images, instance_prompts
        self.class_paths, self.class_prompt = class_paths or [], class_prompt
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.load_pixels, self.seed, self.epoch = load_pixels, seed, 0
        self.class_prompt_dropout = class_prompt_dropout
        self.instance_masks = instance_masks

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
            item.update(class_key=key, class_prompt=self.class_prompt, class_seed=mix_seed(*parts, 1))
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
