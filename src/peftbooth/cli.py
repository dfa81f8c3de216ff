"""`peftbooth` command line: parse -> call the library. Every command's flags come from dataclasses: `train`'s and
`class-images`' from the config sections (config/sections.py), `eval`'s from EvalArgs, the others' from
config/options.py; see config/flags.py for how a field becomes a flag."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import yaml

from .config.checks import MAX_RESOLUTION, RANGES, range_problem
from .config.dicts import SECTIONS, from_dict, to_dict
from .config.flags import add_option_flags, add_section_flags, given_options, options_from_args
from .config.options import DemoOptions, GenerateOptions, PushOptions, TinyModelOptions
from .config.sections import MODEL_REQUIRED, TrainConfig, UsageError
from .world import is_world_model


class Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one line (no usage dump) with exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """--config YAML (if any) overridden by the flags given on the command line."""
    cfg = TrainConfig()
    given = {dest for dest in vars(args) if "." in dest}  # flags on the command line (the rest are SUPPRESSed)
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config {path}: no such file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UsageError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from e
        cfg = from_dict(data, source=f"--config {path}")
        given |= {f"{section}.{key}" for section, keys in data.items() for key in keys}
    for dest, value in vars(args).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            setattr(getattr(cfg, section), name, value)
    # the base model's defaults (resolution, and the world's recipe) fill what was not given, as the preset does
    from .models.defaults import apply_model_defaults, describe, pending

    info, taken = apply_model_defaults(cfg, given)
    pending(describe(info, cfg, taken))  # printed by train's setup once the input passed its checks
    if cfg.train.low_memory:  # the preset fills only what was not given explicitly (flags, --config)
        from .training.memory import LOW_MEMORY, apply_preset

        apply_preset(cfg, LOW_MEMORY, given)
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# commands


def cmd_train(args) -> int:
    from .training.distributed import launch, world_size
    from .training.loop import train

    cfg = config_from_args(args)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg.resolved()), sort_keys=False), end="")
        return 0
    world = world_size(args)
    if world > 1 and "WORLD_SIZE" not in os.environ:  # not already a worker of torchrun / accelerate launch
        from .training.preflight import check_inputs

        # bad input is reported once, here, not by every process; a checkpoint is checked against the number of
        # processes about to start, not this launcher's one
        check_inputs(cfg.resolved(), world_size=world)
        from .models.loading import resolve_model

        resolve_model(cfg.model.model)  # 'tiny' is built once, here, not by N processes at the same time
        return launch(args, args.argv, Path(cfg.train.output_dir))
    train(cfg)
    return 0


def cmd_class_images(args) -> int:
    from .data.images import class_image_prompt
    from .training.prior import generate_class_images

    cfg = config_from_args(argparse.Namespace(config=None, **vars(args)))
    d, m = cfg.data, cfg.model
    if not m.model:
        raise UsageError(MODEL_REQUIRED)
    if not d.class_prompt:
        raise UsageError("--class-prompt is required, e.g. 'a photo of a dog'")
    if not d.class_data_dir:
        raise UsageError("--class-data-dir is required: where the class images go")
    # what a training run with the same flags would draw: class_image_prompt (below, before anything is written)
    # refuses an instance prompt without an identifier
    if d.class_prompt_from_captions and not (d.instance_data_dir and d.instance_prompt):
        raise UsageError("--class-prompt-from-captions needs --instance-data-dir and --instance-prompt: the photos "
                         "whose captions the class images are drawn from")
    ranges = [(d, "num_class_images"), (d, "sample_batch_size"), (d, "class_image_steps"), (cfg.train, "seed")]
    problems = [p for p in (range_problem("--" + name.replace("_", "-"), name, getattr(obj, name),
                                          *RANGES["data" if obj is d else "train"][name]) for obj, name in ranges) if p]
    if problems:
        raise UsageError("; ".join(problems))
    paths = generate_class_images(m.model, class_image_prompt(d), d.class_data_dir, d.num_class_images,
                                  d.sample_batch_size, d.class_image_steps, cfg.train.seed, m.revision, m.variant,
                                  vae=m.vae)
    print(f"{len(paths)} class images in {d.class_data_dir}")
    return 0


def parse_pairs(values: list[str], flag: str, number: bool) -> list[tuple[str | None, str | float]]:
    pairs = []
    for v in values:
        name, sep, rest = v.partition("=")
        if number:
            try:
                pairs.append((name, float(rest)))
            except ValueError:
                raise UsageError(f"{flag} {v}: expected NAME=WEIGHT, e.g. {flag} dog=0.7") from None
            if not sep or not name:
                raise UsageError(f"{flag} {v}: expected NAME=WEIGHT, e.g. {flag} dog=0.7")
        else:
            pairs.append((name, rest) if sep else (None, v))
    return pairs


def cmd_generate(args) -> int:
    from .inference.pipeline import AdapterPipeline, image_grid, save_images
    from .runs.rundir import RunDir, base_model_for, recorded_setting
    from .world.metrics import sampling_defaults

    given = given_options(GenerateOptions, args)
    args = options_from_args(GenerateOptions, args)
    adapters = parse_pairs(args.adapter, "--adapter", number=False)
    mix = parse_pairs(args.mix, "--mix", number=True)
    names = []
    for name, path in adapters:  # check every folder before the model is loaded
        RunDir(path).adapter_folders("--adapter")
        names.append(name or Path(path).resolve().name)
    if len(set(names)) != len(names):
        raise UsageError(f"--adapter: two adapters are named {max(names, key=names.count)!r}; use NAME=DIR")
    for name, _ in mix:
        if name not in names:
            raise UsageError(f"--mix {name}: no --adapter of that name; loaded: {', '.join(names) or 'none'}")
    problems = [p for p in (range_problem(flag, flag, value, low, high) for flag, value, low, high in [
        ("--num-images", args.num_images, 1, 64), ("--num-inference-steps", args.num_inference_steps, 1, 1000),
        ("--seed", args.seed, 0, 2**32 - 1),
        ("--guidance-scale", args.guidance_scale, 0.0, 100.0), ("--guidance-cutoff", args.guidance_cutoff, 0.0, 1.0)])
        if p]
    for flag, value in [("--height", args.height), ("--width", args.width)]:
        if value is not None and not (8 <= value <= MAX_RESOLUTION and value % 8 == 0):
            problems.append(f"{flag} must be a multiple of 8 from 8 to {MAX_RESOLUTION} (got {value})")
    if problems:
        raise UsageError("; ".join(problems))
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out}: is a file")
    runs = [("mix", dict(mix))] if mix else [(n, {n: 1.0}) for n in names] or [("base", {})]
    if args.include_base and runs[0][0] != "base":
        runs.insert(0, ("base", {}))
    # as export does: images already in the folder are only replaced when asked
    planned = ["grid.png"] + [f"{stem}_{s}.png" for stem, _ in runs for s in
                              [f"{i:02d}" for i in range(args.num_images)] + ["grid"]]
    existing = [name for name in planned if (out / name).exists()]
    if existing and not args.overwrite:
        more = f" and {len(existing) - 1} more this command writes" if len(existing) > 1 else ""
        raise UsageError(f"--output-dir {out}: already holds {existing[0]}{more}; pass --overwrite or choose "
                         "another folder")

    run_dirs = [path for _, path in adapters]
    model = base_model_for(args.model, run_dirs)
    if is_world_model(model):  # the world samples as its metrics do, where the flags are not given
        scale, cutoff = sampling_defaults(model)
        args.guidance_scale = args.guidance_scale if "guidance_scale" in given else scale
        args.guidance_cutoff = args.guidance_cutoff if "guidance_cutoff" in given else cutoff
        print(f"world model: guidance {args.guidance_scale:g} for the first {args.guidance_cutoff:.0%} of the steps")
    t5 = recorded_setting(run_dirs, "model", "t5", args.t5, True, "--t5 / --no-t5")
    length = recorded_setting(run_dirs, "model", "max_sequence_length", args.max_sequence_length, 77,
                              "--max-sequence-length")
    pipe = AdapterPipeline(model, args.revision, args.variant, vae=args.vae, t5=t5, max_sequence_length=length)
    for (_, path), name in zip(adapters, names):
        pipe.load_adapter(path, name)
    every = []
    for stem, weights in runs:
        pipe.set_adapters(weights)
        images = pipe.generate(args.prompt, args.num_images, args.seed, args.num_inference_steps, args.guidance_scale,
                               args.height, args.width, args.negative_prompt, args.guidance_cutoff)
        save_images(images, out, stem)
        every += images
    image_grid(every, cols=args.num_images).save(out / "grid.png")
    print(f"{len(every)} images and grid.png written to {out}")
    return 0


def cmd_push(args) -> int:
    from .runs.hub import files_to_upload, push, stage_repo

    args = options_from_args(PushOptions, args)

    from .runs.rundir import RunDir

    if not RunDir(args.run_dir).is_finished():
        raise UsageError(f"push: {args.run_dir} is not a finished run (no unet/adapter_model.safetensors)")
    if args.dry_run:
        print("\n".join(files_to_upload(args.run_dir)))
        return 0
    if args.output_dir:
        from .runs.formats.common import check_output

        out = Path(args.output_dir)
        check_output(out, overwrite=False, flag="--output-dir")
        files = stage_repo(args.run_dir, out)
        print(f"{len(files)} files laid out in {out} as {args.repo_id} would hold them (nothing uploaded)")
        return 0
    print(f"uploaded to {push(args.run_dir, args.repo_id, private=args.private)}")
    return 0


def cmd_tiny_model(args) -> int:
    from .models.tiny import build_tiny_model

    args = options_from_args(TinyModelOptions, args)

    path = Path(args.dir)
    if path.is_file() or (path.is_dir() and any(path.iterdir())):
        raise UsageError(f"tiny-model {path}: exists and is not empty; choose a new folder")
    if args.kind in ("sd3", "sd3.5"):
        from .models.tiny_sd3 import build_tiny_sd3_model

        build_tiny_sd3_model(path, shape=f"tiny-{args.kind}", seed=args.seed)
        print(f"tiny Stable Diffusion {args.kind[2:]} model (flow matching) written to {path}")
        return 0
    shape, prediction = {"sd1": ("tiny", args.prediction_type), "sd2-v": ("tiny-sd2", "v_prediction"),
                         "sdxl": ("tiny-sdxl", args.prediction_type)}[args.kind]
    build_tiny_model(path, prediction_type=prediction, seed=args.seed, shape=shape)
    print(f"tiny Stable Diffusion model ({args.kind}, {prediction}) written to {path}")
    return 0


def cmd_demo(args) -> int:
    from .demo import ADAPTERS, run_demo
    from .world.subjects import by_name

    o = options_from_args(DemoOptions, args)
    try:
        by_name(o.subject)
    except ValueError as e:
        raise UsageError(f"--subject: {e}") from None
    if o.max_train_steps is not None and o.max_train_steps < 1:
        raise UsageError(f"--steps must be >= 1 (got {o.max_train_steps})")
    adapters = o.adapters.split(",")
    if not set(adapters) <= set(ADAPTERS) or len(set(adapters)) != len(adapters):
        raise UsageError(f"--adapters {o.adapters!r}: give each of {', '.join(ADAPTERS)} at most once, comma-separated")
    run_demo(o.output_dir, steps=o.max_train_steps, subject=o.subject, adapters=tuple(adapters))
    return 0


# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="peftbooth", description="DreamBooth with PEFT adapters (LoRA, LoHa, LoKr)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("train", help="train DreamBooth adapters")
    p.add_argument("--config", help="YAML file with sections model, unet_adapter, text_encoder_adapter, data, train")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    from .training.distributed import add_launcher_flags

    add_launcher_flags(p)  # --num-processes, --nnodes, --node-rank, --master-addr, --master-port
    for section in SECTIONS:
        add_section_flags(p, section)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("class-images", help="generate class images for prior preservation (resumable)")
    add_section_flags(p, "model")
    add_section_flags(p, "data", ("class_prompt", "class_data_dir", "num_class_images", "sample_batch_size",
                                   "class_image_steps", "class_prompt_from_captions", "instance_data_dir",
                                   "instance_prompt"))
    add_section_flags(p, "train", ("seed",))
    p.set_defaults(func=cmd_class_images)

    p = sub.add_parser("generate", help="generate images with one or more trained adapters")
    add_option_flags(p, GenerateOptions)
    p.set_defaults(func=cmd_generate)

    from .runs.formats.commands import add_commands

    add_commands(sub)  # export, import, fuse
    from .evaluate.command import add_commands as add_eval_commands

    add_eval_commands(sub)  # eval
    from .ui import add_command as add_ui_command

    add_ui_command(sub)  # ui

    for name, options, func, help in [
        ("push", PushOptions, cmd_push, "upload a run's adapters, model card and samples to the Hugging Face Hub"),
        ("tiny-model", TinyModelOptions, cmd_tiny_model, "write a tiny random Stable Diffusion model folder (offline)"),
        ("demo", DemoOptions, cmd_demo, ("train an adapter on a subject of the world model's family and show "
                                          "what it learned (offline, CPU, about 90 s)")),
    ]:
        p = sub.add_parser(name, help=help)
        add_option_flags(p, options)
        p.set_defaults(func=func)
    return parser


def quiet_libraries() -> None:
    """Hide the libraries' own loading progress bars and chatter; our progress bars and errors stay."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    # Only the messages known to be noise for our users, each for its reason; any other warning is shown.
    # PEFT, loading an adapter folder whose base model is a local path or 'tiny' it cannot look up:
    warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
    # PEFT, saving a text-encoder adapter without the tokenizer's vocabulary (no embeddings are trained):
    warnings.filterwarnings("ignore", message="Could not find a config file.*")
    # diffusers' DPM-Solver++ passes a torch tensor to np.array (every class image and validation sample):
    warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword",
                            category=DeprecationWarning)
    # transformers 5 renamed a property that PEFT and accelerate still read while preparing a model:
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


_python_formatwarning = warnings.formatwarning


def format_warning(message, category, *rest, **kw) -> str:
    """Our warnings (skipped files, corrupt class images) as one readable line, without source excerpts; any
    other warning keeps Python's format, so a library's warning is not passed off as ours."""
    if category is UserWarning:
        return f"peftbooth: warning: {message}\n"
    return _python_formatwarning(message, category, *rest, **kw)


def translate_reference_args(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    from .config.reference_args import translate

    train = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
    train = train.choices["train"]
    known = {s for a in train._actions for s in a.option_strings}
    switches = {s for a in train._actions for s in a.option_strings if a.nargs == 0}
    return translate(argv, known, switches)


def main(argv: list[str] | None = None) -> int:
    from .training.checkpoint import CheckpointError
    from .training.signals import TrainingInterrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["train"]:
        try:  # the DreamBooth example scripts' spellings (--pretrained_model_name_or_path, ...), same meaning
            argv = ["train", *translate_reference_args(parser, argv[1:])]
        except UsageError as e:
            print(f"peftbooth train: error: {e}", file=sys.stderr)
            return 2
    try:
        args = parser.parse_args(argv)
        args.argv = argv
    except SystemExit as e:  # bad usage (code 2) or --help (0): return the code like every other outcome
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    quiet_libraries()
    warnings.formatwarning = format_warning
    try:
        return args.func(args)
    except UsageError as e:
        print(f"peftbooth {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FloatingPointError, CheckpointError) as e:
        print(f"peftbooth {args.command}: error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"peftbooth {args.command}: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
