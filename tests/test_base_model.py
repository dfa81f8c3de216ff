"""The base model: `train` needs one named (flag or --config), never a silent default; `generate`, `export`, `fuse`
and `eval` take the one the run recorded in its config.yaml and say which one they use."""

import yaml
from conftest import draw_photos

from peftbooth.cli import main

PROMPT = "a photo of sks dog"


def one_line_error(capsys) -> str:
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_train_without_model_is_refused_before_anything_is_written(tmp_path, capsys):
    photos = draw_photos(tmp_path / "photos")
    out = tmp_path / "out"
    rc = main(["train", "--instance-data-dir", str(photos), "--instance-prompt", PROMPT, "--output-dir", str(out)])
    assert rc == 2
    line = one_line_error(capsys)
    assert line.startswith("peftbooth train: error: --model is required: a hub id, a local diffusers folder, "
                           "'world' (the small pretrained world model, docs/world.md) or 'tiny'"), line
    assert not out.exists()


def test_class_images_without_model_is_refused(tmp_path, capsys):
    rc = main(["class-images", "--class-prompt", "a photo of a dog", "--class-data-dir", str(tmp_path / "c"),
               "--num-class-images", "1"])
    assert rc == 2
    assert "--model is required" in one_line_error(capsys)
    assert not (tmp_path / "c").exists()


def test_config_file_may_name_the_model(tiny_model, tmp_path, capsys):
    photos = draw_photos(tmp_path / "photos")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"model": tiny_model}}))
    out = tmp_path / "out"
    rc = main(["train", "--config", str(config), "--instance-data-dir", str(photos), "--instance-prompt", PROMPT,
               "--output-dir", str(out), "--resolution", "32", "--max-train-steps", "1", "--report-to", "none"])
    assert rc == 0, capsys.readouterr().err
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["model"] == tiny_model
    capsys.readouterr()
    # a config file that leaves the model out (or null) is refused like the missing flag
    config.write_text("model:\n  model:\n")
    rc = main(["train", "--config", str(config), "--instance-data-dir", str(photos), "--instance-prompt", PROMPT,
               "--output-dir", str(tmp_path / "out2")])
    assert rc == 2 and "--model is required" in one_line_error(capsys)


def _run(tiny_model, tmp_path):
    photos = draw_photos(tmp_path / "photos")
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model, "--instance-data-dir", str(photos), "--instance-prompt", PROMPT,
                 "--output-dir", str(out), "--resolution", "32", "--max-train-steps", "1", "--report-to", "none"]) == 0
    return out, photos


def test_commands_default_to_the_runs_base_model_and_say_so(tiny_model, tmp_path, capsys):
    run, photos = _run(tiny_model, tmp_path)
    capsys.readouterr()
    said = f"base model: {tiny_model} (from {run / 'config.yaml'}; --model overrides)"

    gen = tmp_path / "gen"
    assert main(["generate", "--adapter", str(run), "--prompt", PROMPT, "--num-images", "1", "--steps", "1",
                 "--height", "32", "--width", "32", "--output-dir", str(gen)]) == 0
    assert said in capsys.readouterr().out.splitlines()
    assert (gen / "run_00.png").is_file()

    assert main(["fuse", str(run), "--output", str(tmp_path / "fused")]) == 0
    assert said in capsys.readouterr().out.splitlines()
    index = (tmp_path / "fused" / "model_index.json")
    assert index.is_file()

    assert main(["export", str(run), "--format", "kohya", "--output", str(tmp_path / "k.safetensors")]) == 0
    assert said in capsys.readouterr().out.splitlines()

    from peftbooth.evaluate.runner import EvalArgs, resolve_eval_args

    a, images = resolve_eval_args(EvalArgs(run_dir=str(run), class_name="dog"))
    assert a.model == tiny_model and len(images) == 3
    assert said in capsys.readouterr().out.splitlines()

    # a given --model is used as is, and not announced as the run's
    assert main(["generate", "--model", tiny_model, "--adapter", str(run), "--prompt", PROMPT, "--num-images", "1",
                 "--steps", "1", "--height", "32", "--width", "32", "--output-dir", str(tmp_path / "gen2")]) == 0
    assert "base model:" not in capsys.readouterr().out


def test_generate_without_model_or_adapter_is_refused(tmp_path, capsys):
    assert main(["generate", "--prompt", PROMPT, "--output-dir", str(tmp_path / "g")]) == 2
    line = one_line_error(capsys)
    assert "--model is required when no --adapter is given" in line
    assert not (tmp_path / "g").exists()


def test_generate_with_adapters_of_different_base_models_needs_model(tiny_model, tmp_path, capsys):
    run, _ = _run(tiny_model, tmp_path)
    other = tmp_path / "other"
    import shutil

    shutil.copytree(run, other)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["model"]["model"] = "someone/another-model"
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["generate", "--adapter", str(run), "--adapter", str(other), "--prompt", PROMPT,
                 "--output-dir", str(tmp_path / "g")]) == 2
    line = one_line_error(capsys)
    assert "were trained on different base models" in line and "pass --model" in line
    assert not (tmp_path / "g").exists()
