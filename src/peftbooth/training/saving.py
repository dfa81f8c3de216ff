"""Writing a finished run into its output folder: the adapter folders, config.yaml, README.md and the report.

Everything is written complete into a hidden staging folder first and moved into place, unet/ (the finished-run
marker) last. `run` is train.Run (not imported: train imports this module).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from ..adapters import token_embedding
from ..config.dicts import to_dict
from ..config.sections import TrainConfig
from ..runs.hub import model_card, push
from ..runs.report import write_report
from ..runs.rundir import TOKEN_EMBEDDINGS
from .signals import end_training


def replayable(cfg: TrainConfig) -> TrainConfig:
    """The config as saved in OUTPUT/config.yaml: one-off actions of this invocation (resume, overwrite, push)
    reset, so `train --config OUTPUT/config.yaml --output-dir NEW` trains the same thing again and nothing more."""
    train_args = dataclasses.replace(cfg.train, resume=None, resume_force=False, overwrite=False, push_to_hub=None)
    return dataclasses.replace(cfg, train=train_args)


def check_ranks_agree(run) -> None:
    """Data-parallel processes must end with the same adapters (only rank 0's are saved): compare exactly."""
    acc = run.accelerator
    models = list(run.trained().values())
    # one float64 checksum per adapter tensor: (P,) per process, gathered to (world * P,)
    sums = torch.stack([p.detach().double().sum() for m in models for p in m.parameters() if p.requires_grad])
    per_rank = acc.gather(sums.to(acc.device)).view(acc.num_processes, -1)
    if not bool((per_rank == per_rank[0]).all()):
        raise RuntimeError("data-parallel processes ended with different adapter weights; not saving")
    acc.print(f"adapter weights identical on all {acc.num_processes} processes")


def save(run, stats: dict) -> Path:
    """Write unet/ (and text_encoder/) adapter folders, config.yaml and README.md into the output dir.

    Everything is written complete into a hidden staging folder first, then moved into place one by one, unet/
    (the finished-run marker) last: no file is ever half-written, though a crash between moves can leave the new
    config.yaml beside the previous adapter.
    """
    acc, out = run.accelerator, run.output_dir
    acc.wait_for_everyone()
    if acc.num_processes > 1:
        check_ranks_agree(run)
    if acc.is_main_process:
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
        try:
            # save_embedding_layers=False: no embeddings are trained, and 'auto' would look the base model up online
            for name, model in run.trained().items():
                acc.unwrap_model(model).save_pretrained(staging / name, save_embedding_layers=False)
            if run.cfg.train.train_token_embedding:
                token_embedding.save_file(staging / TOKEN_EMBEDDINGS,
                                          [acc.unwrap_model(m) for m in run.text_encoders],
                                          run.cfg.train.train_token_embedding)
            (staging / "config.yaml").write_text(yaml.safe_dump(to_dict(replayable(run.cfg)), sort_keys=False))
            (staging / "README.md").write_text(model_card(run.cfg, stats, out, sdxl=run.components.is_sdxl))
            # config.yaml and README.md first, unet/ (the finished-run marker) last
            for name in ["config.yaml", "README.md", "text_encoder", "text_encoder_2", TOKEN_EMBEDDINGS, "unet"]:
                src, dst = staging / name, out / name
                if not src.exists():
                    if dst.is_dir() and name.startswith("text_encoder"):
                        shutil.rmtree(dst)  # an --overwrite of a run that did train the text encoder
                    elif dst.is_file() and name == TOKEN_EMBEDDINGS:
                        dst.unlink()  # ... or its identifier's embedding
                    continue
                if dst.is_dir():
                    shutil.rmtree(dst)
                os.replace(src, dst)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        acc.print(f"report: {write_report(out, stats)}")  # after the move: it reads the adapter sizes from disk
    end_training(run.accelerator, run)
    acc.print(f"adapters written to {out}: " + ", ".join(f"{name}/" for name in run.trained()))
    if run.cfg.train.push_to_hub and acc.is_main_process:
        url = push(out, run.cfg.train.push_to_hub)
        acc.print(f"pushed to {url}")
    return out
