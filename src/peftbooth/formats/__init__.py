"""Adapters that load everywhere: export a run, import a kohya / LyCORIS file, fuse into the base model.

* ``export_run(run_dir, fmt, output)``: ``diffusers`` (one pytorch_lora_weights.safetensors for
  ``StableDiffusion(XL)Pipeline.load_lora_weights``; LoRA only), ``kohya`` (one LyCORIS-style .safetensors for
  A1111, Forge and ComfyUI; LoRA, LoHa, LoKr) or ``peft`` (the adapter folders as trained).
* ``import_kohya(file, output_dir, model)``: a kohya / LyCORIS file -> PEFT adapter folders (unet/, text_encoder/,
  and text_encoder_2/ for SDXL) that ``peftbooth generate --adapter`` and ``PeftModel.from_pretrained`` load.
* ``fuse_run(model, run_dir, output_dir, scale)`` (in :mod:`peftbooth.fuse`): a full diffusers pipeline folder.

SD 1.x / 2.x and SDXL runs and files are handled alike; SDXL adds the second text encoder (text_encoder_2) and,
in kohya files, its own module names (see :mod:`.kohya`).

Every output is written beside its destination and renamed into place; only safetensors files are ever read.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..config import UsageError
from .common import (
    ADAPTER_WEIGHTS,
    PICKLE_SUFFIXES,
    atomic_dir,
    atomic_file,
    check_output,
    load_safetensors,
    read_run,
    save_safetensors,
)

FORMATS = ("diffusers", "kohya", "peft")


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
    if fmt == "peft":
        check_output(output, overwrite)
        with atomic_dir(output, overwrite) as tmp:
            for part in run.adapters:
                # pickles beside the safetensors weights are left behind: nothing we write needs unpickling
                shutil.copytree(run.path / part, tmp / part,
                                ignore=lambda _, names: [n for n in names if Path(n).suffix in PICKLE_SUFFIXES])
            for name in ("config.yaml", "README.md"):
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
    an SD 1.x / 2.x model, or the reverse, is refused naming both. Nothing is downloaded.
    """
    from .kohya import kohya_to_peft

    output = Path(output_dir)
    check_output(output, overwrite)
    tensors, metadata = load_safetensors(file, "FILE")
    parts = kohya_to_peft(tensors, metadata, model, where=f"FILE {file}")
    with atomic_dir(output, overwrite) as tmp:
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


# ---------------------------------------------------------------------------------------------------------------
# command line


def cmd_export(args) -> int:
    if args.format == "kohya":  # the one format whose contents depend on the base model (block names, version)
        from ..rundir import RunDir, base_model_for

        if RunDir(args.run_dir).recorded_base_model()[0]:
            base_model_for(None, [args.run_dir], "RUN_DIR")  # says which one
    path = export_run(args.run_dir, args.format, args.output, overwrite=args.overwrite)
    print(f"{args.format} export written to {path}")
    return 0


def cmd_import(args) -> int:
    path = import_kohya(args.file, args.output, model=args.model, overwrite=args.overwrite)
    print(f"PEFT adapters written to {path}")
    return 0


def cmd_fuse(args) -> int:
    from ..fuse import fuse_run

    path = fuse_run(args.model, args.run_dir, args.output, scale=args.scale, overwrite=args.overwrite, vae=args.vae)
    print(f"fused Stable Diffusion pipeline written to {path}")
    return 0


def add_commands(subparsers) -> None:
    """Add the `export`, `import` and `fuse` subcommands to the main CLI's subparsers."""
    overwrite_help = "replace an existing output"

    p = subparsers.add_parser("export", help="export a run's adapters for diffusers, A1111/ComfyUI/Forge or PEFT")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by 'peftbooth train'")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="diffusers: pytorch_lora_weights.safetensors for load_lora_weights (LoRA only); "
                        "kohya: one LyCORIS-style .safetensors (LoRA, LoHa, LoKr); peft: the adapter folders")
    p.add_argument("--output", required=True, metavar="PATH",
                   help="a .safetensors file, or a folder to write it into (peft: the output folder)")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("import", help="convert a kohya / LyCORIS .safetensors into PEFT adapter folders")
    p.add_argument("file", metavar="FILE", help="kohya / LyCORIS .safetensors (LoRA, LoHa, LoKr)")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="folder for unet/, text_encoder/ and (SDXL) text_encoder_2/")
    p.add_argument("--model", default=None,
                   help="base model the file is for (diffusers folder, hub id or 'tiny'); default: the published "
                        "SD 1.x / 2.x / SDXL layout, picked from the file")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.set_defaults(func=cmd_import)

    p = subparsers.add_parser("fuse", help="merge a run's adapters into the base model and save a full pipeline")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by 'peftbooth train'")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the fused diffusers pipeline")
    p.add_argument("--model", default=None, help="base model (default: the one in RUN_DIR/config.yaml)")
    p.add_argument("--vae", default=None, help="VAE for the fused folder (hub id or folder); default: the run's "
                   "--vae from RUN_DIR/config.yaml, else the base model's")
    p.add_argument("--scale", type=float, default=1.0, help="adapter strength merged in (1.0 = as trained)")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.set_defaults(func=cmd_fuse)


__all__ = ["FORMATS", "add_commands", "export_run", "import_kohya", "load_safetensors"]
