"""Dataclass fields -> argparse flags: how every subcommand gets its options.

One field, one flag: ``output_dir`` -> ``--output-dir``, its type from the annotation, its help from the field's
metadata (see :func:`peftbooth.config.sections.option`). `train`'s sections (dicts.SECTIONS) use
:func:`add_section_flags`, whose flags land in a TrainConfig; every other command's options dataclass (in
:mod:`peftbooth.config.options`, and :class:`peftbooth.evaluate.runner.EvalArgs`) uses :func:`add_option_flags` and is read back
with :func:`options_from_args`.

Metadata a field may carry besides ``help``: ``choices``; ``positional`` (an argument, not a flag); ``required``;
``metavar``; ``nargs`` (e.g. '+'); ``aliases``, old spellings that keep working for a release and are named in the
help text as such.
"""

from __future__ import annotations

import argparse
import dataclasses

from .dicts import SECTIONS, field_type, is_list

OLD_SPELLING_NOTE = "old spelling {names}: still accepted, to be removed in a later release"


def flag_name(prefix: str, field_name: str) -> str:
    return "--" + prefix + field_name.replace("_", "-")


def add_section_flags(parser: argparse.ArgumentParser, section: str, only: tuple[str, ...] | None = None) -> None:
    """One flag per field of a train-config section. Defaults are SUPPRESSed so only given flags override."""
    cls, prefix = SECTIONS[section]
    group = parser.add_argument_group(section)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        typ, _ = field_type(f)
        kw = dict(dest=f"{section}.{f.name}", default=argparse.SUPPRESS, help=f.metadata.get("help", ""))
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif is_list(f):
            kw.update(action="append", type=typ, metavar=f.name.upper())  # repeat the flag for more values
        else:
            kw["type"] = typ
            kw["metavar"] = f.name.upper()
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
                kw.pop("metavar")
        group.add_argument(flag_name(prefix, f.name), **kw)


def help_text(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    default = f.default if f.default is not dataclasses.MISSING else None
    if default not in (None, False, "") and "default" not in text and not f.metadata.get("positional"):
        text += f" (default: {default})"
    aliases = f.metadata.get("aliases") or ()
    if aliases:
        text += (" " if text else "") + f"({OLD_SPELLING_NOTE.format(names=', '.join(aliases))})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_option_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per field of an options dataclass. Flags left out keep the field's default (see
    :func:`options_from_args`), so a command can tell a given value from a default one where that matters."""
    for f in dataclasses.fields(cls):
        md = f.metadata
        typ, _ = field_type(f)
        if md.get("positional"):
            parser.add_argument(f.name, type=typ, metavar=md.get("metavar", f.name.upper()), help=help_text(f))
            continue
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text(f))
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif is_list(f) and md.get("nargs"):
            kw.update(nargs=md["nargs"], type=typ, metavar=md.get("metavar", f.name.upper()))
        elif is_list(f):
            kw.update(action="append", type=typ, metavar=md.get("metavar", f.name.upper()))  # repeatable
        else:
            kw.update(type=typ, metavar=md.get("metavar", f.name.upper()))
            if md.get("choices"):
                kw["choices"] = md["choices"]
                kw.pop("metavar")
        if md.get("required"):
            kw["required"] = True
        parser.add_argument(flag_name("", f.name), *(md.get("aliases") or ()), **kw)


def given_options(cls: type, args: argparse.Namespace) -> set[str]:
    """The fields of `cls` set on the command line (positional arguments always are)."""
    return {f.name for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def options_from_args(cls: type, args: argparse.Namespace):
    """The options dataclass of a parsed command line: given flags, the field defaults for the rest."""
    return cls(**{name: getattr(args, name) for name in given_options(cls, args)})
