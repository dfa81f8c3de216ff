"""The `eval` subcommand: parse -> the protocol (:mod:`.runner`), or the world's evaluator for a run on the world
model (:mod:`peftbooth.world.metrics`) -> print the table, refresh the run's report."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..config import UsageError
from ..rundir import EVAL_METRICS_FILE, RunDir
from ..world import is_world_model
from .protocol import CLIP_T_PROMPTS, DEFAULT_CLIP, DEFAULT_DINO
from .runner import EvalArgs, evaluate_run, format_table


def cmd_eval(args) -> int:
    if is_world_model(base_model_of_run(args.run_dir, args.model)):
        return cmd_eval_world(args)
    names = {f.name for f in dataclasses.fields(EvalArgs)}
    # flags left unset keep EvalArgs' defaults (the paper's settings)
    report = evaluate_run(EvalArgs(**{k: v for k, v in vars(args).items() if k in names and v is not None}))
    out = Path(args.output_dir) if args.output_dir else RunDir(args.run_dir).eval_dir
    print(format_table(report))
    note = "" if report["protocol_complete"] else f" (first {report['num_prompts']} prompts only: not the protocol)"
    print(f"metrics written to {out / EVAL_METRICS_FILE}{note}")
    from ..report import has_training_stats, write_report

    if has_training_stats(args.run_dir) and not args.output_dir:
        print(f"report updated: {write_report(args.run_dir)}")
    return 0


def base_model_of_run(run_dir: str, model: str | None) -> str | None:
    """--model, else the base model in RUN_DIR/config.yaml (None when neither names one)."""
    return model or RunDir(run_dir).setting("model", "model", strict=True)


def cmd_eval_world(args) -> int:
    """A run on the world model: the world's evaluator measures what DINO and CLIP measure for real photos."""
    from ..world.metrics import WORLD_METRICS_FILE, WorldEvalSettings, evaluate_world_run, format_world_table

    run = RunDir(args.run_dir)
    run.adapter_folders("RUN_DIR")
    given = {k: getattr(args, k) for k in ("num_images", "seed", "steps", "guidance_scale")
             if getattr(args, k) is not None}
    settings = WorldEvalSettings(**given)  # unset flags: the world's own defaults
    for flag, value in [("--num-images", settings.num_images), ("--steps", settings.steps)]:
        if value < 1:
            raise UsageError(f"{flag} must be >= 1 (got {value})")
    out = Path(args.output_dir) if args.output_dir else run.eval_dir
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out}: is a file")
    print("base model: world (the world's evaluator stands in for DINO and CLIP; see docs/world.md)")
    report = evaluate_world_run(run.path, run.read_config(strict=True), out, settings, args.baseline,
                                run.adapter_fingerprint())
    print(format_world_table(report["results"]))
    print(f"metrics written to {out / WORLD_METRICS_FILE}")
    from ..report import has_training_stats, write_report

    if has_training_stats(args.run_dir) and not args.output_dir:
        print(f"report updated: {write_report(args.run_dir)}")
    return 0


def add_commands(subparsers) -> None:
    """Add the `eval` subcommand to the main CLI's subparsers."""
    p = subparsers.add_parser("eval", help="DreamBooth protocol: DINO, CLIP-I, CLIP-T of a run (and of the base model)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by 'peftbooth train'")
    p.add_argument("--instance-data-dir", default=None,
                   help="the real photos of the subject (default: the run's --instance-data-dir)")
    p.add_argument("--class-name", default=None,
                   help="class noun of the subject, e.g. dog (required, except for a run on the world model)")
    p.add_argument("--live", action="store_true", help="live-subject prompt list (animals, people) instead of objects")
    p.add_argument("--identifier", default=None,
                   help="unique token (default: the word before --class-name in the run's instance prompt)")
    p.add_argument("--model", default=None, help="base model (default: the one in RUN_DIR/config.yaml)")
    p.add_argument("--num-images", type=int, default=None,
                   help="images per prompt (default: 4, the paper's; world runs: 8)")
    p.add_argument("--seed", type=int, default=0,
                   help="prompt j is sampled from seed SEED + j (adapter and base alike)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps, DPM-Solver++ (default: 25; world: 20)")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: 7.5; world runs: 5.0")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the training resolution)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate the base model without the adapter, same seeds (--no-baseline skips it)")
    p.add_argument("--clip-model", default=DEFAULT_CLIP, help="CLIP for CLIP-I and CLIP-T: hub id or local folder")
    p.add_argument("--dino-model", default=DEFAULT_DINO, help="DINO ViT for the DINO score: hub id or local folder")
    p.add_argument("--clip-t-prompt", choices=CLIP_T_PROMPTS, default="class",
                   help="text CLIP-T compares with: 'class' = prompt without the identifier (default), 'full'")
    p.add_argument("--max-prompts", type=int, default=None, help="only the first K prompts (a quick look)")
    p.add_argument("--output-dir", default=None, help="where metrics.json and the images go (default: RUN_DIR/eval)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.set_defaults(func=cmd_eval)

