"""Every input of a training run checked before anything is written: `check_inputs` reads the config, the
output folder, the photos and the checkpoint to resume, and raises UsageError naming the flag. The UI's form
runs the same checks (ui/schema.py), so a run it starts does not fail on them later.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config.checks import validate
from ..config.sections import TrainConfig, UsageError
from ..data.images import list_images, load_captions, load_image, load_masks, mask_path
from ..models.loading import check_vae_arg
from ..precision import check_training, default_device
from ..runs.hub import check_repo_id, hub_token
from .checkpoint import check_compatible, data_fingerprint, list_checkpoints, resolve_resume
from .distributed import check_engine

RUN_MARKER = Path("unet") / "adapter_model.safetensors"  # a folder holding this is a finished run


def check_inputs(cfg: TrainConfig,
                 world_size: int | None = None) -> tuple[list, list[str], str, Path | None, list | None]:
    """Validate config, output folder, photos and resume; return (images, prompts, fingerprint, checkpoint,
    masks): masks are the photos' loss masks with --masked-loss, else None. `world_size`: the processes the
    launcher is about to start (None: this process's own WORLD_SIZE).

    Writes nothing.
    """
    validate(cfg)
    check_engine()  # FSDP / DeepSpeed from `accelerate launch`: refused before anything is loaded
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out}: is a file")
    if (out / RUN_MARKER).exists() and not cfg.train.overwrite:
        raise UsageError(f"--output-dir {out}: already holds a finished run; pass --overwrite or choose another folder")
    # complete checkpoints only: a run killed while writing its first one leaves just a .tmp- folder, which
    # --resume latest cannot use and a fresh start replaces
    if list_checkpoints(out) and not cfg.train.resume and not cfg.train.overwrite:
        raise UsageError(f"--output-dir {out}: holds checkpoints of an unfinished run; pass --resume latest to "
                         "continue it, or --overwrite to start over (its checkpoints are deleted)")
    check_vae_arg(cfg.model.vae)
    d = cfg.data
    paths = list_images(d.instance_data_dir, "--instance-data-dir")
    if not paths:
        raise UsageError(f"--instance-data-dir {d.instance_data_dir}: no images (jpg, jpeg, png, webp) found")
    images = [load_image(p, max_side=2 * d.resolution) for p in paths]
    for p, img in zip(paths, images):
        if min(img.size) < 8:
            raise UsageError(f"{p}: image is only {img.size[0]}x{img.size[1]} px; use photos of at least 8 px a side")
    masks = load_masks(paths, images) if d.masked_loss else None
    # a resume must see the same masks too: they change what is learned as much as the photos do
    fingerprint = data_fingerprint(paths + [mask_path(p) for p in paths] if masks else paths)
    checkpoint = None
    if cfg.train.resume:
        checkpoint = resolve_resume(cfg.train.resume, out)
        check_compatible(checkpoint, cfg, fingerprint, cfg.train.resume_force, world_size)
    if d.with_prior_preservation and d.class_data_dir and Path(d.class_data_dir).is_file():
        raise UsageError(f"--class-data-dir {d.class_data_dir}: is a file, not a folder")
    check_training(cfg.train.mixed_precision)
    if cfg.train.push_to_hub:  # refuse now, not after an hour of training
        check_repo_id(cfg.train.push_to_hub)
        hub_token()
    if cfg.train.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UsageError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes") from None
    return images, load_captions(paths, d.instance_prompt), fingerprint, checkpoint, masks


def cpu_processes_from_launcher() -> None:
    """Plain `torchrun --nproc_per_node N` on a machine without a GPU: Accelerate joins the processes only when
    told to use the CPU (what --num-processes sets), else each believes it is alone and they fight over the output
    folder. Set it before Accelerate's state is first built (check_inputs builds it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and default_device().type == "cpu":
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
