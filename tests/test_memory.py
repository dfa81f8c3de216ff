"""The memory check (peftbooth.training.memory) and the low-memory preset: the estimate as a table, the refusal's text, and
`peftbooth train` refusing, before anything is written, on a faked GPU whose free memory is too small."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from peftbooth.cli import main
from peftbooth.config.dicts import SECTIONS
from peftbooth.config.sections import TrainConfig
from peftbooth.training import memory

GIB = 2**30
# Parameter counts of the real models (as the SD 1.5 / SDXL-shaped builds in benchmarks/memory_estimate.py count
# them), and LoRA r16 'all' + a text-encoder adapter r16 on 'attn' as footprint_of counts them (the fake-tensor
# traces report the same trainable totals).
SD15 = memory.Footprint("sd", 859_520_964, (123_060_480,), 83_653_863, 16_879_616, 1_179_648)
SDXL = memory.Footprint("sdxl", 2_567_463_684, (123_060_480, 694_659_840), 83_653_863, 49_360_896, 6_422_528)


def plan(**kw) -> memory.Plan:
    """LoRA + text-encoder adapter + prior preservation, train's defaults at bf16 (the rows of BENCHMARKS.md)."""
    base = dict(resolution=512, train_batch_size=1, prior=True, sample_batch_size=4, class_images=True,
                gradient_checkpointing=False, compute_bytes=2, vae_bytes=2, train_text_encoder=True)
    return memory.Plan(**{**base, **kw})


SDXL_DEFAULT = dict(resolution=1024, vae_bytes=4)  # SDXL's own VAE stays fp32 (force_upcast)


# --- the formula, calibrated on the fake-tensor traces --------------------------------------------------------

LOW = dict(gradient_checkpointing=True, sample_batch_size=1)  # the preset's changes from the bf16 defaults
# benchmarks/memory_estimate.py's rows in BENCHMARKS.md ("Peak GPU memory by phase"): (model, plan, phase, MiB)
CALIBRATION = [
    (SD15, {}, "caching", 715.8), (SD15, {}, "class-images", 2682.8), (SD15, {}, "training", 5018.5),
    (SD15, LOW, "caching", 715.8), (SD15, LOW, "class-images", 2673.7), (SD15, LOW, "training", 2800.0),
    (SDXL, SDXL_DEFAULT, "caching", 4450.8), (SDXL, SDXL_DEFAULT, "class-images", 9884.8),
    (SDXL, {**SDXL_DEFAULT, **LOW}, "caching", 4450.8), (SDXL, {**SDXL_DEFAULT, **LOW}, "class-images", 9848.5),
]


@pytest.mark.parametrize("fp, kw, phase, traced_mib", CALIBRATION)
def test_estimate_reproduces_the_traced_figures(fp, kw, phase, traced_mib):
    got = memory.estimate(fp, plan(**kw))[phase] / 2**20
    assert got == pytest.approx(traced_mib, rel=0.03)


@pytest.mark.parametrize("change, phase, factor", [
    (dict(train_batch_size=2), "training", lambda a: a > 1.3),  # activations double, weights do not
    (dict(gradient_checkpointing=True), "training", lambda a: a < 0.8),
    (dict(compute_bytes=4, vae_bytes=4), "training", lambda a: a > 1.8),  # fp32: weights and activations x2
    (dict(resolution=256), "training", lambda a: a < 0.8),
    (dict(use_8bit_adam=True), "training", lambda a: 0.9 < a < 1.0),  # moments 8 -> 2 bytes per parameter
    (dict(sample_batch_size=1), "class-images", lambda a: a < 1.0),
    (dict(train_text_encoder=False), "training", lambda a: a < 0.95),  # text encoder offloaded after caching
])
def test_each_setting_moves_its_phase(change, phase, factor):
    before, after = memory.estimate(SD15, plan())[phase], memory.estimate(SD15, plan(**change))[phase]
    assert factor(after / before), after / before


def test_no_class_images_phase_when_they_are_on_disk():
    assert set(memory.estimate(SD15, plan(class_images=False))) == {"caching", "training"}
    assert set(memory.estimate(SD15, plan())) == {"caching", "class-images", "training"}


def test_low_memory_plan_keeps_an_fp32_vae_fp32():
    low = memory.low_memory_plan(plan(compute_bytes=4, vae_bytes=4, train_batch_size=4))
    assert (low.compute_bytes, low.vae_bytes, low.train_batch_size, low.gradient_checkpointing) == (2, 2, 1, True)
    assert memory.low_memory_plan(plan(**SDXL_DEFAULT)).vae_bytes == 4  # SDXL's VAE: fp32 by the policy


# --- the refusal ------------------------------------------------------------------------------------------------

def test_fits_means_no_refusal():
    need, _ = memory.peak(SD15, plan())
    assert memory.refusal(SD15, plan(), need, "cuda:0") is None
    assert memory.refusal(SD15, plan(), need - 1, "cuda:0") is not None


def peak_of(fp, kw, flags):
    """The estimate (with margin) of the alternative `flags` to plan(**kw)."""
    return dict((f, memory.peak(fp, p)[0]) for f, p in memory.alternatives(plan(**kw)))[flags]


@pytest.mark.parametrize("fp, kw, free, named", [
    # exactly enough for one setting: it is named
    (SD15, {}, lambda: peak_of(SD15, {}, "--gradient-checkpointing"), "--gradient-checkpointing ("),
    (SDXL, SDXL_DEFAULT, lambda: peak_of(SDXL, SDXL_DEFAULT, "--low-memory"), "--low-memory ("),
    (SDXL, SDXL_DEFAULT, lambda: peak_of(SDXL, SDXL_DEFAULT, "--resolution 512"), "--resolution 512 ("),
    # nothing fits: the least is named with its figure
    (SDXL, SDXL_DEFAULT, lambda: GIB, "nothing smaller fits: the least, --low-memory --resolution 256, needs"),
])
def test_refusal_names_exactly_the_settings_that_fit(fp, kw, free, named):
    free = free()
    text = memory.refusal(fp, plan(**kw), free, "cuda:0 (Test GPU)")
    assert "\n" not in text and text.endswith("or --no-memory-check to start anyway")
    assert named in text, text
    listed = [part.rsplit(" (", 1)[0] for part in fits_of(text)]
    options = dict((f, memory.peak(fp, p)[0]) for f, p in memory.alternatives(plan(**kw)))
    for flags, need in options.items():
        if "--resolution" not in flags:  # a setting is named if and only if it fits
            assert (flags in listed) == (need <= free), (flags, text)
    for prefix in ("", "--low-memory "):  # of the lower resolutions only the largest that fits, if the setting
        shown = [f for f in listed if f.startswith(prefix + "--resolution")]  # alone does not fit
        fitting = [f for f, need in options.items() if f.startswith(prefix + "--resolution") and need <= free]
        alone = prefix.strip() in listed
        assert shown == ([] if alone or not fitting else fitting[:1]), (prefix, text)


def fits_of(text: str) -> list[str]:
    """The 'FLAGS (N GiB)' items after 'would fit: '."""
    if "; would fit: " not in text:
        return []
    return text.split("; would fit: ", 1)[1].rsplit("; or --no-memory-check", 1)[0].split(", ")




# --- the preset: one owner, and explicit settings win ------------------------------------------------------------

def test_ui_low_memory_switch_is_the_presets_owner():
    from peftbooth.ui import schema

    assert schema.LOW_MEMORY is memory.LOW_MEMORY
    fields = {f"{s}.{f.name}" for s, (cls, _) in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(memory.LOW_MEMORY) <= fields


def print_config(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(["train", *map(str, argv), "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("argv, yaml_train, expected", [
    (["--low-memory"], None, dict(gradient_checkpointing=True, mixed_precision="bf16", sample_batch_size=1)),
    (["--low-memory", "--no-gradient-checkpointing", "--mixed-precision", "no"], None,
     dict(gradient_checkpointing=False, mixed_precision="no", sample_batch_size=1)),
    (["--low-memory", "--sample-batch-size", "3"], None, dict(gradient_checkpointing=True, sample_batch_size=3)),
    ([], {"low_memory": True, "gradient_checkpointing": False}, dict(gradient_checkpointing=False,
                                                                    mixed_precision="bf16")),
    ([], None, dict(gradient_checkpointing=False, sample_batch_size=4)),
])
def test_low_memory_flag_applies_the_preset_under_explicit_settings(tmp_path, capsys, argv, yaml_train, expected):
    if yaml_train is not None:
        (tmp_path / "run.yaml").write_text(yaml.safe_dump({"train": yaml_train}))
        argv = [*argv, "--config", tmp_path / "run.yaml"]
    cfg = print_config(capsys, "--model", "tiny", *argv)
    flat = {**cfg["train"], **cfg["data"]}
    assert {k: flat[k] for k in expected} == expected


# --- the check in `peftbooth train` -------------------------------------------------------------------------------

def train_argv(tiny_model, photos, out, *extra):
    return ["train", "--model", tiny_model, "--instance-data-dir", str(photos), "--instance-prompt",
            "a photo of sks dog", "--resolution", "32", "--max-train-steps", "1", "--report-to", "none",
            "--output-dir", str(out), *extra]


def test_train_refuses_before_writing_when_the_gpu_is_too_small(tiny_model, photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "device_memory", lambda: (64 * 2**20, "cuda:0 (Fake GPU)"))
    out = tmp_path / "out"
    assert main(train_argv(tiny_model, photos, out)) == 2
    err = capsys.readouterr().err.strip()
    # the tiny model at 32 px: the margin alone is more than 64 MiB, and no lower resolution is offered
    assert err == ("peftbooth train: error: not enough GPU memory: the run needs about 0.3 GiB (peak in caching, "
                   "estimated) and cuda:0 (Fake GPU) has 0.1 GiB free; nothing smaller fits: the least, --low-memory, "
                   "needs 0.3 GiB; or --no-memory-check to start anyway")
    assert not out.exists()  # nothing written: the check runs before the output folder is made


def test_train_starts_when_it_fits_or_with_no_memory_check(tiny_model, photos, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "device_memory", lambda: calls.append(1) or (64 * 2**20, "cuda:0 (Fake GPU)"))
    assert main(train_argv(tiny_model, photos, tmp_path / "a", "--no-memory-check")) == 0
    assert (tmp_path / "a" / "unet").is_dir() and calls == []  # not even asked
    monkeypatch.setattr(memory, "device_memory", lambda: (80 * GIB, "cuda:0 (Fake GPU)"))
    assert main(train_argv(tiny_model, photos, tmp_path / "b")) == 0
    assert (tmp_path / "b" / "unet").is_dir()


@pytest.mark.parametrize("cuda, env, expected", [
    (False, {}, None),  # no CUDA device: nothing to check
    (True, {"ACCELERATE_USE_CPU": "true"}, None),  # a run told to use the CPU
    (True, {}, (3 * GIB, "cuda:0 (Fake GPU 0)")),
    (True, {"LOCAL_RANK": "1"}, (3 * GIB, "cuda:1 (Fake GPU 1)")),  # each process asks about its own device
])
def test_device_memory_is_this_processs_cuda_device(monkeypatch, cuda, env, expected):
    import torch

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (3 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"Fake GPU {i}")
    assert memory.device_memory() == expected


def test_check_uses_the_precision_policy_and_the_class_images_on_disk(tiny_model, tmp_path):
    from peftbooth.models.loading import load_components

    cfg = TrainConfig()
    cfg.model.model, cfg.train.output_dir = tiny_model, str(tmp_path / "out")
    cfg.data.with_prior_preservation, cfg.data.num_class_images = True, 2
    cfg.data.class_data_dir = str(tmp_path / "class")
    cfg.train.mixed_precision = "no"
    from peftbooth.precision import for_training

    c = load_components(tiny_model)
    p = memory.plan_of(cfg.resolved(), for_training("no", "cuda", c.family, True))
    assert (p.compute_bytes, p.vae_bytes, p.class_images, p.rows) == (4, 4, True, 2)
    (tmp_path / "class").mkdir()
    for i in range(2):
        (tmp_path / "class" / f"class-{i}.png").write_bytes(b"")
    assert memory.plan_of(cfg.resolved(), for_training("bf16", "cuda", c.family, True)).class_images is False
