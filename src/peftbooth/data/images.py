"""Photos on disk: listing images, loading them safely, their loss masks (``NAME.mask.png``) and captions
(``NAME.txt``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..config.checks import IDENTIFIER_MISSING, identifier_words
from ..config.sections import UsageError

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


def prompts_from_captions(captions: list[str], instance_prompt: str, class_prompt: str) -> list[str]:
    """The prompts class images are drawn from with --class-prompt-from-captions: each photo's caption with the
    instance prompt in it replaced by the class prompt, then any word of the identifier left taken out; distinct,
    in the photos' order. The identifier is the words of the instance prompt the class prompt lacks ('a photo of
    sks dog' / 'a photo of a dog': 'sks'), so 'a photo of sks dog on a beach' gives 'a photo of a dog on a beach'
    and 'sks dog asleep' gives 'dog asleep'. Class images drawn so differ from the photos only in the
    identifier, where the class prompt's alone are drawn in every context the model knows: then the photos'
    contexts are a cue for the subject as good as the identifier, and the subject stays out of other contexts
    (docs/world.md, the ninth sweep)."""
    identifier = identifier_words(instance_prompt, class_prompt)
    if not identifier:
        raise UsageError(IDENTIFIER_MISSING.format(instance_prompt, class_prompt))
    prompts = [" ".join(w for w in caption.replace(instance_prompt, class_prompt).split() if w not in identifier)
               for caption in captions]
    return list(dict.fromkeys(p for p in prompts if p)) or [class_prompt]


def class_image_prompt(data, captions: list[str] | None = None) -> str | list[str]:
    """What a run's class images are drawn from (`data`: its DataArgs): --class-prompt, or with
    --class-prompt-from-captions the prompts of prompts_from_captions. `captions`: the photos' prompts, read from
    --instance-data-dir where not given. Training, the demo and the benchmarks that make class images ahead of a
    run all ask here, so they draw what the run itself would."""
    if not data.class_prompt_from_captions:
        return data.class_prompt
    if captions is None:
        captions = load_captions(list_images(data.instance_data_dir, "--instance-data-dir"), data.instance_prompt)
    return prompts_from_captions(captions, data.instance_prompt, data.class_prompt)
