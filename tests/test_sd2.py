"""SD 2.x: a tiny v-prediction model of the SD 2 layout trains on the velocity and generates; Min-SNR and
offset-noise maths."""

import math

import pytest
import torch
from conftest import tiny_config

from peftbooth.cli import main
from peftbooth.models.loading import load_components
from peftbooth.training.losses import dreambooth_loss, min_snr_weights, offset_noise, snr


@pytest.fixture(scope="module")
def sd2_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd2") / "tiny-sd2-v"
    assert main(["tiny-model", str(path), "--kind", "sd2-v"]) == 0
    return str(path)


def test_tiny_sd2_model_has_the_sd2_layout(sd2_model):
    c = load_components(sd2_model)
    assert c.prediction_type == "v_prediction" and not c.is_sdxl
    assert c.unet.config.use_linear_projection and list(c.unet.config.attention_head_dim) == [2, 4]
    assert isinstance(c.unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    assert c.text_encoder.config.hidden_act == "gelu"


def test_min_snr_weights_match_hand_computation(tiny_model):
    sched = load_components(tiny_model).noise_scheduler
    t = torch.tensor([10, 500, 999])
    a = sched.alphas_cumprod[t].double()
    s = (a / (1 - a))
    torch.testing.assert_close(snr(sched, t).double(), s, rtol=1e-5, atol=0)
    gamma = 5.0
    eps_w = min_snr_weights(s.float(), gamma, "epsilon").double()
    v_w = min_snr_weights(s.float(), gamma, "v_prediction").double()
    for i in range(3):
        clamp = min(s[i].item(), gamma)
        assert math.isclose(eps_w[i].item(), clamp / s[i].item(), rel_tol=1e-5)
        assert math.isclose(v_w[i].item(), clamp / (s[i].item() + 1), rel_tol=1e-5)
    assert eps_w[0] < 1 and eps_w[2] == pytest.approx(1.0)  # low noise is damped, high noise keeps weight 1


def test_weighted_loss_weights_the_instance_rows_only():
    """Min-SNR weights multiply the instance rows' MSE; the class rows' MSE is unweighted (as in the diffusers
    DreamBooth scripts), so --prior-loss-weight means the same with and without --snr-gamma."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 2, 2, generator=g), torch.randn(4, 4, 2, 2, generator=g)
    w = torch.tensor([0.5, 0.25])
    loss, inst, prior = dreambooth_loss(pred, target, 2, 0.7, w)
    rows = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(inst, (rows[:2] * w).mean())
    torch.testing.assert_close(prior, rows[2:].mean())
    torch.testing.assert_close(loss, inst + 0.7 * prior)


def test_offset_noise_shifts_each_channel_by_a_constant():
    noise = torch.zeros(2, 4, 3, 3)
    offset = torch.arange(8.0).view(2, 4, 1, 1)
    out = offset_noise(noise, offset, 0.1)
    torch.testing.assert_close(out.mean(dim=(2, 3)), 0.1 * offset.view(2, 4))
    torch.testing.assert_close(out.std(dim=(2, 3)), torch.zeros(2, 4))


def test_sd2_v_prediction_run_trains_and_generates(sd2_model, photos, tmp_path, monkeypatch):
    """--snr-gamma and --noise-offset reach every training step (with their values), on the velocity target."""
    import importlib

    from peftbooth.inference.pipeline import AdapterPipeline
    from peftbooth.training.loop import train

    objective = importlib.import_module("peftbooth.training.objective")  # the training step's maths live there
    weights_calls, offset_calls = [], []
    real_weights, real_offset = objective.min_snr_weights, objective.offset_noise

    def weights_spy(snr_t, gamma, prediction_type):
        weights_calls.append((gamma, prediction_type, snr_t.shape[0]))
        return real_weights(snr_t, gamma, prediction_type)

    def offset_spy(noise, offset, strength):
        offset_calls.append((strength, offset.abs().sum().item()))
        return real_offset(noise, offset, strength)

    monkeypatch.setattr(objective, "min_snr_weights", weights_spy)
    monkeypatch.setattr(objective, "offset_noise", offset_spy)
    out = train(tiny_config(sd2_model, photos, tmp_path / "run", **{
        "unet_adapter.target_modules": "all", "train.snr_gamma": 5.0, "train.noise_offset": 0.05,
        "train.max_train_steps": 3, "data.with_prior_preservation": True, "data.class_prompt": "a photo of a dog",
        "data.num_class_images": 2, "train.train_text_encoder": True}))
    # one call per training step (proxies measure with the plain loss), instance rows only (batch 1 + 1 class row)
    assert weights_calls == [(5.0, "v_prediction", 1)] * 3
    assert [strength for strength, _ in offset_calls] == [0.05] * 3 and all(size > 0 for _, size in offset_calls)
    pipe = AdapterPipeline(sd2_model)
    assert pipe.pipe.scheduler.config.prediction_type == "v_prediction"  # sampling uses the velocity too
    base = pipe.generate("a photo of sks dog", steps=2, height=32, width=32)
    pipe.load_adapter(out)
    adapted = pipe.generate("a photo of sks dog", steps=2, height=32, width=32)
    assert base[0].size == (32, 32) and list(base[0].getdata()) != list(adapted[0].getdata())
