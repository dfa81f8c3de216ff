"""`peftbooth train` on bad input: exit code 2, one line on stderr naming the flag or file, and nothing written.
Plus --overwrite of a finished run, one end-to-end run of the installed entry point, a finished run's saved
config.yaml reproducing it (here because it shares this module's one finished run) and a NaN loss. Config files
(--config / --print-config) are in tests/test_cli_config.py, which imports this module's helpers.

Real training uses the tiny model at resolution 32 for 1 step, a few seconds each on 2 CPU cores.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import draw_photos

from peftbooth.cli import main

PROMPT = "a photo of sks dog"
MARKER = Path("unet") / "adapter_model.safetensors"


def train_argv(model, photos, out, *extra) -> list[str]:
    return [
        "train", "--model", str(model), "--instance-data-dir", str(photos), "--instance-prompt", PROMPT,
        "--output-dir", str(out), "--resolution", "32", "--max-train-steps", "1", "--report-to", "none", *extra,
    ]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` -> its bytes (None for folders): any file written, changed or removed shows."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))
    }


def print_config(capsys, *argv) -> dict:
    capsys.readouterr()
    rc = main(["train", *map(str, argv), "--print-config"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert err == ""
    return yaml.safe_load(out)


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    """One real 1-step run (module-wide, never modified): (run folder, photos folder, argv that made it)."""
    root = tmp_path_factory.mktemp("finished")
    photos = draw_photos(root / "photos")
    argv = train_argv(tiny_model, photos, root / "run")
    assert main(argv) == 0
    assert (root / "run" / MARKER).is_file()
    return root / "run", photos, argv


# ---------------------------------------------------------------------------------------------------------------
# bad input: exit 2, one line naming the flag / file, nothing written


def _mkdir(tmp, *names):
    for name in names:
        (tmp / name).mkdir(parents=True, exist_ok=True)


def _notes_only(tmp):
    _mkdir(tmp, "notes")
    (tmp / "notes" / "notes.md").write_text("# my dog\n")


def _text_as_png(tmp):
    draw_photos(tmp / "mixed", n=2)
    (tmp / "mixed" / "broken.png").write_text("this is not a png\n")


def _masked_photos(tmp, name, size=(48, 40), value=255):
    """draw_photos' photos with a mask of `size` filled with `value` beside each."""
    from PIL import Image

    draw_photos(tmp / name, n=2)
    for i in range(2):
        Image.new("L", size, value).save(tmp / name / f"photo_{i}.mask.png")


def _truncated_png(tmp):
    draw_photos(tmp / "trunc", n=2)
    data = (tmp / "trunc" / "photo_0.png").read_bytes()
    (tmp / "trunc" / "photo_0.png").write_bytes(data[: len(data) // 2])


def _model_without_unet(tmp, model):
    shutil.copytree(model, tmp / "no-unet")
    shutil.rmtree(tmp / "no-unet" / "unet")


def _copy_finished_run(tmp, finished):
    shutil.copytree(finished, tmp / "out")


# id -> (setup(tmp, model, finished_run_dir) or None, extra argv, expected stderr fragments).
# Extra argv comes after the valid base arguments, so a repeated flag overrides the valid value (argparse: last wins).
# '{tmp}', '{photos}' and '{out}' are filled in with the test's folders.
BAD_INPUTS = {
    "vae-missing": (
        None, ["--vae", "{tmp}/novae"], ["--vae {tmp}/novae: no such folder; pass an AutoencoderKL folder or hub id"]),
    "vae-is-a-file": (
        None, ["--vae", "{photos}/photo_0.png"], ["--vae {photos}/photo_0.png: is a file; pass a diffusers AutoencoderKL folder"]),
    "vae-is-another-model": (
        lambda tmp, m, f: shutil.copytree(Path(m) / "unet", tmp / "notvae"), ["--vae", "{tmp}/notvae"],
        ["--vae {tmp}/notvae: could not load an AutoencoderKL ("]),
    "instance-dir-missing": (
        None, ["--instance-data-dir", "{tmp}/nope"], ["--instance-data-dir {tmp}/nope: no such folder"]),
    "instance-dir-empty": (
        lambda tmp, m, f: _mkdir(tmp, "empty"), ["--instance-data-dir", "{tmp}/empty"],
        ["--instance-data-dir {tmp}/empty: no images (jpg, jpeg, png, webp) found"]),
    "instance-dir-only-non-images": (
        lambda tmp, m, f: _notes_only(tmp), ["--instance-data-dir", "{tmp}/notes"],
        ["--instance-data-dir {tmp}/notes: no images"]),
    "instance-dir-is-a-file": (
        None, ["--instance-data-dir", "{photos}/photo_0.png"],
        ["--instance-data-dir {photos}/photo_0.png: is a file, not a folder of images"]),
    "corrupt-image-text-as-png": (
        lambda tmp, m, f: _text_as_png(tmp), ["--instance-data-dir", "{tmp}/mixed"],
        ["{tmp}/mixed/broken.png: not a readable image"]),
    "corrupt-image-truncated-png": (
        lambda tmp, m, f: _truncated_png(tmp), ["--instance-data-dir", "{tmp}/trunc"],
        ["{tmp}/trunc/photo_0.png: not a readable image", "truncated"]),
    "masked-loss-without-masks": (
        None, ["--masked-loss"],
        ["--masked-loss: photo_0.png has no mask; add photo_0.mask.png beside it (white where the subject is"]),
    "masked-loss-mask-of-another-size": (
        lambda tmp, m, f: _masked_photos(tmp, "sized", size=(40, 40)),
        ["--masked-loss", "--instance-data-dir", "{tmp}/sized"],
        ["{tmp}/sized/photo_0.mask.png: mask is 40x40 px but its photo is 48x40 px; make them the same size"]),
    "masked-loss-black-mask": (
        lambda tmp, m, f: _masked_photos(tmp, "black", value=0),
        ["--masked-loss", "--instance-data-dir", "{tmp}/black"],
        ["{tmp}/black/photo_0.mask.png: mask is black everywhere, so nothing of the photo would be learned"]),
    "unmasked-weight-without-masked-loss": (
        None, ["--unmasked-weight", "0.1"], ["--unmasked-weight needs --masked-loss"]),
    "unmasked-weight-above-1": (
        None, ["--masked-loss", "--unmasked-weight", "2"], ["--unmasked-weight must be"]),
    "ema-decay-of-1": (
        None, ["--ema-decay", "1"], ["--ema-decay must be < 1 (got 1.0)"]),
    "ema-decay-negative": (
        None, ["--ema-decay", "-0.5"], ["--ema-decay must be >= 0 (got -0.5)"]),
    "prior-without-class-prompt": (
        None, ["--with-prior-preservation"], ["--with-prior-preservation needs --class-prompt"]),
    "class-prompt-dropout-without-prior": (
        None, ["--class-prompt-dropout", "0.5"], ["--class-prompt-dropout needs --with-prior-preservation"]),
    "class-prompt-from-captions-without-prior": (
        None, ["--class-prompt-from-captions"],
        ["--class-prompt-from-captions needs --with-prior-preservation with --prior-mode class-images"]),
    "class-prompt-from-captions-no-identifier": (
        None, ["--with-prior-preservation", "--class-prompt", "a photo of sks dog", "--class-prompt-from-captions"],
        [("--class-prompt-from-captions: --instance-prompt 'a photo of sks dog' has no word that --class-prompt "
          "'a photo of sks dog' lacks (the identifier to take out of the captions)")]),
    "class-prompt-dropout-above-1": (
        None, ["--with-prior-preservation", "--class-prompt", "a photo of a dog", "--class-prompt-dropout", "1.5"],
        ["--class-prompt-dropout must be"]),
    "class-data-dir-is-a-file": (
        None, ["--with-prior-preservation", "--class-prompt", "a photo of a dog",
               "--class-data-dir", "{photos}/photo_0.png"],
        ["--class-data-dir {photos}/photo_0.png: is a file, not a folder"]),
    "resolution-not-multiple-of-8": (
        None, ["--resolution", "30"], ["--resolution must be a multiple of 8 from 8 to 4096 (got 30)"]),
    # numeric options: finite and in range, refused before any work (a huge resolution used to hang for minutes)
    "resolution-huge": (
        None, ["--resolution", "1000000"], ["--resolution must be a multiple of 8 from 8 to 4096 (got 1000000)"]),
    "learning-rate-nan": (None, ["--learning-rate", "nan"], ["--learning-rate must be a finite number (got nan)"]),
    "learning-rate-inf": (None, ["--learning-rate", "inf"], ["--learning-rate must be a finite number (got inf)"]),
    "learning-rate-negative": (None, ["--learning-rate=-1e-4"], ["--learning-rate must be > 0 (got -0.0001)"]),
    "text-encoder-learning-rate-nan": (
        None, ["--train-text-encoder", "--text-encoder-learning-rate", "nan"],
        ["--text-encoder-learning-rate must be a finite number (got nan)"]),
    "adam-epsilon-nan": (None, ["--adam-epsilon", "nan"], ["--adam-epsilon must be a finite number (got nan)"]),
    "max-grad-norm-nan": (None, ["--max-grad-norm", "nan"], ["--max-grad-norm must be a finite number (got nan)"]),
    "prior-loss-weight-inf": (
        None, ["--prior-loss-weight", "inf"], ["--prior-loss-weight must be a finite number (got inf)"]),
    "snr-gamma-nan": (None, ["--snr-gamma", "nan"], ["--snr-gamma must be a finite number (got nan)"]),
    "noise-offset-too-big": (None, ["--noise-offset", "5"], ["--noise-offset must be <= 1 (got 5.0)"]),
    "alpha-nan": (None, ["--alpha", "nan"], ["--alpha must be a finite number (got nan)"]),
    "rank-huge": (None, ["--rank", "100000"], ["--rank must be <= 4096 (got 100000)"]),
    "seed-negative": (None, ["--seed", "-1"], ["--seed must be >= 0 (got -1)"]),
    "seed-too-big": (None, ["--seed", str(2**32)], [f"--seed must be <= {2**32 - 1} (got {2**32})"]),
    "batch-size-huge": (None, ["--train-batch-size", "100000"], ["--train-batch-size must be <= 1024 (got 100000)"]),
    "dropout-one": (None, ["--dropout", "1"], ["--dropout must be < 1 (got 1.0)"]),
    "warmup-negative": (None, ["--lr-warmup-steps", "-5"], ["--lr-warmup-steps must be >= 0 (got -5)"]),
    "decompose-factor-zero": (
        None, ["--adapter", "lokr", "--decompose-factor", "0"], ["--decompose-factor must be -1 (automatic) or >= 1"]),
    "every-problem-at-once": (
        None, ["--resolution", "1000000", "--learning-rate", "nan"],
        ["--resolution must be a multiple of 8", "; --learning-rate must be a finite number (got nan)"]),
    "resolution-not-a-number": (
        None, ["--resolution", "big"], ["argument --resolution: invalid int value: 'big'"]),
    "max-train-steps-zero": (
        None, ["--max-train-steps", "0"], ["--max-train-steps must be >= 1 (got 0)"]),
    "unknown-adapter-type": (
        None, ["--adapter", "foo"], ["argument --adapter: invalid choice: 'foo'", "lora", "loha", "lokr"]),
    "unknown-target-preset": (
        None, ["--target-modules", "attn-f"],
        ["--target-modules: unknown preset 'attn-f'; presets are attn | attn-ff | all"]),
    "unknown-target-module": (
        None, ["--target-modules", "to_q,to_zz"],
        ["--target-modules: no module named to_zz in the UNet2DConditionModel"]),
    "unknown-text-encoder-target-module": (
        None, ["--train-text-encoder", "--text-encoder-target-modules", "zz_proj"],
        ["--text-encoder-target-modules: no module named zz_proj in the CLIPTextModel"]),
    "dora-on-loha": (
        None, ["--adapter", "loha", "--use-dora"], ["--use-dora / --use-rslora apply to lora only (adapter is loha)"]),
    "model-empty-folder": (
        lambda tmp, m, f: _mkdir(tmp, "empty-model"), ["--model", "{tmp}/empty-model"],
        ["--model {tmp}/empty-model: not a diffusers Stable Diffusion folder (missing unet/, vae/"]),
    "model-missing-unet": (
        lambda tmp, m, f: _model_without_unet(tmp, m), ["--model", "{tmp}/no-unet"],
        ["--model {tmp}/no-unet: not a diffusers Stable Diffusion folder (missing unet/)"]),
    "model-no-such-path": (
        None, ["--model", "{tmp}/no-model-here"], ["--model {tmp}/no-model-here: no such folder"]),
    "compile-mode-without-compile": (
        None, ["--compile-mode", "reduce-overhead"], ["--compile-mode reduce-overhead needs --compile"]),
    "unknown-compile-mode": (
        None, ["--compile", "--compile-mode", "fast"], ["argument --compile-mode: invalid choice: 'fast'"]),
    "output-dir-is-a-file": (
        None, ["--output-dir", "{photos}/photo_0.png"], ["--output-dir {photos}/photo_0.png: is a file"]),
    "output-dir-holds-finished-run": (
        lambda tmp, m, f: _copy_finished_run(tmp, f), [],
        ["--output-dir {out}: already holds a finished run; pass --overwrite"]),
}

# cases that also warn: id -> fragment of the warning
BAD_INPUT_WARNINGS = {"instance-dir-only-non-images": "--instance-data-dir {tmp}/notes: skipping non-image files: notes.md"}

if not torch.cuda.is_available():  # Accelerate gives fp16 on the CPU neither autocast nor a gradient scaler
    BAD_INPUTS["fp16-on-the-cpu"] = (
        None, ["--mixed-precision", "fp16"],
        ["--mixed-precision fp16: needs a GPU (on the CPU there is no fp16 autocast or gradient scaler); "
         "use --mixed-precision bf16 or no"])

try:
    import bitsandbytes  # noqa: F401
except ImportError:  # the check only means something where bitsandbytes is missing
    BAD_INPUTS["8bit-adam-without-bitsandbytes"] = (
        None, ["--use-8bit-adam"], ["--use-8bit-adam needs bitsandbytes"])


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tiny_model, finished_run, tmp_path, capsys, recwarn):
    setup, extra, expected = BAD_INPUTS[case]
    photos = draw_photos(tmp_path / "photos")
    out = tmp_path / "out"
    if setup:
        setup(tmp_path, tiny_model, finished_run[0])
    fill = dict(tmp=tmp_path, photos=photos, out=out)
    extra = [a.format(**fill) for a in extra]
    before, model_before = snapshot(tmp_path), snapshot(Path(tiny_model))
    existed = out.exists()

    rc = main(train_argv(tiny_model, photos, out, *extra))

    stdout, stderr = capsys.readouterr()
    assert rc == 2, stderr
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("peftbooth train: error: ")
    for fragment in expected:
        assert fragment.format(**fill) in lines[0]
    warned = [str(w.message) for w in recwarn]
    if case in BAD_INPUT_WARNINGS:
        assert [m for m in warned if BAD_INPUT_WARNINGS[case].format(**fill) in m], warned
    # nothing written: no output folder, photos / model / an existing run byte-for-byte unchanged
    assert out.exists() == existed
    assert snapshot(tmp_path) == before
    assert snapshot(Path(tiny_model)) == model_before


def test_finished_run_is_refused_then_overwritten_with_overwrite(tiny_model, finished_run, tmp_path, capsys):
    run, photos, _ = finished_run
    out = tmp_path / "out"
    shutil.copytree(run, out)
    old = (out / MARKER).read_bytes()
    assert main(train_argv(tiny_model, photos, out, "--seed", "7")) == 2
    assert (out / MARKER).read_bytes() == old
    capsys.readouterr()

    assert main(train_argv(tiny_model, photos, out, "--seed", "7", "--learning-rate", "0.01", "--overwrite")) == 0
    assert "adapters written to" in capsys.readouterr().out
    assert (out / MARKER).read_bytes() != old  # a new adapter, trained with another seed and learning rate
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["seed"] == 7 and saved["train"]["learning_rate"] == 0.01
    assert not [p.name for p in out.iterdir() if p.name.startswith(".staging")]


def test_non_image_file_beside_photos_is_skipped_with_a_warning(tiny_model, photos, tmp_path, capsys):
    (photos / "notes.md").write_text("my dog\n")
    (photos / "photo_0.txt").write_text("a photo of sks dog on grass\n")  # a caption: skipped silently
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"skipping non-image files: notes\.md$"):
        rc = main(train_argv(tiny_model, photos, out))
    assert rc == 0, capsys.readouterr().err
    assert (out / MARKER).is_file()


def test_entry_point_exit_code_2_end_to_end(tiny_model, tmp_path):
    """The installed package run as a program: one line on stderr, exit code 2, nothing written."""
    photos = draw_photos(tmp_path / "photos")
    before = snapshot(tmp_path)
    argv = train_argv(tiny_model, tmp_path / "nope", tmp_path / "out")
    proc = subprocess.run([sys.executable, "-m", "peftbooth", *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"peftbooth train: error: --instance-data-dir {tmp_path}/nope: no such folder"]
    assert not (tmp_path / "out").exists()
    assert snapshot(tmp_path) == before and photos.is_dir()


# ---------------------------------------------------------------------------------------------------------------
# a finished run's saved config; a failing run


def test_saved_config_reproduces_the_run(finished_run, tmp_path, capsys):
    run, _, argv = finished_run
    saved = yaml.safe_load((run / "config.yaml").read_text())
    # the saved file is exactly the resolved config of the command that made the run ...
    assert print_config(capsys, *argv[1:]) == saved
    # ... and passed back as --config it resolves to the same config again
    assert print_config(capsys, "--config", run / "config.yaml") == saved
    # ... and trains: only the output folder differs
    rc = main(["train", "--config", str(run / "config.yaml"), "--output-dir", str(tmp_path / "again")])
    assert rc == 0, capsys.readouterr().err
    again = yaml.safe_load((tmp_path / "again" / "config.yaml").read_text())
    assert again["train"].pop("output_dir") == str(tmp_path / "again")
    saved["train"].pop("output_dir")
    assert again == saved
    # the saved output folder holds a finished run, so the file alone is refused rather than overwriting it
    capsys.readouterr()
    assert main(["train", "--config", str(run / "config.yaml")]) == 2
    assert "already holds a finished run" in capsys.readouterr().err


def test_nan_loss_without_checkpoint_names_none(tiny_model, photos, tmp_path, capsys, monkeypatch):
    """A NaN loss with no checkpoint written: exit 1, and the message does not speak of a checkpoint that does not
    exist (it used to say 'the last checkpoint before it is kept')."""
    import importlib

    train_module = importlib.import_module("peftbooth.training.loop")  # the module that calls training_step
    real = train_module.training_step

    def nan_step(run, batch):
        loss, inst, prior = real(run, batch)
        return loss * float("nan"), inst, prior

    monkeypatch.setattr(train_module, "training_step", nan_step)
    out = tmp_path / "out"
    assert main(train_argv(tiny_model, photos, out, "--max-train-steps", "2", "--logging-steps", "1")) == 1
    err = capsys.readouterr().err
    assert "loss became NaN/inf at step 1; no checkpoint had been written (--checkpointing-steps N keeps some)" in err
    assert "last checkpoint" not in err and not (out / "checkpoints").exists()
