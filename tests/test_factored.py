"""LoHa / LoKr through their factors (factored.py): the same outputs and gradients as PEFT's full delta weight."""

import copy

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, get_peft_model

from peftbooth.adapters import factored


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


def peft_net(config, make=Net):
    torch.manual_seed(0)
    model = get_peft_model(make(), copy.deepcopy(config))
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


@pytest.mark.parametrize("case", ["loha", "lokr", "loha-small", "lokr-small"])
def test_output_has_the_frozen_layers_dtype_under_autocast(case):
    """Under autocast an adapted layer hands on the autocast dtype, as the un-adapted layer and LoRA do, also when
    its input is fp32: CUDA autocast runs GroupNorm/LayerNorm in fp32, so most adapted UNet layers get fp32 input.
    PEFT's LoHa/LoKr forward casts its output to the input's dtype, which sends fp32 activations on through the
    rest of the block. The values are PEFT's, rounded to bf16. The small cases keep PEFT's delta (below
    MIN_WEIGHT) but run our forward."""
    from peftbooth.precision import Precision, place_frozen

    adapter, small = case.split("-")[0], case.endswith("-small")
    if small:
        config = copy.deepcopy(CASES[adapter])
        config.target_modules = ["0"]
        models = [peft_net(config, lambda: torch.nn.Sequential(torch.nn.Linear(16, 16))) for _ in range(2)]
        inputs = (torch.randn(3, 16),)
    else:
        models = [peft_net(CASES[case]), peft_net(CASES[case])]
        g = torch.Generator().manual_seed(1)
        inputs = (torch.randn(2, 5, 256, generator=g), torch.randn(2, 96, 9, 9, generator=g))
    reference, ours = models

    def outputs(model, xs):
        out = model(*xs)
        return list(out) if isinstance(out, tuple) else [out]

    assert factored.install(ours) == (1 if small else 3)
    for model in models:
        # frozen bf16, adapters fp32, as training
        place_frozen(model, Precision(torch.device("cpu"), torch.bfloat16, torch.bfloat16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = [outputs(m, inputs) for m in (reference, ours)]
    assert [t.dtype for t in expected] == [torch.float32] * len(inputs)  # PEFT's forward: the input's dtype
    assert [t.dtype for t in got] == [torch.bfloat16] * len(inputs)  # what nn.Linear / nn.Conv2d give here
    for g_, e in zip(got, expected):
        torch.testing.assert_close(g_.float(), e, rtol=2e-2, atol=2e-2)
    with torch.no_grad():  # without autocast nothing changes: x's dtype out, as before
        bf16_inputs = [x.bfloat16() for x in inputs]
        assert [t.dtype for t in outputs(ours, bf16_inputs)] == [torch.bfloat16] * len(inputs)

    # the paths that run PEFT's forward keep the rule too: disabled adapters (the "before" of a comparison),
    # merged ones, and module dropout while training
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with ours.disable_adapter():
            disabled = outputs(ours, inputs)
        for layer in ours.modules():
            if hasattr(layer, factored.ORIGINAL_FORWARD):
                layer.module_dropout["default"] = 0.5
        ours.train()
        dropped = outputs(ours, inputs)
        ours.eval()  # PEFT drops nothing in eval: our forward again, the full update
        evaluated = outputs(ours, inputs)
        ours.merge_adapter()  # last: merging into bf16 weights and back rounds them
        merged = outputs(ours, inputs)
    for path in (disabled, dropped, evaluated, merged):
        assert [t.dtype for t in path] == [torch.bfloat16] * len(inputs)
    for e, g_ in zip(evaluated, got):
        torch.testing.assert_close(e, g_)


def test_uninstall_restores_peft_forward():
    model = peft_net(CASES["loha"])
    factored.install(model)
    factored.uninstall(model)
    layer = model.base_model.model.proj
    assert not hasattr(layer, factored.ORIGINAL)
    assert layer._get_delta_activations.__func__ is type(layer)._get_delta_activations
    assert layer.forward.__func__ is type(layer).forward
    assert not hasattr(layer, factored.ORIGINAL_FORWARD)


def count_paths(model, monkeypatch):
    """Calls of adapted layers and how many of them fell back to PEFT's forward, during the returned counter's life."""
    counts = {"calls": 0, "fallbacks": 0}
    real_fallback = factored._fallback

    def fallback(*a, **k):
        counts["fallbacks"] += 1
        return real_fallback(*a, **k)

    monkeypatch.setattr(factored, "_fallback", fallback)
    for m in model.modules():
        if hasattr(m, factored.ORIGINAL):
            m.register_forward_pre_hook(lambda *_: counts.__setitem__("calls", counts["calls"] + 1))
    return counts


@pytest.mark.parametrize("adapter", ["loha", "lokr"])
def test_training_through_the_factors_matches_peft_forward(adapter, tiny_model, photos, tmp_path, monkeypatch):
    """End to end on the tiny model, with the size cutoff lowered so its layers take the factored way."""
    from conftest import tiny_config

    from peftbooth.training.loop import fit
    from peftbooth.training.setup import setup

    monkeypatch.setattr(factored, "MIN_WEIGHT", 0)
    params = []
    for on in (True, False):
        run = setup(tiny_config(tiny_model, photos, tmp_path / f"out-{on}", **{
            "unet_adapter.adapter": adapter, "unet_adapter.target_modules": "all", "train.max_train_steps": 2,
            "train.train_text_encoder": True, "train.factored_lycoris": on}))
        installed = sum(hasattr(m, factored.ORIGINAL) for m in run.unet.modules())
        if on:
            counts = count_paths(run.unet, monkeypatch)
            assert installed > 0
        else:
            assert installed == 0
        fit(run)
        if on:  # most adapted layers really ran through their factors
            assert counts["calls"] > 0 and counts["fallbacks"] < counts["calls"] / 2, counts
        params.append({n: p.detach().clone() for m in run.trained().values()
                       for n, p in m.named_parameters() if p.requires_grad})
    # Adam divides by the gradient's running size, so rounding-level gradient differences on weights whose
    # gradient is near zero move them by up to a few % of one lr-sized step (lr 1e-3): compare at that scale
    for name, p in params[0].items():
        torch.testing.assert_close(p, params[1][name], rtol=1e-3, atol=5e-5)


def test_factored_training_in_bf16_and_generation(tiny_model, photos, tmp_path, monkeypatch, fresh_accelerator_state):
    """bf16 autocast over fp32 adapter factors trains to finite weights; generation with the factored layers gives
    the images PEFT's own forward gives."""
    import numpy as np
    from conftest import tiny_config

    from peftbooth.inference.pipeline import AdapterPipeline
    from peftbooth.training.loop import train

    monkeypatch.setattr(factored, "MIN_WEIGHT", 0)
    out = train(tiny_config(tiny_model, photos, tmp_path / "run", **{
        "unet_adapter.adapter": "lokr", "unet_adapter.target_modules": "all", "train.max_train_steps": 2,
        "train.mixed_precision": "bf16", "train.learning_rate": 1e-2}))
    pipe = AdapterPipeline(tiny_model)
    pipe.load_adapter(out)
    assert sum(hasattr(m, factored.ORIGINAL) for m in pipe.pipe.unet.modules()) > 0
    fast = np.asarray(pipe.generate("a photo of sks dog", steps=2, height=32, width=32)[0], dtype=np.int16)
    factored.uninstall(pipe.pipe.unet)
    slow = np.asarray(pipe.generate("a photo of sks dog", steps=2, height=32, width=32)[0], dtype=np.int16)
    assert np.abs(fast - slow).max() <= 2  # 8-bit images: rounding differences only
    pipe.disable_adapters()
    plain = np.asarray(pipe.generate("a photo of sks dog", steps=2, height=32, width=32)[0], dtype=np.int16)
    assert np.abs(plain - slow).max() > 2  # the trained adapter does change the image
