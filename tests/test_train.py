"""Training end to end on the tiny model: what changes, what is saved, and that it reloads exactly."""

import math

import pytest
import torch
from conftest import tiny_config
from peft import PeftModel

from peftbooth.adapters import factored
from peftbooth.models.loading import load_components
from peftbooth.training.loop import finish, fit, training_step
from peftbooth.training.setup import setup

ADAPTER_KEYS = ("lora_", "hada_", "lokr_")


def is_adapter_param(name: str) -> bool:
    return any(k in name for k in ADAPTER_KEYS)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g)


@pytest.mark.parametrize("train_text_encoder", [False, True], ids=["unet", "unet+te"])
@pytest.mark.parametrize("adapter", ["lora", "loha", "lokr"])
def test_train_changes_only_adapters_and_reloads_exactly(tiny_model, photos, tmp_path, adapter, train_text_encoder):
    cfg = tiny_config(tiny_model, photos, tmp_path / "out", **{
        "unet_adapter.adapter": adapter, "unet_adapter.target_modules": "all", "train.max_train_steps": 3,
        "train.train_text_encoder": train_text_encoder,
    })
    run = setup(cfg)
    unet_before, te_before = snapshot(run.unet), snapshot(run.text_encoder)
    stats = fit(run)
    assert stats["steps"] == 3 and math.isfinite(stats["final_loss"])

    for model, before in [(run.unet, unet_before), (run.text_encoder, te_before)]:
        changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
        assert all(is_adapter_param(n) for n in changed), sorted(n for n in changed if not is_adapter_param(n))[:3]
        trained_here = model is run.unet or train_text_encoder
        assert bool(changed) == trained_here

    out = finish(run, stats)
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and "logs" not in p.parts}
    expected = {"config.yaml", "README.md", "unet/adapter_config.json", "unet/adapter_model.safetensors"}
    if train_text_encoder:
        expected |= {"text_encoder/adapter_config.json", "text_encoder/adapter_model.safetensors"}
    assert expected <= files
    assert any(f.startswith("text_encoder/") for f in files) == train_text_encoder
    assert not any(p.name.startswith(".staging") for p in out.iterdir())

    # Reload on fresh base components with plain PEFT and compare with the trained, in-memory model.
    fresh = load_components(tiny_model)
    unet = PeftModel.from_pretrained(fresh.unet, out / "unet").eval()
    run.unet.eval()
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        factored_out = run.unet(x, t, ctx).sample
        factored.uninstall(run.unet)  # PEFT's own forward on both sides: the saved weights must match bitwise
        assert torch.equal(unet(x, t, ctx).sample, run.unet(x, t, ctx).sample)
        torch.testing.assert_close(factored_out, run.unet(x, t, ctx).sample, rtol=1e-4, atol=1e-5)
        # and the adapter does something: the base model alone gives another output
        with unet.disable_adapter():
            assert not torch.allclose(unet(x, t, ctx).sample, run.unet(x, t, ctx).sample)
    if train_text_encoder:
        te = PeftModel.from_pretrained(fresh.text_encoder, out / "text_encoder").eval()
        run.text_encoder.eval()
        factored.uninstall(run.text_encoder)
        ids = torch.randint(0, 512, (2, 77))
        with torch.no_grad():
            assert torch.equal(te(ids)[0], run.text_encoder(ids)[0])


def test_text_encoder_adapter_may_differ_from_unet(tiny_model, photos, tmp_path):
    import json

    cfg = tiny_config(tiny_model, photos, tmp_path / "out", **{
        "unet_adapter.adapter": "loha", "unet_adapter.rank": 4, "text_encoder_adapter.adapter": "lora",
        "text_encoder_adapter.rank": 2, "text_encoder_adapter.target_modules": "attn-mlp",
        "train.train_text_encoder": True, "train.max_train_steps": 1,
    })
    run = setup(cfg)
    out = finish(run, fit(run))
    unet_cfg = json.loads((out / "unet" / "adapter_config.json").read_text())
    te_cfg = json.loads((out / "text_encoder" / "adapter_config.json").read_text())
    assert unet_cfg["peft_type"] == "LOHA" and unet_cfg["r"] == 4
    assert te_cfg["peft_type"] == "LORA" and te_cfg["r"] == 2 and te_cfg["lora_alpha"] == 2
    assert set(te_cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert unet_cfg["base_model_name_or_path"] == tiny_model


def test_training_step_loss_is_instance_plus_weighted_prior(tiny_model, photos, tmp_path):
    cfg = tiny_config(tiny_model, photos, tmp_path / "out", **{
        "data.with_prior_preservation": True, "data.class_prompt": "a photo of a dog", "data.num_class_images": 2,
        "data.prior_loss_weight": 0.3, "data.train_batch_size": 2,
    })
    run = setup(cfg)
    batch = next(iter(run.dataloader))
    assert [k[0] for k in batch["keys"]] == ["instance", "instance", "class", "class"] and batch["num_instance"] == 2
    assert batch["prompts"] == ["a photo of sks dog"] * 2 + ["a photo of a dog"] * 2
    loss, instance_loss, prior_loss = training_step(run, batch)
    assert prior_loss is not None
    torch.testing.assert_close(loss, instance_loss + 0.3 * prior_loss, rtol=0, atol=0)
    assert len(list((tmp_path / "out" / "class_images").glob("*.png"))) == 2


@pytest.mark.parametrize("adapter", ["lora", "loha", "lokr"])
def test_caching_does_not_change_training(tiny_model, photos, tmp_path, adapter):
    """Same seed, with and without the latent and text caches: same losses and adapters within fp tolerance."""
    results = []
    for cached in (True, False):
        cfg = tiny_config(tiny_model, photos, tmp_path / f"out-{cached}", **{
            "unet_adapter.adapter": adapter, "train.max_train_steps": 3, "data.random_flip": True,
            "data.with_prior_preservation": True, "data.class_prompt": "a photo of a dog",
            "data.num_class_images": 2, "data.class_data_dir": str(tmp_path / "class"),
            "train.cache_latents": cached, "train.cache_text_states": cached,
        })
        run = setup(cfg)
        assert (run.latent_cache is not None) == cached and (run.text_cache is not None) == cached
        if cached:
            assert len(run.latent_cache) == (3 + 2) * 2  # every instance and class image, both flips
        losses = []
        for batch in run.dataloader:
            losses.append(training_step(run, batch)[0].item())
            if len(losses) == 3:
                break
        fit(run)
        results.append((losses, {n: p.detach().clone() for n, p in run.unet.named_parameters() if p.requires_grad}))
    (cached_losses, cached_params), (plain_losses, plain_params) = results
    torch.testing.assert_close(cached_losses, plain_losses, rtol=1e-5, atol=1e-6)
    for name, p in cached_params.items():
        torch.testing.assert_close(p, plain_params[name], rtol=1e-4, atol=1e-6)


def test_random_crop_turns_latent_caching_off(tiny_model, photos, tmp_path, capsys):
    run = setup(tiny_config(tiny_model, photos, tmp_path / "out", **{"data.center_crop": False}))
    assert run.latent_cache is None and run.text_cache is not None
    assert "latents are not cached: random crops" in capsys.readouterr().out
    assert "pixel_values" in next(iter(run.dataloader))


def test_gradient_accumulation_counts_optimizer_steps(tiny_model, photos, tmp_path):
    cfg = tiny_config(tiny_model, photos, tmp_path / "out", **{
        "train.gradient_accumulation_steps": 2, "train.max_train_steps": 2, "train.lr_scheduler": "linear",
    })
    run = setup(cfg)
    events = []
    backward, step = run.accelerator.backward, run.optimizer.step
    run.accelerator.backward = lambda loss, **k: events.append("backward") or backward(loss, **k)
    run.optimizer.step = lambda *a, **k: events.append("step") or step(*a, **k)
    stats = fit(run)
    assert stats["steps"] == 2
    # 4 micro-batches; every 2nd ends an optimizer step
    assert events == ["backward", "backward", "step", "backward", "backward", "step"]
    assert run.lr_scheduler.last_epoch == 2  # the schedule advanced once per optimizer step
    assert run.lr_scheduler.get_last_lr()[0] == 0.0  # linear decay reached its end exactly at max_train_steps


def test_tensorboard_logs_and_gradient_checkpointing(tiny_model, photos, tmp_path):
    cfg = tiny_config(tiny_model, photos, tmp_path / "out", **{
        "train.report_to": "tensorboard", "train.gradient_checkpointing": True, "train.train_text_encoder": True,
    })
    run = setup(cfg)
    assert run.components.unet.is_gradient_checkpointing
    finish(run, fit(run))
    assert list((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))


def test_v_prediction_model_trains(tiny_vpred_model, photos, tmp_path):
    cfg = tiny_config(tiny_vpred_model, photos, tmp_path / "out")
    run = setup(cfg)
    assert run.components.prediction_type == "v_prediction"
    stats = fit(run)
    assert math.isfinite(stats["final_loss"])


def test_text_encoder_adapter_loads_through_transformers_load_adapter(tiny_model, photos, tmp_path):
    """diffusers' load_lora_weights loads text-encoder LoRAs through transformers' own `load_adapter`.

    transformers 5.24 made that path demand peft >= 0.22 (unreleased), which is why pyproject bounds
    transformers < 5.24: this test fails if an install lets such a pair in.
    """
    cfg = tiny_config(tiny_model, photos, tmp_path / "out", **{"train.train_text_encoder": True})
    run = setup(cfg)
    out = finish(run, fit(run))
    te = load_components(tiny_model).text_encoder
    te.load_adapter(str(out / "text_encoder"), adapter_name="dog")
    run.text_encoder.eval()
    ids = torch.randint(0, 512, (2, 77))
    with torch.no_grad():
        torch.testing.assert_close(te(ids)[0], run.text_encoder(ids)[0], rtol=0, atol=1e-6)


def test_logged_loss_is_the_mean_over_the_logging_window(tiny_model, photos, tmp_path, monkeypatch):
    """Progress bar, TensorBoard, the report's curve and the final loss show the mean over every micro-batch of the
    optimizer steps since the previous log, not the one micro-batch at a random timestep that happened to be last."""
    import importlib

    train_module = importlib.import_module("peftbooth.training.loop")
    real, seen = train_module.training_step, []

    def step(run, batch):
        out = real(run, batch)
        seen.append([part.item() for part in out])  # the test may wait for the device; the loop does not
        return out

    monkeypatch.setattr(train_module, "training_step", step)
    run = setup(tiny_config(tiny_model, photos, tmp_path / "out", **{
        "train.max_train_steps": 4, "train.logging_steps": 2, "train.gradient_accumulation_steps": 2,
        "data.with_prior_preservation": True, "data.class_prompt": "a photo of a dog", "data.num_class_images": 2,
        "train.report_to": "tensorboard"}))
    logged, postfix = [], []
    monkeypatch.setattr(run.accelerator, "log", lambda logs, step=None: logged.append((step, logs)))
    monkeypatch.setattr(train_module.tqdm, "set_postfix", lambda self, **kw: postfix.append(kw["loss"]))
    stats = fit(run)
    assert len(seen) == 8  # 4 optimizer steps of 2 micro-batches, logged after steps 2 and 4
    windows = [seen[:4], seen[4:]]
    means = [[sum(row[i] for row in w) / 4 for i in range(3)] for w in windows]  # (loss, instance, prior)
    assert [s for s, _ in stats["loss_history"]] == [2, 4]
    for (_, loss), mean in zip(stats["loss_history"], means):
        assert loss == pytest.approx(mean[0], rel=1e-6)
    assert stats["final_loss"] == pytest.approx(means[1][0], rel=1e-6)
    assert [s for s, _ in logged] == [2, 4]
    for (_, logs), mean in zip(logged, means):
        assert [logs["loss"], logs["instance_loss"], logs["prior_loss"]] == pytest.approx(mean, rel=1e-6)
    assert postfix == [f"{m[0]:.4f}" for m in means]
    assert means[1][0] != pytest.approx(seen[-1][0], rel=1e-3)  # the last micro-batch alone is another number
