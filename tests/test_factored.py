"""LoHa / LoKr through their factors (factored.py): the same outputs and gradients as PEFT's full delta weight."""

import copy

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, get_peft_model

from peftbooth import factored


class Net(torch.nn.Module):
    """A Linear and two Conv2d layers wide enough that the factored way is the cheaper one."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(256, 384)
        self.conv = torch.nn.Conv2d(96, 128, 3, stride=2, padding=1)
        self.pointwise = torch.nn.Conv2d(128, 512, 1)

    def forward(self, tokens, image):
        return self.proj(tokens), self.pointwise(self.conv(image))


CASES = {
    "loha": LoHaConfig(r=4, alpha=3, target_modules=["proj", "conv", "pointwise"]),
    "lokr": LoKrConfig(r=4, alpha=3, target_modules=["proj", "conv", "pointwise"]),
    "lokr-decompose-both": LoKrConfig(r=2, alpha=5, target_modules=["proj", "conv", "pointwise"], decompose_both=True),
    "lokr-full-factors": LoKrConfig(r=64, alpha=16, target_modules=["proj", "conv", "pointwise"]),
}


def peft_net(config):
    torch.manual_seed(0)
    model = get_peft_model(Net(), copy.deepcopy(config))
    with torch.no_grad():  # PEFT starts LoHa/LoKr at a zero update: give every factor values
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def run(model, inputs):
    tokens, image = inputs
    out_tokens, out_image = model(tokens, image)
    loss = out_tokens.pow(2).mean() + out_image.pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out_tokens.detach(), out_image.detach(), grads


@pytest.mark.parametrize("case", list(CASES))
def test_factored_forward_and_gradients_match_peft(case, monkeypatch):
    reference = peft_net(CASES[case])
    fast = copy.deepcopy(reference)
    assert factored.install(fast) == 3
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 5, 256, generator=g), torch.randn(2, 96, 9, 9, generator=g))
    fallbacks = []
    real_fallback = factored._fallback
    monkeypatch.setattr(factored, "_fallback", lambda *a, **k: fallbacks.append(a[1]) or real_fallback(*a, **k))
    ref_tokens, ref_image, ref_grads = run(reference, inputs)
    fast_tokens, fast_image, fast_grads = run(fast, inputs)
    assert fallbacks == []  # every layer really went the factored way
    torch.testing.assert_close(fast_tokens, ref_tokens, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_image, ref_image, rtol=1e-4, atol=1e-5)
    assert fast_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-3, atol=1e-5)
    # the saved adapter is PEFT's own: the same parameter names and values
    assert fast.state_dict().keys() == reference.state_dict().keys()


def test_small_layers_and_rank_dropout_keep_peft_forward(monkeypatch):
    """Where the full weight is cheaper (a narrow layer) or PEFT must randomise it (rank dropout), PEFT's own code
    runs."""
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoHaConfig(r=4, target_modules=["0"]))
    factored.install(model)
    calls = []
    monkeypatch.setattr(factored, "_fallback", lambda *a, **k: calls.append(a[1]) or torch.zeros(1))
    model(torch.randn(1, 8))
    assert calls == ["default"]  # a layer this small keeps PEFT's forward

    narrow = get_peft_model(torch.nn.Sequential(torch.nn.Linear(256, 512)), LoHaConfig(r=16, target_modules=["0"]))
    factored.install(narrow)
    calls.clear()
    narrow(torch.randn(1, 256))
    assert calls == ["default"]  # r² = 256: 256 * (256 + 512) >= 256 * 512, the full weight is the cheaper way

    wide = get_peft_model(torch.nn.Sequential(torch.nn.Linear(256, 256)),
                          LoHaConfig(r=4, rank_dropout=0.5, target_modules=["0"]))
    factored.install(wide)
    calls.clear()
    wide.train()
    wide(torch.randn(1, 256))
    assert calls == ["default"]
    wide.eval()  # rank dropout only acts in training
    calls.clear()
    wide(torch.randn(1, 256))
    assert calls == []


def test_uninstall_restores_peft_forward():
    model = peft_net(CASES["loha"])
    factored.install(model)
    factored.uninstall(model)
    layer = model.base_model.model.proj
    assert not hasattr(layer, factored.ORIGINAL)
    assert layer._get_delta_activations.__func__ is type(layer)._get_delta_activations
