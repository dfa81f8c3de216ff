"""Shared fixtures: one tiny random SD model per session, built from configs and saved as a diffusers folder."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # any hidden hub call fails fast instead of hanging
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # 'tiny' resolves inside the test session's own cache, never the user's
    monkeypatch.setenv("PEFTBOOTH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session", autouse=True)
def _quiet():
    from peftbooth.cli import quiet_libraries

    quiet_libraries()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from peftbooth.models.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd"))


@pytest.fixture(scope="session")
def tiny_vpred_model(tmp_path_factory) -> str:
    from peftbooth.models.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd-v", prediction_type="v_prediction"))


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state whose mixed precision cannot change: reset it around a bf16 test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def draw_photos(folder: Path, n: int = 3, size=(48, 40)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", size, (40 * i, 120, 200 - 30 * i))
        ImageDraw.Draw(img).ellipse((4 + 3 * i, 4, 30, 30), fill=(250, 20, 20))
        img.save(folder / f"photo_{i}.png")
    return folder


@pytest.fixture
def photos(tmp_path) -> Path:
    return draw_photos(tmp_path / "photos")


def tiny_config(model: str, photos: Path, output_dir: Path, **overrides):
    """A TrainConfig for a few fast steps on the tiny model; overrides are 'section.field' -> value."""
    from peftbooth.config.sections import TrainConfig

    cfg = TrainConfig()
    cfg.model.model = model
    cfg.data.instance_data_dir = str(photos)
    cfg.data.instance_prompt = "a photo of sks dog"
    cfg.data.resolution = 32
    cfg.data.class_image_steps = 2
    cfg.train.output_dir = str(output_dir)
    cfg.train.max_train_steps = 2
    cfg.train.learning_rate = 1e-3
    cfg.train.report_to = "none"
    cfg.train.logging_steps = 1
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def modules_diffusers_reads(converted: dict, parts) -> dict[str, set[str]]:
    """Per part, the PEFT module names that diffusers' kohya reader lands the converted keys on (the text
    encoders' `text_model.` level dropped, as transformers 5 lays them out)."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    found = {}
    for part in parts:
        sd = {k[len(part) + 1:]: v for k, v in converted.items() if k.startswith(part + ".")}
        sd = convert_unet_state_dict_to_peft(sd) if part == "unet" else \
            convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
        found[part] = {k.rsplit(".lora_", 1)[0].removeprefix("text_model.") for k in sd}
    return found
