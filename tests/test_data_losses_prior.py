"""Data pairing, transforms, the loss maths and resumable class-image generation."""

import io
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import draw_photos, tiny_config
from PIL import Image

from peftbooth.data.dataset import DreamBoothDataset, collate
from peftbooth.data.images import list_images, load_captions, load_image
from peftbooth.data.transforms import to_tensor
from peftbooth.models.loading import load_components
from peftbooth.training.losses import diffusion_target, dreambooth_loss
from peftbooth.training.prior import generate_class_images, valid_class_images

# --- data -------------------------------------------------------------------------------------------------------


def test_batch_pairs_each_half_with_its_own_prompt(tiny_model, tmp_path):
    photos = draw_photos(tmp_path / "photos", n=3)
    (photos / "photo_1.txt").write_text("a photo of sks dog on a beach\n")  # per-image caption
    paths = list_images(photos, "--instance-data-dir")
    prompts = load_captions(paths, "a photo of sks dog")
    assert prompts == ["a photo of sks dog", "a photo of sks dog on a beach", "a photo of sks dog"]
    class_dir = draw_photos(tmp_path / "class", n=2, size=(40, 40))
    ds = DreamBoothDataset([load_image(p) for p in paths], prompts, 32, class_paths=list_images(class_dir, "c"),
                           class_prompt="a photo of a dog")
    assert len(ds) == 3
    tok = load_components(tiny_model).tokenizer
    batch = collate([ds[0], ds[1]], [tok])  # batch size 2 + 2 class images
    assert batch["num_instance"] == 2
    assert batch["prompts"] == ["a photo of sks dog", "a photo of sks dog on a beach",
                                "a photo of a dog", "a photo of a dog"]
    for row, prompt in enumerate(batch["prompts"]):
        assert torch.equal(batch["input_ids"][0][row], tok(prompt, padding="max_length", max_length=77,
                                                        truncation=True, return_tensors="pt").input_ids[0])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    # rows 2 and 3 are the class images 0 and 1, in order
    torch.testing.assert_close(batch["pixel_values"][2], ds[0]["class_pixels"])
    torch.testing.assert_close(batch["pixel_values"][3], ds[1]["class_pixels"])


def test_class_prompt_dropout_gives_some_class_rows_the_empty_prompt(tmp_path):
    photos = draw_photos(tmp_path / "photos", n=2)
    class_paths = list_images(draw_photos(tmp_path / "class", n=4, size=(40, 40)), "c")
    images = [load_image(p) for p in list_images(photos, "p")]

    def dataset(dropout):
        return DreamBoothDataset(images, ["a photo of sks dog"] * 2, 32, random_flip=True, class_paths=class_paths,
                                 class_prompt="a photo of a dog", seed=5, class_prompt_dropout=dropout)

    plain, half, every = dataset(0.0), dataset(0.5), dataset(1.0)
    prompts = []
    for epoch in range(25):
        for ds in (plain, half, every):
            ds.set_epoch(epoch)
        for i in range(4):
            a, b, c = plain[i], half[i], every[i]
            assert a["class_prompt"] == "a photo of a dog" and c["class_prompt"] == ""
            assert torch.equal(b["class_pixels"], a["class_pixels"])
            assert b["instance_prompt"] == a["instance_prompt"] and b["class_seed"] == a["class_seed"]
            assert b["class_key"] == a["class_key"]  # the same flips and noise: only the prompt changes
            prompts.append(b["class_prompt"])
    assert set(prompts) == {"", "a photo of a dog"}
    assert 0.35 < prompts.count("") / len(prompts) < 0.65  # 100 rows at 0.5
    again = dataset(0.5)
    again.set_epoch(24)
    assert [again[i]["class_prompt"] for i in range(4)] == prompts[-4:]  # a function of (seed, epoch, index)


def test_epoch_padding_gives_a_repeated_item_its_own_draws(tiny_model, photos, tmp_path):
    """3 photos in batches of 2: the epoch is padded to 4 rows by using one photo again. That row must get its own
    seed (latent sample, noise, timestep) and flip draw, not a copy of the photo's first row in the epoch."""
    from peftbooth.training.setup import setup

    run = setup(tiny_config(tiny_model, photos, tmp_path / "run", **{"data.train_batch_size": 2,
                                                                     "data.random_flip": True}))
    for epoch in range(3):
        run.sampler.set_epoch(epoch)
        run.dataset.set_epoch(epoch)
        rows = [(key[1], seed) for batch in run.dataloader for key, seed in zip(batch["keys"], batch["seeds"])]
        assert len(rows) == 4 and sorted({photo for photo, _ in rows}) == [0, 1, 2]  # one photo twice
        assert len({seed for _, seed in rows}) == 4
    repeat = run.sampler.order()[-1]
    assert repeat[1] == 1  # the padding slot is the item's first repeat
    pairs = set()
    for epoch in range(12):
        run.dataset.set_epoch(epoch)
        pairs.add((run.dataset[(repeat[0], 0)]["instance_key"][2], run.dataset[repeat]["instance_key"][2]))
    assert any(first != again for first, again in pairs)  # the repeat's flip is drawn, not copied


def test_transforms_resize_short_side_crop_and_range(tmp_path):
    img = Image.new("RGB", (80, 40), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 40))  # blue left quarter
    ds = DreamBoothDataset([img], ["p"], 32, center_crop=True)
    x = ds[0]["instance_pixels"]
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    # 80x40 -> 64x32, center crop keeps columns 16..48: the blue quarter (0..16 after resize) is cut away
    assert torch.allclose(x[:, :, 4], torch.tensor([1.0, -1.0, -1.0])[:, None], atol=0.02)
    assert torch.equal(to_tensor(Image.new("RGB", (2, 2), (255, 255, 255))), torch.ones(3, 2, 2))


def test_flips_and_random_crops_vary_across_epochs_and_repeat_within_one():
    """--random-flip and --no-center-crop draw a new flip and crop for each item every epoch (from the item's seed),
    and the same ones again for the same (epoch, item): what exact resume relies on."""
    arr = np.zeros((40, 96, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(96, dtype=np.uint8)[None, :] * 2  # a horizontal ramp: every crop and flip looks different
    arr[..., 1] = np.arange(40, dtype=np.uint8)[:, None] * 5
    ds = DreamBoothDataset([Image.fromarray(arr)], ["p"], 32, center_crop=False, random_flip=True, seed=3)
    flips, lefts, views = set(), set(), set()
    for epoch in range(10):
        ds.set_epoch(epoch)
        item = ds[0]
        assert torch.equal(item["instance_pixels"], ds[0]["instance_pixels"])  # the same epoch: the same view
        flips.add(item["instance_key"][2])
        lefts.add(int(item["instance_time_ids"][3]))  # the crop's left edge (96x40 -> 77x32: 0..45)
        views.add(item["instance_pixels"].numpy().tobytes())
    assert flips == {False, True}
    assert len(lefts) > 3 and len(views) > 3


def test_exif_rotation_and_modes_become_upright_rgb(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "alpha.png")
    assert load_image(tmp_path / "alpha.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    Image.new("L", (8, 8), 100).save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png").mode == "RGB"


# --- losses -----------------------------------------------------------------------------------------------------


def test_dreambooth_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    loss, inst, prior = dreambooth_loss(pred, target, num_instance=2, prior_loss_weight=0.5)
    hand_inst = ((pred[:2] - target[:2]) ** 2).sum() / pred[:2].numel()
    hand_prior = ((pred[2:] - target[2:]) ** 2).sum() / pred[2:].numel()
    torch.testing.assert_close(inst, hand_inst)
    torch.testing.assert_close(prior, hand_prior)
    torch.testing.assert_close(loss, hand_inst + 0.5 * hand_prior)
    only, inst_only, none = dreambooth_loss(pred[:2], target[:2], 2, 0.5)
    assert none is None and torch.equal(only, inst_only)
    torch.testing.assert_close(only, F.mse_loss(pred[:2], target[:2]))


def test_target_is_noise_for_epsilon_and_velocity_for_v_prediction(tiny_model, tiny_vpred_model):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    eps_sched = load_components(tiny_model).noise_scheduler
    assert diffusion_target(eps_sched, x0, noise, t) is noise
    v_sched = load_components(tiny_vpred_model).noise_scheduler
    assert type(v_sched).__name__ == "DDPMScheduler" and v_sched.config.prediction_type == "v_prediction"
    v = diffusion_target(v_sched, x0, noise, t)
    a = v_sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x0)
    assert not torch.allclose(v, noise)


# --- class images -----------------------------------------------------------------------------------------------


def test_class_images_generate_missing_only_and_resume(tiny_model, tmp_path):
    folder = tmp_path / "class"
    paths = generate_class_images(tiny_model, "a photo of a dog", folder, 3, sample_batch_size=2,
                                  num_inference_steps=2, show_progress=False)
    assert len(paths) == 3 and len(set(p.name for p in paths)) == 3
    assert sorted(p.name[:11] for p in paths) == ["class-00000", "class-00001", "class-00002"]
    assert all(len(p.stem) == 11 + 1 + 16 for p in paths)  # index + content hash
    # a crash: one image lost, a half-written temp file and a corrupt image left behind
    paths[1].unlink()  # lost from the middle: index 1 must be made again, not a repeat of index 2
    (folder / f".{paths[0].name}.123.tmp").write_bytes(b"\x89PNG\r\n")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    before = set(folder.iterdir())
    with pytest.warns(UserWarning, match="broken.png"):
        again = generate_class_images(tiny_model, "a photo of a dog", folder, 4, sample_batch_size=2,
                                      num_inference_steps=2, show_progress=False)
    new = set(folder.iterdir()) - before
    assert sorted(p.name[:11] for p in new) == ["class-00001", "class-00003"]  # 2 were left, 4 wanted
    assert len(again) == 4 and all(p.suffix == ".png" and not p.name.startswith(".") for p in again)
    good, corrupt = valid_class_images(folder)
    assert len(good) == 4 and [p.name for p in corrupt] == ["broken.png"]
    # nothing missing: nothing is generated (the model is not even loaded)
    untouched = set(folder.iterdir())
    with pytest.warns(UserWarning):
        generate_class_images("/no/such/model", "x", folder, 4, show_progress=False)
    assert set(folder.iterdir()) == untouched


def test_class_image_is_written_atomically(tmp_path, monkeypatch):
    from peftbooth.training import prior

    img = Image.new("RGB", (8, 8), (1, 2, 3))
    calls = []
    real_replace = os.replace  # the one rename of rundir.atomic_file, which prior writes through
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append((a, b)) or real_replace(a, b))
    path = prior.write_image_atomic(tmp_path, img, 7)
    (src, dst), = calls
    assert src.name.startswith(".") and dst == path and path.exists() and not src.exists()
    assert path.name.startswith("class-00007-")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert path.read_bytes() == buf.getvalue()


def test_class_images_command_fills_up_to_n(tiny_model, tmp_path, capsys):
    from peftbooth.cli import main

    folder = tmp_path / "class"
    argv = ["class-images", "--model", tiny_model, "--class-prompt", "a photo of a dog", "--class-data-dir",
            str(folder), "--class-image-steps", "2", "--sample-batch-size", "2"]
    assert main([*argv, "--num-class-images", "2"]) == 0
    first = set(folder.iterdir())
    assert main([*argv, "--num-class-images", "3"]) == 0
    assert len(first) == 2 and first < set(folder.iterdir()) and len(list(folder.iterdir())) == 3
    assert "3 class images in" in capsys.readouterr().out
    assert main([*argv[:-4], "--num-class-images", "0"]) == 2


def test_class_prompt_dropout_trains_through_the_text_cache(tiny_model, photos, tmp_path):
    """With a frozen (cached) text encoder the empty prompt must be in the cache; dropping the class prompt
    changes what the class rows teach, so the adapter differs from the run without it."""
    from safetensors.torch import load_file

    from peftbooth.training.loop import train

    settings = {"data.with_prior_preservation": True, "data.class_prompt": "a photo of a dog",
                "data.num_class_images": 2, "data.class_data_dir": str(tmp_path / "class"), "train.max_train_steps": 3}
    runs = {p: train(tiny_config(tiny_model, photos, tmp_path / f"run{p}", **settings,
                                 **{"data.class_prompt_dropout": p})) for p in (0.0, 1.0)}
    a, b = (load_file(runs[p] / "unet" / "adapter_model.safetensors") for p in (0.0, 1.0))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


def test_class_images_take_their_captions_through_the_text_cache(tiny_model, photos, tmp_path):
    """A class image with NAME.txt beside it is trained on that caption (regularisation images with captions);
    the others on --class-prompt. With a frozen text encoder every caption is in the text cache."""
    from safetensors.torch import load_file

    from peftbooth.training.loop import train
    from peftbooth.training.prior import generate_class_images

    folders = {}
    for name in ("plain", "captioned"):
        folders[name] = tmp_path / name
        paths = generate_class_images(tiny_model, "a photo of a dog", folders[name], 2, 2, 2, 0, show_progress=False)
    (folders["captioned"] / paths[1].name).with_suffix(".txt").write_text("a photo of a dog on a beach\n")
    class_paths = list_images(folders["captioned"], "c")
    ds = DreamBoothDataset([load_image(p) for p in list_images(photos, "p")], ["a photo of sks dog"] * 3, 32,
                           class_paths=class_paths, class_prompt="a photo of a dog",
                           class_prompts=load_captions(class_paths, "a photo of a dog"))
    assert [ds[i]["class_prompt"] for i in range(2)] == ["a photo of a dog", "a photo of a dog on a beach"]
    runs = {name: train(tiny_config(tiny_model, photos, tmp_path / f"run-{name}", **{
        "data.with_prior_preservation": True, "data.class_prompt": "a photo of a dog", "data.num_class_images": 2,
        "data.class_data_dir": str(folder), "train.max_train_steps": 3})) for name, folder in folders.items()}
    a, b = (load_file(runs[n] / "unet" / "adapter_model.safetensors") for n in folders)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
