"""Stable Diffusion 3 / 3.5: the MMDiT transformer trained by flow matching, two CLIPs and T5 (optional), on tiny
SD3 and SD 3.5 models built in code. Loading, conditioning as the pipeline conditions, training with every part a
run has, exact resume, generation, fuse, refusals, two processes."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import draw_photos, tiny_config
from safetensors.torch import load_file

from peftbooth.cli import main
from peftbooth.config.sections import UsageError
from peftbooth.data.dataset import tokenize
from peftbooth.models.components import encode_text
from peftbooth.models.loading import check_model_folder, family_of, load_components, load_pipeline
from peftbooth.training.loop import train

RES = 64  # the tiny VAE halves the size: 64 px images, 32 px latents, 16 x 16 patches


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd3") / "tiny-sd3"
    assert main(["tiny-model", str(path), "--kind", "sd3"]) == 0
    return str(path)


@pytest.fixture(scope="module")
def sd35_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd35") / "tiny-sd3.5"
    assert main(["tiny-model", str(path), "--kind", "sd3.5"]) == 0
    return str(path)


def sd3_config(model, photos, out, **overrides):
    return tiny_config(model, photos, out, **{"data.resolution": RES, "model.max_sequence_length": 16, **overrides})


def tensors(out, parts=("transformer",)):
    return {f"{p}/{k}": v for p in parts for k, v in load_file(out / p / "adapter_model.safetensors").items()}


def test_sd3_and_sd35_load_as_one_family(sd3_model, sd35_model, tmp_path):
    for path, dual in ((sd3_model, False), (sd35_model, True)):
        c = load_components(path)
        assert c.family == "sd3" and c.is_sd3 and not c.is_sdxl and c.denoiser_part == "transformer"
        assert type(c.unet).__name__ == "SD3Transformer2DModel" and c.unet.config.in_channels == 16
        assert type(c.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
        assert c.latent_shift == pytest.approx(0.0609) and c.latent_scale == pytest.approx(1.5305)
        assert len(c.tokenizers) == 3 and len(c.text_encoders) == 2  # T5 conditions, but is never trained
        assert (getattr(c.unet.transformer_blocks[0], "attn2", None) is not None) == dual  # SD 3.5's MMDiT-X self-attention
        assert (c.unet.transformer_blocks[0].attn.norm_q is not None) == dual  # and its qk-norm
    assert load_components(sd3_model, t5=False).text_encoder_3 is None
    # a folder saved without T5 (as the SD3 world model is) loads as --no-t5 does, training and generating
    from diffusers import StableDiffusion3Pipeline

    no_t5 = tmp_path / "no-t5"
    StableDiffusion3Pipeline.from_pretrained(sd3_model, text_encoder_3=None, tokenizer_3=None).save_pretrained(no_t5)
    assert load_components(str(no_t5)).text_encoder_3 is None
    assert load_pipeline(str(no_t5)).text_encoder_3 is None
    broken = tmp_path / "broken"
    shutil.copytree(sd3_model, broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(UsageError, match=r"missing transformer/"):
        check_model_folder(str(broken))
    with pytest.raises(UsageError, match="only Stable Diffusion 3 / 3.5"):
        family_of({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]})


@pytest.mark.parametrize("t5", [True, False])
def test_encode_text_matches_the_sd3_pipeline(sd35_model, t5):
    """Training conditions the transformer exactly as StableDiffusion3Pipeline does at inference, with T5 or
    without it (zeros in its place)."""
    pipe = load_pipeline(sd35_model, t5=t5, max_sequence_length=16)
    c = load_components(sd35_model, t5=t5, max_sequence_length=16)
    prompts = ["a photo of sks box", "a box"]
    with torch.no_grad():
        context, pooled = encode_text(c.text_encoders, [tokenize(t, prompts) for t in c.tokenizers], c.t5)
        ref, _, ref_pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device="cpu",
                                                   do_classifier_free_guidance=False, max_sequence_length=16)
    assert context.shape == (2, 77 + 16, 64) and pooled.shape == (2, 64)
    torch.testing.assert_close(context, ref)
    torch.testing.assert_close(pooled, ref_pooled)


def test_sd35_lora_with_text_encoders_prior_and_validation_trains_saves_and_generates(sd35_model, tmp_path):
    from peftbooth.inference.pipeline import AdapterPipeline

    photos = draw_photos(tmp_path / "photos", n=2, size=(64, 64))
    out = tmp_path / "run"
    c_before = load_components(sd35_model)
    t5_before = {k: v.clone() for k, v in c_before.text_encoder_3.state_dict().items()}
    train(sd3_config(sd35_model, photos, out, **{
        "train.train_text_encoder": True, "data.with_prior_preservation": True, "data.class_prompt": "a box",
        "data.num_class_images": 2, "train.validation_prompt": ["a photo of sks dog"], "train.validation_steps": 2,
        "train.num_validation_images": 1,
        "train.target_blocks": None}))
    assert {p.name for p in out.iterdir()} >= {"transformer", "text_encoder", "text_encoder_2", "proxies.json",
                                                "report.html", "validation", "class_images"}
    assert not (out / "unet").exists()
    weights = tensors(out, ("transformer", "text_encoder", "text_encoder_2"))
    # 'attn' covers SD 3.5's second self-attention and both streams' projections; lora_B moved off zero
    names = " ".join(weights)
    for module in ("attn.to_q", "attn.add_k_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_out.0"):
        assert module in names, module
    assert all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
    assert "sd3" in (out / "README.md").read_text() and "transformer/" in (out / "README.md").read_text()
    # the adapter changes what the pipeline draws; switching it off gives the base model's images back
    pipe = AdapterPipeline(sd35_model, max_sequence_length=16)
    base = pipe.generate("a photo of sks dog", num_images=1, steps=2, guidance_scale=2.0)[0]
    pipe.load_adapter(out, "run")
    adapted = pipe.generate("a photo of sks dog", num_images=1, steps=2, guidance_scale=2.0)[0]
    pipe.disable_adapters()
    again = pipe.generate("a photo of sks dog", num_images=1, steps=2, guidance_scale=2.0)[0]
    assert pixel_difference(base, again) == 0 < pixel_difference(base, adapted)
    # T5 was never trained
    c = load_components(sd35_model)
    assert all(torch.equal(v, t5_before[k]) for k, v in c.text_encoder_3.state_dict().items())


def test_sd3_fuse_equals_the_adapter_applied(sd3_model, tmp_path):
    from peftbooth.inference.fuse import fuse_run
    from peftbooth.inference.pipeline import AdapterPipeline

    photos = draw_photos(tmp_path / "photos", n=2, size=(64, 64))
    out = train(sd3_config(sd3_model, photos, tmp_path / "run", **{"train.learning_rate": 1e-2}))
    fused = fuse_run(None, out, tmp_path / "fused")
    kw = dict(num_images=1, steps=2, guidance_scale=2.0, seed=1)
    a = AdapterPipeline(str(fused), max_sequence_length=16).generate("a photo of sks dog", **kw)[0]
    pipe = AdapterPipeline(sd3_model, max_sequence_length=16)
    pipe.load_adapter(out)
    b = pipe.generate("a photo of sks dog", **kw)[0]
    assert pixel_difference(a, b) <= 2  # merged weights: the same images up to float rounding of W + BA
    # a mix of the run with itself at 0.5 + 0.5 is the run at full strength (LoRA's update is linear in it)
    torch.manual_seed(0)
    args = dict(hidden_states=torch.randn(1, 16, 8, 8), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 93, 64), pooled_projections=torch.randn(1, 64))

    def prediction(weights):
        pipe.set_adapters(weights)
        with torch.no_grad():
            return pipe.pipe.transformer(**args).sample

    pipe.load_adapter(out, "again")
    full, base = prediction({"run": 1.0}), prediction({})
    torch.testing.assert_close(prediction({"run": 0.5, "again": 0.5}), full)
    half = prediction({"again": 0.5})
    assert (full - base).abs().max() > 1e-3 and (half - full).abs().max() > 1e-4


def pixel_difference(a, b) -> float:
    import numpy as np

    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max())


@pytest.mark.parametrize("adapter", ["loha", "lokr"])
def test_sd3_lycoris_resume_with_ema_and_masks_is_bitwise_identical(sd3_model, tmp_path, monkeypatch, adapter):
    """A SIGTERM at step 2 and a resume train exactly what one run of 4 steps trains (EMA, masks, offset noise and
    the mode density included)."""
    import signal

    from PIL import Image
    from test_resume import signal_at_step

    from peftbooth.training.signals import TrainingInterrupted

    photos = draw_photos(tmp_path / "photos", n=2, size=(64, 64))
    for p in photos.glob("photo_*.png"):
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (8, 8, 40, 40))
        mask.save(photos / f"{p.stem}.mask.png")
    settings = {"unet_adapter.adapter": adapter, "train.max_train_steps": 4, "train.ema_decay": 0.5,
                "data.masked_loss": True, "data.unmasked_weight": 0.1, "train.noise_offset": 0.05,
                "train.weighting_scheme": "mode", "train.seed": 2, "data.random_flip": True}
    reference = tensors(train(sd3_config(sd3_model, photos, tmp_path / "ref", **settings)))
    out = tmp_path / "run"
    signal_at_step(monkeypatch, 2, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted):
        train(sd3_config(sd3_model, photos, out, **settings))
    monkeypatch.undo()
    got = tensors(train(sd3_config(sd3_model, photos, out, **settings, **{"train.resume": "latest"})))
    assert got.keys() == reference.keys() and got
    for k in got:
        assert torch.equal(got[k], reference[k]), k


def test_sd3_without_t5_and_with_target_blocks(sd3_model, tmp_path, capsys):
    photos = draw_photos(tmp_path / "photos", n=2, size=(64, 64))
    out = train(sd3_config(sd3_model, photos, tmp_path / "run", **{
        "model.t5": False, "train.target_blocks": "1", "unet_adapter.target_modules": "attn-ff"}))
    keys = list(tensors(out))
    assert keys and all(".transformer_blocks.1." in k for k in keys)
    assert any(".ff.net.2." in k for k in keys)  # block 1 is the last: no text-stream feed-forward
    # generate reads --no-t5 and the sequence length from the run's config.yaml
    assert main(["generate", "--adapter", str(out), "--prompt", "a photo of sks dog", "--output-dir",
                 str(tmp_path / "img"), "--num-images", "1", "--steps", "2", "--height", "64", "--width", "64"]) == 0
    assert (tmp_path / "img" / "run_00.png").is_file()
    with pytest.raises(UsageError, match=r"--target-blocks 5: this transformer has blocks 0-1"):
        train(sd3_config(sd3_model, photos, tmp_path / "bad", **{"train.target_blocks": "5"}))
    assert not (tmp_path / "bad").exists()


def test_family_flags_are_refused_in_one_line(sd3_model, tiny_model, tmp_path, capsys):
    photos = draw_photos(tmp_path / "photos", n=1)
    base = ["train", "--instance-data-dir", str(photos), "--instance-prompt", "a photo of sks dog"]
    assert main([*base, "--model", sd3_model, "--output-dir", str(tmp_path / "a"), "--snr-gamma", "5"]) == 2
    assert "--snr-gamma: Min-SNR weights an epsilon/v-prediction loss; this SD3 model trains by flow matching" \
        in capsys.readouterr().err
    assert main([*base, "--model", tiny_model, "--output-dir", str(tmp_path / "b"), "--weighting-scheme",
                 "cosmap", "--no-t5"]) == 2
    err = capsys.readouterr().err
    assert "--weighting-scheme applies to SD3 models" in err and "--no-t5 / --max-sequence-length apply" in err
    assert main([*base, "--model", sd3_model, "--output-dir", str(tmp_path / "c"), "--target-blocks", "2-1"]) == 2
    assert "--target-blocks '2-1': give block numbers and ranges" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abc")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU launcher case")
def test_sd3_two_processes_train_as_one_process_does(sd3_model, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU")}
    photos = draw_photos(tmp_path / "photos", n=2, size=(64, 64))

    def cmd(out, *extra):
        return [sys.executable, "-m", "peftbooth", "train", "--model", sd3_model, "--instance-data-dir", str(photos),
                "--instance-prompt", "a photo of sks dog", "--resolution", str(RES), "--report-to", "none",
                "--max-sequence-length", "16", "--max-train-steps", "2", "--learning-rate", "0.01",
                "--output-dir", str(out), *extra]

    two = subprocess.run(cmd(tmp_path / "two", "--num-processes", "2"), capture_output=True, text=True, env=env,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "adapter weights identical on all 2 processes" in two.stdout
    one = subprocess.run(cmd(tmp_path / "one", "--train-batch-size", "2"), capture_output=True, text=True, env=env,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = tensors(tmp_path / "two"), tensors(tmp_path / "one")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("adapter", ["loha", "lokr"])
def test_factored_lycoris_on_the_transformer_gives_peft_s_output(sd35_model, tmp_path, adapter):
    """LoHa / LoKr on every attention and feed-forward projection of the MMDiT go through the factored forward,
    with PEFT's own output."""
    from peftbooth.adapters import factored
    from peftbooth.adapters.inject import attach
    from peftbooth.adapters.peft_config import denoiser_presets

    c = load_components(sd35_model)
    cfg = sd3_config(sd35_model, tmp_path, tmp_path / "out", **{"unet_adapter.adapter": adapter,
                                                                  "unet_adapter.target_modules": "attn-ff"})
    model = attach(c.unet, cfg.resolved().unet_adapter, denoiser_presets("sd3"), "")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.2)  # non-zero updates everywhere
    args = dict(hidden_states=torch.randn(2, 16, 8, 8), timestep=torch.tensor([300.0, 700.0]),
                encoder_hidden_states=torch.randn(2, 5, 64), pooled_projections=torch.randn(2, 64))
    with torch.no_grad():
        reference = c.unet(**args).sample
        assert factored.install(model) > 0
        got = c.unet(**args).sample
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)


def test_sd3_identifier_embedding_is_trained_in_both_clips_and_not_in_t5(sd3_model, tmp_path):
    """--train-token-embedding on SD3: the identifier's row in CLIP-L and CLIP-G (T5, never trained, is not asked)."""
    from safetensors.torch import load_file as load

    photos = draw_photos(tmp_path / "photos", n=2, size=(64, 64))
    out = train(sd3_config(sd3_model, photos, tmp_path / "run", **{
        "data.instance_prompt": "a photo of x dog", "train.train_text_encoder": True,
        "train.train_token_embedding": "x"}))
    rows = load(out / "token_embeddings.safetensors")
    assert len(rows) == 2 and all(v.abs().sum() > 0 for v in rows.values())
