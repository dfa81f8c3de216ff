"""--ema-decay: the moving average of the adapter weights, what the run saves and validates, and exact resume."""

import importlib

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from test_resume import adapter_tensors, assert_bitwise_equal, signal_at_step

from peftbooth.training.checkpoint import list_checkpoints, release_lock
from peftbooth.training.ema import FILE, AdapterEMA, adapter_ema, ema_decay
from peftbooth.training.loop import train
from peftbooth.training.setup import setup
from peftbooth.training.signals import TrainingInterrupted

loop = importlib.import_module("peftbooth.training.loop")  # the module whose fit calls validation_images


@pytest.mark.parametrize("decay, updates, expected", [
    (0.99, 0, 0.1),  # the first update keeps a tenth of the starting weights
    (0.99, 90, 0.91),
    (0.99, 890, 0.99),  # the warm-up reaches D
    (0.99, 5000, 0.99),
    (0.5, 0, 0.1),
    (0.5, 10, 0.5),
])
def test_decay_warms_up_to_its_value(decay, updates, expected):
    assert ema_decay(decay, updates) == pytest.approx(expected)


def linear_ema(decay=0.9):
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    layer.bias.requires_grad_(False)  # frozen: not averaged
    return layer, adapter_ema({"part": layer}, decay)


def test_update_is_the_exponential_average_of_the_weights():
    layer, ema = linear_ema(0.9)
    assert set(ema.average) == {"part/weight"}
    expected = layer.weight.detach().clone()
    for n in range(5):
        with torch.no_grad():
            layer.weight.add_(torch.randn_like(layer.weight))
        ema.update()
        d = ema_decay(0.9, n)
        expected = d * expected + (1 - d) * layer.weight.detach()
        torch.testing.assert_close(ema.average["part/weight"], expected, rtol=0, atol=1e-6)
    assert ema.updates == 5
    assert not torch.equal(ema.average["part/weight"], layer.weight)


def test_swapped_in_restores_the_trained_weights_even_on_error():
    layer, ema = linear_ema()
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update()
    trained = layer.weight.detach().clone()
    with pytest.raises(RuntimeError), ema.swapped_in():
        assert torch.equal(layer.weight, ema.average["part/weight"])
        raise RuntimeError("sampling failed")
    assert torch.equal(layer.weight, trained)
    ema.copy_to_params()
    assert torch.equal(layer.weight, ema.average["part/weight"])


def test_save_and_load_keep_average_and_count(tmp_path):
    layer, ema = linear_ema()
    for _ in range(3):
        with torch.no_grad():
            layer.weight.mul_(1.5)
        ema.update()
    ema.save(tmp_path / FILE)
    other = AdapterEMA({"part/weight": layer.weight}, 0.9)
    other.load(tmp_path / FILE)
    assert other.updates == 3 and torch.equal(other.average["part/weight"], ema.average["part/weight"])
    wrong = AdapterEMA({"part/other": layer.weight}, 0.9)
    with pytest.raises(ValueError, match="does not fit this run's adapters"):
        wrong.load(tmp_path / FILE)


def test_off_is_none_and_a_decay_outside_0_1_is_refused():
    layer, _ = linear_ema()
    assert adapter_ema({"part": layer}, 0.0) is None
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        AdapterEMA({"w": layer.weight}, 1.0)


def peft_names(ema_tensors: dict, part: str) -> dict:
    """ema.safetensors' 'unet/<parameter>' -> the adapter file's keys (PEFT drops the adapter name)."""
    return {k[len(part) + 1:].replace(".default", ""): v for k, v in ema_tensors.items() if k.startswith(part + "/")}


@pytest.mark.parametrize("adapter", ["lora", "loha"])
def test_the_run_saves_the_average_of_its_steps(tiny_model, photos, tmp_path, adapter):
    """Checkpoints hold the weights of every step and the average; the finished run's adapter is the average
    (not the last step's weights), and each step's average is the previous one moved towards that step's weights."""
    settings = {"unet_adapter.adapter": adapter, "train.train_text_encoder": True, "train.max_train_steps": 4,
                "train.checkpointing_steps": 1, "train.ema_decay": 0.9, "train.learning_rate": 1e-2}
    out = train(tiny_config(tiny_model, photos, tmp_path / "run", **settings))
    saved = adapter_tensors(out)
    ckpts = list_checkpoints(out)
    assert [p.name for p in ckpts][-1] == "checkpoint-000004"
    last_ema, before_ema = load_file(ckpts[-1] / FILE), load_file(ckpts[-2] / FILE)
    last_raw = adapter_tensors(ckpts[-1])
    for part in ("unet", "text_encoder"):
        average = peft_names(last_ema, part)
        assert average.keys() == {k.split("/", 1)[1] for k in saved if k.startswith(part + "/")}
        previous = peft_names(before_ema, part)
        for k, v in average.items():
            assert torch.equal(saved[f"{part}/{k}"], v), k
            moved = previous[k].lerp(last_raw[f"{part}/{k}"], 1 - ema_decay(0.9, 3))
            torch.testing.assert_close(v, moved, rtol=0, atol=1e-7)
    changed = [k for k in saved if not torch.equal(saved[k], last_raw[k])]
    assert len(changed) > len(saved) // 2, "the saved adapter is the last step's weights, not their average"


def test_resume_with_ema_is_bitwise_identical(tiny_model, photos, tmp_path, monkeypatch):
    settings = {"train.max_train_steps": 5, "train.ema_decay": 0.8, "train.train_text_encoder": True,
                "data.random_flip": True, "train.seed": 3}
    reference = adapter_tensors(train(tiny_config(tiny_model, photos, tmp_path / "ref", **settings)))
    out = tmp_path / "run"
    signal_at_step(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted):
        train(tiny_config(tiny_model, photos, out, **settings))
    monkeypatch.undo()
    assert (list_checkpoints(out)[-1] / FILE).is_file()
    resumed = train(tiny_config(tiny_model, photos, out, **settings, **{"train.resume": "latest"}))
    assert_bitwise_equal(adapter_tensors(resumed), reference)


def test_resume_force_from_a_run_without_ema_starts_the_average_there(tiny_model, photos, tmp_path, monkeypatch):
    out = tmp_path / "run"
    signal_at_step(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted):
        train(tiny_config(tiny_model, photos, out, **{"train.max_train_steps": 4}))
    monkeypatch.undo()
    checkpoint = list_checkpoints(out)[-1]
    with pytest.warns(UserWarning, match="has no ema.safetensors; the moving average starts from its weights"):
        run = setup(tiny_config(tiny_model, photos, out, **{"train.max_train_steps": 4, "train.ema_decay": 0.9,
                                                             "train.resume": "latest", "train.resume_force": True}))
    try:
        assert run.ema.updates == 0
        for name, p in run.ema.params.items():
            assert torch.equal(run.ema.average[name], p), name
        restored = {k: v for k, v in adapter_tensors(checkpoint).items() if k.startswith("unet/")}
        average = peft_names(run.ema.average, "unet")
        assert restored and all(torch.equal(v, average[k.split("/", 1)[1]]) for k, v in restored.items())
    finally:
        release_lock(run.lock)


def fit_tiny(tiny_model, photos, out, **settings):
    run = setup(tiny_config(tiny_model, photos, out, **{
        "train.max_train_steps": 3, "train.ema_decay": 0.9, "train.learning_rate": 1e-2, **settings}))
    try:
        loop.fit(run)
    finally:
        release_lock(run.lock)
    return run


def test_validation_samples_the_average_and_training_goes_on_from_the_trained_weights(tiny_model, photos, tmp_path,
                                                                                     monkeypatch):
    seen, averages = [], []
    monkeypatch.setattr(loop, "validation_images", lambda run, step: seen.append(
        (step, {k: p.detach().clone() for k, p in run.ema.params.items()})))
    real_update = AdapterEMA.update

    def update(self):
        real_update(self)
        averages.append({k: v.clone() for k, v in self.average.items()})

    monkeypatch.setattr(AdapterEMA, "update", update)
    run = fit_tiny(tiny_model, photos, tmp_path / "run", **{
        "train.validation_prompt": ["a photo of sks dog"], "train.validation_steps": 2})
    assert [step for step, _ in seen] == [0, 2, 3]
    for step, weights in seen[1:]:
        for k, v in weights.items():
            assert torch.equal(v, averages[step - 1][k]), (step, k)
    # fit ends with the average in the weights (what save() writes), and the same average as a run that never
    # validated: the trained weights came back after each validation
    plain = fit_tiny(tiny_model, photos, tmp_path / "plain")
    for k, p in run.ema.params.items():
        assert torch.equal(p, averages[-1][k]) and torch.equal(p, plain.ema.params[k]), k


def test_the_report_says_the_saved_weights_are_the_average():
    from peftbooth.runs.report import summary_section

    with_ema = summary_section({"train": {"ema_decay": 0.99}}, {}, {})
    assert "the moving average of the adapter weights (--ema-decay 0.99), not the last step&#x27;s" in with_ema
    assert "moving average" not in summary_section({"train": {"ema_decay": 0.0}}, {}, {})
