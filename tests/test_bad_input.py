"""Bad input that real photo folders contain. Each case: the one-line message and exit code 2 with nothing
written, or the documented handling (converted, rotated, downscaled) and a run that trains.

(More cases live beside the features they test: test_cli.py — folders, flags, YAML configs, models, finished
runs; test_resume.py — full disk, locks, checkpoints from another setup; test_data_losses_prior.py — corrupt
class images from an earlier crash.)"""

import io

import numpy as np
import pytest
from conftest import draw_photos
from PIL import Image

from peftbooth.cli import main
from peftbooth.data.images import load_image


def jpeg_bytes(img, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def train_argv(tiny_model, photos, out):
    return ["train", "--model", tiny_model, "--instance-data-dir", str(photos), "--instance-prompt", "a sks dog",
            "--resolution", "32", "--max-train-steps", "1", "--report-to", "none", "--output-dir", str(out)]


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


REFUSED = {
    "zero-byte": ("bad.png", lambda: b"", "bad.png: not a readable image"),
    "truncated-jpeg": ("bad.jpg", lambda: jpeg_bytes(Image.new("RGB", (64, 64), (9, 99, 199)))[:300],
                       "bad.jpg: not a readable image"),
    "text-named-png": ("bad.png", lambda: b"just some notes, not a picture\n", "bad.png: not a readable image"),
    "one-pixel": ("tiny.png", lambda: png_bytes(Image.new("RGB", (1, 1))), "tiny.png: image is only 1x1 px"),
}


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case", REFUSED)
def test_refused_images(tiny_model, tmp_path, capsys, case):
    name, make, message = REFUSED[case]
    photos = draw_photos(tmp_path / "photos", n=2)
    (photos / name).write_bytes(make())
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    assert main(train_argv(tiny_model, photos, out)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("peftbooth train: error: ") and len(err.splitlines()) == 1
    assert snapshot(tmp_path) == before and not out.exists()


def test_unreadable_file_is_named(tiny_model, tmp_path, capsys, monkeypatch):
    """A file without read permission. Tests may run as root, who can read anything: the denial is simulated
    at the point where the file is opened."""
    photos = draw_photos(tmp_path / "photos", n=2)
    locked = photos / "locked.png"
    locked.write_bytes(png_bytes(Image.new("RGB", (40, 40))))
    import peftbooth.data.images as data

    real_open = data.Image.open

    def deny(path, *a, **k):
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(data.Image, "open", deny)
    assert main(train_argv(tiny_model, photos, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "locked.png: not a readable image (PermissionError: [Errno 13] Permission denied" in err
    assert not (tmp_path / "out").exists()


def cmyk_jpeg() -> bytes:
    return jpeg_bytes(Image.new("CMYK", (40, 48), (0, 255, 255, 0)))  # pure red in CMYK


def rgba_png() -> bytes:
    img = Image.new("RGBA", (40, 40), (0, 0, 255, 255))
    img.paste((0, 0, 0, 0), (0, 0, 20, 40))  # left half fully transparent
    return png_bytes(img)


def png16() -> bytes:
    arr = np.full((40, 40), 65535, dtype=np.uint16)
    arr[:, :20] = 0
    img = Image.fromarray(arr)
    assert img.mode.startswith("I")  # 16-bit grayscale
    return png_bytes(img)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    return jpeg_bytes(Image.new("RGB", (60, 30), (0, 200, 0)), exif=exif.tobytes())


HANDLED = {
    # case: (file name, bytes, check of the loaded image)
    "rgba-png": ("a.png", rgba_png, lambda im: im.getpixel((5, 5)) == (255, 255, 255) and im.getpixel((30, 5)) == (0, 0, 255)),
    "cmyk-jpeg": ("c.jpg", cmyk_jpeg, lambda im: im.getpixel((5, 5))[0] > 200 and im.getpixel((5, 5))[1] < 60),
    "16-bit-png": ("d.png", png16, lambda im: im.getpixel((5, 5)) == (0, 0, 0) and im.getpixel((30, 5)) == (255, 255, 255)),
    "grayscale": ("g.png", lambda: png_bytes(Image.new("L", (40, 40), 128)), lambda im: im.getpixel((0, 0)) == (128, 128, 128)),
    "exif-rotated": ("r.jpg", exif_rotated, lambda im: im.size == (30, 60)),  # upright: portrait
}


@pytest.mark.parametrize("case", HANDLED)
def test_converted_images_train(tiny_model, tmp_path, case):
    name, make, check = HANDLED[case]
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / name).write_bytes(make())
    img = load_image(photos / name)
    assert img.mode == "RGB" and check(img)
    assert main(train_argv(tiny_model, photos, tmp_path / "out")) == 0
    assert (tmp_path / "out" / "unet" / "adapter_model.safetensors").is_file()


def test_huge_jpeg_is_decoded_small(tiny_model, tmp_path):
    """A 12 000 px photo: JPEG draft mode decodes it at a fraction of full size (no 300 MB buffer)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "huge.jpg").write_bytes(jpeg_bytes(Image.new("RGB", (12000, 8000), (200, 60, 60)), quality=50))
    img = load_image(photos / "huge.jpg", max_side=64)
    assert min(img.size) >= 64 and max(img.size) <= 12000 // 8
    assert main(train_argv(tiny_model, photos, tmp_path / "out")) == 0


def test_adapter_from_another_base_model_is_refused(tiny_model, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    photos = draw_photos(tmp_path / "photos", n=2)
    run = tmp_path / "run"
    assert main(train_argv(tiny_model, photos, run)) == 0
    weights = run / "unet" / "adapter_model.safetensors"
    state = load_file(weights)
    key = next(k for k in sorted(state) if k.endswith("attn2.to_k.lora_A.weight"))
    state[key] = state[key].new_zeros(state[key].shape[0], 768)  # as if trained on SD 1.5 (768-d text states)
    save_file(state, weights)
    out = tmp_path / "gen"
    assert main(["generate", "--model", tiny_model, "--adapter", str(run), "--prompt", "p", "--output-dir",
                 str(out)]) == 2
    err = capsys.readouterr().err
    module = key.removeprefix("base_model.model.").replace("lora_A.weight", "lora_A")
    assert f"does not fit this base model ({module}" in err
    assert "the adapter has shape [4, 768], this model needs [4, 32]" in err
    assert not out.exists()


def test_model_with_pickle_weights_only_is_refused(tiny_model, tmp_path, capsys):
    """Base-model weights are read from safetensors only: a folder holding only .bin files is not unpickled."""
    import shutil

    import torch
    from safetensors.torch import load_file

    model = tmp_path / "pickled-model"
    shutil.copytree(tiny_model, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), model / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    photos = draw_photos(tmp_path / "photos", n=2)
    assert main(train_argv(str(model), photos, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"--model {model}: could not load" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
