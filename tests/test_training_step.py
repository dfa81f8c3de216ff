"""The real training step (train.training_step) against a hand computation: the latent sample scaled by the VAE's
scaling factor, the noised latents from ᾱ at each row's own timestep, the epsilon or velocity target, Min-SNR on
the instance rows only, and the offset noise."""

import pytest
import torch
from conftest import tiny_config

from peftbooth.data.dataset import tokenize
from peftbooth.training.loop import training_step
from peftbooth.training.setup import setup


class Recorder(torch.nn.Module):
    """Wraps the UNet: keeps each call's inputs and output, so the test can recompute the loss by hand."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []

    def forward(self, sample, timestep, context, **kw):
        out = self.unet(sample, timestep, context, **kw)
        self.calls.append((sample.detach().clone(), timestep.clone(), out.sample.detach().clone()))
        return out


def by_hand(run, batch, noise_offset: float = 0.0):
    """Noisy latents, timesteps and target of `batch`, from first principles: each row's generator (seeded with the
    row's seed) draws the latent sample, the noise, the timestep and the offset, in that order."""
    c = run.components
    pixels = torch.stack([run.dataset.pixels(key)[0] for key in batch["keys"]])  # (N, 3, H, W)
    with torch.no_grad():
        posterior = c.vae.encode(pixels).latent_dist
    scaling = c.vae.config.scaling_factor
    assert scaling == 0.18215  # SD 1.x's: a scale of 1 (or none) would give latents of another size
    alpha_bar = c.noise_scheduler.alphas_cumprod  # (T,)
    latents, noisy, targets, steps = [], [], [], []
    for row, seed in enumerate(batch["seeds"]):
        g = torch.Generator().manual_seed(seed)
        x0 = (posterior.mean[row] + posterior.std[row] * torch.randn(posterior.mean.shape[1:], generator=g)) * scaling
        eps = torch.randn(x0.shape, generator=g)
        t = int(torch.randint(0, 1000, (1,), generator=g))
        if noise_offset:
            eps = eps + noise_offset * torch.randn(x0.shape[0], 1, 1, generator=g)
        a = alpha_bar[t]
        noisy.append(a.sqrt() * x0 + (1 - a).sqrt() * eps)
        targets.append(eps if c.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0)
        latents.append(x0)
        steps.append(t)
    return torch.stack(noisy), torch.tensor(steps), torch.stack(targets)


def recorded_step(run, batch):
    recorder = Recorder(run.unet)
    run.unet = recorder
    loss = training_step(run, batch)
    run.unet = recorder.unet
    (sample, timesteps, pred), = recorder.calls
    return loss, sample, timesteps, pred


def prior_run(model, photos, tmp_path, **extra):
    return setup(tiny_config(model, photos, tmp_path / "run", **{
        "data.with_prior_preservation": True, "data.class_prompt": "a photo of a dog", "data.num_class_images": 2,
        "data.train_batch_size": 2, "data.prior_loss_weight": 0.3, **extra}))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_noised_latents_and_target_match_a_hand_computation(prediction, tiny_model, tiny_vpred_model, photos,
                                                            tmp_path):
    run = prior_run(tiny_model if prediction == "epsilon" else tiny_vpred_model, photos, tmp_path)
    assert run.components.prediction_type == prediction
    batch = next(iter(run.dataloader))
    (loss, instance_loss, prior_loss), sample, timesteps, pred = recorded_step(run, batch)
    noisy, steps, target = by_hand(run, batch)
    assert len(set(steps.tolist())) == 4  # each row has its own timestep
    assert torch.equal(timesteps, steps)
    torch.testing.assert_close(sample, noisy, rtol=1e-5, atol=1e-5)
    hand_instance = (pred[:2] - target[:2]).pow(2).mean()
    hand_prior = (pred[2:] - target[2:]).pow(2).mean()
    torch.testing.assert_close(instance_loss, hand_instance, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(prior_loss, hand_prior, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, hand_instance + 0.3 * hand_prior, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_the_instance_rows_only(prediction, tiny_model, tiny_vpred_model, photos, tmp_path):
    """As the diffusers DreamBooth scripts do: the instance MSE per row times min(SNR, γ)/SNR (epsilon) or
    min(SNR, γ)/(SNR + 1) (velocity), the prior MSE unweighted, so --prior-loss-weight means the same with and
    without --snr-gamma."""
    run = prior_run(tiny_model if prediction == "epsilon" else tiny_vpred_model, photos, tmp_path,
                    **{"train.snr_gamma": 1e-3})
    batch = next(iter(run.dataloader))
    (loss, instance_loss, prior_loss), _, _, pred = recorded_step(run, batch)
    _, steps, target = by_hand(run, batch)
    a = run.components.noise_scheduler.alphas_cumprod[steps[:2]]
    snr = a / (1 - a)
    weights = snr.clamp(max=1e-3) / (snr if prediction == "epsilon" else snr + 1)
    assert not torch.allclose(weights, torch.ones(2))  # the weights do something at these timesteps
    per_row = (pred - target).pow(2).mean(dim=(1, 2, 3))  # (4,)
    torch.testing.assert_close(instance_loss, (per_row[:2] * weights).mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(prior_loss, per_row[2:].mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, instance_loss + 0.3 * prior_loss, rtol=0, atol=0)


def test_noise_offset_reaches_the_noise(tiny_model, photos, tmp_path):
    run = prior_run(tiny_model, photos, tmp_path, **{"train.noise_offset": 0.5})
    batch = next(iter(run.dataloader))
    (_, instance_loss, _), sample, _, pred = recorded_step(run, batch)
    noisy, _, target = by_hand(run, batch, noise_offset=0.5)
    torch.testing.assert_close(sample, noisy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(instance_loss, (pred[:2] - target[:2]).pow(2).mean(), rtol=1e-5, atol=1e-7)
    plain, _, _ = by_hand(run, batch)
    assert (sample - plain).abs().max() > 0.05  # without the offset the inputs would be other ones


def test_text_states_are_each_rows_own_prompt(tiny_model, photos, tmp_path):
    """The context each row is conditioned on is its own prompt's encoding (instance rows, then class rows)."""
    run = prior_run(tiny_model, photos, tmp_path)
    batch = next(iter(run.dataloader))
    seen = []
    real = run.unet

    def spy(sample, timestep, context, **kw):
        seen.append(context.detach().clone())
        return real(sample, timestep, context, **kw)

    run.unet = spy
    training_step(run, batch)
    run.unet = real
    ids = tokenize(run.components.tokenizer, batch["prompts"])
    with torch.no_grad():
        expected = run.components.text_encoder(ids)[0]
    torch.testing.assert_close(seen[0], expected, rtol=1e-5, atol=1e-6)
