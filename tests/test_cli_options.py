"""Every subcommand's flags come from a dataclass, under one naming scheme; old spellings still parse the same."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from peftbooth.cli import build_parser
from peftbooth.config import options
from peftbooth.config.flags import given_options, options_from_args
from peftbooth.evaluate.runner import EvalArgs

OPTION_CLASSES = [options.GenerateOptions, options.ExportOptions, options.ImportOptions, options.FuseOptions,
                  options.PushOptions, options.TinyModelOptions, options.DemoOptions, options.UiOptions, EvalArgs]


def subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def flags_of(name: str) -> set[str]:
    return {s for a in subparser(name)._actions for s in a.option_strings}


@pytest.mark.parametrize("cls", OPTION_CLASSES, ids=lambda c: c.__name__)
def test_every_option_has_help(cls):
    assert all(f.metadata.get("help") for f in dataclasses.fields(cls))


@pytest.mark.parametrize("command", ["generate", "eval", "import", "fuse", "push", "demo", "ui", "train"])
def test_folders_written_are_output_dir(command):
    flags = flags_of(command)
    assert "--output-dir" in flags or command == "ui"
    assert "--steps" not in flags or command in ("generate", "eval", "demo")  # only as an old spelling


# (command, argv before, old spelling argv, new spelling argv, field)
OLD_SPELLINGS = [
    ("generate", ["--prompt", "p", "--output-dir", "o"], ["--steps", "3"], ["--num-inference-steps", "3"],
     "num_inference_steps"),
    ("eval", ["RUN"], ["--steps", "3"], ["--num-inference-steps", "3"], "num_inference_steps"),
    ("import", ["FILE"], ["--output", "d"], ["--output-dir", "d"], "output_dir"),
    ("fuse", ["RUN"], ["--output", "d"], ["--output-dir", "d"], "output_dir"),
    ("push", ["RUN", "user/name"], ["--output", "d"], ["--output-dir", "d"], "output_dir"),
    ("demo", [], ["--steps", "3"], ["--max-train-steps", "3"], "max_train_steps"),
]


@pytest.mark.parametrize("command,before,old,new,field", OLD_SPELLINGS, ids=[c[0] for c in OLD_SPELLINGS])
def test_old_spellings_parse_as_the_new_ones_and_say_so(command, before, old, new, field):
    parser = build_parser()
    a, b = parser.parse_args([command, *before, *old]), parser.parse_args([command, *before, *new])
    assert getattr(a, field) == getattr(b, field) and str(getattr(a, field)) in ("3", "d")
    assert "old spelling " + old[0] in " ".join(subparser(command).format_help().split())


def test_unset_flags_keep_the_dataclass_defaults_and_are_not_given():
    args = build_parser().parse_args(["eval", "RUN", "--num-images", "2"])
    assert given_options(EvalArgs, args) == {"run_dir", "num_images"}
    a = options_from_args(EvalArgs, args)
    assert a == EvalArgs(run_dir="RUN", num_images=2)
    g = options_from_args(options.GenerateOptions, build_parser().parse_args(
        ["generate", "--prompt", "p", "--output-dir", "o", "--adapter", "a", "--adapter", "n=b", "--mix", "a=1"]))
    assert (g.adapter, g.mix, g.num_inference_steps, g.overwrite) == (["a", "n=b"], ["a=1"], 25, False)


def test_required_options_are_required(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["fuse", "RUN"])
    assert e.value.code == 2 and "--output-dir" in capsys.readouterr().err
