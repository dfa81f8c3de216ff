"""Build the SD3-shaped world model from a seed: `python -m peftbooth.world.build_sd3 --out DIR`.

Stages, each kept in --work-dir so that a stopped build goes on from the last finished stage (single thread,
deterministic on the CPU):
  vae          16-channel AutoencoderKL started from the SD world's VAE, on world scenes and general pictures;
               shift_factor / scaling_factor measured on the data set's latents
  dataset      world scenes (never the subject), their caption token ids and VAE posteriors (the SD world's stage)
  transformer  SD3Transformer2DModel + two CLIP text encoders, trained jointly by flow matching (EMA weights)
  quality      samples for many prompts judged by the SD world's evaluator (reused: it judges images, not models)
  write        the StableDiffusion3Pipeline folder without T5 (fp16 transformer and VAE), the evaluator, build.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from ..runs.atomic import atomic_dir, write_text
from ..runs.rundir import TEXT_ENCODERS
from . import configs_sd3
from .evaluator import load_evaluator
from .pretrain_sd3 import set_latent_stats, train_transformer, train_vae_sd3
from .pretrain_vae import reconstruction_mse
from .quality import world_quality
from .scene_dataset import build_dataset, load_tensors, save_tensors
from .scenes import prompt, vocabulary
from .tokenizer import write_tokenizer
from .training import StageClock, log

SD_WORLD = Path(__file__).parent / "model"
DEFAULTS = dict(vae_steps=250, vae_batch=32, vae_pool=4000, scenes=10000, transformer_steps=1700,
                transformer_batch=64, transformer_lr=1e-3, ema_max=0.995, quality_prompts=75, quality_steps=20,
                quality_guidance=5.0, p_empty=0.1)


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**configs_sd3.scheduler_config())


def components(tokenizer, vae, transformer, te1, te2):
    from ..models.components import Components

    return Components(tokenizer, scheduler(), vae, transformer, te1, "world-sd3", tokenizer, te2, None, None,
                      is_sd3=True, max_sequence_length=configs_sd3.T5_ROWS)


def write_model(tokenizer, vae, transformer, te1, te2, tok_dir: Path, out: Path) -> None:
    """The diffusers folder without T5 (model_index.json's text_encoder_3 / tokenizer_3 null). Transformer and VAE
    as fp16 (diffusers loads them back as fp32); the text encoders (0.6 MB each) stay fp32."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler(), vae=vae, text_encoder=te1,
                                    tokenizer=tokenizer, text_encoder_2=te2, tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    with atomic_dir(out) as tmp:
        transformer.half()
        vae.half()
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        transformer.float()
        vae.float()
        for folder in ("tokenizer", "tokenizer_2"):
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(tok_dir / name, tmp / folder / name)
        shutil.copy(SD_WORLD / "evaluator.safetensors", tmp / "evaluator.safetensors")


def recorded_configs() -> dict:
    return {"transformer": configs_sd3.transformer_config(), "vae": configs_sd3.vae_config(),
            "text": configs_sd3.text_config(1), "text_2": configs_sd3.text_config(2),
            "scheduler": configs_sd3.scheduler_config(), "t5_rows": configs_sd3.T5_ROWS, "vocabulary": vocabulary()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m peftbooth.world.build_sd3", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "model_sd3"), help="the model folder to write")
    p.add_argument("--work-dir", default=".world-sd3-build", help="stage results, for a build that was stopped")
    p.add_argument("--seed", type=int, default=configs_sd3.BUILD_SEED)
    p.add_argument("--grid", default="", help="where a sample grid goes (none by default)")
    p.add_argument("--deadline", type=float, default=None,
                   help="unix time: stop the transformer's training there (recorded in build.json)")
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # deterministic, and the fastest setting on a shared 2-core machine
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    given = sys.argv[1:] if argv is None else argv
    record = {"command": " ".join(["python -m peftbooth.world.build_sd3", *given]), "seed": a.seed,
              "settings": {k: getattr(a, k) for k in DEFAULTS}, "seconds": {}, "started": time.strftime("%F %T")}
    start = time.perf_counter()

    stage = StageClock(work, record)

    tok_dir = work / "tokenizer"
    tokenizer = write_tokenizer(tok_dir, vocabulary())
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    made = not (work / "vae" / "config.json").exists()
    if not made:
        vae = AutoencoderKL.from_pretrained(str(work / "vae")).eval().requires_grad_(False)
    else:
        vae = train_vae_sd3(a.seed, a.vae_steps, a.vae_batch, a.vae_pool)
    stage("vae", made)

    data_file = work / "dataset.safetensors"
    made_data = not data_file.exists()
    if not made_data:
        data = {k: v.numpy() for k, v in load_tensors(data_file).items()}
    else:
        data = build_dataset(vae, tokenizer, a.seed, a.scenes)
        save_tensors(data_file, data)
    if made:  # SD3's latent statistics, measured on the world scenes the transformer learns
        record["latent_stats"] = set_latent_stats(vae, torch.from_numpy(data["mean"][:4096]))
        vae.save_pretrained(str(work / "vae"))
    record["latent_stats"] = {k: vae.config[k] for k in ("shift_factor", "scaling_factor")}
    vae.half().float()  # stored as fp16: measure what ships
    record["vae_mse"] = reconstruction_mse(vae, a.seed)
    log(f"vae {record['latent_stats']} reconstruction mse {record['vae_mse']}")
    stage("dataset", made_data)

    made = not (work / "transformer" / "config.json").exists()
    if not made:
        transformer = SD3Transformer2DModel.from_pretrained(str(work / "transformer")).eval().requires_grad_(False)
        te1, te2 = (CLIPTextModelWithProjection.from_pretrained(str(work / n), dtype=torch.float32).eval()
                    .requires_grad_(False) for n in TEXT_ENCODERS)
        record["transformer_training"] = json.loads((work / "transformer_training.json").read_text())
    else:
        te1, te2, transformer, info = train_transformer(data, vae, a.seed, a.transformer_steps, a.transformer_batch,
                                                        a.transformer_lr, a.p_empty, a.ema_max, a.deadline)
        transformer.save_pretrained(str(work / "transformer"))
        te1.save_pretrained(str(work / "text_encoder"))
        te2.save_pretrained(str(work / "text_encoder_2"))
        (work / "transformer_training.json").write_text(json.dumps(info))
        record["transformer_training"] = info
    stage("transformer", made)
    del data

    from ..inference.sampling import in_memory_pipeline

    transformer.half().float()  # stored as fp16: measure what ships
    net = load_evaluator(SD_WORLD)
    pipe = in_memory_pipeline(components(tokenizer, vae, transformer, te1, te2))
    quality, images, triples = world_quality(pipe, net, a.seed, a.quality_prompts, a.quality_steps,
                                             a.quality_guidance)
    record["quality"] = quality
    log(f"world model quality {quality}")
    if a.grid:
        from ..inference.sampling import grid

        rows = [r for r in (images[i * 15:(i + 1) * 15] for i in range(5)) if r]
        Path(a.grid).parent.mkdir(parents=True, exist_ok=True)
        g = grid(rows)
        g.resize((g.width * 3, g.height * 3), 0).save(a.grid)
        record["grid_prompts"] = [prompt(*t) for t in triples[:75]]
    stage("quality")

    out = Path(a.out)
    write_model(tokenizer, vae, transformer, te1, te2, tok_dir, out)
    record["total_seconds"] = round(sum(record["seconds"].values()), 1)
    record["invocation_seconds"] = round(time.perf_counter() - start, 1)
    record["configs"] = recorded_configs()
    write_text(out / "build.json", json.dumps(record, indent=1, default=list) + "\n")
    log(f"wrote {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
