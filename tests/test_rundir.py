"""The run folder's one owner: its layout, its readers (lenient and strict), and the atomic writes."""

from __future__ import annotations

import json
import math

import pytest

from peftbooth.config.sections import UsageError
from peftbooth.runs.atomic import atomic_dir, atomic_file, read_json, write_json, write_text
from peftbooth.runs.rundir import ADAPTER_PARTS, RunDir, base_model_for


def fake_adapter(run, part="unet", peft_type="LORA", weights=b"w", base=None):
    folder = run / part
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "base_model_name_or_path": base}))
    if weights is not None:
        (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def test_layout_names_every_file_of_a_run(tmp_path):
    run = RunDir(tmp_path)
    assert run.config_file == tmp_path / "config.yaml"
    assert run.stats_file.name == "train_stats.json" and run.proxies_file.name == "proxies.json"
    assert run.report_file.name == "report.html" and run.eval_dir.name == "eval"
    assert run.validation_dir.name == "validation" and run.checkpoints_dir.name == "checkpoints"
    assert run.class_images_dir.name == "class_images" and run.model_card.name == "README.md"
    assert [run.adapter_dir(p).name for p in ADAPTER_PARTS] == ["unet", "transformer", "text_encoder", "text_encoder_2"]
    with pytest.raises(ValueError, match="no adapter part"):
        run.adapter_dir("vae")


def test_adapter_folders_are_checked(tmp_path):
    with pytest.raises(UsageError, match="no such folder"):
        RunDir(tmp_path / "missing").adapter_folders("RUN_DIR")
    with pytest.raises(UsageError, match=r"RUN_DIR .*: no unet/adapter_config.json"):
        RunDir(tmp_path).adapter_folders("RUN_DIR")
    fake_adapter(tmp_path, "unet", weights=None)
    (tmp_path / "unet" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(UsageError, match=r"only pickle weights \(adapter_model.bin\)"):
        RunDir(tmp_path).adapter_folders()
    (tmp_path / "unet" / "adapter_model.safetensors").write_bytes(b"w")
    fake_adapter(tmp_path, "text_encoder", peft_type="LOHA")
    run = RunDir(tmp_path)
    assert run.adapter_folders() == {"unet": tmp_path / "unet", "text_encoder": tmp_path / "text_encoder"}
    assert run.adapter_types() == ["LORA", "LOHA"] and run.is_finished()
    assert set(run.adapter_sizes()) == {"unet", "text_encoder"}


def test_fingerprint_follows_the_weights(tmp_path):
    assert RunDir(tmp_path).adapter_fingerprint() is None
    fake_adapter(tmp_path, weights=b"one")
    first = RunDir(tmp_path).adapter_fingerprint()
    (tmp_path / "unet" / "adapter_model.safetensors").write_bytes(b"two")
    assert len(first) == 16 and RunDir(tmp_path).adapter_fingerprint() != first


def test_config_is_read_leniently_unless_asked(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_config() == {} and run.read_config(strict=True) == {}
    run.config_file.write_text("model: {model: tiny, vae: null}\n")
    assert run.setting("model", "model") == "tiny" and run.setting("model", "vae", "default") == "default"
    run.config_file.write_text("model: [unclosed\n")
    assert run.read_config() == {}
    with pytest.raises(UsageError, match=r"RUN_DIR .*: config.yaml is not valid YAML"):
        run.read_config(strict=True)
    run.config_file.write_text("- a list\n")
    assert run.read_config(strict=True) == {}


def test_base_model_from_config_then_adapter_record(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    fake_adapter(a, base="from/adapter")
    fake_adapter(b)
    assert RunDir(a).recorded_base_model() == ("from/adapter", a / "unet" / "adapter_config.json")
    (a / "config.yaml").write_text("model: {model: tiny}\n")
    assert RunDir(a).recorded_base_model() == ("tiny", a / "config.yaml")
    assert base_model_for(None, [a]) == "tiny" and "base model: tiny" in capsys.readouterr().out
    assert base_model_for("given", [b]) == "given"
    with pytest.raises(UsageError, match="records no base model"):
        base_model_for(None, [b])
    (b / "config.yaml").write_text("model: {model: other}\n")
    with pytest.raises(UsageError, match="different base models"):
        base_model_for(None, [a, b])


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["f.txt"]
    with atomic_file(target, durable=True) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["f.txt"]


def test_atomic_dir_replaces_a_folder(tmp_path):
    target = tmp_path / "out"
    (target / "stale").mkdir(parents=True)
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("x")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing hidden left behind
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError
    assert [p.name for p in target.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_write_json_keeps_the_file_valid_json(tmp_path):
    path = write_json(tmp_path / "m.json", {"a": math.nan, "b": [math.inf, 1.0], "c": {"d": -math.inf}})
    assert json.loads(path.read_text()) == {"a": None, "b": [None, 1.0], "c": {"d": None}}
    assert read_json(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{")
    assert read_json(tmp_path / "bad.json") is None
