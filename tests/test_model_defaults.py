"""Defaults that follow the base model (peftbooth.models.defaults): the family and native resolution read from the
model folder, the world's recipe and the community's SD settings filling only what the user did not give (flag,
--config YAML, UI form), the one line the run prints; SD 3 / 3.5 told apart by the transformer's config, with
diffusers' SD3 DreamBooth LoRA recipe; and the warning when validation samples stop changing."""

import dataclasses
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from peftbooth.cli import main
from peftbooth.models.defaults import COMMUNITY, SD3_RECIPE, SD3_TARGETS, ModelInfo, info_from_configs, model_info
from peftbooth.runs.rundir import read_warning, step_dir
from peftbooth.training.validation import note_unchanged, unchanged_warning
from peftbooth.world.recipe import LEARNING_RATES, RANKS


def train_config(capsys, *argv) -> tuple[dict, str]:
    """`peftbooth train ... --print-config`: (the resolved config, stderr)."""
    capsys.readouterr()
    rc = main(["train", *map(str, argv), "--print-config"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return yaml.safe_load(out), err


# the configs of the real models' folders, as far as the family and resolution go
SD15 = ({"_class_name": "StableDiffusionPipeline"}, {"sample_size": 64, "cross_attention_dim": 768},
        {"block_out_channels": [128, 256, 512, 512]}, {"prediction_type": "epsilon"})
SD21 = ({"_class_name": "StableDiffusionPipeline"}, {"sample_size": 96, "cross_attention_dim": 1024},
        {"block_out_channels": [128, 256, 512, 512]}, {"prediction_type": "v_prediction"})
SD21_BASE = ({"_class_name": "StableDiffusionPipeline"}, {"sample_size": 64, "cross_attention_dim": 1024},
             {"block_out_channels": [128, 256, 512, 512]}, {"prediction_type": "epsilon"})
SDXL = ({"_class_name": "StableDiffusionXLPipeline"}, {"sample_size": 128, "addition_embed_type": "text_time"},
        {"block_out_channels": [128, 256, 512, 512]}, {"prediction_type": "epsilon"})


@pytest.mark.parametrize("configs, family, resolution", [
    (SD15, "sd1", 512), (SD21, "sd2-v", 768), (SD21_BASE, "sd2", 512), (SDXL, "sdxl", 1024)])
def test_family_and_resolution_from_the_configs(configs, family, resolution):
    assert info_from_configs(*configs) == ModelInfo(family, resolution)


def test_the_world_and_tiny_models_native_resolutions(tmp_path):
    assert model_info("world") == ModelInfo("world", 32)  # UNet sample 8 x VAE factor 4
    from peftbooth.models.loading import resolve_model

    assert model_info(resolve_model("tiny")) == ModelInfo("sd1", 64)  # the built folder agrees with TINY_RESOLUTION
    assert model_info("tiny") == ModelInfo("tiny", 64)


def test_world_cli_takes_the_recipe_for_what_is_not_given(capsys, tmp_path):
    base = ["--model", "world", "--instance-data-dir", tmp_path, "--instance-prompt", "a photo of a sks ball",
            "--output-dir", tmp_path / "out"]
    cfg, _ = train_config(capsys, *base)
    # before: 512 px, rank 4 on attention, 1e-4, 400 steps, no text encoder: nothing learned, 256x the pixels
    assert cfg["data"]["resolution"] == 32
    assert (cfg["unet_adapter"]["rank"], cfg["unet_adapter"]["target_modules"]) == (RANKS["lora"], "all")
    assert cfg["train"]["learning_rate"] == LEARNING_RATES["lora"]
    assert cfg["train"]["max_train_steps"] == 1500 and cfg["train"]["train_text_encoder"] is True
    assert cfg["data"]["masked_loss"] is False  # no photo has a mask here: masked loss is no default then
    loha, _ = train_config(capsys, *base, "--adapter", "loha")  # the recipe's LoHa: its own rank and rate
    assert (loha["unet_adapter"]["rank"], loha["train"]["learning_rate"]) == (RANKS["loha"], LEARNING_RATES["loha"])
    # what the user gives wins: flags, and --config keys
    given, _ = train_config(capsys, *base, "--resolution", "64", "--learning-rate", "1e-4", "--no-train-text-encoder")
    assert (given["data"]["resolution"], given["train"]["learning_rate"]) == (64, 1e-4)
    assert given["train"]["train_text_encoder"] is False and given["unet_adapter"]["rank"] == RANKS["lora"]
    config = tmp_path / "run.yaml"
    config.write_text("unet_adapter:\n  rank: 2\ntrain:\n  max_train_steps: 7\n")
    from_yaml, _ = train_config(capsys, *base, "--config", config)
    assert (from_yaml["unet_adapter"]["rank"], from_yaml["train"]["max_train_steps"]) == (2, 7)
    assert from_yaml["train"]["learning_rate"] == LEARNING_RATES["lora"]


def test_world_masks_and_prior_settings_follow_the_photos_and_the_switch(capsys, tmp_path):
    from peftbooth.world.scenes import write_subject_photos

    photos = tmp_path / "photos"
    write_subject_photos(photos)  # with NAME.mask.png beside each photo
    cfg, _ = train_config(capsys, "--model", "world", "--instance-data-dir", photos, "--instance-prompt",
                          "a photo of a sks ball", "--output-dir", tmp_path / "o", "--with-prior-preservation",
                          "--class-prompt", "a photo of a ball")
    assert (cfg["data"]["masked_loss"], cfg["data"]["unmasked_weight"]) == (True, 0.1)
    assert (cfg["data"]["num_class_images"], cfg["data"]["prior_loss_weight"]) == (50, 0.25)
    assert cfg["data"]["class_prompt_from_captions"] is True  # class images from the photos' captions
    # without class images to draw (the base model's prediction as the prior), nothing says what they show
    base, _ = train_config(capsys, "--model", "world", "--instance-data-dir", photos, "--instance-prompt",
                           "a photo of a sks ball", "--output-dir", tmp_path / "o", "--with-prior-preservation",
                           "--class-prompt", "a photo of a ball", "--prior-mode", "base-prediction")
    assert base["data"]["class_prompt_from_captions"] is False and base["data"]["prior_loss_weight"] == 0.25
    alone, _ = train_config(capsys, "--model", "world", "--instance-data-dir", photos, "--instance-prompt",
                            "a photo of a sks ball", "--output-dir", tmp_path / "o")
    assert alone["data"]["class_prompt_from_captions"] is False


def test_sd_families_get_their_resolution_and_the_community_settings(capsys, tmp_path):
    base = ["--instance-data-dir", tmp_path, "--instance-prompt", "a photo of sks dog", "--output-dir", tmp_path / "o"]
    # a hub id offline (HF_HUB_OFFLINE=1): the configs cannot be read, the family's naming says 1024
    xl, _ = train_config(capsys, "--model", "stabilityai/stable-diffusion-xl-base-1.0", *base)
    assert xl["data"]["resolution"] == 1024  # before: 512, without a word
    assert xl["train"]["max_train_steps"] == COMMUNITY["train.max_train_steps"]
    assert xl["train"]["learning_rate"] == COMMUNITY["train.learning_rate"]
    v, _ = train_config(capsys, "--model", "stabilityai/stable-diffusion-2-1", *base)
    assert v["data"]["resolution"] == 768
    mine, _ = train_config(capsys, "--model", "stabilityai/stable-diffusion-xl-base-1.0", "--resolution", "512", *base)
    assert mine["data"]["resolution"] == 512


def test_the_run_prints_one_line_naming_the_defaults_it_took(capsys, tmp_path):
    from peftbooth.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--model", "world", "--instance-data-dir", str(tmp_path),
                                      "--instance-prompt", "a photo of a sks ball", "--resolution", "32"])
    capsys.readouterr()
    config_from_args(args)
    assert capsys.readouterr().err == ""  # said once the input passed train's checks (bad input: one line)
    from peftbooth.models.defaults import announce

    announce()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("defaults from the world model")
    assert "--learning-rate 0.002" in err[0] and "--train-text-encoder" in err[0]
    assert "--resolution" not in err[0]  # given, so not the model's


# SD 3 / 3.5: model_index.json names a transformer; the transformer's config tells 3 from 3.5 (SD 3.5 Medium's
# MMDiT-X dual attention layers, 3.5's RMS qk-norm); the VAE's 4 blocks give the factor 8
SD3_INDEX = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
             "text_encoder_3": ["transformers", "T5EncoderModel"], "vae": ["diffusers", "AutoencoderKL"]}
SD3_VAE = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "latent_channels": 16}
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
MMDIT = {"_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16,
         "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096}
SD3_MEDIUM = {**MMDIT, "num_layers": 24, "pos_embed_max_size": 192}  # an older config: neither key
SD35_MEDIUM = {**MMDIT, "num_layers": 24, "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)),
               "qk_norm": "rms_norm"}
SD35_LARGE = {**MMDIT, "num_layers": 38, "num_attention_heads": 38, "pos_embed_max_size": 192,
              "dual_attention_layers": [], "qk_norm": "rms_norm"}


@pytest.mark.parametrize("transformer, family", [(SD3_MEDIUM, "sd3"), (SD35_MEDIUM, "sd3.5"), (SD35_LARGE, "sd3.5"),
                                                 ({**SD3_MEDIUM, "dual_attention_layers": [], "qk_norm": None}, "sd3")])
def test_sd3_family_and_resolution_from_the_configs(transformer, family):
    assert info_from_configs(SD3_INDEX, {}, SD3_VAE, SD3_SCHEDULER, transformer) == ModelInfo(family, 1024)
    # no VAE config to read: SD3's VAE factor 8
    assert info_from_configs(SD3_INDEX, {}, {}, {}, transformer) == ModelInfo(family, 1024)
    # another transformer family (not trained here): no family, so no defaults
    other = {**SD3_INDEX, "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    assert info_from_configs(other, {}, SD3_VAE, {}, {"_class_name": "FluxTransformer2DModel"}) is None


def write_configs(folder, **configs):
    """A model folder of small JSON files only (no weights): {"transformer/config.json": {...}, ...}."""
    for name, config in configs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(config))
    return folder


def test_a_hand_written_sd35_medium_folder_is_read_before_any_weights(tmp_path):
    folder = write_configs(tmp_path / "sd35m", **{"model_index.json": SD3_INDEX,
                                                  "transformer/config.json": SD35_MEDIUM,
                                                  "vae/config.json": SD3_VAE,
                                                  "scheduler/scheduler_config.json": SD3_SCHEDULER})
    assert model_info(str(folder)) == ModelInfo("sd3.5", 1024)
    sd3 = write_configs(tmp_path / "sd3m", **{"model_index.json": SD3_INDEX, "transformer/config.json": SD3_MEDIUM})
    assert model_info(str(sd3)) == ModelInfo("sd3", 1024)


@pytest.mark.parametrize("repo, family", [("stabilityai/stable-diffusion-3-medium-diffusers", "sd3"),
                                          ("stabilityai/stable-diffusion-3.5-medium", "sd3.5"),
                                          ("stabilityai/stable-diffusion-3.5-large", "sd3.5")])
def test_sd3_hub_ids_offline_are_known_by_their_names(repo, family):
    assert model_info(repo) == ModelInfo(family, 1024)  # HF_HUB_OFFLINE=1 and nothing cached: the name says


@pytest.fixture(scope="module")
def tiny_sd3_models(tmp_path_factory) -> dict[str, str]:
    from peftbooth.models.tiny_sd3 import build_tiny_sd3_model

    root = tmp_path_factory.mktemp("sd3-models")
    return {shape: str(build_tiny_sd3_model(root / shape, shape=shape)) for shape in ("tiny-sd3", "tiny-sd3.5")}


def test_tiny_sd3_folders_are_read_as_their_family_at_their_own_size(tiny_sd3_models):
    # as the tiny SD folder reads as sd1 at 64 px: transformer sample 32 x the tiny VAE's factor 2
    assert model_info(tiny_sd3_models["tiny-sd3"]) == ModelInfo("sd3", 64)
    assert model_info(tiny_sd3_models["tiny-sd3.5"]) == ModelInfo("sd3.5", 64)


def test_the_sd3_recipe_sets_only_flags_that_exist_and_its_targets_are_the_transformers():
    from peftbooth.adapters.inject import check_targets
    from peftbooth.config.sections import TrainConfig
    from peftbooth.models.tiny_sd3 import random_sd3_components

    cfg = TrainConfig()
    for key in SD3_RECIPE:
        section, name = key.split(".", 1)
        assert name in {f.name for f in dataclasses.fields(getattr(cfg, section))}, key
    # diffusers' default --lora_layers: both streams' attention projections; SD 3.5's extra attn2 is not among them
    for shape in ("tiny-sd3", "tiny-sd3.5"):
        transformer = random_sd3_components(shape)["transformer"]
        targets = check_targets(transformer, SD3_TARGETS, {}, "")
        assert len(targets) == 8
        names = [n for n, _ in transformer.named_modules()]
        hit = [n for n in names if any(n.endswith("." + t) for t in targets)]
        assert hit and not any(".attn2." in n for n in hit)
    assert any(".attn2." in n for n in names)  # tiny-sd3.5 has the MMDiT-X attention it leaves alone


def test_sd3_families_get_1024_and_the_reference_scripts_recipe(capsys, tmp_path, tiny_sd3_models):
    base = ["--instance-data-dir", tmp_path, "--instance-prompt", "a photo of sks dog", "--output-dir", tmp_path / "o"]
    for repo in ("stabilityai/stable-diffusion-3.5-medium", "stabilityai/stable-diffusion-3-medium-diffusers"):
        cfg, _ = train_config(capsys, "--model", repo, *base)
        assert cfg["data"]["resolution"] == 1024
        assert (cfg["unet_adapter"]["rank"], cfg["unet_adapter"]["target_modules"]) == (4, SD3_TARGETS)
        assert (cfg["train"]["learning_rate"], cfg["train"]["max_train_steps"]) == (4e-4, 500)
        assert cfg["model"]["max_sequence_length"] == 77
        assert (cfg["train"]["weighting_scheme"], cfg["train"]["precondition_outputs"]) == ("logit_normal", True)
    tiny, _ = train_config(capsys, "--model", tiny_sd3_models["tiny-sd3.5"], *base)
    assert tiny["data"]["resolution"] == 64 and tiny["train"]["learning_rate"] == 4e-4
    # what the user gives wins
    mine, _ = train_config(capsys, "--model", "stabilityai/stable-diffusion-3.5-medium", "--resolution", "512",
                           "--learning-rate", "1e-4", "--target-modules", "attn", "--max-sequence-length", "256",
                           "--weighting-scheme", "mode", *base)
    assert (mine["data"]["resolution"], mine["train"]["learning_rate"]) == (512, 1e-4)
    assert (mine["unet_adapter"]["target_modules"], mine["model"]["max_sequence_length"]) == ("attn", 256)
    assert mine["train"]["weighting_scheme"] == "mode" and mine["train"]["max_train_steps"] == 500


def test_an_sd3_run_names_its_family_in_its_one_line(capsys, tmp_path):
    from peftbooth.cli import build_parser, config_from_args
    from peftbooth.models.defaults import announce

    args = build_parser().parse_args(["train", "--model", "stabilityai/stable-diffusion-3.5-medium",
                                      "--instance-data-dir", str(tmp_path), "--instance-prompt", "a photo of sks dog"])
    config_from_args(args)
    capsys.readouterr()
    announce()
    line = capsys.readouterr().err.strip()
    assert line.startswith("defaults from the sd3.5 model")
    assert "--resolution 1024" in line and "--learning-rate 0.0004" in line and "--precondition-outputs" in line


def write_step(out, step: int, shade: int, n: int = 2) -> None:
    folder = step_dir(out, step)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((32, 32, 3), shade + 10 * i, np.uint8)).save(folder / f"prompt00_{i:02d}.png")
    Image.new("RGB", (32 * n, 32)).save(folder / "grid.png")  # what the report shows


def test_validation_warns_when_samples_equal_the_base_models_or_stop_changing(tmp_path):
    write_step(tmp_path, 0, 100)
    write_step(tmp_path, 100, 100)
    assert "equal the base model's (step 0)" in unchanged_warning(tmp_path, 100)
    note_unchanged(tmp_path, 100)
    assert "step 100" in read_warning(tmp_path)
    write_step(tmp_path, 200, 140)  # the adapter moved the samples: no warning any more
    assert unchanged_warning(tmp_path, 200) is None
    note_unchanged(tmp_path, 200)
    assert read_warning(tmp_path) is None
    write_step(tmp_path, 300, 140)
    assert "stopped changing: step 300 equals step 200" in unchanged_warning(tmp_path, 300)
    note_unchanged(tmp_path, 300)
    from peftbooth.runs.report import validation_section
    from peftbooth.ui.runs import progress

    assert "stopped changing" in validation_section(tmp_path)  # the report says it
    assert "stopped changing" in progress(tmp_path)["validation_warning"]  # and the UI's run page
