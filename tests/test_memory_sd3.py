"""The memory estimate for SD3 / 3.5 (peftbooth.training.memory with memory_sd3): SD 3.5 Medium at 1024 px with and
without T5 and gradient checkpointing, the refusal's one line, and footprint_of on a tiny SD3 model's components."""

from __future__ import annotations

import types

import pytest

from peftbooth.training import memory
from peftbooth.training.memory_sd3 import DiT

GIB = 2**30
T5 = 4_762_310_656  # T5-XXL's encoder, counted on the meta device (benchmarks/memory_estimate.py, SD35M_FOOTPRINT)
# SD 3.5 Medium counted on the meta device: transformer (with its position table), CLIP-L, CLIP-G, VAE, LoRA r16
# 'all' on the transformer, a text-encoder adapter r16 'attn' on both CLIPs; 77 + 77 text tokens (the default).
DIT = DiT(blocks=24, dual_blocks=13, width=1536, patch=2, text_tokens=77 + 77)
WITH_T5 = memory.Footprint("sd3", 2_469_663_936, (123_650_381, 694_659_917), 83_819_683, 13_382_656, 6_422_528,
                           t5=T5, dit=DIT)
NO_T5 = memory.Footprint("sd3", 2_469_663_936, (123_650_381, 694_659_917), 83_819_683, 13_382_656, 6_422_528,
                         t5=0, dit=DIT)


def plan(**kw) -> memory.Plan:
    base = dict(resolution=1024, train_batch_size=1, prior=True, sample_batch_size=4, class_images=True,
                gradient_checkpointing=False, compute_bytes=2, vae_bytes=2, train_text_encoder=True)
    return memory.Plan(**{**base, **kw})


def test_image_tokens_at_1024_px():
    assert DIT.image_tokens(1024) == 4096  # 128 x 128 latents, 2 x 2 patches


def test_t5_adds_about_its_weights():
    for kw in ({}, dict(gradient_checkpointing=True), dict(train_text_encoder=False)):
        with_t5, without = memory.estimate(WITH_T5, plan(**kw)), memory.estimate(NO_T5, plan(**kw))
        for phase in ("caching", "class-images"):  # T5 is on the device: its bf16 weights (+ its activations)
            assert with_t5[phase] - without[phase] == pytest.approx(T5 * 2, rel=0.06), phase
    # training: T5 stays only where the text states are encoded every step (a trained text encoder)
    assert (memory.estimate(WITH_T5, plan())["training"] - memory.estimate(NO_T5, plan())["training"]
            == pytest.approx(T5 * 2, rel=0.06))
    assert memory.estimate(WITH_T5, plan(train_text_encoder=False))["training"] == \
        memory.estimate(NO_T5, plan(train_text_encoder=False))["training"]


# BENCHMARKS.md, "SD 3.5 Medium memory estimate (1024 px)": GiB per phase (before the margin)
TABLE = [
    (True, False, 11.81, 17.65, 39.87), (True, True, 11.81, 17.65, 17.94),
    (False, False, 2.94, 8.78, 30.75), (False, True, 2.94, 8.78, 8.82),
]


@pytest.mark.parametrize("t5, checkpointing, caching, class_images, training", TABLE)
def test_sd35_medium_table(t5, checkpointing, caching, class_images, training):
    got = memory.estimate(WITH_T5 if t5 else NO_T5, plan(gradient_checkpointing=checkpointing))
    assert [round(got[k] / GIB, 2) for k in ("caching", "class-images", "training")] == [caching, class_images, training]


def test_activation_reproduces_the_full_trace():
    # the fake-tensor trace of all 24 blocks at 1024 px, 2 rows of 4096 + 333 tokens, no checkpointing
    from peftbooth.training.memory_sd3 import train_activation

    got = 2 * train_activation(DiT(24, 13, 1536, 2, 333), 1024, False) / 2**20
    assert got == pytest.approx(25396.1, rel=0.03)


def test_refusal_one_line_names_what_fits():
    free = memory.peak(NO_T5, plan(gradient_checkpointing=True))[0]
    text = memory.refusal(WITH_T5, plan(), free, "cuda:0 (Test GPU)")
    assert "\n" not in text and text.startswith("not enough GPU memory: the run needs about 44.1 GiB (peak in "
                                                "training, estimated) and cuda:0 (Test GPU) has 10.0 GiB free; ")
    assert text.endswith("or --no-memory-check to start anyway")
    assert memory.refusal(NO_T5, plan(gradient_checkpointing=True), free, "cuda:0") is None


def test_check_memory_refuses_an_sd3_run(tmp_path, monkeypatch):
    """check_memory on a tiny SD 3.5 model's real components, on a faked 64 MiB GPU: the same one-line refusal."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from peftbooth.config.sections import TrainConfig, UsageError
    from peftbooth.models.tiny_sd3 import build_tiny_sd3_model

    path = str(build_tiny_sd3_model(tmp_path / "sd35", shape="tiny-sd3.5"))
    parts = dict(unet=SD3Transformer2DModel.from_pretrained(path, subfolder="transformer"),
                 vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
                 text_encoder=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder"),
                 text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"))
    t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3")
    cfg = TrainConfig()
    cfg.model.model, cfg.train.output_dir, cfg.data.resolution = path, str(tmp_path / "out"), 64
    cfg = cfg.resolved()
    fps = {}
    for name, encoder in (("t5", t5), ("no-t5", None)):
        c = types.SimpleNamespace(family="sd3", text_encoders=[parts["text_encoder"], parts["text_encoder_2"]],
                                  text_encoder_3=encoder, max_sequence_length=77, **parts)
        fps[name] = memory.footprint_of(cfg, c)
    assert fps["t5"].t5 == sum(p.numel() for p in t5.parameters()) + sum(b.numel() for b in t5.buffers())
    assert fps["no-t5"].t5 == 0 and fps["t5"].dit == DiT(2, 1, 32, 2, 154)
    assert fps["t5"].unet > sum(p.numel() for p in parts["unet"].parameters())  # the position table counts
    monkeypatch.setattr(memory, "device_memory", lambda: (64 * 2**20, "cuda:0 (Fake GPU)"))
    monkeypatch.setattr(memory, "footprint_of", lambda cfg, components: fps["t5"])
    with pytest.raises(UsageError) as err:
        memory.check_memory(cfg, c)
    text = str(err.value)
    assert "\n" not in text and text.startswith("not enough GPU memory: the run needs about ")
    assert "cuda:0 (Fake GPU) has 0.1 GiB free" in text and text.endswith("or --no-memory-check to start anyway")
