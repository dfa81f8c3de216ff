"""Build the world model and its evaluator from a seed: `python -m peftbooth.world.build --out DIR`.

Stages, each kept in --work-dir so that a stopped build goes on from the last finished stage (same seed, same
result; the CPU run is deterministic with one thread):
  vae        AutoencoderKL on world scenes and general pictures (a codec beyond the world's palette)
  dataset    world scenes (never the subject; --p-patterned of them painted in a pattern) and VAE posteriors
  unet       UNet + CLIP text encoder trained jointly (Min-SNR, EMA), captions re-drawn each time
  evaluator  the WorldEvaluator on scenes, subjects and look-alikes, half of them through the VAE
  judge      the SubjectJudge (any subject, given its description) and its calibration
  quality    samples for many prompts judged by the evaluator; a grid for docs/
  write      the diffusers folder (fp16 weights), evaluator.safetensors and build.json

`--only unet` makes the data set, UNet, text encoder and quality stages again on the VAE of an existing folder
(--out) and keeps its VAE, evaluator and judge: how the shipped UNet was rebuilt with patterned objects.
`--only decoder` trains the VAE's decoder of an existing folder again with patterned objects in its pool (the
encoder, so the latents, kept) and measures the VAE, evaluator, judge and samples again: how the shipped decoder
learned to keep small parts.

This module is the command line and the order of the stages, and writes the result; each stage's work lives in its
own module: pretrain_vae, scene_dataset, pretrain_unet, evaluator_training, judge_training and quality (training.py:
the log and the learning-rate schedule they share).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from ..runs.atomic import atomic_dir, write_text
from . import configs
from .evaluator import load_evaluator, save_evaluator
from .evaluator_training import evaluator_accuracy, train_evaluator
from .judge import load_judge, save_judge
from .judge_training import judge_calibration, train_judge
from .pretrain_unet import train_unet
from .pretrain_vae import finetune_decoder, reconstruction_mse, train_vae
from .quality import world_quality
from .scene_dataset import build_dataset, load_tensors, save_tensors
from .scenes import prompt, vocabulary
from .tokenizer import write_tokenizer
from .training import StageClock, log

DEFAULTS = dict(vae_steps=800, vae_batch=32, vae_pool=6000, scenes=40000, unet_steps=3000, unet_batch=128, unet_lr=1e-3,
                evaluator_steps=1200, evaluator_batch=128, evaluator_pool=8000, quality_prompts=150, quality_steps=25,
                quality_guidance=5.0, p_empty=0.1, judge_steps=1500, judge_batch=128, judge_pool=16000,
                p_patterned=0.4, decoder_steps=2000, decoder_batch=32, decoder_pool=6000)


# ---------------------------------------------------------------------------------------------------------------
# writing


def assemble_pipeline(tokenizer, text_encoder, unet, vae):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDPMScheduler(**configs.scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def write_model(pipe, tok_dir: Path, out: Path) -> None:
    """The diffusers folder. The UNet and VAE are stored as fp16 (diffusers loads them back as fp32); the text
    encoder (0.6 MB) stays fp32, since transformers loads a checkpoint in its stored dtype."""
    with atomic_dir(out) as tmp:
        pipe.unet.half()
        pipe.vae.half()
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        pipe.unet.float()
        pipe.vae.float()
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(tok_dir / name, tmp / "tokenizer" / name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m peftbooth.world.build", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "model"), help="the world model folder to write")
    p.add_argument("--work-dir", default=".world-build", help="stage results, for a build that was stopped")
    p.add_argument("--seed", type=int, default=configs.BUILD_SEED)
    p.add_argument("--grid", default="docs/world-samples.png", help="where the sample grid goes")
    p.add_argument("--only", choices=("evaluator", "judge", "unet", "decoder"),
                   help="run this stage alone (evaluator: beside a build that is running, it needs the finished VAE "
                   "in --work-dir; judge: on the VAE in --out, into --out; unet: the data set, UNet and text "
                   "encoder and the quality stage again on the VAE in --out, into --out; decoder: the VAE's decoder of --out "
                   "trained again and everything that reads it measured again, into --out)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: deterministic, and the fastest on a "
                   "shared 2-core machine while another stage runs beside)")
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    import sys

    given = sys.argv[1:] if argv is None else argv
    record = {"command": " ".join(["python -m peftbooth.world.build", *given]), "seed": a.seed,
              "settings": {k: getattr(a, k) for k in DEFAULTS}, "seconds": {}}
    start = time.perf_counter()

    stage = StageClock(work, record)

    if a.only == "judge":
        return judge_only(a, record, stage)
    if a.only == "unet":
        return unet_only(a, record, stage)
    if a.only == "decoder":
        return decoder_only(a, record, stage)
    tok_dir = work / "tokenizer"
    tokenizer = write_tokenizer(tok_dir, vocabulary())
    from diffusers import AutoencoderKL

    made = not (work / "vae" / "config.json").exists()
    if not made:
        vae = AutoencoderKL.from_pretrained(str(work / "vae")).eval().requires_grad_(False)
    else:
        vae = train_vae(a.seed, a.vae_steps, a.vae_batch, a.vae_pool)
        vae.save_pretrained(str(work / "vae"))
    record["vae_mse"] = reconstruction_mse(vae, a.seed)
    record["vae_scaling_factor"] = vae.config.scaling_factor
    log(f"vae reconstruction mse {record['vae_mse']}")
    stage("vae", made)

    if a.only == "evaluator":
        stage.restart()
        save_evaluator(train_evaluator(vae, a.seed, a.evaluator_steps, a.evaluator_batch, a.evaluator_pool),
                       work / "evaluator")
        stage("evaluator")
        return 0

    data_file = work / "dataset.safetensors"
    made = not data_file.exists()
    if not made:
        data = {k: v.numpy() for k, v in load_tensors(data_file).items()}
    else:
        data = build_dataset(vae, tokenizer, a.seed, a.scenes, a.p_patterned)
        save_tensors(data_file, data)
    stage("dataset", made)

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    made = not (work / "unet" / "config.json").exists()
    if not made:
        unet = UNet2DConditionModel.from_pretrained(str(work / "unet")).eval().requires_grad_(False)
        text_encoder = CLIPTextModel.from_pretrained(str(work / "text_encoder"), dtype=torch.float32)
        text_encoder.eval().requires_grad_(False)
    else:
        text_encoder, unet = train_unet(data, vae, a.seed, a.unet_steps, a.unet_batch, a.unet_lr, a.p_empty)
        unet.save_pretrained(str(work / "unet"))
        text_encoder.save_pretrained(str(work / "text_encoder"))
    stage("unet", made)

    made = not (work / "evaluator" / "evaluator.safetensors").exists()
    if not made:
        net = load_evaluator(work / "evaluator")
    else:
        net = train_evaluator(vae, a.seed, a.evaluator_steps, a.evaluator_batch, a.evaluator_pool)
        save_evaluator(net, work / "evaluator")
    net.half().float()  # stored as fp16: measure what ships
    record["evaluator_accuracy"] = evaluator_accuracy(net, vae, a.seed, n=min(2000, a.evaluator_pool))
    log(f"evaluator accuracy {record['evaluator_accuracy']}")
    stage("evaluator", made)

    judge = judge_stage(a, vae, record, stage)

    pipe = assemble_pipeline(tokenizer, text_encoder, unet, vae)
    quality_stage(a, record, pipe, net)
    stage("quality")

    out = Path(a.out)
    write_model(pipe, tok_dir, out)
    save_evaluator(net, out)
    save_judge(judge, out)
    # every stage's own time (those loaded from --work-dir: when they were made there), and this invocation's
    record["total_seconds"] = round(sum(record["seconds"].values()), 1)
    record["invocation_seconds"] = round(time.perf_counter() - start, 1)
    record["configs"] = {"unet": configs.unet_config(), "vae": configs.vae_config(), "text": configs.text_config(),
                         "scheduler": configs.scheduler_config(), "vocabulary": vocabulary()}
    write_text(out / "build.json", json.dumps(record, indent=1, default=list) + "\n")
    log(f"wrote {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB)")
    return 0


def quality_stage(a, record: dict, pipe, net) -> None:
    """Samples for many prompts judged by the evaluator (record["quality"]), and the grid for docs/."""
    from diffusers import DDPMScheduler

    from ..inference.sampling import in_memory_pipeline
    from ..models.components import Components

    comps = Components(pipe.tokenizer, DDPMScheduler(**configs.scheduler_config()), pipe.vae, pipe.unet,
                       pipe.text_encoder, "world")
    quality, images, triples = world_quality(in_memory_pipeline(comps), net, a.seed, a.quality_prompts,
                                             a.quality_steps, a.quality_guidance)
    record["quality"] = quality
    log(f"world model quality {quality}")
    if a.grid:
        from ..inference.sampling import grid

        rows = [r for r in (images[i * 15:(i + 1) * 15] for i in range(5)) if r]
        Path(a.grid).parent.mkdir(parents=True, exist_ok=True)
        g = grid(rows)
        g.resize((g.width * 3, g.height * 3), 0).save(a.grid)
        record["grid_prompts"] = [prompt(*t) for t in triples[:75]]


def unet_only(a, record: dict, stage) -> int:
    """--only unet: the data set, the UNet and text encoder, and the quality stage of an existing world model, on
    its VAE in --out (the evaluator and judge, trained on that VAE, stay as they are); the new UNet and text encoder
    written into --out, and build.json's record of them under "unet" (its "quality" and grid replaced)."""
    from diffusers import AutoencoderKL

    out, work = Path(a.out), Path(a.work_dir)
    tok_dir = work / "tokenizer"
    tokenizer = write_tokenizer(tok_dir, vocabulary())
    vae = AutoencoderKL.from_pretrained(str(out / "vae")).float().eval().requires_grad_(False)
    data = build_dataset(vae, tokenizer, a.seed, a.scenes, a.p_patterned)
    stage("dataset")
    text_encoder, unet = train_unet(data, vae, a.seed, a.unet_steps, a.unet_batch, a.unet_lr, a.p_empty)
    stage("unet")
    pipe = assemble_pipeline(tokenizer, text_encoder, unet, vae)
    quality_stage(a, record, pipe, load_evaluator(out))
    stage("quality")
    built = json.loads((out / "build.json").read_text())
    keys = ("scenes", "unet_steps", "unet_batch", "unet_lr", "p_empty", "p_patterned", "quality_prompts",
            "quality_steps", "quality_guidance")
    built["unet"] = {"command": record["command"], "seed": a.seed, "threads": a.threads,
                     "settings": {k: record["settings"][k] for k in keys}, "seconds": record["seconds"]}
    built["quality"] = record["quality"]
    built["grid_prompts"] = record.get("grid_prompts", built.get("grid_prompts"))
    with atomic_dir(out / "unet") as tmp:
        unet.half().save_pretrained(str(tmp), safe_serialization=True)
    with atomic_dir(out / "text_encoder") as tmp:
        text_encoder.save_pretrained(str(tmp), safe_serialization=True)
    write_text(out / "build.json", json.dumps(built, indent=1, default=list) + "\n")
    log(f"wrote the UNet and text encoder into {out}")
    return 0


def decoder_only(a, record: dict, stage) -> int:
    """--only decoder: the decoder of --out's VAE trained again (pretrain_vae.finetune_decoder), then what depends on
    it measured again on the folder's own UNet, text encoder, evaluator and judge (VAE error, evaluator accuracy,
    judge calibration, the quality stage and its grid); the VAE written into --out and build.json updated, with
    the decoder's settings and the VAE error it replaced under "decoder"."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .subjects import family

    out = Path(a.out)
    vae = AutoencoderKL.from_pretrained(str(out / "vae")).float()
    # the config's _name_or_path stays as the folder had it (a fresh build writes none), not this machine's path
    saved = json.loads((out / "vae" / "config.json").read_text())
    vae.register_to_config(_name_or_path=saved.get("_name_or_path", "vae"))
    built = json.loads((out / "build.json").read_text())
    vae = finetune_decoder(vae, a.seed, a.decoder_steps, a.decoder_batch, a.decoder_pool)
    stage("decoder")
    vae.half().float()  # stored as fp16: measure what ships
    record["vae_mse"] = reconstruction_mse(vae, a.seed)
    net, judge = load_evaluator(out), load_judge(out)
    record["evaluator_accuracy"] = evaluator_accuracy(net, vae, a.seed, n=min(2000, a.evaluator_pool))
    calibration = judge_calibration(judge, vae, a.seed, n=min(2000, a.judge_pool), subjects=family())
    log(f"vae mse {record['vae_mse']}; judge on round trips {calibration['random/vae']}")
    unet = UNet2DConditionModel.from_pretrained(str(out / "unet")).float().eval().requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(str(out / "text_encoder"), dtype=torch.float32).eval()
    pipe = assemble_pipeline(CLIPTokenizer.from_pretrained(str(out / "tokenizer")), text_encoder, unet, vae)
    quality_stage(a, record, pipe, net)
    stage("quality")
    keys = ("decoder_steps", "decoder_batch", "decoder_pool", "quality_prompts", "quality_steps", "quality_guidance")
    built["decoder"] = {"command": record["command"], "seed": a.seed, "threads": a.threads,
                        "settings": {k: record["settings"][k] for k in keys}, "seconds": record["seconds"],
                        "vae_mse_before": built["vae_mse"]}
    for key in ("vae_mse", "evaluator_accuracy", "quality"):
        built[key] = record[key]
    built["judge"]["calibration"] = calibration
    built["grid_prompts"] = record.get("grid_prompts", built.get("grid_prompts"))
    with atomic_dir(out / "vae") as tmp:
        vae.half().save_pretrained(str(tmp), safe_serialization=True)
    write_text(out / "build.json", json.dumps(built, indent=1, default=list) + "\n")
    log(f"wrote the VAE into {out}")
    return 0


def judge_stage(a, vae, record: dict, stage):
    """Train (or load from --work-dir) the judge; record its settings and calibration (docs/world.md)."""
    from .subjects import family

    work = Path(a.work_dir)
    made = not (work / "judge" / "judge.safetensors").exists()
    if not made:
        net = load_judge(work / "judge")
    else:
        net = train_judge(vae, a.seed, a.judge_steps, a.judge_batch, a.judge_pool)
        save_judge(net, work / "judge")
    net.half().float()  # stored as fp16: measure what ships
    record["judge"] = {"calibration": judge_calibration(net, vae, a.seed, n=min(2000, a.judge_pool),
                                                        subjects=family())}
    log(f"judge calibration {record['judge']['calibration']['random/vae']}")
    stage("judge", made)
    return net


def judge_only(a, record: dict, stage) -> int:
    """--only judge: the judge of an existing world model (its VAE in --out), written into --out beside it, and its
    record merged into --out's build.json under "judge" (the rest of the record is left as its build wrote it)."""
    from diffusers import AutoencoderKL

    out = Path(a.out)
    vae = AutoencoderKL.from_pretrained(str(out / "vae")).float().eval().requires_grad_(False)
    net = judge_stage(a, vae, record, stage)
    save_judge(net, out)
    built = json.loads((out / "build.json").read_text())
    built["judge"] = {"command": record["command"], "seed": a.seed, "seconds": record["seconds"]["judge"],
                      "settings": {k: v for k, v in record["settings"].items() if k.startswith("judge_")},
                      **record["judge"]}
    write_text(out / "build.json", json.dumps(built, indent=1, default=list) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
