"""Adapters that load everywhere: export a run, import a kohya / LyCORIS file, fuse into the base model.

* ``export_run(run_dir, fmt, output)``: ``diffusers`` (one pytorch_lora_weights.safetensors for
  ``StableDiffusion(XL|3)Pipeline.load_lora_weights``; LoRA only), ``kohya`` (one LyCORIS-style .safetensors for
  A1111, Forge and ComfyUI; LoRA, LoHa, LoKr) or ``peft`` (the adapter folders as trained).
* ``import_kohya(file, output_dir, model)``: a kohya / LyCORIS file -> PEFT adapter folders (unet/, text_encoder/,
  and text_encoder_2/ for SDXL) that ``peftbooth generate --adapter`` and ``PeftModel.from_pretrained`` load.
* ``fuse_run(model, run_dir, output_dir, scale)`` (in :mod:`peftbooth.inference.fuse`): a full diffusers pipeline
  folder.

The ``export``, ``import`` and ``fuse`` commands are :mod:`.commands`.

SD 1.x / 2.x and SDXL runs and files are handled alike; SDXL adds the second text encoder (text_encoder_2) and,
in kohya files, its own module names (see :mod:`.kohya_names`). An SD3 / SD 3.5 run (a transformer/ adapter) exports
as diffusers (``StableDiffusion3Pipeline.load_lora_weights``) or as the sd-scripts / ComfyUI single file with the
MMDiT's fused qkv layers, and such a file imports back into transformer/ and text_encoder*/ folders (needs --model);
see :mod:`.sd3` for what is exact and what is refused (LoHa / LoKr on q / k / v).

Every output is written beside its destination and renamed into place; only safetensors files are ever read.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ...config.options import EXPORT_FORMATS
from ...config.sections import UsageError
from ..rundir import ADAPTER_WEIGHTS, PICKLE_SUFFIXES, RunDir
from .common import atomic_dir, atomic_file, check_output, load_safetensors, read_run, save_safetensors

FORMATS = EXPORT_FORMATS


def output_file(output: Path, default_name: str) -> Path:
    """An --output ending in .safetensors is the file itself; anything else is a folder to put `default_name` in."""
    if output.suffix.lower() in PICKLE_SUFFIXES:
        raise UsageError(f"--output {output}: exports are written as .safetensors only, never as pickles")
    if output.suffix.lower() == ".safetensors":
        return output
    if output.is_file():
        raise UsageError(f"--output {output}: is a file; give a .safetensors path or a folder")
    return output / default_name


def export_run(run_dir: str | Path, fmt: str, output: str | Path, overwrite: bool = False) -> Path:
    """Export a run folder's adapters as `fmt` to `output`; returns the file (diffusers, kohya) or folder (peft)."""
    from .diffusers_format import WEIGHT_NAME, diffusers_file
    from .kohya import kohya_file

    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    run = read_run(run_dir)  # every adapter is read and checked before anything is written
    output = Path(output)
    token_file = RunDir(run_dir).token_embeddings_file
    if fmt != "peft" and token_file.is_file():
        raise UsageError(f"RUN_DIR {run_dir}: trained its identifier's embedding ({token_file.name}), which the "
                         f"{fmt} format does not carry; export --format peft, or fuse the run into the base model")
    if fmt == "peft":
        check_output(output, overwrite)
        with atomic_dir(output, overwrite) as tmp:
            for part in run.adapters:
                # pickles beside the safetensors weights are left behind: nothing we write needs unpickling
                shutil.copytree(run.path / part, tmp / part,
                                ignore=lambda _, names: [n for n in names if Path(n).suffix in PICKLE_SUFFIXES])
            for name in ("config.yaml", "README.md", token_file.name):
                if (run.path / name).is_file():
                    shutil.copy2(run.path / name, tmp / name)
        return output
    if fmt == "diffusers":
        target = output_file(output, WEIGHT_NAME)
        check_output(target, overwrite)
        tensors, header = diffusers_file(run)
    else:
        target = output_file(output, f"{run.name}.safetensors")
        check_output(target, overwrite)
        tensors, header = kohya_file(run, target.stem)
    with atomic_file(target, overwrite) as tmp:
        save_safetensors(tensors, tmp, header)
    return target


def import_kohya(file: str | Path, output_dir: str | Path, model: str | None = None, overwrite: bool = False) -> Path:
    """Convert a kohya / LyCORIS .safetensors (LoRA, LoHa, LoKr; conv layers included) into PEFT adapter folders.

    Module names and shapes are checked against `model` (a diffusers folder, hub id or 'tiny'); without it, against
    the published SD 1.x, SD 2.x or SDXL configs (picked from the file's keys, header or shapes). An SDXL file given
    an SD 1.x / 2.x model, or the reverse, is refused naming both. An SD3 file (MMDiT names) needs `model` and gives
    transformer/ (fused qkv split into to_q / to_k / to_v, see :mod:`.sd3`). Nothing is downloaded.
    """
    from .kohya import kohya_to_peft

    output = Path(output_dir)
    check_output(output, overwrite, "--output-dir")
    tensors, metadata = load_safetensors(file, "FILE")
    parts = kohya_to_peft(tensors, metadata, model, where=f"FILE {file}")
    with atomic_dir(output, overwrite, "--output-dir") as tmp:
        for part, (config, state) in parts.items():
            config.base_model_name_or_path = model
            (tmp / part).mkdir()
            config.save_pretrained(str(tmp / part))
            save_safetensors(state, tmp / part / ADAPTER_WEIGHTS, {"format": "pt"})
        (tmp / "README.md").write_text(
            f"# peftbooth adapters imported from `{Path(file).name}`\n\n"
            f"PEFT adapter folders ({', '.join(p + '/' for p in parts)}) converted from a kohya / LyCORIS file"
            + (f" for base model `{model}`" if model else "") + ". Generate with "
            f"`peftbooth generate --model {model or 'MODEL'} --adapter {output} --prompt ...`.\n"
        )
    return output
