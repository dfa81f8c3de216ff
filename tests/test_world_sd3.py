"""The SD3-shaped world model (src/peftbooth/world/model_sd3, docs/world_sd3.md): it loads through peftbooth's SD3
loader without T5, fits in 10 MB, and was made by the current build (the configs recorded in its build.json)."""

import json
from pathlib import Path

import torch

from peftbooth.world import build_sd3, configs_sd3
from peftbooth.world.scenes import vocabulary
from peftbooth.world.tokenizer import vocab_and_merges

MODEL_SD3 = Path(build_sd3.__file__).parent / "model_sd3"


def test_world_sd3_names_the_shipped_folder():
    from peftbooth.models.loading import resolve_model
    from peftbooth.world import SD3_MODEL_DIR

    assert SD3_MODEL_DIR == MODEL_SD3 and resolve_model("world-sd3") == str(MODEL_SD3)


def json_normal(d):
    return json.loads(json.dumps(d))  # tuples -> lists, as in a saved config


def test_the_folder_is_small_and_has_no_t5():
    size = sum(f.stat().st_size for f in MODEL_SD3.rglob("*") if f.is_file())
    assert size <= 10_000_000
    index = json.loads((MODEL_SD3 / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    assert (MODEL_SD3 / "evaluator.safetensors").exists()


def test_build_json_records_what_the_build_makes():
    record = json.loads((MODEL_SD3 / "build.json").read_text())
    assert record["configs"] == json_normal(build_sd3.recorded_configs())
    assert record["command"].startswith("python -m peftbooth.world.build_sd3")
    assert record["settings"] == build_sd3.DEFAULTS  # the defaults rebuild what ships
    assert {"vae", "dataset", "transformer", "quality"} <= set(record["seconds"])
    vocab, merges = vocab_and_merges(vocabulary())
    for folder in ("tokenizer", "tokenizer_2"):  # both CLIPs share the world's word-level tokenizer
        assert json.loads((MODEL_SD3 / folder / "vocab.json").read_text()) == vocab
        lines = (MODEL_SD3 / folder / "merges.txt").read_text().splitlines()[1:]
        assert [tuple(line.split(" ")) for line in lines] == merges


def test_loads_through_peftbooths_sd3_loader_and_matches_the_configs():
    from peftbooth.models.loading import load_components

    c = load_components(str(MODEL_SD3), max_sequence_length=configs_sd3.T5_ROWS)
    assert c.family == "sd3" and c.text_encoder_3 is None and c.tokenizer_3 is None
    record = json.loads((MODEL_SD3 / "build.json").read_text())
    for key, value in json_normal(configs_sd3.transformer_config()).items():
        assert json_normal(c.unet.config[key]) == value, key
    for key, value in json_normal(configs_sd3.vae_config()).items():
        assert json_normal(c.vae.config[key]) == value, key
    # SD3's latent statistics, measured by the build and recorded
    assert c.vae.config.shift_factor == record["latent_stats"]["shift_factor"]
    assert c.vae.config.scaling_factor == record["latent_stats"]["scaling_factor"]
    assert c.noise_scheduler.config.shift == configs_sd3.SHIFT
    for encoder, index in ((c.text_encoder, 1), (c.text_encoder_2, 2)):
        cfg = encoder.config.to_dict()
        assert all(cfg[k] == v for k, v in configs_sd3.text_config(index).items()), index
    # one denoising call with peftbooth's conditioning (zeros of T5_ROWS rows for T5) runs and is finite
    from peftbooth.models.components import encode_text

    ids = c.tokenizer(["a photo of a red ball on the grass"], padding="max_length",
                      max_length=c.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        context, pooled = encode_text(c.text_encoders, [ids, ids], c.t5)
        assert context.shape == (1, c.tokenizer.model_max_length + configs_sd3.T5_ROWS,
                                 c.unet.config.joint_attention_dim)
        out = c.unet(hidden_states=torch.randn(1, 16, configs_sd3.LATENT_SIZE, configs_sd3.LATENT_SIZE),
                     encoder_hidden_states=context, pooled_projections=pooled, timestep=torch.tensor([500.0])).sample
    assert out.shape == (1, 16, configs_sd3.LATENT_SIZE, configs_sd3.LATENT_SIZE) and torch.isfinite(out).all()


def test_build_sd3_is_deterministic(tmp_path):
    """Two builds from the same seed (tiny settings) write identical weights, and the folder loads as an SD3 model."""
    from safetensors.torch import load_file

    from peftbooth.models.loading import load_components

    small = ["--vae-steps", "2", "--vae-pool", "32", "--vae-batch", "8", "--scenes", "64", "--transformer-steps", "2",
             "--transformer-batch", "8", "--quality-prompts", "3", "--quality-steps", "2"]
    for k in (0, 1):
        assert build_sd3.main(["--out", str(tmp_path / f"m{k}"), "--work-dir", str(tmp_path / f"w{k}"), *small]) == 0
    for f in ["transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
              "text_encoder/model.safetensors", "text_encoder_2/model.safetensors"]:
        a, b = load_file(str(tmp_path / "m0" / f)), load_file(str(tmp_path / "m1" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    record = json.loads((tmp_path / "m0" / "build.json").read_text())
    assert set(record["seconds"]) >= {"vae", "dataset", "transformer", "quality"} and "vae_mse" in record
    assert load_components(str(tmp_path / "m0")).family == "sd3"
