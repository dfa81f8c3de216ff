"""Fuse: merge a run's adapters into the base weights and save a plain diffusers pipeline folder.

The fused folder loads anywhere a Stable Diffusion (or, for an SDXL run, SDXL) checkpoint loads (no PEFT needed)
and runs at base-model speed.
`fuse_adapters` / `unfuse_adapters` merge in place and undo it, for comparing fused and unfused outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapters.strength import set_strength
from ..adapters.token_embedding import IdentifierRows
from ..config.sections import UsageError
from ..runs.formats.common import atomic_dir, check_output, read_run
from ..runs.rundir import RunDir, base_model_for


def fuse_adapters(pipe, run_dir: str | Path, scale: float = 1.0) -> dict:
    """Merge the run's adapters into `pipe.unet` / `pipe.text_encoder` (/ `pipe.text_encoder_2`, SDXL) in place, at
    `scale` x their strength.

    Returns the PeftModel handles ('unet', 'text_encoder', 'text_encoder_2'), which `unfuse_adapters` uses to
    subtract the updates again (merging keeps the adapter weights for exactly that).
    """
    from peft import PeftModel

    run = read_run(run_dir)  # checks every adapter before the pipeline is touched
    if "text_encoder_2" in run.adapters and getattr(pipe, "text_encoder_2", None) is None:
        raise UsageError(f"RUN_DIR {run_dir}: has a text_encoder_2 adapter (SDXL) but the base model is "
                         f"{type(pipe).__name__}, without a second text encoder; pass an SDXL base model as --model")
    handles = {}
    for part in run.adapters:
        folder = Path(run_dir) / part
        try:
            handles[part] = PeftModel.from_pretrained(getattr(pipe, part), folder)
        except (RuntimeError, ValueError, KeyError) as e:  # shapes of another base model
            first = str(e).strip().splitlines()[0]
            raise UsageError(f"RUN_DIR {run_dir}: the {part} adapter does not fit this base model "
                             f"({first[:300]})") from e
        handles[part].eval()
        set_strength(handles[part], {"default": scale})  # scale x the trained strength
        handles[part].merge_adapter(safe_merge=True)  # safe_merge: refuse NaN/inf weights instead of saving them
    return handles


def unfuse_adapters(handles: dict) -> None:
    """Subtract the merged updates again and remove the adapter layers: the base weights are back (up to float
    rounding of W + dW - dW)."""
    for peft_model in handles.values():
        peft_model.unmerge_adapter()
        peft_model.unload()


def vae_of(run, vae: str | None) -> str | None:
    """--vae if given, else the replacement VAE the run trained with (config.yaml), else None (the base model's)."""
    return vae or run.setting("model", "vae")


def fuse_token_embeddings(pipe, run_dir: str | Path, scale: float) -> None:
    """Write a run's trained identifier rows (--train-token-embedding) into the pipeline's embedding tables, at
    `scale` between the pretrained row (0) and the trained one (1), as generation does."""
    token_file = RunDir(run_dir).token_embeddings_file
    if not token_file.is_file():
        return
    rows = IdentifierRows.of_pipeline(pipe)
    rows.add("run", *rows.check(token_file, flag="RUN_DIR"))
    rows.apply({"run": scale})


def fuse_run(model: str | None, run_dir: str | Path, output_dir: str | Path, scale: float = 1.0,
             overwrite: bool = False, vae: str | None = None) -> Path:
    """Write base model + run adapters (at `scale`) as a full StableDiffusion(XL)Pipeline folder (safetensors).

    `model` None takes the base model the run was trained on (its config.yaml); `vae` None takes the replacement
    VAE the run trained with (`--vae`), if it had one, so the fused folder decodes as the run's samples did.
    """
    from ..models.loading import check_vae_arg, load_pipeline
    from ..precision import for_fuse

    if not (isinstance(scale, (int, float)) and torch.isfinite(torch.tensor(float(scale)))):
        raise UsageError(f"--scale must be a finite number (got {scale!r})")
    output = Path(output_dir)
    check_output(output, overwrite, "--output-dir")
    run = read_run(run_dir)
    model, vae = base_model_for(model, [run_dir], "RUN_DIR"), vae_of(run, vae)
    check_vae_arg(vae)
    policy = for_fuse()  # fp32 on the CPU: the merge adds no rounding of its own
    pipe = load_pipeline(model, vae=vae, torch_dtype=policy.compute).to(policy.device)
    fuse_token_embeddings(pipe, run_dir, scale)  # checked (and written) before the merge, the heavier step
    handles = fuse_adapters(pipe, run_dir, scale)
    for peft_model in handles.values():
        peft_model.unload()  # the layers are merged: dropping the wrappers keeps the fused weights
    with atomic_dir(output, overwrite, "--output-dir") as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "README.md").write_text(
            f"# peftbooth fused model\n\nBase model `{model}`{f' with the VAE `{vae}`' if vae else ''} and the adapters "
            f"of `{Path(run_dir).resolve()}` merged in at scale {scale:g}. A plain diffusers folder: "
            f"`{type(pipe).__name__}.from_pretrained(this_folder)` or `peftbooth generate --model this_folder`.\n"
        )
    return output
