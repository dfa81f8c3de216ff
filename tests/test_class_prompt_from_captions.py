"""--class-prompt-from-captions: class images drawn from the photos' captions with the identifier taken out, each
captioned with its prompt, so that class images differ from the photos only in the identifier."""

import pytest
from conftest import tiny_config

from peftbooth.config.sections import UsageError
from peftbooth.data.images import list_images, load_captions, prompts_from_captions

INSTANCE, CLASS = "a photo of a sks box", "a photo of a box"


@pytest.mark.parametrize("captions, expected", [
    (["a photo of a sks box on the grass", "a photo of a sks box in the snow", "a photo of a sks box on the grass"],
     ["a photo of a box on the grass", "a photo of a box in the snow"]),  # distinct, in the photos' order
    (["a photo of a sks box"], ["a photo of a box"]),  # no caption: the instance prompt, so the class prompt
    (["sks box, sks box by the sea"], ["box, box by the sea"]),  # no instance prompt: the identifier taken out
    (["a photo of a sks box, a sks box"], ["a photo of a box, a box"]),
    (["sks"], [CLASS]),  # nothing left: the class prompt
])
def test_prompts_are_the_captions_without_the_identifier(captions, expected):
    assert prompts_from_captions(captions, INSTANCE, CLASS) == expected


def test_an_instance_prompt_without_an_identifier_is_refused():
    with pytest.raises(UsageError, match="has no word that --class-prompt 'a photo of a box' lacks"):
        prompts_from_captions(["a photo of a box"], "a photo of a box", CLASS)


def test_class_images_are_drawn_and_captioned_from_the_photos_captions(tiny_model, photos, tmp_path, capsys):
    from peftbooth.training.loop import train

    captions = ["a photo of sks dog on a beach", "a photo of sks dog in the snow", "a photo of sks dog on a beach"]
    for path, caption in zip(list_images(photos, "p"), captions):
        path.with_suffix(".txt").write_text(caption + "\n")
    settings = {"data.with_prior_preservation": True, "data.class_prompt": "a photo of a dog",
                "data.num_class_images": 5, "train.max_train_steps": 2, "data.sample_batch_size": 2}
    folders = {}
    for flag in (False, True):
        folders[flag] = tmp_path / f"class-{flag}"
        train(tiny_config(tiny_model, photos, tmp_path / f"run-{flag}", **settings,
                          **{"data.class_data_dir": str(folders[flag]), "data.class_prompt_from_captions": flag}))
    assert "class images from the photos' captions: a photo of a dog on a beach | a photo of a dog in the snow" \
        in capsys.readouterr().out
    drawn = list_images(folders[True], "c")
    # image k from prompt k mod 2, from seed + k as without the flag, and its prompt written beside it
    assert load_captions(drawn, "-") == ["a photo of a dog on a beach", "a photo of a dog in the snow"] * 2 + [
        "a photo of a dog on a beach"]
    plain = list_images(folders[False], "c")
    assert not any(p.with_suffix(".txt").exists() for p in plain)
    assert [p.name[:11] for p in drawn] == [p.name[:11] for p in plain]
    assert all(a.read_bytes() != b.read_bytes() for a, b in zip(drawn, plain))  # other prompts, other images


def test_the_class_images_command_draws_from_the_captions_as_training_would(tiny_model, photos, tmp_path, capsys):
    from peftbooth.cli import main

    for path, caption in zip(list_images(photos, "p"), ["a photo of sks dog on a beach", "a photo of sks dog"]):
        path.with_suffix(".txt").write_text(caption + "\n")
    argv = ["class-images", "--model", tiny_model, "--class-prompt", "a photo of a dog", "--class-data-dir",
            str(tmp_path / "class"), "--class-image-steps", "2", "--num-class-images", "3"]
    assert main([*argv, "--class-prompt-from-captions"]) == 2  # no photos to read the captions of
    assert "--class-prompt-from-captions needs --instance-data-dir and --instance-prompt" in capsys.readouterr().err
    assert main([*argv, "--class-prompt-from-captions", "--instance-data-dir", str(photos), "--instance-prompt",
                 "a photo of a dog"]) == 2
    assert "has no word that --class-prompt 'a photo of a dog' lacks" in capsys.readouterr().err
    assert not (tmp_path / "class").exists()  # refused before anything was written
    assert main([*argv, "--class-prompt-from-captions", "--instance-data-dir", str(photos), "--instance-prompt",
                 "a photo of sks dog"]) == 0
    drawn = list_images(tmp_path / "class", "c")
    assert load_captions(drawn, "-") == ["a photo of a dog on a beach", "a photo of a dog",
                                         "a photo of a dog on a beach"]
