"""The new-run form, built from the config dataclasses, and the checks `peftbooth train` makes before it starts.

Every field of every section in :data:`peftbooth.config.dicts.SECTIONS` becomes one form field (its help text, type,
default and choices come from the dataclass), so the page can never offer an option the CLI lacks or miss one it
has. The page sends ``{"section.field": value}``; :func:`check_run` turns that into a ``TrainConfig`` through
``from_dict`` (the same type checks as a ``--config`` YAML file), then runs ``config.validate`` and
``training.preflight.check_inputs``, and hands each problem back under the field whose flag it names.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

from ..config.checks import validate
from ..config.dicts import SECTIONS, field_type, from_dict, is_list
from ..config.sections import UNET_ADAPTER_DEFAULTS, TrainConfig, UsageError
from ..models.defaults import apply_model_defaults, describe
from ..training import memory

# Fields the UI fills itself: the run folder is the output folder, the photos are uploaded or named on the page,
# resuming is the Resume button, and the low-memory switch writes the preset's values into the form (a
# `train.low_memory` in the run's config.yaml would change nothing: every setting there is given explicitly).
MANAGED = ("train.output_dir", "data.instance_data_dir", "train.resume", "train.resume_force", "train.overwrite",
           "train.low_memory")

# The fields shown at the top of the form: what a user must decide (the photos and the preset are above them); the
# rest go under "Advanced", where the model's defaults (peftbooth.models.defaults) fill them. Still one list of
# options: both parts are rendered from `form_fields()`.
MAIN = ("model.model", "data.instance_prompt", "data.with_prior_preservation", "data.class_prompt",
        "data.resolution", "train.max_train_steps", "train.validation_prompt")

# Each field's label in words; the flag is shown beside it. Fields not listed read as their name in words.
LABELS = {
    "model.model": "Base model", "data.instance_prompt": "Prompt of your photos (with the identifier)",
    "data.with_prior_preservation": "Keep the class as it was (prior preservation)",
    "data.class_prompt": "Class prompt", "data.resolution": "Resolution (px)",
    "train.max_train_steps": "Training steps", "train.validation_prompt": "Sample prompts (one per line)",
    "unet_adapter.adapter": "Adapter type", "unet_adapter.target_modules": "Layers adapted",
    "train.learning_rate": "Learning rate", "unet_adapter.rank": "Rank",
}

# Base models offered by name; any hub id or local diffusers folder can be typed instead.
MODEL_CHOICES = ("tiny", "world")
# Hub ids offered beside them (the page's model list): SDXL and SD 3.5 Medium, whose defaults follow the model as
# any other's (peftbooth.models.defaults: family sdxl / sd3.5, 1024 px, each family's recipe). Downloaded by the
# training process, as any typed hub id.
HUB_MODELS = ("stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-3.5-medium")

# Values, not options: each preset sets fields that exist in the dataclasses (checked by the tests). They leave
# the learning rate alone: that is the model's (the world learns nothing at SD's 1e-4). No preset: the model's
# own defaults. Each is named for what it does.
PRESETS: dict[str, dict[str, object]] = {
    "quick-look": {"train.max_train_steps": 200, "train.validation_steps": 50},
    "more-capacity": {"unet_adapter.rank": 16, "unet_adapter.target_modules": "all", "train.train_text_encoder": True,
                      "train.checkpointing_steps": 200},
}
PRESET_LABELS = {"": "the base model's defaults", "quick-look": "a quick look: 200 steps, samples every 50",
                 "more-capacity": "more capacity: rank 16 on every layer, and the text encoder"}
# Applied on top of any preset: less memory for the same training. Its one owner is peftbooth.training.memory, which
# `train --low-memory` applies too.
LOW_MEMORY = memory.LOW_MEMORY


def flag_of(section: str, name: str) -> str:
    return "--" + SECTIONS[section][1] + name.replace("_", "-")


def form_fields() -> list[dict]:
    """One entry per config field (less the managed ones): key, flag, type, default, help, choices."""
    defaults = TrainConfig()
    fields = []
    for section, (cls, _) in SECTIONS.items():
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            if key in MANAGED:
                continue
            typ, optional = field_type(f)
            kind = "list" if is_list(f) else typ.__name__
            fields.append({
                "key": key, "section": section, "name": f.name, "flag": flag_of(section, f.name), "type": kind,
                "optional": optional, "default": getattr(getattr(defaults, section), f.name),
                "help": f.metadata.get("help", ""), "choices": list(f.metadata.get("choices") or ()),
                "main": key in MAIN, "inherits": inherited(section, f.name),
                "label": LABELS.get(key) or f.name.replace("_", " ").capitalize(),
            })
    return fields


def inherited(section: str, name: str) -> str | None:
    """What an unset adapter field becomes (`TrainConfig.resolved`), shown as the input's placeholder."""
    if section == "unet_adapter" and name in UNET_ADAPTER_DEFAULTS:
        return "= rank" if name == "alpha" else str(UNET_ADAPTER_DEFAULTS[name])
    if section == "text_encoder_adapter":
        return {"alpha": "= its rank", "target_modules": "attn"}.get(name, "= the UNet adapter's")
    return None


def _fields_by_key() -> dict[str, dataclasses.Field]:
    return {f"{s}.{f.name}": f for s, (cls, _) in SECTIONS.items() for f in dataclasses.fields(cls)}


def parse_value(value, f: dataclasses.Field, flag: str):
    """A form value (text from an input, a bool from a checkbox, a list of lines) -> the field's Python type.

    Empty text is None for optional fields (the CLI's 'not given'); type checks and choices are left to
    `from_dict`, so the messages are the config file's own.
    """
    typ, optional = field_type(f)
    if is_list(f):
        if isinstance(value, str):
            value = value.splitlines()
        return [v.strip() for v in value if isinstance(v, str) and v.strip()] if isinstance(value, list) else value
    if isinstance(value, str) and typ is not str:
        text = value.strip()
        if text == "":
            return None
        try:
            return typ(text) if typ is not bool else {"true": True, "false": False}[text.lower()]
        except (ValueError, KeyError):
            raise UsageError(f"{flag} must be {typ.__name__} (got {text!r})") from None
    if isinstance(value, str) and value.strip() == "" and optional:
        return None
    return value


def to_sections(values: dict) -> tuple[dict, dict[str, list[str]]]:
    """{'section.field': value} -> ({section: {field: value}}, errors by key)."""
    known = _fields_by_key()
    data: dict[str, dict] = {s: {} for s in SECTIONS}
    errors: dict[str, list[str]] = {}
    for key, value in values.items():
        if key not in known or key in MANAGED:
            errors.setdefault("general", []).append(f"unknown setting {key!r}")
            continue
        section, name = key.split(".", 1)
        try:
            data[section][name] = parse_value(value, known[key], flag_of(section, name))
        except UsageError as e:
            errors.setdefault(key, []).append(str(e))
    return data, errors


def flag_keys() -> dict[str, str]:
    """'--text-encoder-rank' -> 'text_encoder_adapter.rank', for every field, managed ones included."""
    return {flag_of(s, f.name): f"{s}.{f.name}" for s, (cls, _) in SECTIONS.items() for f in dataclasses.fields(cls)}


FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*")


def key_of(message: str, fallback: str = "general") -> str:
    """The field a problem belongs to: the flag it says is needed, else the first flag it names."""
    flags = flag_keys()
    # 'A needs B': B is what to fill in ('--with-prior-preservation needs --class-prompt')
    needs = re.search(r" needs (--[a-z0-9][a-z0-9-]*)", message)
    for flag in ([needs.group(1)] if needs else []) + FLAG.findall(message):
        if flag in flags:
            return flags[flag]
    return fallback


def split_problems(message: str) -> list[str]:
    """`validate` joins its problems with '; ', each starting with its flag; a '; ' inside one
    problem (not followed by a flag) stays in it."""
    problems: list[str] = []
    for part in message.split("; "):
        if problems and not part.startswith("--"):
            problems[-1] += "; " + part
        else:
            problems.append(part)
    return problems


def model_defaults(values: dict, given, instance_data_dir: str | None) -> dict:
    """What the form's base model fills in for the fields not in `given` (the page's "defaults that follow the
    model"): {"values": {key: value}, "line": the run's one line, "family": ...}; nothing for a form that does
    not parse yet (its problems are the check's to say)."""
    data, errors = to_sections(values)
    try:
        cfg = None if errors else from_dict(data, source="settings")
    except UsageError:
        cfg = None
    if cfg is None:
        return {"values": {}, "line": "", "family": None}
    cfg.data.instance_data_dir = instance_data_dir
    info, taken = apply_model_defaults(cfg, set(given))
    return {"values": {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in taken},
            "line": describe(info, cfg, taken), "family": info.family if info else None}


def check_run(values: dict, instance_data_dir: str | None, output_dir: str,
              given=None) -> tuple[TrainConfig | None, dict]:
    """The same checks as `peftbooth train`, in the same order, writing nothing.

    `given`: the keys the user set (edited, or a preset's); the base model's defaults fill the others, as
    `peftbooth train` fills what no flag gives. None: every key in `values` counts as given.
    Returns (resolved config, {}) or (None, {key: [messages]}), with 'general' for a problem that names no field.
    """
    data, errors = to_sections(values)
    if errors:
        return None, errors
    # the UI's own fields: a run folder of its own, the photos chosen on the page, never an overwrite or resume
    data["train"].update(output_dir=output_dir, overwrite=False, resume=None, resume_force=False)
    data["data"]["instance_data_dir"] = instance_data_dir
    try:
        cfg = from_dict(data, source="settings")
    except UsageError as e:  # 'settings: train.max_train_steps must be int (got ...)'
        m = re.search(r"settings: (\w+)\.(\w+)", str(e))
        key = f"{m.group(1)}.{m.group(2)}" if m else "general"
        msg = str(e).replace(m.group(0), flag_of(m.group(1), m.group(2))) if m else str(e)
        return None, {key: [msg]}
    apply_model_defaults(cfg, set(values) if given is None else set(given))
    cfg = cfg.resolved()
    try:
        validate(cfg)
    except UsageError as e:
        for problem in split_problems(str(e)):
            errors.setdefault(key_of(problem), []).append(problem)
        return None, errors
    try:
        check_model(cfg.model.model)
        from ..training.preflight import check_inputs

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # skipped non-image files: the page lists the photos it found
            check_inputs(cfg)
    except UsageError as e:
        msg = str(e)
        fallback = "data.instance_data_dir" if instance_data_dir and msg.startswith(instance_data_dir) else "general"
        return None, {key_of(msg, fallback): [msg]}
    return cfg, {}


def check_model(model: str) -> None:
    """A typed local folder must be a diffusers model; built-in names are built when training starts, and hub
    ids are looked up by the training process."""
    if model in MODEL_CHOICES:
        return
    from ..models.loading import resolve_model

    resolve_model(model)


def config_yaml(cfg: TrainConfig) -> str:
    """The run's config.yaml, as `peftbooth train` itself saves it (so the CLI repeats the run)."""
    import yaml

    from ..config.dicts import to_dict
    from ..training.saving import replayable

    return yaml.safe_dump(to_dict(replayable(cfg)), sort_keys=False)


def values_of(config_file: Path) -> dict:
    """A saved config.yaml back as form values {'section.field': value} (for 'run again with these settings')."""
    import yaml

    cfg = from_dict(yaml.safe_load(config_file.read_text()) or {}, source=str(config_file))
    return {f"{s}.{k}": v for s in SECTIONS for k, v in dataclasses.asdict(getattr(cfg, s)).items()
            if f"{s}.{k}" not in MANAGED}
