"""Writing a finished run into its output folder: the adapter folders, config.yaml, README.md and the report.

Everything is written complete into a hidden staging folder first and moved into place, unet/ (the finished-run
marker) last, through runs/atomic.py. Each function takes what it writes: the trained adapters, the config and the
statistics, never the training run itself.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch
import yaml

from ..adapters.files import TrainedAdapters
from ..config.dicts import to_dict
from ..config.sections import TrainConfig
from ..runs.atomic import replace, staging_dir
from ..runs.hub import model_card, push
from ..runs.report import write_report
from ..runs.rundir import CONFIG_FILE, DENOISERS, MODEL_CARD, TEXT_ENCODERS, TOKEN_EMBEDDINGS


def replayable(cfg: TrainConfig) -> TrainConfig:
    """The config as saved in OUTPUT/config.yaml: one-off actions of this invocation (resume, overwrite, push)
    reset, so `train --config OUTPUT/config.yaml --output-dir NEW` trains the same thing again and nothing more."""
    train_args = dataclasses.replace(cfg.train, resume=None, resume_force=False, overwrite=False, push_to_hub=None)
    return dataclasses.replace(cfg, train=train_args)


def check_ranks_agree(accelerator, models: list[torch.nn.Module]) -> None:
    """Data-parallel processes must end with the same adapters (only rank 0's are saved): compare exactly."""
    acc = accelerator
    # one float64 checksum per adapter tensor: (P,) per process, gathered to (world * P,)
    sums = torch.stack([p.detach().double().sum() for m in models for p in m.parameters() if p.requires_grad])
    per_rank = acc.gather(sums.to(acc.device)).view(acc.num_processes, -1)
    if not bool((per_rank == per_rank[0]).all()):
        raise RuntimeError("data-parallel processes ended with different adapter weights; not saving")
    acc.print(f"adapter weights identical on all {acc.num_processes} processes")


def save(accelerator, out: Path, adapters: TrainedAdapters, cfg: TrainConfig, stats: dict, family: str) -> Path:
    """Write the adapter folders, config.yaml, README.md and the report into `out`.

    Everything is written complete into a hidden staging folder first, then moved into place one by one, the
    denoiser's folder (unet/ or transformer/: the finished-run marker) last: no file is ever half-written, though a crash between moves can leave the new
    config.yaml beside the previous adapter.
    """
    acc = accelerator
    acc.wait_for_everyone()
    if acc.num_processes > 1:
        check_ranks_agree(acc, list(adapters.models.values()))
    if acc.is_main_process:
        with staging_dir(out) as staging:
            adapters.save(staging)
            (staging / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(replayable(cfg)), sort_keys=False))
            (staging / MODEL_CARD).write_text(model_card(cfg, stats, out, family))
            # config.yaml and README.md first, the denoiser's folder (the finished-run marker) last
            for name in [CONFIG_FILE, MODEL_CARD, *TEXT_ENCODERS, TOKEN_EMBEDDINGS, *DENOISERS]:
                src, dst = staging / name, out / name
                if src.exists():
                    replace(src, dst)
                elif name in (*TEXT_ENCODERS, *DENOISERS) and dst.is_dir():
                    shutil.rmtree(dst)  # an --overwrite of a run that did train the text encoder, or another family
                elif name == TOKEN_EMBEDDINGS and dst.is_file():
                    dst.unlink()  # ... or its identifier's embedding
        acc.print(f"report: {write_report(out, stats)}")  # after the move: it reads the adapter sizes from disk
    return out


def publish(accelerator, out: Path, parts: list[str], push_to_hub: str | None) -> None:
    """Say where the adapters are, and upload the run when --push-to-hub asks (main process only)."""
    accelerator.print(f"adapters written to {out}: " + ", ".join(f"{name}/" for name in parts))
    if push_to_hub and accelerator.is_main_process:
        url = push(out, push_to_hub)
        accelerator.print(f"pushed to {url}")
