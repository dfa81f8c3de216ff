"""The `eval` subcommand: parse -> the protocol (:mod:`.runner`), or the world's evaluator for a run on the world
model (:mod:`peftbooth.world.metrics`) -> print the table, refresh the run's report."""

from __future__ import annotations

from pathlib import Path

from ..config.flags import add_option_flags, given_options, options_from_args
from ..config.sections import UsageError
from ..runs.rundir import EVAL_METRICS_FILE, RunDir
from ..world import is_world_model
from .runner import EvalArgs, check_guidance_cutoff, evaluate_run, format_table


def cmd_eval(args) -> int:
    if is_world_model(base_model_of_run(args.run_dir, getattr(args, "model", None))):
        return cmd_eval_world(args)
    a = options_from_args(EvalArgs, args)  # flags left unset keep EvalArgs' defaults (the paper's settings)
    report = evaluate_run(a)
    out = Path(a.output_dir) if a.output_dir else RunDir(a.run_dir).eval_dir
    print(format_table(report))
    note = "" if report["protocol_complete"] else f" (first {report['num_prompts']} prompts only: not the protocol)"
    print(f"metrics written to {out / EVAL_METRICS_FILE}{note}")
    refresh_report(a.run_dir, a.output_dir)
    return 0


def refresh_report(run_dir: str, output_dir: str | None) -> None:
    """The run's report.html shows RUN/eval's metrics: rebuilt when they were written there."""
    from ..runs.report import has_training_stats, write_report

    if has_training_stats(run_dir) and not output_dir:
        print(f"report updated: {write_report(run_dir)}")


def base_model_of_run(run_dir: str, model: str | None) -> str | None:
    """--model, else the base model in RUN_DIR/config.yaml (None when neither names one)."""
    return model or RunDir(run_dir).setting("model", "model", strict=True)


# EvalArgs field -> WorldEvalSettings field: the settings a world run takes from the command line
WORLD_SETTINGS = {"num_images": "num_images", "seed": "seed", "num_inference_steps": "steps",
                  "guidance_scale": "guidance_scale", "guidance_cutoff": "guidance_cutoff", "world_subject": "subject"}


def cmd_eval_world(args) -> int:
    """A run on the world model: the world's evaluator measures what DINO and CLIP measure for real photos."""
    from ..runs.rundir import WORLD_METRICS_FILE
    from ..world.metrics import WorldEvalSettings, evaluate_world_run, format_world_table

    a, given = options_from_args(EvalArgs, args), given_options(EvalArgs, args)
    run = RunDir(a.run_dir)
    run.adapter_folders("RUN_DIR")
    settings = WorldEvalSettings(**{w: getattr(a, k) for k, w in WORLD_SETTINGS.items() if k in given})
    for flag, value in [("--num-images", settings.num_images), ("--num-inference-steps", settings.steps)]:
        if value < 1:
            raise UsageError(f"{flag} must be >= 1 (got {value})")
    check_guidance_cutoff(settings.guidance_cutoff)
    out = Path(a.output_dir) if a.output_dir else run.eval_dir
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out}: is a file")
    print("base model: world (the world's evaluator stands in for DINO and CLIP; see docs/world.md)")
    report = evaluate_world_run(run.path, run.read_config(strict=True), out, settings, a.baseline,
                                run.adapter_fingerprint())
    print(format_world_table(report["results"]))
    print(f"metrics written to {out / WORLD_METRICS_FILE}")
    refresh_report(a.run_dir, a.output_dir)
    return 0


def add_commands(subparsers) -> None:
    """Add the `eval` subcommand to the main CLI's subparsers: one flag per EvalArgs field."""
    p = subparsers.add_parser("eval", help="DreamBooth protocol: DINO, CLIP-I, CLIP-T of a run (and of the base model)")
    add_option_flags(p, EvalArgs)
    p.set_defaults(func=cmd_eval)
