"""--guidance-cutoff (models/pipeline.guidance_cutoff_kwargs): classifier-free guidance for the first steps only.
In every family the denoiser sees the guided batch ([unconditional; conditional], 2B) up to the cutoff step and
then the conditional half of it (B), for every image of the call: diffusers' own cutoff callbacks keep one row."""

import pytest
import torch

from peftbooth.cli import main
from peftbooth.inference.sampling import in_memory_pipeline, sample_images
from peftbooth.models.loading import load_components
from peftbooth.models.pipeline import denoiser, guidance_cutoff_kwargs


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cutoff")
    out = {}
    for kind in ("sd1", "sdxl", "sd3"):
        assert main(["tiny-model", str(root / kind), "--kind", kind]) == 0
        out[kind] = str(root / kind)
    return out


def record_denoiser_calls(pipe) -> list[tuple[int, torch.Tensor]]:
    """(batch size, text states) of every denoiser call from now on."""
    calls = []

    def hook(module, args, kwargs):
        states = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        calls.append((args[0].shape[0] if args else kwargs["hidden_states"].shape[0], states.detach().clone()))

    denoiser(pipe).register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize("kind", ["sd1", "sdxl", "sd3"])
def test_guidance_stops_at_the_cutoff_and_keeps_the_conditional_half(models, kind):
    pipe = in_memory_pipeline(load_components(models[kind]))
    calls = record_denoiser_calls(pipe)
    steps, cutoff = 4, 0.5  # guided steps 0, 1 and 2 (int(4 x 0.5) is the last guided one), then one conditional
    images = sample_images(pipe, "a photo of a dog", [0, 1], steps, 5.0, 64, guidance_cutoff=cutoff)
    assert len(images) == 2
    assert [b for b, _ in calls] == [4, 4, 4, 2]
    guided, after = calls[0][1], calls[-1][1]
    assert torch.equal(after, guided[2:])  # both images' conditional text states, not the unconditional ones
    assert not torch.equal(after, guided[:2])
    assert pipe.guidance_scale == 0.0  # the next call sets its own again
    calls.clear()
    sample_images(pipe, "a photo of a dog", [0, 1], steps, 5.0, 64)
    assert [b for b, _ in calls] == [4] * steps  # no cutoff: guided to the end


def test_cutoff_changes_the_image_and_one_is_all_steps(tiny_model):
    pipe = in_memory_pipeline(load_components(tiny_model))
    full = sample_images(pipe, "a photo of a dog", [3], 3, 7.5, 32)[0]
    same = sample_images(pipe, "a photo of a dog", [3], 3, 7.5, 32, guidance_cutoff=1.0)[0]
    cut = sample_images(pipe, "a photo of a dog", [3], 3, 7.5, 32, guidance_cutoff=0.0)[0]
    assert same.tobytes() == full.tobytes() and cut.tobytes() != full.tobytes()
    assert guidance_cutoff_kwargs(pipe, 1.0) == {}
    with pytest.raises(ValueError, match=r"guidance_cutoff must be in \[0, 1\], got 1.5"):
        guidance_cutoff_kwargs(pipe, 1.5)


def test_generate_and_eval_refuse_a_cutoff_outside_zero_to_one(tiny_model, photos, tmp_path, capsys):
    from conftest import tiny_config

    from peftbooth.training.loop import train

    run = train(tiny_config(tiny_model, photos, tmp_path / "run", **{"train.max_train_steps": 1}))
    assert main(["eval", str(run), "--class-name", "dog", "--guidance-cutoff", "-0.5"]) == 2
    assert "--guidance-cutoff must be >= 0 (got -0.5)" in capsys.readouterr().err
    assert not (run / "eval").exists()
    out = tmp_path / "g"
    assert main(["generate", "--model", tiny_model, "--prompt", "p", "--output-dir", str(out),
                 "--guidance-cutoff", "1.5"]) == 2
    assert "--guidance-cutoff must be <= 1 (got 1.5)" in capsys.readouterr().err
    assert not out.exists()
    assert main(["generate", "--model", tiny_model, "--prompt", "p", "--output-dir", str(out), "--num-images", "1",
                 "--steps", "2", "--height", "32", "--width", "32", "--guidance-cutoff", "0.5"]) == 0
    assert (out / "base_00.png").is_file()


def test_generate_on_the_world_samples_as_the_world_does(tmp_path, capsys):
    """--model world without --guidance-scale / --guidance-cutoff: the world's 5 and 0.4 (world.metrics)."""
    def png(*flags) -> bytes:
        out = tmp_path / "-".join(flags or ("default",))
        assert main(["generate", "--model", "world", "--prompt", "a photo of a red box on the grass", "--output-dir",
                     str(out), "--num-images", "1", "--steps", "6", *flags]) == 0
        return (out / "base_00.png").read_bytes()

    default = png()
    assert "world model: guidance 5 for the first 40% of the steps" in capsys.readouterr().out
    assert default == png("--guidance-scale", "5", "--guidance-cutoff", "0.4")
    assert default != png("--guidance-cutoff", "1")
