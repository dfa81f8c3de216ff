"""Validation during training (in-memory model, fixed seeds, step 0 = before training) and OUTPUT/report.html."""

import base64
import io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from conftest import draw_photos, tiny_config
from PIL import Image

from peftbooth.runs.chart import loss_curve
from peftbooth.runs.report import loss_points, write_report
from peftbooth.runs.rundir import step_dir, validation_steps_on_disk
from peftbooth.training import validation
from peftbooth.training.loop import finish, fit, proxy_inputs, validation_images
from peftbooth.training.proxies import write_proxies
from peftbooth.training.setup import setup
from peftbooth.training.validation import should_validate, validation_schedule

PROMPTS = ["a photo of sks dog", "a sks dog on the beach"]
STEPS = 2  # denoising steps: enough to exercise the sampler on the tiny model
CHROMIUM = "/usr/bin/chromium"


def train_with_validation(run) -> dict:
    """fit, whose validation calls sample STEPS denoising steps here (few: the images only have to differ)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(validation, "DEFAULT_INFERENCE_STEPS", STEPS)
        return fit(run)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


# ---------------------------------------------------------------------------------------------------------------
# validation


def test_schedule_is_step_0_every_n_and_the_last():
    assert validation_schedule(10, 4) == [0, 4, 8, 10]
    assert validation_schedule(8, 4) == [0, 4, 8]
    cfg = tiny_config("tiny", Path("."), Path("."), **{
        "train.validation_prompt": PROMPTS, "train.validation_steps": 4, "train.max_train_steps": 10})
    assert [s for s in range(11) if should_validate(cfg, s)] == [0, 4, 8, 10]
    cfg.train.validation_prompt = []
    assert not any(should_validate(cfg, s) for s in range(11))


@pytest.fixture(scope="module")
def validated_run(tiny_model, tmp_path_factory):
    """A 4-step run at a high learning rate with validation; (run, stats)."""
    root = tmp_path_factory.mktemp("validated")
    cfg = tiny_config(tiny_model, draw_photos(root / "photos"), root / "out", **{
        "train.validation_prompt": PROMPTS, "train.num_validation_images": 2, "train.validation_steps": 2,
        "train.max_train_steps": 4, "train.learning_rate": 1e-2,
    })
    run = setup(cfg)
    stats = train_with_validation(run)
    return run, stats


def test_validation_images_at_the_configured_steps_differ_from_step_0(validated_run):
    run, _ = validated_run
    out = run.output_dir
    assert validation_steps_on_disk(out) == validation_schedule(4, 2) == [0, 2, 4]  # step 0, every 2, the last
    names = {f"prompt{j:02d}_{i:02d}.png" for j in range(2) for i in range(2)} | {"grid.png"}
    for step in (0, 4):
        assert {p.name for p in step_dir(out, step).iterdir()} == names
    for name in sorted(names - {"grid.png"}):
        before, after = pixels(step_dir(out, 0) / name), pixels(step_dir(out, 4) / name)
        assert before.shape == (32, 32, 3)
        assert np.abs(before - after).sum() > 0, f"{name}: training changed nothing"
    # 2 prompts x 2 seeds in one grid: rows are prompts
    assert Image.open(step_dir(out, 4) / "grid.png").size == (64, 64)
    assert not should_validate(run.cfg, 3)  # not a validation step: fit samples nothing there
    assert validation_steps_on_disk(out) == [0, 2, 4]


def test_validation_uses_the_in_memory_model_with_fixed_seeds_and_restores_state(validated_run):
    run, _ = validated_run
    out = run.output_dir
    for m in (run.unet, run.text_encoder):
        m.train()  # as fit leaves them
    flags = [m.training for m in run.unet.modules()] + [m.training for m in run.text_encoder.modules()]
    rng = torch.get_rng_state()
    # The same model sampled again gives the same images: fixed seeds per image index.
    validation_images(run, 104, num_inference_steps=STEPS)
    # With the adapter switched off, the in-memory model is the untrained one: step 0's images come back exactly.
    with run.accelerator.unwrap_model(run.unet).disable_adapter():
        validation_images(run, 100, num_inference_steps=STEPS)
    for name in ("prompt00_00.png", "prompt01_01.png"):
        assert np.array_equal(pixels(step_dir(out, 104) / name), pixels(step_dir(out, 4) / name))
        assert np.array_equal(pixels(step_dir(out, 100) / name), pixels(step_dir(out, 0) / name))
    assert [m.training for m in run.unet.modules()] + [m.training for m in run.text_encoder.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)  # training draws the same noise with or without validation
    for step in (100, 104):
        shutil.rmtree(step_dir(out, step))


def test_validation_grid_is_logged_to_tensorboard(tiny_model, photos, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = setup(tiny_config(tiny_model, photos, tmp_path / "out", **{
        "train.validation_prompt": PROMPTS[:1], "train.num_validation_images": 2, "train.report_to": "tensorboard",
        "train.max_train_steps": 1}))
    validation_images(run, 0, num_inference_steps=STEPS)
    run.accelerator.end_training()  # flushes the event file
    event_file = next((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))
    events = EventAccumulator(str(event_file.parent), size_guidance={"images": 0}).Reload()
    tags = events.Tags()["images"]
    assert any(t.startswith("validation") for t in tags), tags
    image = events.Images(tags[0])[0]
    assert image.step == 0 and (image.width, image.height) == (64, 32)


# ---------------------------------------------------------------------------------------------------------------
# report


class ImageSources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def open_source(page: Path, source: str) -> Image.Image:
    """The image an <img src> points at: a data URI, or a file relative to the page (never a remote URL)."""
    if source.startswith("data:image/png;base64,"):
        return Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
    assert "://" not in source and not source.startswith("/"), f"not a local relative path: {source}"
    path = page.parent / unquote(source)
    assert path.is_file(), f"missing image {source}"
    return Image.open(path)


@pytest.fixture(scope="module")
def report(validated_run) -> Path:
    run, stats = validated_run
    write_proxies(proxy_inputs(run))
    out = finish(run, stats)
    return write_report(out, stats)


def test_report_holds_every_part_and_its_images_load(report, validated_run):
    _, stats = validated_run
    page = report.read_text()
    for text in ("Configuration", "instance_prompt: a photo of sks dog",  # the config
                 "training loss against step",  # the loss curve
                 "step 0 (before training)", "step 4", "a sks dog on the beach",  # validation over time
                 "instance loss", "Offline proxies", "DreamBooth metrics", "peftbooth eval",  # metrics
                 "adapter size on disk", "unet/", "KB", "training time", "steps/s", "images/s",
                 "PeftModel.from_pretrained", "peftbooth generate", "AdapterPipeline"):  # how to load
        assert text in page, text
    assert "<script" not in page and "http://" not in page and "https://" not in page  # nothing to fetch or run
    parser = ImageSources()
    parser.feed(page)
    grids = len(validation_steps_on_disk(report.parent))
    assert grids >= 2 and len(parser.sources) == 1 + grids  # loss curve + one grid per validation step
    for source in parser.sources:
        img = open_source(report, source)
        img.load()
        assert img.width > 0
    # the page can be rebuilt later from the saved statistics alone
    rebuilt = write_report(report.parent)
    assert "training loss against step" in rebuilt.read_text()
    assert stats["steps"] == 4


def test_loss_curve_handles_any_history():
    assert loss_curve([]) is None
    assert loss_curve([[5, 0.3]]).size == (720, 260)  # one point
    img = loss_curve(loss_points([(1, 1.0), (2, float("nan")), {"step": 3, "loss": 0.5}]))
    assert np.asarray(img).min() < 100  # something was drawn
    assert loss_points([(2, 1.0), (1, 2.0), (3, float("inf"))]) == [[1, 2.0], [2, 1.0]]


def require_browser() -> None:
    """Skip where Chromium is missing on a developer's machine; fail under CI (env CI or PEFTBOOTH_REQUIRE_BROWSER
    set, as .ci/run does), where a missing browser is a broken setup, not a reason to pass."""
    if os.path.exists(CHROMIUM):
        return
    why = f"{CHROMIUM} not installed (Debian package 'chromium')"
    if os.environ.get("CI") or os.environ.get("PEFTBOOTH_REQUIRE_BROWSER"):
        pytest.fail(f"{why}, and CI requires the browser tests to run")
    pytest.skip(why)


def test_missing_browser_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(os.path, "exists", lambda path: False if path == CHROMIUM else True)
    for var in ("CI", "PEFTBOOTH_REQUIRE_BROWSER"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_browser()
    for var in ("CI", "PEFTBOOTH_REQUIRE_BROWSER"):
        monkeypatch.setenv(var, "1")
        with pytest.raises(pytest.fail.Exception, match="CI requires the browser tests to run"):
            require_browser()
        monkeypatch.delenv(var)


def test_report_renders_in_headless_chromium(report, tmp_path):
    require_browser()
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--enable-logging=stderr", "--v=0", "--window-size=1200,2400", f"--screenshot={shot}",
         report.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # with --enable-logging, every console message of the page is a 'CONSOLE' line on stderr
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    img = Image.open(shot)
    assert img.size == (1200, 2400)
    assert len(np.unique(np.asarray(img.convert("L")))) > 10  # the page drew something, not a blank screen
