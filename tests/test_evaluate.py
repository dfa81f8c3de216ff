"""The DreamBooth protocol and the offline proxies.

Evaluator models are tiny random CLIP and ViT models built here from configs and saved as folders (tokenizer from
peftbooth.models), passed as the --clip-model / --dino-model overrides: nothing is downloaded. Random evaluators
say nothing about image quality, so the metric code is checked on cases with known answers.
"""

import argparse
import json
import math

import numpy as np
import pytest
import torch
from conftest import draw_photos, tiny_config
from PIL import Image, ImageDraw

from peftbooth.config.sections import UsageError
from peftbooth.evaluate.command import add_commands
from peftbooth.evaluate.evaluators import Evaluators, protocol_metrics
from peftbooth.evaluate.protocol import (
    LIVE_PROMPTS,
    OBJECT_PROMPTS,
    clip_t_text,
    distinct_pairs_mean_cosine,
    identifier_from_prompt,
    matched_mean_cosine,
    pairwise_mean_cosine,
    render,
)
from peftbooth.training.loop import finish, fit, proxy_inputs
from peftbooth.training.proxies import compute_proxies, fixed_timesteps, write_proxies
from peftbooth.training.setup import setup

# ---------------------------------------------------------------------------------------------------------------
# tiny evaluator models


def _image_processor(kind: str, size: int):
    """The PIL-backed processor where transformers has one (5.x: the default ones need torchvision)."""
    import transformers

    name = {"clip": "CLIPImageProcessor", "vit": "ViTImageProcessor"}[kind]
    cls = getattr(transformers, name + "Pil", None) or getattr(transformers, name)
    if kind == "clip":
        return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return cls(size={"height": size, "width": size})


@pytest.fixture(scope="module")
def evaluator_dirs(tmp_path_factory) -> tuple[str, str]:
    """(tiny CLIP folder, tiny DINO-like ViT folder), random weights, 32 px inputs."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from peftbooth.models.tiny import _write_tokenizer

    root = tmp_path_factory.mktemp("evaluators")
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16,
    ))
    clip.save_pretrained(root / "clip")
    _write_tokenizer(root / "clip")  # the byte-level CLIP tokenizer the tiny SD model uses
    _image_processor("clip", 32).save_pretrained(root / "clip")
    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4), add_pooling_layer=False)
    vit.save_pretrained(root / "dino")
    _image_processor("vit", 32).save_pretrained(root / "dino")
    return str(root / "clip"), str(root / "dino")


@pytest.fixture(scope="module")
def evaluators(evaluator_dirs) -> Evaluators:
    clip, dino = evaluator_dirs
    return Evaluators.load(clip, dino, "cpu")


def picture(seed: int, size=(40, 36)) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ImageDraw.Draw(img).ellipse((4, 4, 20 + seed, 24), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


# ---------------------------------------------------------------------------------------------------------------
# prompts


def test_prompt_lists_are_the_papers_25_each():
    assert len(OBJECT_PROMPTS) == len(LIVE_PROMPTS) == 25
    assert len(set(OBJECT_PROMPTS)) == len(set(LIVE_PROMPTS)) == 25
    # the first ten (backgrounds) and the last five (properties) are shared; the middle ten differ
    assert OBJECT_PROMPTS[:10] == LIVE_PROMPTS[:10] and OBJECT_PROMPTS[20:] == LIVE_PROMPTS[20:]
    assert not set(OBJECT_PROMPTS[10:20]) & set(LIVE_PROMPTS[10:20])
    assert "a {0} {1} with the Eiffel Tower in the background" in OBJECT_PROMPTS
    assert "a {0} {1} wearing a black top hat and a monocle" in LIVE_PROMPTS
    assert all("{0} {1}" in t for t in OBJECT_PROMPTS + LIVE_PROMPTS)
    assert render(OBJECT_PROMPTS[0], "sks", "dog") == "a sks dog in the jungle"
    assert render("a cube shaped {0} {1}", "sks", "stuffed animal") == "a cube shaped sks stuffed animal"


def test_clip_t_text_drops_the_identifier_unless_asked():
    assert clip_t_text("a {0} {1} in the snow", "sks", "dog") == "a dog in the snow"
    assert clip_t_text("a red {0} {1}", "sks", "dog") == "a red dog"
    assert clip_t_text("a red {0} {1}", "sks", "dog", "full") == "a red sks dog"
    with pytest.raises(UsageError, match="--clip-t-prompt"):
        clip_t_text("a {0} {1}", "sks", "dog", "nope")
    assert identifier_from_prompt("a photo of sks dog", "dog") == "sks"
    assert identifier_from_prompt("a photo of sks dog", "cat") is None
    assert identifier_from_prompt("zwx stuffed animal on a table", "stuffed animal") == "zwx"


# ---------------------------------------------------------------------------------------------------------------
# metrics


def test_averaging_follows_the_protocol_on_known_vectors():
    gen = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    real = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    # cosines: gen0 -> (1, 0); gen1 -> (1/sqrt2, 1/sqrt2); gen2 -> (0, 1): mean of all 6 pairs
    assert pairwise_mean_cosine(gen, real) == pytest.approx((2 + math.sqrt(2)) / 6)
    # CLIP-T pairs row i with row i only: (1/sqrt2 + -1) / 2
    texts = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert matched_mean_cosine(images, texts) == pytest.approx((1 / math.sqrt(2) - 1) / 2)
    # the real-vs-real reference leaves the self-pairs out: (0 + 1/sqrt2 + 1/sqrt2) / 3
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert distinct_pairs_mean_cosine(x) == pytest.approx(math.sqrt(2) / 3)
    assert distinct_pairs_mean_cosine(x[:1]) is None


def test_copies_of_an_image_score_one(evaluators):
    img = picture(0)
    m = protocol_metrics(evaluators, [img.copy() for _ in range(3)], [img], ["a dog"] * 3)
    assert m["dino"] == pytest.approx(1.0, abs=1e-6)
    assert m["clip_i"] == pytest.approx(1.0, abs=1e-6)
    assert -1.0 <= m["clip_t"] <= 1.0
    other = protocol_metrics(evaluators, [picture(1)], [img], ["a dog"])
    assert other["dino"] < 1 - 1e-4 and other["clip_i"] < 1 - 1e-4  # a different image does not


def test_metrics_match_a_hand_computation(evaluators):
    generated, real = [picture(s) for s in (1, 2, 3)], [picture(s) for s in (4, 5)]
    texts = ["a dog in the jungle", "a red dog", "a dog on the beach"]
    m = protocol_metrics(evaluators, generated, real, texts)

    def cos(u, v):
        u, v = u.double().flatten(), v.double().flatten()
        return float(u @ v / (u.norm() * v.norm()))

    # one image at a time (no batching), then plain Python loops
    dino = [evaluators.dino_embed([im]) for im in generated + real]
    clip = [evaluators.clip_image([im]) for im in generated + real]
    text = [evaluators.clip_text([t]) for t in texts]
    pairs = [(g, 3 + r) for g in range(3) for r in range(2)]
    assert m["dino"] == pytest.approx(sum(cos(dino[g], dino[r]) for g, r in pairs) / 6, abs=1e-5)
    assert m["clip_i"] == pytest.approx(sum(cos(clip[g], clip[r]) for g, r in pairs) / 6, abs=1e-5)
    assert m["clip_t"] == pytest.approx(sum(cos(clip[i], text[i]) for i in range(3)) / 3, abs=1e-5)
    # and CLIP-T is not the image-vs-any-prompt average: shuffling the texts changes it
    shuffled = protocol_metrics(evaluators, generated, real, texts[1:] + texts[:1])
    assert shuffled["clip_t"] != pytest.approx(m["clip_t"], abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# peftbooth eval


def eval_parser() -> argparse.ArgumentParser:
    """The subcommand as the main CLI will hold it (cli.py calls evaluate.add_commands)."""
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.fixture(scope="module")
def trained_run(tiny_model, tmp_path_factory):
    from peftbooth.runs.report import write_report

    root = tmp_path_factory.mktemp("eval-run")
    photos = draw_photos(root / "photos")
    run = setup(tiny_config(tiny_model, photos, root / "run", **{"train.max_train_steps": 2}))
    stats = fit(run)
    out = finish(run, stats)
    write_report(out, stats)
    return out, photos


def test_eval_command_writes_metrics_for_adapter_and_base(trained_run, evaluator_dirs, capsys):
    run_dir, photos = trained_run
    clip, dino = evaluator_dirs
    args = eval_parser().parse_args([
        "eval", str(run_dir), "--instance-data-dir", str(photos), "--class-name", "dog", "--live",
        "--num-images", "2", "--steps", "2", "--clip-model", clip, "--dino-model", dino, "--device", "cpu",
    ])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| adapter |" in printed and "| base model (no adapter) |" in printed and "report updated" in printed

    report = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert report["num_prompts"] == 25 and report["protocol_complete"] and report["subject"] == "live"
    assert report["evaluators"] == {"clip": clip, "dino": dino}
    assert set(report["results"]) == {"adapter", "base", "real"}
    for name in ("adapter", "base"):
        assert all(-1.0 <= report["results"][name][k] <= 1.0 for k in ("dino", "clip_i", "clip_t"))
        rows = report["per_prompt"][name]
        assert len(rows) == 25 and rows[10]["prompt"] == "a sks dog wearing a red hat"
        assert rows[10]["clip_t_text"] == "a dog wearing a red hat"
        assert len(list((run_dir / "eval" / "images" / name).glob("*.png"))) == 25 * 2
        # the overall score is the mean over all pairs, which with equal images per prompt is the prompts' mean
        assert report["results"][name]["dino"] == pytest.approx(np.mean([r["dino"] for r in rows]), abs=1e-9)
    # same seeds, adapter on and off: only the (trained, nonzero) adapter makes the images differ
    a = np.asarray(Image.open(run_dir / "eval/images/adapter/prompt00_00.png"), dtype=np.int16)
    b = np.asarray(Image.open(run_dir / "eval/images/base/prompt00_00.png"), dtype=np.int16)
    assert a.shape == b.shape == (32, 32, 3) and np.abs(a - b).sum() > 0
    assert report["results"]["real"]["clip_t"] is None and report["results"]["real"]["dino"] is not None
    assert (run_dir / "eval" / "metrics.md").read_text().startswith("| model | DINO | CLIP-I | CLIP-T |")
    page = (run_dir / "report.html").read_text()
    assert "base model (no adapter)" in page and "computed for a different adapter" not in page


def test_eval_refuses_bad_input_naming_the_flag(trained_run, evaluator_dirs, tmp_path):
    run_dir, photos = trained_run
    clip, dino = evaluator_dirs
    parser = eval_parser()

    def run(*extra):
        args = parser.parse_args(["eval", str(run_dir), "--instance-data-dir", str(photos), "--device", "cpu",
                                  "--clip-model", clip, "--dino-model", dino, *extra])
        return args.func(args)

    with pytest.raises(UsageError, match="--identifier"):  # 'cat' is not in 'a photo of sks dog'
        run("--class-name", "cat")
    with pytest.raises(UsageError, match="--dino-model"):
        run("--class-name", "dog", "--dino-model", str(tmp_path / "no-such-model"))
    with pytest.raises(UsageError, match="--instance-data-dir"):
        run("--class-name", "dog", "--instance-data-dir", str(tmp_path / "nothing"))
    with pytest.raises(UsageError, match="RUN_DIR"):
        args = parser.parse_args(["eval", str(tmp_path), "--class-name", "dog"])
        args.func(args)


# ---------------------------------------------------------------------------------------------------------------
# offline proxies


def test_fixed_timesteps_cover_the_schedule_evenly():
    assert fixed_timesteps(1000, 10) == [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
    assert fixed_timesteps(1000, 1) == [500]


def test_predictions_do_not_depend_on_the_chunk_size(tiny_model):
    from peftbooth.models.loading import load_components
    from peftbooth.training.proxies import fixed_noise, predictions

    c = load_components(tiny_model)
    latents = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    context = torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(1))
    noise = fixed_noise(2, (3, 4, 4, 4), seed=0)
    assert torch.equal(noise, fixed_noise(2, (3, 4, 4, 4), seed=0))  # fixed: the same draw every call
    whole = predictions(c.unet, c.noise_scheduler, latents, context, [100, 900], noise, chunk=8)
    parts = predictions(c.unet, c.noise_scheduler, latents, context, [100, 900], noise, chunk=2)
    for a, b in zip(whole[0] + whole[1], parts[0] + parts[1]):
        assert torch.allclose(a, b, atol=1e-5)


def test_instance_loss_falls_after_a_short_high_lr_run(tiny_model, photos, tmp_path):
    run = setup(tiny_config(tiny_model, photos, tmp_path / "out", **{
        "train.max_train_steps": 8, "train.learning_rate": 1e-2}))
    fit(run)
    flags = [m.training for m in run.unet.modules()]
    rng = torch.get_rng_state()
    p = write_proxies(proxy_inputs(run))
    assert p["instance"]["loss_after"] < p["instance"]["loss_before"]
    assert len(p["instance"]["per_timestep"]["after"]) == len(p["timesteps"]) == 10
    # fixed noise and timesteps: the same numbers again, and nothing about the run disturbed
    assert compute_proxies(proxy_inputs(run))["instance"] == p["instance"]
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in run.unet.modules()] == flags
    assert json.loads((tmp_path / "out" / "proxies.json").read_text())["instance"] == p["instance"]
    assert p["class"] is None and "--class-prompt" in p["class_note"]


def test_class_drift_is_reported_with_and_without_prior_preservation(tiny_model, photos, tmp_path):
    common = {"data.class_prompt": "a photo of dog", "data.class_data_dir": str(tmp_path / "class"),
              "data.num_class_images": 3, "train.max_train_steps": 4, "train.learning_rate": 1e-2}
    results = {}
    for prior in (True, False):  # the prior run generates the class images the other one is measured on
        run = setup(tiny_config(tiny_model, photos, tmp_path / f"prior-{prior}", **common,
                                **{"data.with_prior_preservation": prior}))
        fit(run)
        results[prior] = write_proxies(proxy_inputs(run))
    for prior, p in results.items():
        c = p["class"]
        assert p["with_prior_preservation"] == prior
        assert c["images"] == 3 and c["prompt"] == "a photo of dog"
        assert math.isfinite(c["drift"]) and c["drift"] > 0 and math.isfinite(c["relative_drift"])
        assert len(c["drift_per_timestep"]) == 10
    # reported, not judged: on a random model the direction of the difference means nothing
    print({prior: p["class"]["relative_drift"] for prior, p in results.items()})
