"""The world: its scenes, the shipped world model and evaluator, and proof that training teaches the subject.

The learning tests train the world recipe (peftbooth/world/recipe.py) for a few hundred steps and measure with
the world's evaluator; their thresholds were measured over several seeds (BENCHMARKS.md, "Learning quality").
"""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from peftbooth.world import MODEL_DIR, configs
from peftbooth.world.recipe import RECIPE
from peftbooth.world.scenes import (
    BACKGROUNDS,
    CLASS_PROMPT,
    CLASSES,
    CONTEXTS,
    HELD_OUT_CONTEXTS,
    INSTANCE_PROMPT,
    RARE_TOKENS,
    SUBJECT_COLOURS,
    draw,
    random_scene,
    subject_prompt,
    vocabulary,
    write_subject_photos,
)

TEST_STEPS = 500  # a third of the recipe's 1500, for CI's time; the thresholds below were measured at 500
# measured over seeds of the recipe at TEST_STEPS, sampled as the world samples (guidance for the first 40 % of the
# steps), with the VAE's decoder trained again (2026-12-08; `benchmarks/learning_quality.py --subjects
# ball-stripes-cyan-lime-pink,ball-halves-magenta-cyan --adapters lora --seeds 3 --steps 500`, rows in
# benchmarks/results/ci_learning_test_500_decoder.jsonl): the ball, seeds 0-2,
# 0.94, 0.94, 0.94 (with the first decoder, seeds 0-1: 1.00, 1.00); the base model 0.00. This test runs on the
# machine's threads, whose sums round differently from the benchmark's one thread, so its run is another draw.
LEARNED = 0.5
# the first test subject (subjects.split(), never tuned on), the recipe's LoRA over seeds 0-2, same command: in-context
# fidelity 0.96, 0.92, 0.96; held-out 1.00, 0.81, 0.88 (13-16 of 16 images); the base model 0.00 (with the first
# decoder: 0.96, 1.00, 1.00 and 0.44, 0.38, 0.38, when these bounds were 0.6 and 0.25). Margins as above: the test's
# run is another draw; 0.5 is five images below the lowest held-out figure.
LEARNED_IN_CONTEXT = 0.75
LEARNED_HELD_OUT = 0.5
DRIFT_MARGIN = 0.5  # class drift without prior preservation minus with it (measured: see BENCHMARKS.md)


def json_normal(d: dict) -> dict:
    return json.loads(json.dumps(d))  # tuples -> lists, as in a saved config.json


# ---------------------------------------------------------------------------------------------------------------
# the world and what ships


def test_scenes_captions_and_subject_photos(tmp_path):
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(300)]
    assert not any(s.subject for s in scenes)  # the world never draws the subject
    assert {s.cls for s in scenes} == set(CLASSES) and {s.context for s in scenes} == set(CONTEXTS)
    captions = [s.caption(rng) for s in scenes]
    assert CLASS_PROMPT in captions  # the class word alone: any ball
    words = set(vocabulary())
    assert all(set(c.split()) <= words for c in captions)
    assert "sks" not in " ".join(captions).split()

    paths = write_subject_photos(tmp_path / "photos", captions=True)
    assert 4 <= len(paths) <= 6 and all(p.stem.split("_")[-1] in p.with_suffix(".txt").read_text() for p in paths)
    contexts = [p.with_suffix(".txt").read_text().strip().removeprefix(INSTANCE_PROMPT + " ") for p in paths]
    assert set(contexts) <= set(CONTEXTS) and not set(contexts) & set(HELD_OUT_CONTEXTS)
    plain = write_subject_photos(tmp_path / "plain", captions=False, masks=False)
    assert len(plain) == len(paths) and not list((tmp_path / "plain").glob("*.txt"))
    assert not list((tmp_path / "plain").glob("*.mask.png"))
    # each photo's mask is white on the ball and black on the background
    for p in paths:
        photo = np.asarray(Image.open(p).convert("RGB"), int)
        mask = np.asarray(Image.open(p.with_name(p.stem + ".mask.png")), int)
        off_background = np.abs(photo - photo[0, 0]).max(-1) > 60  # (the gradient varies far less than that)
        assert mask.shape == photo.shape[:2] and (mask[off_background] > 0).mean() > 0.95
        assert (mask == 255).sum() > 50 and (mask[~off_background] < 128).mean() > 0.95
    # the subject: magenta above its centre, cyan below
    s = random_scene(random.Random(1), subject=True, context="at night")
    px = np.asarray(draw(s), int)
    top, bottom = px[int(s.cy) - 3, int(s.cx)], px[int(s.cy) + 3, int(s.cx)]
    assert np.abs(top - SUBJECT_COLOURS[0]).max() < 50 and np.abs(bottom - SUBJECT_COLOURS[1]).max() < 50
    bg = px[0, 0] if abs(s.cx) > 4 else px[0, -1]
    assert np.abs(bg - BACKGROUNDS["at night"][0]).max() < 20


def test_pretraining_scenes_hold_patterned_objects_in_world_colours():
    """The build's data: p_patterned of the objects in a pattern of world colours, captioned in the world's own
    words within the tokenizer's length; p_patterned 0 draws exactly the first build's scenes."""
    from peftbooth.world.scene_dataset import caption_variants, draw_scenes
    from peftbooth.world.scenes import COLOURS
    from peftbooth.world.tokenizer import MAX_LENGTH

    images, texts = draw_scenes(7, 300, 0.5)
    firsts = texts[::4]  # each scene's caption with its colours and its context
    colour_words = [[w for w in t.split() if w in COLOURS] for t in firsts]
    patterned = [i for i, words in enumerate(colour_words) if len(words) > 1]
    assert 0.4 < len(patterned) / 300 < 0.6
    assert all(len(set(colour_words[i])) == len(colour_words[i]) for i in patterned)  # distinct colours
    words = set(vocabulary())
    assert all(set(t.split()) <= words for t in texts)
    tokenizer = CLIPTokenizer.from_pretrained(str(MODEL_DIR / "tokenizer"))
    assert max(len(ids) for ids in tokenizer(texts).input_ids) <= MAX_LENGTH
    # a patterned object holds more than one colour; a plain one is one colour (and its shading)
    spread = [np.ptp(np.asarray(images[i], float).reshape(-1, 3), axis=0).sum() for i in patterned[:20]]
    assert min(spread) > 0
    rng = random.Random(7 + 1)
    plain_images, plain_texts = draw_scenes(7, 20, 0.0)
    scenes = [random_scene(rng) for _ in range(20)]
    assert [np.asarray(im).tobytes() for im in plain_images] == [np.asarray(draw(s)).tobytes() for s in scenes]
    assert plain_texts == [c for s in scenes for c in caption_variants(s)]


def test_shipped_world_model_was_made_by_this_build_script():
    """The weights in the package match the current script's configs and vocabulary, and fit in 10 MB."""
    for part, expected in [("unet", configs.unet_config()), ("vae", configs.vae_config()),
                           ("text_encoder", configs.text_config()), ("scheduler", configs.scheduler_config())]:
        saved = json.loads((MODEL_DIR / part / ("scheduler_config.json" if part == "scheduler" else "config.json"))
                           .read_text())
        for key, value in json_normal(expected).items():
            assert saved[key] == value, (part, key)
    from peftbooth.world.tokenizer import vocab_and_merges

    vocab, merges = vocab_and_merges(vocabulary())
    assert json.loads((MODEL_DIR / "tokenizer" / "vocab.json").read_text()) == vocab
    assert (MODEL_DIR / "tokenizer" / "merges.txt").read_text().splitlines()[1:] == [f"{a} {b}" for a, b in merges]
    record = json.loads((MODEL_DIR / "build.json").read_text())
    assert json_normal(record["configs"]) == json_normal(
        {"unet": configs.unet_config(), "vae": configs.vae_config(), "text": configs.text_config(),
         "scheduler": configs.scheduler_config(), "vocabulary": vocabulary()})
    total = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    assert total <= 10 * 2**20
    q = record["quality"]
    assert q["prompts"] >= 100 and min(q["class_match"], q["colour_match"], q["background_match"]) >= 0.9


def test_world_tokenizer_and_loading():
    from peftbooth.models.loading import load_components

    c = load_components("world")
    assert c.unet.dtype == c.vae.dtype == c.text_encoder.dtype == torch.float32
    tok = c.tokenizer
    ids = {w: tok(w, add_special_tokens=False).input_ids for w in vocabulary()}
    assert all(len(v) == 1 for v in ids.values())  # one token per word, the rare identifiers too
    assert len({v[0] for v in ids.values()}) == len(ids)
    assert set(RARE_TOKENS) <= set(ids)
    assert len(tok("an unknown zebra").input_ids) > 4  # other text still tokenizes, character by character


def test_evaluator_reads_freshly_drawn_scenes():
    from peftbooth.world.evaluator import HEADS, judge, load_evaluator
    from peftbooth.world.evaluator_training import evaluator_example

    net = load_evaluator(MODEL_DIR)
    rng = random.Random(12345)  # not the build's seeds
    pool = [evaluator_example(rng) for _ in range(300)]
    verdict = judge(net, [p[0] for p in pool])
    for i, head in enumerate(HEADS):
        y = [HEADS[head][p[1][i]] for p in pool if p[1][i] >= 0]
        got = [v for v, p in zip(verdict[head], pool) if p[1][i] >= 0]
        assert np.mean([a == b for a, b in zip(got, y)]) >= 0.95, head


# ---------------------------------------------------------------------------------------------------------------
# training teaches the subject (and prior preservation keeps the class)


@pytest.fixture(scope="module")
def world_setup(tmp_path_factory):
    from peftbooth.data.images import load_image
    from peftbooth.world.evaluator import load_evaluator
    from peftbooth.world.metrics import WorldEvalSettings

    root = tmp_path_factory.mktemp("world")
    photos = write_subject_photos(root / "photos")
    return {"root": root, "real": [load_image(p) for p in photos], "evaluator": load_evaluator(MODEL_DIR),
            "settings": WorldEvalSettings(num_images=8)}


def train_and_measure(setup: dict, name: str, prior: bool, baseline: bool = False, subject=None) -> dict:
    """The world recipe's LoRA on the ball's photos (or `subject`'s, written beside them), measured."""
    from dataclasses import replace

    from peftbooth.data.images import load_image
    from peftbooth.training.loop import train
    from peftbooth.world.metrics import evaluate_adapter
    from peftbooth.world.recipe import world_config
    from peftbooth.world.subjects import write_photos

    root, real, settings = setup["root"], setup["real"], setup["settings"]
    photos = root / "photos"
    if subject is not None:
        photos = root / subject.name
        real = [load_image(p) for p in write_photos(subject, photos)]
        settings = replace(settings, subject=subject.name, in_context=True)
    cfg = world_config(photos, root / name, "lora", prior=prior, text_encoder=True, steps=TEST_STEPS,
                       class_data_dir=root / f"class_images_{subject.name if subject else 'ball'}", subject=subject)
    run = train(cfg)
    res = evaluate_adapter(MODEL_DIR, {name: run}, real, settings, baseline=baseline)
    return {"run": run, **res["results"]}


@pytest.fixture(scope="module")
def with_prior(world_setup):
    return train_and_measure(world_setup, "lora-prior", prior=True, baseline=True)


@pytest.fixture(scope="module")
def test_subject_run(world_setup):
    """A subject the recipe was never tuned on: the first test subject of the family's fixed split."""
    from peftbooth.world.subjects import split

    return train_and_measure(world_setup, "lora-test-subject", prior=True, baseline=True, subject=split()[1][0])


def test_training_teaches_a_test_subject_in_its_contexts_and_new_ones(test_subject_run):
    base, after = test_subject_run["base"], test_subject_run["lora-test-subject"]
    assert base["subject_fidelity"] <= 0.05 and base["in_context_fidelity"] <= 0.05
    assert after["in_context_fidelity"] >= LEARNED_IN_CONTEXT
    assert after["subject_fidelity"] >= LEARNED_HELD_OUT
    assert after["prompt_fidelity"] >= 0.8  # the held-out contexts are drawn as asked
    assert after["subject_similarity"] > base["subject_similarity"]


def test_training_teaches_the_ball_in_new_contexts(with_prior):
    base, after = with_prior["base"], with_prior["lora-prior"]
    assert base["subject_fidelity"] <= 0.05
    assert after["subject_fidelity"] >= LEARNED
    assert after["subject_similarity"] > base["subject_similarity"]


def test_prior_preservation_reduces_language_drift(world_setup, with_prior):
    without = train_and_measure(world_setup, "lora-no-prior", prior=False)["lora-no-prior"]
    with_ = with_prior["lora-prior"]
    assert without["class_drift"] - with_["class_drift"] >= DRIFT_MARGIN
    assert with_["diversity"] > without["diversity"]


def test_a_broken_objective_fails_the_learning_test(world_setup, monkeypatch):
    """The control: with the target replaced by the noisy input, the same run does not learn the subject."""
    import importlib

    objective = importlib.import_module("peftbooth.training.objective")  # the training step's maths
    monkeypatch.setattr(objective, "diffusion_target", lambda sched, latents, noise, t: sched.add_noise(
        latents, noise, t))
    from peftbooth.world.subjects import split

    broken = train_and_measure(world_setup, "lora-broken", prior=True, subject=split()[1][0])["lora-broken"]
    assert broken["in_context_fidelity"] < LEARNED_IN_CONTEXT and broken["subject_fidelity"] < LEARNED_HELD_OUT


def test_eval_cli_on_a_world_run(with_prior, capsys):
    from peftbooth.cli import main

    run = Path(with_prior["run"])
    assert main(["eval", str(run), "--guidance-cutoff", "1.5"]) == 2  # refused before any sampling
    assert "--guidance-cutoff must be <= 1 (got 1.5)" in capsys.readouterr().err
    assert main(["eval", str(run), "--num-images", "2", "--no-baseline"]) == 0
    printed = capsys.readouterr().out
    assert "base model: world" in printed and "subject_fidelity" in printed
    report = json.loads((run / "eval" / "world_metrics.json").read_text())
    assert report["protocol"] == "world" and set(report["results"]) == {"adapter"}
    assert report["prompts"] == [subject_prompt(c) for c in HELD_OUT_CONTEXTS] + [CLASS_PROMPT]
    assert (run / "eval" / "world_adapter_sheet.png").is_file()
    html = (run / "report.html").read_text()
    assert "World metrics" in html and "subject_fidelity" in html


def test_build_script_is_deterministic(tmp_path):
    """Two builds from the same seed (tiny settings) write identical weights; the folder loads as an SD model."""
    from safetensors.torch import load_file

    from peftbooth.models.loading import load_components
    from peftbooth.world.build import main

    small = ["--vae-steps", "2", "--vae-pool", "32", "--vae-batch", "8", "--scenes", "64", "--unet-steps", "2",
             "--unet-batch", "8", "--evaluator-steps", "2", "--evaluator-pool", "32", "--quality-prompts", "3",
             "--judge-steps", "2", "--judge-pool", "32", "--judge-batch", "8"]
    for k in (0, 1):
        assert main(["--out", str(tmp_path / f"m{k}"), "--work-dir", str(tmp_path / f"w{k}"),
                     "--grid", str(tmp_path / f"g{k}.png"), *small]) == 0
    files = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors", "evaluator.safetensors", "judge.safetensors"]
    for f in files:
        a, b = load_file(str(tmp_path / "m0" / f)), load_file(str(tmp_path / "m1" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    record = json.loads((tmp_path / "m0" / "build.json").read_text())
    assert record["quality"]["prompts"] == 3 and set(record["seconds"]) >= {"vae", "unet", "evaluator", "quality"}
    c = load_components(str(tmp_path / "m0"))
    assert c.unet.config.sample_size == configs.LATENT_SIZE and c.latent_scale == record["vae_scaling_factor"]
    assert (tmp_path / "g0.png").is_file()
    # --only unet: the UNet and text encoder made again on the folder's VAE; the VAE, evaluator and judge kept
    for k in (0, 1):
        shutil.copytree(tmp_path / "m0", tmp_path / f"u{k}")
        assert main(["--only", "unet", "--out", str(tmp_path / f"u{k}"), "--work-dir", str(tmp_path / f"v{k}"),
                     "--grid", "", "--p-patterned", "0.5", *small]) == 0
    for f in files:
        a, b = (tmp_path / "u0" / f).read_bytes(), (tmp_path / "u1" / f).read_bytes()
        kept = f.split("/")[0] not in ("unet", "text_encoder")
        assert a == b and (a == (tmp_path / "m0" / f).read_bytes()) == kept, f
    redone = json.loads((tmp_path / "u0" / "build.json").read_text())
    assert redone["unet"]["settings"]["p_patterned"] == 0.5 and set(redone["unet"]["seconds"]) == {
        "dataset", "unet", "quality"}
    assert redone["vae_mse"] == record["vae_mse"] and redone["quality"]["prompts"] == 3
    # --only decoder: the VAE's decoder trained again, its encoder (so the UNet's latents) and the rest kept
    for k in (0, 1):
        shutil.copytree(tmp_path / "m0", tmp_path / f"d{k}")
        assert main(["--only", "decoder", "--out", str(tmp_path / f"d{k}"), "--work-dir", str(tmp_path / f"e{k}"),
                     "--grid", "", "--decoder-steps", "2", "--decoder-pool", "30", "--decoder-batch", "8",
                     *small]) == 0
    vae = "vae/diffusion_pytorch_model.safetensors"
    for f in files:
        a, b = (tmp_path / "d0" / f).read_bytes(), (tmp_path / "d1" / f).read_bytes()
        assert a == b and (a == (tmp_path / "m0" / f).read_bytes()) == (f != vae), f
    before, after = load_file(str(tmp_path / "m0" / vae)), load_file(str(tmp_path / "d0" / vae))
    trained = {k for k in before if k.startswith(("decoder.", "post_quant_conv."))}
    assert all(torch.equal(before[k], after[k]) for k in set(before) - trained)
    assert not all(torch.equal(before[k], after[k]) for k in trained)
    assert str(tmp_path) not in (tmp_path / "d0" / "vae" / "config.json").read_text()  # no machine's path in it
    decoded = json.loads((tmp_path / "d0" / "build.json").read_text())
    assert decoded["decoder"]["settings"]["decoder_steps"] == 2 and decoded["decoder"]["vae_mse_before"] == \
        record["vae_mse"] and set(decoded["decoder"]["seconds"]) == {"decoder", "quality"}
    assert decoded["vae_mse"] != record["vae_mse"] and set(decoded["judge"]["calibration"]) == set(
        record["judge"]["calibration"]) and decoded["quality"]["prompts"] == 3


def test_demo_runs_end_to_end(tmp_path, capsys):
    from PIL import Image

    from peftbooth.config.options import DemoOptions
    from peftbooth.demo import ADAPTERS, DEMO_ADAPTERS, DEMO_SUBJECT, demo_rows, run_demo
    from peftbooth.world.subjects import by_name

    # the CLI's defaults are the demo's
    assert (DemoOptions().subject, DemoOptions().adapters.split(",")) == (DEMO_SUBJECT, list(DEMO_ADAPTERS))
    result = run_demo(tmp_path / "demo", steps=2, num_images=2, adapters=ADAPTERS)  # two at a time
    out = capsys.readouterr().out
    assert set(result["runs"]) == set(ADAPTERS)
    for run in result["runs"].values():
        assert (run / "unet" / "adapter_model.safetensors").is_file() and (run / "text_encoder").is_dir()
        assert "a photo of a sks box" in (run / "config.yaml").read_text()
    assert len(list((tmp_path / "demo" / "class_images").glob("*.png"))) == RECIPE["num_class_images"]
    subject = by_name(DEMO_SUBJECT)
    rows = demo_rows(subject, ADAPTERS)
    assert len(rows) == 2 + 3 * len(ADAPTERS)  # base x 2, then per adapter: 2 held-out contexts + the class prompt
    assert [r[2] for r in rows[2:4]] == [subject.prompt(c) for c in subject.held_out_contexts]
    assert Image.open(result["samples"]).size == (2 * 96, len(rows) * 96)
    assert len((tmp_path / "demo" / "samples" / "before_after.txt").read_text().splitlines()) == len(rows)
    report = json.loads((tmp_path / "demo" / "world_metrics.json").read_text())
    assert report["settings"]["subject"] == DEMO_SUBJECT
    metrics = report["results"]
    assert set(metrics) == {"base", *ADAPTERS} and all(0 <= m["subject_fidelity"] <= 1 for m in metrics.values())
    assert "world metrics" in out and "Everything is in" in out


@pytest.mark.parametrize("flags, message", [
    (["--subject", "box-zigzag-red"], "--subject: no world subject 'box-zigzag-red'; the family: ball-halves-"),
    (["--steps", "0"], "--steps must be >= 1 (got 0)"),
    (["--adapters", "lora,ia3"], "--adapters 'lora,ia3': give each of lora, loha, lokr at most once, comma-separated"),
    (["--adapters", "lora,lora"], "--adapters 'lora,lora': give each of lora, loha, lokr at most once"),
])
def test_demo_refuses_bad_flags_before_any_work(tmp_path, capsys, flags, message):
    from peftbooth.cli import main

    assert main(["demo", "--output-dir", str(tmp_path / "d"), *flags]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_eval_names_an_unknown_world_subject(with_prior, capsys):
    from peftbooth.cli import main

    assert main(["eval", str(with_prior["run"]), "--world-subject", "ball-zigzag-red"]) == 2
    err = capsys.readouterr().err
    assert "--world-subject: no world subject 'ball-zigzag-red'; the family: ball-halves-magenta-cyan" in err
