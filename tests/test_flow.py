"""SD3's flow-matching objective against hand computations: the sigma table, the timestep densities, the loss
weights, and a whole step of `flow_matching_loss` on a tiny module, recomputed here line by line."""

import math

import pytest
import torch

from peftbooth.training import flow
from peftbooth.training.objective import ObjectiveSettings, flow_matching_loss, row_generators


def test_the_sigma_table_is_the_flow_match_schedulers_own():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift in (1.0, 3.0):
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        torch.testing.assert_close(flow.shifted_sigmas(1000, shift), scheduler.sigmas.float()[:1000])
        torch.testing.assert_close(flow.shifted_sigmas(1000, shift) * 1000, scheduler.timesteps.float())
    # shift 3 moves every sigma towards noise: s = 0.5 -> 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert flow.shifted_sigmas(4, 3.0).tolist() == pytest.approx([1.0, 3 * 0.75 / 2.5, 0.75, 3 * 0.25 / 1.5])
    table = torch.tensor([1.0, 0.75, 0.5, 0.25])
    assert flow.sigmas_of(torch.tensor([0.0, 0.3, 0.999, 1.0]), table).tolist() == [1.0, 0.75, 0.25, 0.25]


def test_the_densities_draw_from_the_row_generator_by_their_formulas():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(1, generator=torch.Generator().manual_seed(5))
    assert flow.density_sample("logit_normal", g, "cpu", 0.5, 2.0).item() == pytest.approx(
        1 / (1 + math.exp(-(z.item() * 2.0 + 0.5))))
    r = torch.rand(1, generator=torch.Generator().manual_seed(6)).item()
    u = flow.density_sample("mode", torch.Generator().manual_seed(6), "cpu", mode_scale=1.29).item()
    assert u == pytest.approx(1 - r - 1.29 * (math.cos(math.pi * r / 2) ** 2 - 1 + r))
    assert flow.density_sample("cosmap", torch.Generator().manual_seed(6), "cpu").item() == pytest.approx(r)


def test_loss_weights():
    s = torch.tensor([0.25, 0.5])
    assert flow.loss_weights("sigma_sqrt", s).tolist() == pytest.approx([16.0, 4.0])
    assert flow.loss_weights("cosmap", s).tolist() == pytest.approx(
        [2 / (math.pi * (1 - 0.5 + 0.125)), 2 / (math.pi * (1 - 1 + 0.5))])
    assert flow.loss_weights("logit_normal", s).tolist() == [1.0, 1.0]


class Velocity(torch.nn.Module):
    """A stand-in transformer: out = w * x + timestep / 1000 + pooled mean + context mean (all rows differ)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
        from types import SimpleNamespace

        bias = (timestep / 1000 + pooled_projections.mean(1) + encoder_hidden_states.mean((1, 2))).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=self.w * hidden_states + bias)


@pytest.mark.parametrize("scheme, precondition", [("logit_normal", True), ("logit_normal", False),
                                                  ("sigma_sqrt", True), ("mode", False)])
def test_flow_matching_loss_matches_a_hand_computation(scheme, precondition):
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    n, inst = 4, 2  # 2 instance rows, 2 class rows
    mean, std = torch.randn(n, 16, 4, 4), torch.rand(n, 16, 4, 4) * 0.1
    context, pooled = torch.randn(n, 7, 8), torch.randn(n, 6)
    seeds, scale, shift = [11, 12, 13, 14], 1.5, 0.1
    settings = ObjectiveSettings(prior_loss_weight=0.7, weighting_scheme=scheme, precondition_outputs=precondition)
    model = Velocity()
    got = flow_matching_loss(model, scheduler, mean, std, context, {"pooled_projections": pooled},
                             row_generators(seeds, torch.device("cpu")), inst, scale, shift, settings)

    # by hand, row by row: each row's generator draws eps, noise, then u
    table = scheduler.sigmas[:1000].float()
    per_row = []
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        eps = torch.randn(16, 4, 4, generator=g)
        x0 = (mean[i] + std[i] * eps - shift) * scale
        noise = torch.randn(16, 4, 4, generator=g)
        if scheme == "logit_normal":
            u = torch.sigmoid(torch.randn(1, generator=g))
        else:
            r = torch.rand(1, generator=g)
            u = 1 - r - 1.29 * (torch.cos(math.pi * r / 2) ** 2 - 1 + r) if scheme == "mode" else r
        sigma = table[int(u.item() * 1000)]
        xt = (1 - sigma) * x0 + sigma * noise
        out = 0.3 * xt + sigma * 1000 / 1000 + pooled[i].mean() + context[i].mean()
        pred, target = (xt - sigma * out, x0) if precondition else (out, noise - x0)
        weight = sigma ** -2.0 if scheme == "sigma_sqrt" else 1.0
        per_row.append(weight * ((pred - target) ** 2).mean())
    instance, prior = torch.stack(per_row[:inst]).mean(), torch.stack(per_row[inst:]).mean()
    torch.testing.assert_close(got.instance, instance)
    torch.testing.assert_close(got.prior, prior)
    torch.testing.assert_close(got.total, instance + 0.7 * prior)
    got.total.backward()  # the loss reaches the model
    assert model.w.grad is not None and model.w.grad != 0


def test_offset_noise_is_drawn_after_u_and_changes_the_loss():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    mean, std = torch.randn(1, 16, 2, 2), torch.zeros(1, 16, 2, 2)
    args = (Velocity(), scheduler, mean, std, torch.zeros(1, 3, 8), {"pooled_projections": torch.zeros(1, 6)})
    plain = flow_matching_loss(*args, row_generators([3], torch.device("cpu")), 1, 1.0, 0.0, ObjectiveSettings())
    offset = flow_matching_loss(*args, row_generators([3], torch.device("cpu")), 1, 1.0, 0.0,
                                ObjectiveSettings(noise_offset=0.1))
    assert plain.prior is None and not torch.equal(plain.total, offset.total)
