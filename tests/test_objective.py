"""objective.training_loss on tiny hand-made modules against the loss written out by hand: each row's generator
draws the latent sample, the noise, the timestep and the offset in that order; the latents are scaled, noised
from ᾱ at each row's own timestep; the target is epsilon or velocity; Min-SNR weights the instance rows only;
the prior rows count with --prior-loss-weight."""

import pytest
import torch
from diffusers import DDPMScheduler

from peftbooth.training.objective import LossParts, ObjectiveSettings, draw, row_generators, training_loss


class AffineUNet(torch.nn.Module):
    """A 1x1 convolution plus a per-row bias from the timestep and the mean context: small, but its output depends
    on every input the real UNet gets, so a wrong timestep or context changes the loss."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(4, 4, generator=g) * 0.5)
        self.calls = []

    def forward(self, sample, timestep, context, added_cond_kwargs=None):
        self.calls.append((sample, timestep, context, added_cond_kwargs))
        out = torch.einsum("oc,nchw->nohw", self.weight, sample)
        out = out + (timestep.float() / 1000 + context.mean(dim=(1, 2))).view(-1, 1, 1, 1)
        return type("Output", (), {"sample": out})()


def hand_loss(unet, sched, mean, std, context, seeds, num_instance, scale, weight, gamma, offset):
    """The step written out row by row, with nothing shared with the code under test but the scheduler's ᾱ."""
    alpha_bar = sched.alphas_cumprod
    v = sched.config.prediction_type == "v_prediction"
    per_row, snrs = [], []
    for row, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        x0 = (mean[row] + std[row] * torch.randn(mean.shape[1:], generator=g)) * scale
        eps = torch.randn(x0.shape, generator=g)
        t = int(torch.randint(0, sched.config.num_train_timesteps, (1,), generator=g))
        if offset:
            eps = eps + offset * torch.randn(x0.shape[0], 1, 1, generator=g)
        a = alpha_bar[t]
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = (unet.weight[:, :, None, None] * noisy[None]).sum(1) + t / 1000 + context[row].mean()
        target = a.sqrt() * eps - (1 - a).sqrt() * x0 if v else eps
        per_row.append(((pred - target) ** 2).mean())
        snrs.append(a / (1 - a))
    per_row, snrs = torch.stack(per_row), torch.stack(snrs)
    w = torch.ones(num_instance)
    if gamma is not None:
        clamped = snrs[:num_instance].clamp(max=gamma)
        w = clamped / (snrs[:num_instance] + 1 if v else snrs[:num_instance])
    instance = (per_row[:num_instance] * w).mean()
    if num_instance == len(seeds):
        return instance, instance, None
    prior = per_row[num_instance:].mean()
    return instance + weight * prior, instance, prior


def inputs(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, 4, 3, 3, generator=g)
    std = torch.rand(n, 4, 3, 3, generator=g) + 0.1
    context = torch.randn(n, 5, 6, generator=g)
    return mean, std, context, [100 + 7 * i for i in range(n)]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma, offset", [(None, 0.0), (2.0, 0.0), (None, 0.3), (0.5, 0.2)])
def test_training_loss_matches_a_hand_computation(prediction, gamma, offset):
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction)
    unet, (mean, std, context, seeds) = AffineUNet(), inputs()
    settings = ObjectiveSettings(prior_loss_weight=0.3, snr_gamma=gamma, noise_offset=offset)
    parts = training_loss(unet, sched, mean, std, context, None, row_generators(seeds, torch.device("cpu")), 2,
                          0.18215, settings)
    assert isinstance(parts, LossParts)
    expected = hand_loss(unet, sched, mean, std, context, seeds, 2, 0.18215, 0.3, gamma, offset)
    for got, want in zip(parts, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.total, parts.instance + 0.3 * parts.prior, rtol=0, atol=0)
    (_, timesteps, seen_context, added), = unet.calls
    assert timesteps.dtype == torch.long and seen_context is context and added is None


def test_without_class_rows_there_is_no_prior_loss():
    sched = DDPMScheduler(num_train_timesteps=1000)
    unet, (mean, std, context, seeds) = AffineUNet(), inputs(n=2)
    parts = training_loss(unet, sched, mean, std, context, None, row_generators(seeds, torch.device("cpu")), 2,
                          0.18215, ObjectiveSettings(prior_loss_weight=0.3))
    total, instance, prior = hand_loss(unet, sched, mean, std, context, seeds, 2, 0.18215, 0.3, None, 0.0)
    assert parts.prior is None and parts.total is parts.instance
    torch.testing.assert_close(parts.instance, instance, rtol=1e-5, atol=1e-6)


def test_each_row_draws_from_its_own_generator_only():
    """A row's draws do not depend on which other rows share its batch (what makes resume and DDP exact)."""
    mean, std, _, seeds = inputs()
    both = draw(mean, std, row_generators(seeds, torch.device("cpu")), 1000, 0.18215, 0.1)
    alone = draw(mean[2:3], std[2:3], row_generators(seeds[2:3], torch.device("cpu")), 1000, 0.18215, 0.1)
    for a, b in zip(both, alone):
        assert torch.equal(a[2:3], b)


def test_channels_last_changes_strides_not_values():
    sched = DDPMScheduler(num_train_timesteps=1000)
    mean, std, context, seeds = inputs()
    runs = []
    for channels_last in (False, True):
        unet = AffineUNet()
        parts = training_loss(unet, sched, mean, std, context, None, row_generators(seeds, torch.device("cpu")), 2,
                              0.18215, ObjectiveSettings(channels_last=channels_last))
        runs.append((parts, unet.calls[0][0]))
    (plain, x), (cl, y) = runs
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, y)
    torch.testing.assert_close(plain.total, cl.total, rtol=1e-6, atol=0)
