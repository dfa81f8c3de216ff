"""--prior-mode base-prediction: prior preservation without class images. The class rows are the photos under the
class prompt, and their target is the base model's own prediction (adapters off) on the same noisy input."""

import importlib

import pytest
import torch
from conftest import draw_photos, tiny_config

from peftbooth.cli import main
from peftbooth.training.loop import train
from peftbooth.training.objective import ObjectiveSettings, row_generators, training_loss

loop_module = importlib.import_module("peftbooth.training.loop")


class Unet(torch.nn.Module):
    def forward(self, x, t, context, added_cond_kwargs=None):
        from types import SimpleNamespace

        return SimpleNamespace(sample=0.5 * x + context.mean((1, 2)).view(-1, 1, 1, 1))


def test_the_class_rows_are_trained_towards_the_prior_target():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    mean, std, context = torch.randn(4, 4, 2, 2), torch.zeros(4, 4, 2, 2), torch.randn(4, 3, 8)
    seen = {}

    def prior_target(noisy, timesteps, ctx, added):
        seen.update(noisy=noisy, ctx=ctx)
        return torch.full_like(noisy, 0.25)

    def loss(prior):
        return training_loss(Unet(), scheduler, mean, std, context, None, row_generators([1, 2, 3, 4], "cpu"), 2,
                             1.0, ObjectiveSettings(prior_loss_weight=0.5), prior_target=prior)

    plain, based = loss(None), loss(prior_target)
    torch.testing.assert_close(plain.instance, based.instance)  # the instance rows keep the noise as target
    # the class rows' (rows 2, 3) prediction is compared with the prior target on their own noisy input
    pred = 0.5 * seen["noisy"] + context[2:].mean((1, 2)).view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["ctx"], context[2:])
    torch.testing.assert_close(based.prior, ((pred - 0.25) ** 2).mean())
    torch.testing.assert_close(based.total, based.instance + 0.5 * based.prior)


def record_losses(monkeypatch) -> list:
    real, parts = loop_module.training_step, []

    def step(run, batch):
        out = real(run, batch)
        parts.append(out)
        return out

    monkeypatch.setattr(loop_module, "training_step", step)
    return parts


@pytest.mark.parametrize("text_encoder", [False, True])
def test_base_prediction_starts_at_zero_prior_loss_and_makes_no_class_images(tiny_model, tmp_path, monkeypatch,
                                                                             text_encoder):
    """Every adapter starts as a zero update, so at the first step the adapted model is the base model: its class
    rows' loss against the base prediction is 0 (up to the rounding of a forward of 2 rows against one of 4); once
    the adapters move, it is not."""
    photos = draw_photos(tmp_path / "photos", n=2)
    parts = record_losses(monkeypatch)
    out = train(tiny_config(tiny_model, photos, tmp_path / "run", **{
        "data.with_prior_preservation": True, "data.class_prompt": "a photo of a dog",
        "data.prior_mode": "base-prediction", "train.max_train_steps": 3, "train.learning_rate": 1e-2,
        "train.train_text_encoder": text_encoder}))
    assert parts[0].prior is not None and parts[0].prior.item() < 1e-10
    assert parts[-1].prior.item() > 1e-7
    assert not (out / "class_images").exists()
    assert "prior_mode: base-prediction" in (out / "config.yaml").read_text()


def test_base_prediction_on_sd3(tmp_path, monkeypatch):
    model = tmp_path / "sd3"
    assert main(["tiny-model", str(model), "--kind", "sd3"]) == 0
    photos = draw_photos(tmp_path / "photos", n=2, size=(64, 64))
    parts = record_losses(monkeypatch)
    train(tiny_config(str(model), photos, tmp_path / "run", **{
        "data.resolution": 64, "model.max_sequence_length": 8, "data.with_prior_preservation": True,
        "data.class_prompt": "a photo of a dog", "data.prior_mode": "base-prediction", "train.max_train_steps": 2,
        "train.learning_rate": 1e-2}))
    assert parts[0].prior.item() < 1e-10 and parts[-1].prior.item() > 1e-7


def test_prior_mode_refusals(tiny_model, tmp_path, capsys):
    photos = draw_photos(tmp_path / "photos", n=1)
    base = ["train", "--model", tiny_model, "--instance-data-dir", str(photos), "--instance-prompt", "a sks dog"]
    assert main([*base, "--output-dir", str(tmp_path / "a"), "--prior-mode", "base-prediction"]) == 2
    assert "--prior-mode base-prediction needs --with-prior-preservation" in capsys.readouterr().err
    assert main([*base, "--output-dir", str(tmp_path / "b"), "--prior-mode", "base-prediction",
                 "--with-prior-preservation", "--class-prompt", "a dog", "--class-data-dir", str(tmp_path)]) == 2
    assert "--class-data-dir: --prior-mode base-prediction uses no class images" in capsys.readouterr().err
