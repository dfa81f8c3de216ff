"""The ``export``, ``import`` and ``fuse`` commands: flags from their option dataclasses, then the library."""

from __future__ import annotations

from ...config.flags import add_option_flags, options_from_args
from ...config.options import ExportOptions, FuseOptions, ImportOptions
from ...inference.fuse import fuse_run
from ..rundir import RunDir, base_model_for
from . import export_run, import_kohya


def cmd_export(args) -> int:
    o = options_from_args(ExportOptions, args)
    if o.format == "kohya":  # the one format whose contents depend on the base model (block names, version)
        if RunDir(o.run_dir).recorded_base_model()[0]:
            base_model_for(None, [o.run_dir], "RUN_DIR")  # says which one
    path = export_run(o.run_dir, o.format, o.output, overwrite=o.overwrite)
    print(f"{o.format} export written to {path}")
    return 0


def cmd_import(args) -> int:
    o = options_from_args(ImportOptions, args)
    path = import_kohya(o.file, o.output_dir, model=o.model, overwrite=o.overwrite)
    print(f"PEFT adapters written to {path}")
    return 0


def cmd_fuse(args) -> int:
    o = options_from_args(FuseOptions, args)
    path = fuse_run(o.model, o.run_dir, o.output_dir, scale=o.scale, overwrite=o.overwrite, vae=o.vae)
    print(f"fused Stable Diffusion pipeline written to {path}")
    return 0


def add_commands(subparsers) -> None:
    """Add the `export`, `import` and `fuse` subcommands to the main CLI's subparsers."""
    for name, options, func, help in [
        ("export", ExportOptions, cmd_export, "export a run's adapters for diffusers, A1111/ComfyUI/Forge or PEFT"),
        ("import", ImportOptions, cmd_import, "convert a kohya / LyCORIS .safetensors into PEFT adapter folders"),
        ("fuse", FuseOptions, cmd_fuse, "merge a run's adapters into the base model and save a full pipeline"),
    ]:
        p = subparsers.add_parser(name, help=help)
        add_option_flags(p, options)
        p.set_defaults(func=func)

