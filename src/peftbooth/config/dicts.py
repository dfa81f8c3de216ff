"""A training config as nested dicts (YAML files, the saved ``config.yaml``, the UI's form): ``to_dict`` and
``from_dict``, which refuses unknown keys and wrong types, naming them."""

from __future__ import annotations

import dataclasses

from .sections import AdapterArgs, DataArgs, ModelArgs, TrainArgs, TrainConfig, UsageError

SECTIONS: dict[str, tuple[type, str]] = {
    # section name -> (dataclass, flag prefix)
    "model": (ModelArgs, ""),
    "unet_adapter": (AdapterArgs, ""),
    "text_encoder_adapter": (AdapterArgs, "text-encoder-"),
    "data": (DataArgs, ""),
    "train": (TrainArgs, ""),
}


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, source: str = "config") -> TrainConfig:
    """Build a TrainConfig from nested dicts, refusing unknown keys and wrong types (naming them)."""
    if not isinstance(data, dict):
        raise UsageError(f"{source}: expected a mapping of sections {', '.join(SECTIONS)}")
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise UsageError(f"{source}: unknown section {unknown[0]!r}; sections are {', '.join(SECTIONS)}")
    cfg = TrainConfig()
    for section, values in data.items():
        cls, _ = SECTIONS[section]
        if values is None:
            continue
        if not isinstance(values, dict):
            raise UsageError(f"{source}: section {section!r} must be a mapping")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        obj = getattr(cfg, section)
        for key, value in values.items():
            if key not in fields:
                raise UsageError(f"{source}: unknown key {section}.{key}")
            setattr(obj, key, coerce(value, fields[key], f"{source}: {section}.{key}"))
    return cfg


def field_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(base type, optional) of a field whose annotation is a string such as 'Optional[int]'.

    'list[str]' gives (str, False): use `is_list` to tell lists (repeatable flags, YAML lists) apart.
    """
    ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    optional = ann.startswith("Optional[")
    base = ann[len("Optional[") : -1] if optional else ann
    base = base[len("list[") : -1] if base.startswith("list[") else base
    return {"str": str, "int": int, "float": float, "bool": bool}[base], optional


def is_list(f: dataclasses.Field) -> bool:
    return str(f.type).startswith("list[")


def coerce(value, f: dataclasses.Field, where: str):
    """Check a YAML value against the field's type (ints are accepted for floats), naming the key on error."""
    typ, optional = field_type(f)
    if is_list(f):
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, typ) for v in value):
            raise UsageError(f"{where} must be a list of {typ.__name__} (got {value!r})")
        return list(value)
    if value is None:
        if optional:
            return None
        raise UsageError(f"{where} must not be empty")
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise UsageError(f"{where} must be {typ.__name__} (got {type(value).__name__} {value!r})")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UsageError(f"{where} must be one of {', '.join(choices)} (got {value!r})")
    return value
