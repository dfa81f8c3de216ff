"""What the page may touch on disk: sanitised names, folders confined to the allowed roots, checked uploads.

Nothing a browser sends becomes a path by itself: run and file names are reduced to a safe alphabet, and every
folder typed into the page must resolve (symlinks followed) inside the runs folder or a folder given at start.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from ..config.sections import UsageError
from ..data.images import IMAGE_EXTENSIONS, MASK_SUFFIX, list_images, load_image, mask_path, mask_problem, photo_beside
from ..runs.atomic import replace, write_text

MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # one photo; phone photos are 2-12 MB
MAX_PHOTOS = 50  # per run
# Training works from one photo (the CLI takes one too), so that is the floor; DreamBooth's paper and every guide
# use 3-10, so fewer than BEST_PHOTOS[0] is a note on the page, not a refusal. One wording, used everywhere:
MIN_PHOTOS = 1
BEST_PHOTOS = (3, 10)
PHOTO_RULE = f"at least {MIN_PHOTOS} photo of the subject; {BEST_PHOTOS[0]}–{BEST_PHOTOS[1]} work best"
CAPTION_SUFFIX = ".txt"
MAX_CAPTION_CHARS = 2000
PHOTOS = "photos"  # uploads go to RUN/photos/, captions beside them as NAME.txt
UI_DIR = "ui"  # RUN/ui/: the UI's own files (job state, training log, samples, exports)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, what: str, max_len: int = 80) -> str:
    """A file or folder name from the browser -> letters, digits, '.', '_', '-' only, no leading dot.

    Only the last path component is kept ('../../x.png' -> 'x.png'); an empty result is refused.
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    clean = _UNSAFE.sub("-", base).strip("-").lstrip(".")[:max_len]
    if not clean or clean in (".", ".."):
        raise UsageError(f"{what} {name!r}: not a usable name; use letters, digits, '.', '_' or '-'")
    return clean


def run_name(name: str) -> str:
    """A run name: safe_name without dots at all, so it can never be '..' or a hidden folder."""
    return safe_name(name.replace(".", "-"), "run name", max_len=64)


def inside(path: Path, roots: list[Path]) -> bool:
    real = path.resolve()
    return any(real == r or real.is_relative_to(r) for r in (root.resolve() for root in roots))


def confined(typed: str, roots: list[Path], what: str) -> Path:
    """A folder typed into the page, refused unless it resolves inside one of `roots`."""
    if not typed or "\x00" in typed:
        raise UsageError(f"{what}: give a folder")
    path = Path(typed).expanduser()
    if not path.is_absolute():
        path = roots[0] / path
    if not inside(path, roots):
        raise UsageError(f"{what} {typed}: outside the folders this UI may read ("
                         + ", ".join(str(r) for r in roots) + "); start 'peftbooth ui --allow-dir DIR' to add one")
    return path.resolve()


def run_dir(runs_dir: Path, name: str) -> Path:
    """RUNS/NAME for a name from a URL, refused unless it is already a safe run name."""
    if run_name(name) != name:
        raise UsageError(f"run {name!r}: not a run name")
    return runs_dir / name


def file_in(folder: Path, rel: str) -> Path:
    """A file named by a URL path inside `folder` (symlinks followed), or UsageError: no escaping the folder."""
    if "\x00" in rel:
        raise UsageError("bad file name")
    path = (folder / rel).resolve()
    if not path.is_relative_to(folder.resolve()) or not path.is_file():
        raise UsageError(f"{rel}: no such file")
    return path


def unique(folder: Path, name: str) -> Path:
    stem, suffix = os.path.splitext(name)
    path, i = folder / name, 1
    while path.exists():
        path, i = folder / f"{stem}-{i}{suffix}", i + 1
    return path


def store_upload(folder: Path, filename: str, data: bytes) -> Path:
    """Save one uploaded photo into `folder` under a sanitised, unused name, after the project's own loader has
    decoded it. Refused (nothing left behind): a name without an image extension, too many photos, too many
    bytes, or bytes that do not decode as an image.

    NAME.mask.png is the loss mask of the photo NAME.* (--masked-loss): its photo must be there already, the mask
    must have the photo's size and not be black everywhere, and it replaces an earlier mask of that photo."""
    name = safe_name(filename, "photo")
    if Path(name).suffix.lower() == CAPTION_SUFFIX:
        return store_caption(folder, filename, name, data)
    if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
        raise UsageError(f"photo {filename!r}: only {', '.join(IMAGE_EXTENSIONS)} images (and NAME.txt captions) "
                         "are accepted")
    if len(data) > MAX_UPLOAD_BYTES:
        raise UsageError(f"photo {filename!r}: {len(data) / 2**20:.1f} MB is over the {MAX_UPLOAD_BYTES // 2**20} MB "
                         "limit per photo")
    folder.mkdir(parents=True, exist_ok=True)
    is_mask = name.lower().endswith(MASK_SUFFIX)
    photo = photo_beside(folder / name, len(MASK_SUFFIX)) if is_mask else None
    if is_mask and photo is None:
        raise UsageError(f"mask {filename!r}: there is no photo {name[:-len(MASK_SUFFIX)]}.* for it; upload the "
                         "photo first (or rename the file if it is a photo)")
    if not is_mask and len(list_images(folder, "photos")) >= MAX_PHOTOS:
        raise UsageError(f"photo {filename!r}: this run already has {MAX_PHOTOS} photos, the most it may have")
    # a hidden name while it is checked: list_images (and so training) never sees a file that is not an image
    tmp = folder / f".upload-{secrets.token_hex(8)}{Path(name).suffix.lower()}"
    try:
        tmp.write_bytes(data)
        try:
            image = load_image(tmp)
        except UsageError:
            raise UsageError(f"photo {filename!r}: not a readable image") from None
        if photo is not None and (problem := mask_problem(image, load_image(photo))):
            raise UsageError(f"mask {filename!r}: {problem}")
        target = mask_path(photo) if photo is not None else unique(folder, name)
        replace(tmp, target)
        return target
    finally:
        tmp.unlink(missing_ok=True)


def store_caption(folder: Path, filename: str, name: str, data: bytes) -> Path:
    """An uploaded NAME.txt is the caption of the photo NAME.* already uploaded (as a typed caption would be)."""
    photo = photo_beside(folder / name, len(CAPTION_SUFFIX)) if folder.is_dir() else None
    if photo is None:
        raise UsageError(f"caption {filename!r}: there is no photo {name[:-len(CAPTION_SUFFIX)]}.* for it; upload "
                         "the photo first")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"caption {filename!r}: not UTF-8 text") from None
    return write_caption(folder, photo.name, text)


def photos_problem(folder: Path) -> str | None:
    """What the page says instead of '--instance-data-dir ...: no such folder' when there are no photos yet."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        count = len(list_images(folder, "photos")) if folder.is_dir() else 0
    if count < MIN_PHOTOS:
        return f"photos: none yet; add {PHOTO_RULE} (drop them above, choose files, or use a folder)"
    return None


def photos_note(folder: Path) -> str | None:
    """A word, not a refusal, when there are fewer photos than work best."""
    count = len(photos_of(folder))
    if MIN_PHOTOS <= count < BEST_PHOTOS[0]:
        best = f"{BEST_PHOTOS[0]}–{BEST_PHOTOS[1]}"
        return f"{count} photo{'s' if count > 1 else ''}: training works, but {best} work best"
    return None


def photos_of(folder: Path) -> list[dict]:
    """[{name, caption, mask}] for the photos of a folder; the caption is NAME.txt's text, '' when there is none;
    mask: whether NAME.mask.png lies beside it (--masked-loss)."""
    if not folder.is_dir():
        return []
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = list_images(folder, "photos")
    out = []
    for p in paths:
        txt = p.with_suffix(".txt")
        try:
            caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
        except (OSError, UnicodeDecodeError):
            caption = ""
        out.append({"name": p.name, "caption": caption, "mask": mask_path(p).is_file()})
    return out


def write_caption(folder: Path, photo: str, text: str) -> Path:
    """NAME.txt beside NAME.jpg (training reads it as that photo's prompt); empty text removes it."""
    path = folder / photo
    if photo != safe_name(photo, "photo") or not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise UsageError(f"photo {photo!r}: no such photo")
    if len(text) > MAX_CAPTION_CHARS:
        raise UsageError(f"caption of {photo}: over {MAX_CAPTION_CHARS} characters")
    txt = path.with_suffix(".txt")
    if not text.strip():
        txt.unlink(missing_ok=True)
        return txt
    atomic_write(txt, text.strip() + "\n")
    return txt


def atomic_write(path: Path, text: str) -> None:
    write_text(path, text)
