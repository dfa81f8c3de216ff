"""`peftbooth train --config FILE` and `--print-config`: a bad config file exits 2 with one line naming the key,
flags override the file, the text encoder's adapter inherits the UNet's, and mixed adapter types train.

The helpers (train_argv, print_config, snapshot) come from tests/test_cli.py, as does the bad-input part of the CLI's
tests; real training uses the tiny model at resolution 32 for 1 step, a few seconds on 2 CPU cores.
"""

import pytest
import yaml
from test_cli import MARKER, print_config, snapshot, train_argv

from peftbooth.cli import main

# ---------------------------------------------------------------------------------------------------------------
# --config YAML files


BAD_CONFIGS = {
    "unknown-key": ("data:\n  resolutoin: 64\n", "unknown key data.resolutoin"),
    "unknown-key-in-adapter": ("unet_adapter:\n  lora_rank: 8\n", "unknown key unet_adapter.lora_rank"),
    "unknown-section": ("optimizer:\n  lr: 0.1\n", "unknown section 'optimizer'; sections are model, unet_adapter"),
    "wrong-type-int": ("data:\n  resolution: big\n", "data.resolution must be int (got str 'big')"),
    "wrong-type-float": ("train:\n  learning_rate: fast\n", "train.learning_rate must be float (got str 'fast')"),
    "wrong-type-bool": ("data:\n  center_crop: 1\n", "data.center_crop must be bool (got int 1)"),
    "float-for-int": ("unet_adapter:\n  rank: 4.5\n", "unet_adapter.rank must be int (got float 4.5)"),
    "bad-choice": ("unet_adapter:\n  adapter: foo\n", "unet_adapter.adapter must be one of lora, loha, lokr"),
    "null-for-required": ("data:\n  resolution:\n", "data.resolution must not be empty"),
    "section-not-mapping": ("data: 5\n", "section 'data' must be a mapping"),
    "not-a-mapping": ("- data\n- train\n", "expected a mapping of sections"),
    "invalid-yaml": ("data: {resolution: [32\n", "not valid YAML"),
    "valid-type-bad-value": ("data:\n  train_batch_size: 0\n", "--train-batch-size must be >= 1 (got 0)"),
    "nan-in-file": ("train:\n  learning_rate: .nan\n", "--learning-rate must be a finite number (got nan)"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_file_exits_2_naming_the_key(case, tiny_model, photos, tmp_path, capsys):
    text, expected = BAD_CONFIGS[case]
    config = tmp_path / "run.yaml"
    config.write_text(text)
    before = snapshot(tmp_path)
    # the config's problem must be reported although every flag on the command line is valid
    rc = main(["train", "--config", str(config), *train_argv(tiny_model, photos, tmp_path / "out")[1:]])
    stdout, stderr = capsys.readouterr()
    assert rc == 2, stderr
    assert stdout == ""
    assert len(stderr.splitlines()) == 1, stderr
    assert expected in stderr
    if not expected.startswith("--"):  # a problem of the file itself: the file is named too
        assert f"peftbooth train: error: --config {config}: {expected}" in stderr
    assert snapshot(tmp_path) == before


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml"), "--print-config"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"peftbooth train: error: --config {tmp_path / 'nope.yaml'}: no such file"
    ]


def test_flags_override_config_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"model": "some/model"},
        "unet_adapter": {"adapter": "loha", "rank": 8},
        "data": {"resolution": 64, "center_crop": True, "instance_prompt": "a photo of zwx cat"},
        "train": {"seed": 5, "learning_rate": 0.001},
    }))
    cfg = print_config(capsys, "--config", config, "--resolution", "32", "--no-center-crop", "--rank", "2",
                       "--learning-rate", "0.5")
    # given on the command line: the flag wins
    assert cfg["data"]["resolution"] == 32
    assert cfg["data"]["center_crop"] is False
    assert cfg["unet_adapter"]["rank"] == 2 and cfg["unet_adapter"]["alpha"] == 2.0
    assert cfg["train"]["learning_rate"] == 0.5
    # not given: the file's value stays, not the default
    assert cfg["model"]["model"] == "some/model"
    assert cfg["unet_adapter"]["adapter"] == "loha"
    assert cfg["data"]["instance_prompt"] == "a photo of zwx cat"
    assert cfg["train"]["seed"] == 5


@pytest.mark.parametrize(
    "flags, unet, te",
    [
        ([], dict(adapter="lora", rank=4, alpha=4.0), dict(adapter="lora", rank=4, alpha=4.0, target_modules="attn")),
        (["--adapter", "loha", "--rank", "8", "--target-modules", "attn-ff"],
         dict(adapter="loha", rank=8, alpha=8.0, target_modules="attn-ff"),
         dict(adapter="loha", rank=8, alpha=8.0, target_modules="attn")),
        (["--adapter", "lokr", "--rank", "8", "--text-encoder-rank", "2"],
         dict(adapter="lokr", rank=8), dict(adapter="lokr", rank=2, alpha=2.0)),
        (["--adapter", "loha", "--rank", "6", "--text-encoder-adapter", "lora"],
         dict(adapter="loha", rank=6), dict(adapter="lora", rank=6, alpha=6.0)),
        # a LoRA-only option of the UNet is not inherited by a text-encoder adapter of another type
        (["--use-dora", "--text-encoder-adapter", "loha"],
         dict(adapter="lora", use_dora=True), dict(adapter="loha", use_dora=False)),
        (["--use-dora", "--use-rslora"], dict(use_dora=True, use_rslora=True),
         dict(adapter="lora", use_dora=True, use_rslora=True)),
    ],
    ids=["defaults", "loha-rank-8", "own-rank", "own-type", "dora-not-leaked", "dora-inherited"],
)
def test_print_config_text_encoder_inherits_unet_adapter(flags, unet, te, capsys):
    cfg = print_config(capsys, *flags)
    for key, value in unet.items():
        assert cfg["unet_adapter"][key] == value, key
    for key, value in te.items():
        assert cfg["text_encoder_adapter"][key] == value, key


def test_mixed_adapter_types_with_unet_only_option_train(tiny_model, photos, tmp_path, capsys):
    """--use-dora belongs to the UNet's LoRA: a LoHa text encoder must not be refused for it."""
    out = tmp_path / "out"
    rc = main(train_argv(tiny_model, photos, out, "--use-dora", "--train-text-encoder", "--text-encoder-adapter", "loha"))
    assert rc == 0, capsys.readouterr().err
    assert (out / MARKER).is_file()
    assert (out / "text_encoder" / "adapter_model.safetensors").is_file()
