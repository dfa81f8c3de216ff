"""Data-parallel training on CPU (2 processes, gloo): same adapters on every rank, same result as one process
with the same global batch, class images split without duplicates, one writer."""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import draw_photos


def argv(tiny_model, photos, out, class_dir, extra):
    return [sys.executable, "-m", "peftbooth", "train", "--model", tiny_model, "--instance-data-dir", str(photos),
            "--instance-prompt", "a photo of sks dog", "--resolution", "32", "--max-train-steps", "3",
            "--report-to", "none", "--output-dir", str(out), "--with-prior-preservation", "--class-prompt",
            "a photo of a dog", "--num-class-images", "3", "--class-image-steps", "2", "--class-data-dir",
            str(class_dir), "--train-text-encoder", "--learning-rate", "0.01", "--random-flip", *extra]


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_model, tmp_path):
    photos = draw_photos(tmp_path / "photos", n=4)  # 4 photos: 2 global batches of 2 per epoch, no padding
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    two = subprocess.run(argv(tiny_model, photos, tmp_path / "two", tmp_path / "class2",
                              ["--train-batch-size", "1", "--num-processes", "2"]),
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "adapter weights identical on all 2 processes" in two.stdout
    assert two.stdout.count("adapters written to") == 1  # rank 0 alone reports and writes
    names = sorted(p.name[:11] for p in (tmp_path / "class2").iterdir())
    assert names == ["class-00000", "class-00001", "class-00002"]  # split across ranks, none made twice

    one = subprocess.run(argv(tiny_model, photos, tmp_path / "one", tmp_path / "class1", ["--train-batch-size", "2"]),
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    for part in ("unet", "text_encoder"):
        a = load_file(tmp_path / "two" / part / "adapter_model.safetensors")
        b = load_file(tmp_path / "one" / part / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        changed = 0
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
            changed += int(a[k].abs().sum() > 0)
        assert changed  # trained, not both still at their zero init


def test_two_processes_train_sdxl_with_both_text_encoders(tmp_path):
    """SDXL under DistributedDataParallel with adapters on both text encoders: every adapter weight gets a gradient
    (an unused one would stall the gradient exchange), both ranks end identical, all three adapters are saved."""
    from peftbooth.models import build_tiny_model

    model = build_tiny_model(tmp_path / "sdxl", shape="tiny-sdxl")
    photos = draw_photos(tmp_path / "photos", n=2)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    cmd = argv(str(model), photos, tmp_path / "two", tmp_path / "class", ["--num-processes", "2"])
    cmd[cmd.index("--resolution") + 1] = "64"
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "adapter weights identical on all 2 processes" in run.stdout
    for part in ("unet", "text_encoder", "text_encoder_2"):
        assert (tmp_path / "two" / part / "adapter_model.safetensors").is_file()
