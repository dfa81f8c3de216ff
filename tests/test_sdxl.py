"""SDXL: two text encoders (pooled embedding from the second), per-image micro-conditioning through caching and
collation, fp32 VAE by default, adapters on the UNet and both text encoders, save/reload, generation."""

import shutil

import pytest
import torch
from conftest import draw_photos, tiny_config
from peft import PeftModel
from PIL import Image

from peftbooth.cli import main
from peftbooth.config.sections import UsageError
from peftbooth.data.dataset import tokenize
from peftbooth.data.images import load_image
from peftbooth.data.transforms import micro_conditioning, resize_crop_coords
from peftbooth.models.components import encode_text
from peftbooth.models.loading import check_model_folder, family_of, load_components, load_pipeline
from peftbooth.training.loop import finish, fit, training_step
from peftbooth.training.setup import setup

RES = 64  # the tiny SDXL model's VAE halves the size: 64 px images, 32 px latents


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    assert main(["tiny-model", str(path), "--kind", "sdxl"]) == 0
    return str(path)


@pytest.fixture
def sized_photos(tmp_path):
    """photo_0 is 48x40 (landscape), photo_1 is 40x56 (portrait) with its own caption."""
    folder = draw_photos(tmp_path / "photos", n=1, size=(48, 40))
    Image.open(draw_photos(tmp_path / "p1", n=1, size=(40, 56)) / "photo_0.png").save(folder / "photo_1.png")
    (folder / "photo_1.txt").write_text("a photo of sks dog on a beach")
    return folder


# Hand-computed time ids (original h, w, crop top, left, target h, w) at 64 px:
# 48x40 -> resized 77x64, center crop left (77-64)//2 = 6, flipped left 77-64-6 = 7;
# 40x56 -> resized 64x90, top (90-64)//2 = 13; class images are generated at 64x64.
EXPECTED_TIME_IDS = {
    ("instance", 0, False): [40, 48, 0, 6, RES, RES], ("instance", 0, True): [40, 48, 0, 7, RES, RES],
    ("instance", 1, False): [56, 40, 13, 0, RES, RES], ("instance", 1, True): [56, 40, 13, 0, RES, RES],
}


def sdxl_config(model, photos, out, **overrides):
    return tiny_config(model, photos, out, **{"data.resolution": RES, **overrides})


def test_tiny_sdxl_model_has_the_sdxl_layout(sdxl_model, tmp_path, capsys):
    c = load_components(sdxl_model)
    assert c.is_sdxl and type(c.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert c.unet.config.addition_embed_type == "text_time"
    # the UNet attends to both encoders' states side by side
    assert c.unet.config.cross_attention_dim == c.text_encoder.config.hidden_size + c.text_encoder_2.config.hidden_size
    assert c.tokenizer_2.pad_token == "!" and c.tokenizer.pad_token == "<|endoftext|>"
    assert type(load_pipeline(sdxl_model)).__name__ == "StableDiffusionXLPipeline"
    broken = tmp_path / "broken"
    shutil.copytree(sdxl_model, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(UsageError, match=r"not a diffusers Stable Diffusion folder \(missing text_encoder_2/\)"):
        check_model_folder(str(broken))
    with pytest.raises(UsageError, match="SDXL refiner"):
        family_of({"text_encoder": [None, None], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]})


def test_encode_text_matches_the_sdxl_pipeline(sdxl_model):
    """Training conditions the UNet exactly as diffusers' SDXL pipeline does at inference."""
    pipe = load_pipeline(sdxl_model)
    c = load_components(sdxl_model)
    prompts = ["a photo of sks dog", "a dog"]
    with torch.no_grad():
        context, pooled = encode_text(c.text_encoders, [tokenize(t, prompts) for t in c.tokenizers])
        ref_context, _, ref_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert context.shape == (2, 77, 64) and pooled.shape == (2, 32)
    torch.testing.assert_close(context, ref_context)
    torch.testing.assert_close(pooled, ref_pooled)


def test_micro_conditioning_records_original_size_and_crop(tmp_path):
    big = tmp_path / "big.jpg"
    Image.new("RGB", (400, 300), (10, 200, 30)).save(big)
    img = load_image(big, max_side=64)  # JPEG draft mode decodes it smaller...
    assert img.size != (400, 300)
    crop, top_left = resize_crop_coords(img, 64, True, False)
    ids = micro_conditioning(img.info["peftbooth_original_size"], top_left, 64)
    # 4:3 resized to 85x64, center crop left (85-64)//2 = 10
    assert ids.tolist() == [300, 400, 0, 10, 64, 64]  # ...but SDXL is told the photo's own size
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: width and height swap
    Image.new("RGB", (80, 40)).save(rotated, exif=exif)
    assert load_image(rotated).info["peftbooth_original_size"] == (40, 80) == load_image(rotated).size


def test_sdxl_prior_preservation_batch_2_pairs_rows_then_saves_reloads_and_generates(sdxl_model, sized_photos,
                                                                                      tmp_path):
    from peftbooth.inference.pipeline import AdapterPipeline

    cfg = sdxl_config(sdxl_model, sized_photos, tmp_path / "run", **{
        "data.with_prior_preservation": True, "data.class_prompt": "a photo of a dog", "data.num_class_images": 2,
        "data.train_batch_size": 2, "data.random_flip": True, "train.train_text_encoder": True,
        "train.max_train_steps": 2, "train.validation_prompt": ["a photo of sks dog"], "train.validation_steps": 2,
    })
    run = setup(cfg)
    assert run.latent_cache is not None and run.text_cache is None  # text encoders train: encoded every step
    seen = {}
    hook = run.components.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(args=args, kwargs=kwargs), with_kwargs=True)
    batch = next(iter(run.dataloader))
    training_step(run, batch)
    hook.remove()
    keys, prompts = batch["keys"], batch["prompts"]
    assert [k[0] for k in keys] == ["instance", "instance", "class", "class"]
    assert prompts[2:] == ["a photo of a dog"] * 2
    assert prompts[:2] == [("a photo of sks dog on a beach" if k[1] == 1 else "a photo of sks dog") for k in keys[:2]]
    context = seen["args"][2] if len(seen["args"]) > 2 else seen["kwargs"]["encoder_hidden_states"]
    added = seen["kwargs"]["added_cond_kwargs"]
    c = run.components
    with torch.no_grad():
        for row, (key, prompt) in enumerate(zip(keys, prompts)):
            ctx, pooled = encode_text(run.text_encoders, [tokenize(t, [prompt]) for t in c.tokenizers])
            torch.testing.assert_close(context[row], ctx[0])  # each row's own prompt...
            torch.testing.assert_close(added["text_embeds"][row], pooled[0])  # ...and its pooled embedding
            expected = EXPECTED_TIME_IDS.get(key, [RES, RES, 0, 0, RES, RES])  # class images: 64x64, no crop
            assert added["time_ids"][row].tolist() == expected, (row, key)

    stats = fit(run)
    out = finish(run, stats)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        assert (out / part / "adapter_model.safetensors").is_file()
    assert (out / "validation" / "step_2" / "grid.png").is_file()
    assert len(list((out / "class_images").glob("class-*.png"))) == 2

    # reload on fresh components with plain PEFT: the same outputs as the trained, in-memory modules
    fresh = load_components(sdxl_model)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([10, 700])
    ids = [tokenize(tok, ["a photo of sks dog", "a dog"]) for tok in c.tokenizers]
    time_ids = torch.tensor([[40, 48, 0, 6, RES, RES], [RES, RES, 0, 0, RES, RES]], dtype=torch.float32)
    reloaded = {p: PeftModel.from_pretrained(getattr(fresh, p), out / p).eval()
                for p in ("unet", "text_encoder", "text_encoder_2")}
    for m in run.trained().values():
        m.eval()
    with torch.no_grad():
        ctx, pooled = encode_text([reloaded["text_encoder"], reloaded["text_encoder_2"]], ids)
        ref_ctx, ref_pooled = encode_text(run.text_encoders, ids)
        assert torch.equal(ctx, ref_ctx) and torch.equal(pooled, ref_pooled)
        cond = {"text_embeds": pooled, "time_ids": time_ids}
        assert torch.equal(reloaded["unet"](x, t, ctx, added_cond_kwargs=cond).sample,
                           run.unet(x, t, ctx, added_cond_kwargs=cond).sample)
        with reloaded["text_encoder_2"].disable_adapter():  # the second encoder's adapter does something
            assert not torch.equal(encode_text([reloaded["text_encoder"], reloaded["text_encoder_2"]], ids)[1], pooled)

    pipe = AdapterPipeline(sdxl_model)
    base = pipe.generate("a photo of sks dog", steps=2)
    pipe.load_adapter(out)
    assert set(pipe.adapters[out.name]) == {"unet", "text_encoder", "text_encoder_2"}
    adapted = pipe.generate("a photo of sks dog", steps=2)
    assert base[0].size == (RES, RES) and list(base[0].getdata()) != list(adapted[0].getdata())


def test_sdxl_caching_does_not_change_training(sdxl_model, sized_photos, tmp_path):
    """Cached latents + time ids and cached (context, pooled) train the same as computing them every step."""
    params = []
    for cached in (True, False):
        cfg = sdxl_config(sdxl_model, sized_photos, tmp_path / f"out-{cached}", **{
            "train.max_train_steps": 3, "data.random_flip": True, "data.with_prior_preservation": True,
            "data.class_prompt": "a photo of a dog", "data.num_class_images": 2,
            "data.class_data_dir": str(tmp_path / "class"), "train.cache_latents": cached,
            "train.cache_text_states": cached,
        })
        run = setup(cfg)
        assert (run.latent_cache is not None) == cached and (run.text_cache is not None) == cached
        fit(run)
        params.append({n: p.detach().clone() for n, p in run.unet.named_parameters() if p.requires_grad})
    for name, p in params[0].items():
        torch.testing.assert_close(p, params[1][name], rtol=1e-4, atol=1e-6)


def test_sdxl_vae_runs_in_fp32_where_its_config_says_it_overflows(sdxl_model, photos, tmp_path,
                                                                    fresh_accelerator_state):
    """The VAE's dtype follows its config's force_upcast, as diffusers' SDXL pipeline does: the model's own VAE and
    a replacement that overflows in fp16 (the original SDXL VAE given as --vae) run in fp32; an fp16-fixed
    replacement (force_upcast False) in the compute dtype; --no-upcast-vae forces the compute dtype."""
    vae = load_components(sdxl_model).vae
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(0.5)  # recognisable: this VAE, not the model's own
    vae.save_pretrained(tmp_path / "original-vae")  # force_upcast True, as SDXL's own
    vae.register_to_config(force_upcast=False)
    vae.save_pretrained(tmp_path / "fixed-vae")
    dtypes = {}
    for name, extra in [("own", {}), ("forced", {"model.upcast_vae": False}),
                        ("original", {"model.vae": str(tmp_path / "original-vae")}),
                        ("fixed", {"model.vae": str(tmp_path / "fixed-vae")})]:
        run = setup(sdxl_config(sdxl_model, photos, tmp_path / name, **{"train.mixed_precision": "bf16", **extra}))
        dtypes[name] = next(run.components.vae.parameters()).dtype
        if name in ("original", "fixed"):
            assert torch.all(run.components.vae.decoder.conv_out.bias == 0.5)
        assert run.latent_cache.mean.dtype == torch.bfloat16  # latents join the UNet in the compute dtype
    assert dtypes == {"own": torch.float32, "forced": torch.bfloat16, "original": torch.float32,
                      "fixed": torch.bfloat16}


def test_sdxl_generate_cli_and_adapter_on_the_wrong_family(sdxl_model, tiny_model, sized_photos, tmp_path, capsys):
    cfg = sdxl_config(sdxl_model, sized_photos, tmp_path / "run", **{"train.train_text_encoder": True})
    from peftbooth.training.loop import train

    out = train(cfg)
    assert main(["generate", "--model", sdxl_model, "--adapter", str(out), "--prompt", "a photo of sks dog",
                 "--num-images", "1", "--steps", "2", "--output-dir", str(tmp_path / "images")]) == 0
    assert (tmp_path / "images" / "run_00.png").is_file()
    capsys.readouterr()
    assert main(["generate", "--model", tiny_model, "--adapter", str(out), "--prompt", "x", "--steps", "1",
                 "--output-dir", str(tmp_path / "wrong")]) == 2
    assert "has text_encoder_2/, which this base model does not have" in capsys.readouterr().err


def test_sdxl_resume_with_both_text_encoders_is_bitwise_identical(sdxl_model, sized_photos, tmp_path, monkeypatch):
    """A checkpoint holds all three adapters; stopping (SIGTERM) and resuming trains exactly what one run trains."""
    import signal

    from safetensors.torch import load_file
    from test_resume import signal_at_step

    from peftbooth.training.loop import train
    from peftbooth.training.signals import TrainingInterrupted

    def tensors(out):
        return {f"{p}/{k}": v for p in ("unet", "text_encoder", "text_encoder_2")
                for k, v in load_file(out / p / "adapter_model.safetensors").items()}

    settings = {"train.train_text_encoder": True, "train.max_train_steps": 4, "data.random_flip": True,
                "data.with_prior_preservation": True, "data.class_prompt": "a photo of a dog",
                "data.num_class_images": 2, "data.class_data_dir": str(tmp_path / "class"), "train.seed": 3}
    reference = tensors(train(sdxl_config(sdxl_model, sized_photos, tmp_path / "ref", **settings)))
    out = tmp_path / "run"
    signal_at_step(monkeypatch, 2, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted):
        train(sdxl_config(sdxl_model, sized_photos, out, **settings))
    checkpoint = out / "checkpoints" / "checkpoint-000002"
    assert {p.name for p in checkpoint.iterdir()} >= {"unet", "text_encoder", "text_encoder_2"}
    monkeypatch.undo()
    got = tensors(train(sdxl_config(sdxl_model, sized_photos, out, **settings, **{"train.resume": "latest"})))
    assert got.keys() == reference.keys()
    for k in got:
        assert torch.equal(got[k], reference[k]), k


def test_every_sdxl_text_encoder_adapter_weight_gets_a_gradient(sdxl_model, photos, tmp_path):
    """SDXL reads the first text encoder's penultimate layer: its last layer gets no adapter (it could never be
    trained, and under DistributedDataParallel weights without gradients stall the gradient exchange)."""
    run = setup(sdxl_config(sdxl_model, photos, tmp_path / "out", **{"train.train_text_encoder": True}))
    last = run.components.text_encoder.config.num_hidden_layers - 1
    te1 = [n for n, p in run.text_encoder.named_parameters() if p.requires_grad]
    assert te1 and not [n for n in te1 if f"layers.{last}." in n]
    assert any(f"layers.{last}." in n for n, p in run.text_encoder_2.named_parameters() if p.requires_grad)
    loss = training_step(run, next(iter(run.dataloader)))[0]
    loss.backward()
    missing = [n for name, m in run.trained().items() for n, p in m.named_parameters()
               if p.requires_grad and p.grad is None]
    assert missing == []


def test_fp32_vae_stays_fp32_inside_autocast(sdxl_model):
    """Validation and the proxies sample under the training autocast: an fp32 (SDXL) VAE must still run in fp32."""
    from peftbooth.models.vae import vae_calls

    vae = load_components(sdxl_model).vae
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = vae.decode(latents).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert vae.decode(latents).sample.dtype == torch.bfloat16  # what autocast alone would do
            with vae_calls(vae):
                inside = vae.decode(latents.bfloat16()).sample
    assert inside.dtype == torch.float32 and torch.equal(inside, vae.decode(latents.bfloat16().float()).sample)
    torch.testing.assert_close(inside, reference, rtol=0.05, atol=0.02)  # only the bf16 input rounding differs
    assert "decode" not in vae.__dict__  # the wrapper is gone afterwards
