"""Dataclass trees from YAML mappings: type coercion, unknown keys named with the
closest valid one, dotted overrides. Generic (the data recipes use it too)."""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the fix."""


# Element types of list fields holding dataclasses: (cls, field name) -> item class.
_LIST_ITEM_TYPES: dict = {}


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, path: str, noun: str = "config key") -> Any:
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path}: null is not allowed; give a {_type_name(base)}")
    if dataclasses.is_dataclass(base):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {base.__name__} fields, got {value!r}")
        return _from_dict(base, value, path, noun)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{path}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(f)
    if base is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if base is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    if base is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return list(value)
    if base is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def register_list_items(cls, name: str, item_cls) -> None:
    """Declare that list field `cls.name` holds `item_cls` mappings (for from_mapping)."""
    _LIST_ITEM_TYPES[(cls, name)] = item_cls


def _from_dict(cls, data: dict, prefix: str = "", noun: str = "config key"):
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{(prefix + '.' if prefix else '') + close[0]}'?" if close else (
                f"; valid keys: {', '.join(names)}")
            raise ConfigError(f"unknown {noun} '{path}'{hint}")
        item_cls = _LIST_ITEM_TYPES.get((cls, key))
        if item_cls is not None:
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{path}: expected a non-empty list of {item_cls.__name__} mappings")
            kwargs[key] = [_coerce(v, item_cls, f"{path}[{i}]", noun) for i, v in enumerate(value)]
        else:
            kwargs[key] = _coerce(value, hints[key], path, noun)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required key '{(prefix + '.' if prefix else '') + missing[0]}'")
    return cls(**kwargs)


def from_mapping(cls, data: Any, where: str = ""):
    """A dataclass instance from a (YAML) mapping: types coerced, unknown keys
    named with the closest valid one, required keys enforced (ConfigError)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    return _from_dict(cls, data, where, noun="key")


def to_dict(cfg) -> dict:
    """Plain nested dict (for YAML dumps, checkpoints and W&B)."""
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if k.isdigit() and isinstance(node, list):
            k = int(k)
            if k >= len(node):
                raise ConfigError(f"override '{dotted}': index {k} is out of range (list has {len(node)} items)")
        elif not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{k}' is not a section")
        node = node.setdefault(k, {}) if isinstance(node, dict) else node[k]
        if node is None:
            raise ConfigError(f"override '{dotted}': '{k}' is null; set the whole section instead")
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override '{dotted}': '{last}' is not a valid list index")
        node[int(last)] = value
    else:
        node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=3' -> ('a.b', 3); the value is parsed as a YAML scalar/list/mapping."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like dotted.key=value, e.g. train.max_steps=20")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key; use dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def read_yaml_mapping(path: str, what: str = "config file",
                      fix: str = "pass an existing YAML file to --config") -> dict:
    """yaml.safe_load a file that must hold a mapping; one-line ConfigError otherwise."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} '{path}' does not exist; {fix}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{what} '{path}' is not valid YAML{where}; fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}' must hold a mapping of keys at the top level")
    return data
