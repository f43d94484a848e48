"""Dataclass trees from YAML mappings: type coercion, unknown keys named with the
closest valid one, dotted overrides. Generic (the data recipes use it too)."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from typing import Any, Union

import yaml


def one_line(text: str) -> str:
    """`text` with line breaks and other unprintable characters escaped (\\n, \\u2028, ...):
    an error message stays one line whatever the user's keys and values hold."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def brief(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters (a value echoed in an error can be huge)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's 4300-digit str limit
        return "<a number too large to print>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the fix (one line)."""

    def __str__(self) -> str:
        return one_line(super().__str__())


# Element types of list fields holding dataclasses: (cls, field name) -> item class.
_LIST_ITEM_TYPES: dict = {}
# Integers must fit int64 (what torch and numpy hold); bigger ones are typos or fuzz.
_INT_LIMIT = 2 ** 63
# Values in one config file or override, aliases expanded (a YAML alias bomb stops here).
_MAX_VALUES = 100_000


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
            raise ConfigError(f"{path}: expected a mapping of {base.__name__} fields, got {brief(value)}")
        return _from_dict(base, value, path, noun)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{path}: expected true/false, got {brief(value)}")
    if base is int:
        return _coerce_int(value, path)
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{path}: expected a number, got {brief(value)}")
        try:
            f = float(value)
        except (ValueError, OverflowError):
            raise ConfigError(f"{path}: expected a number, got {brief(value)}") from None
        if not math.isfinite(f):
            raise ConfigError(f"{path}: expected a finite number, got {brief(value)}")
        return f
    if base is str:
        if isinstance(value, (dict, list, set, bytes)):  # set/bytes: YAML's !!set and !!binary tags
            raise ConfigError(f"{path}: expected a string, got {brief(value)}")
        return str(value)
    if base is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {brief(value)}")
        return list(value)
    if base is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {brief(value)}")
        return dict(value)
    return value


def _coerce_int(value: Any, path: str) -> int:
    """An int from an int, an integral finite float (1e3) or a string of either."""
    bad = ConfigError(f"{path}: expected an integer, got {brief(value)}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                raise bad from None
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise bad
        value = int(value)
    if abs(value) >= _INT_LIMIT:
        raise ConfigError(f"{path}: {brief(value, 40)} is too large; integers must lie within +-(2**63 - 1)")
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
            shown = str(key) if len(str(key)) <= 60 else str(key)[:57] + "..."
            close = difflib.get_close_matches(str(key)[:60], names, n=1, cutoff=0.5)
            hint = f"; did you mean '{(prefix + '.' if prefix else '') + close[0]}'?" if close else (
                f"; valid keys: {', '.join(names)}")
            raise ConfigError(f"unknown {noun} '{(prefix + '.' if prefix else '') + shown}'{hint}")
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
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {brief(data)}")
    return _from_dict(cls, data, where, noun="key")


def to_dict(cfg) -> dict:
    """Plain nested dict (for YAML dumps, checkpoints and W&B)."""
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if "" in keys:
        raise ConfigError(f"override '{dotted}' has an empty part between dots; use dotted.key=value, "
                          "e.g. train.max_steps=20")
    node = tree
    for i, k in enumerate(keys[:-1]):
        if k.isdigit() and isinstance(node, list):
            k = int(k)
            if k >= len(node):
                raise ConfigError(f"override '{dotted}': index {k} is out of range (list has {len(node)} items)")
        elif not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{'.'.join(keys[:i])}' is not a section")
        node = node.setdefault(k, {}) if isinstance(node, dict) else node[k]
        if node is None:
            raise ConfigError(f"override '{dotted}': '{k}' is null; set the whole section instead")
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override '{dotted}': '{last}' is not a valid list index")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override '{dotted}': '{'.'.join(keys[:-1])}' holds {brief(node)}, not a section")


def _count_values(data: Any, where: str) -> None:
    """Refuse a tree with more than _MAX_VALUES values once YAML aliases are expanded
    (a billion-laughs file, or an alias cycle, would otherwise blow up dataclasses.asdict)."""
    todo, seen = [data], 0
    while todo:
        node = todo.pop()
        seen += 1
        if seen > _MAX_VALUES:
            raise ConfigError(f"{where} holds more than {_MAX_VALUES:,} values once its YAML aliases are "
                              "expanded (an alias bomb or a cycle?); write the values out")
        if isinstance(node, dict):
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)


def _safe_load(text, where: str) -> Any:
    """yaml.safe_load with every failure as one ConfigError line naming `where`."""
    try:
        data = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}{at}: {one_line(e.problem or 'cannot be constructed')[:120]}; only plain "
                          "YAML is read (tags like !!python/object are refused by yaml.safe_load)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where} is not valid YAML{at}; fix the syntax there") from None
    except ValueError:  # int() of a number beyond Python's 4300-digit limit
        raise ConfigError(f"{where} holds a number too long to read (over 4300 digits)") from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to read") from None
    _count_values(data, where)
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=3' -> ('a.b', 3); the value is parsed as a YAML scalar/list/mapping."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like dotted.key=value, e.g. train.max_steps=20")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key; use dotted.key=value")
    try:
        value = _safe_load(raw, f"override '{text}'") if raw.strip() else ""
    except ConfigError as e:
        if "is not valid YAML" not in str(e):
            raise  # tags, giant numbers, deep nesting, alias bombs
        value = raw  # not YAML (e.g. 'a: b: c'): the text itself, as a string
    return key, value


def read_yaml_mapping(path: str, what: str = "config file",
                      fix: str = "pass an existing YAML file to --config") -> dict:
    """yaml.safe_load a file that must hold a mapping; one-line ConfigError otherwise."""
    if os.path.isdir(path):
        raise ConfigError(f"{what} '{path}' is a folder, not a file; {fix}")
    if not os.path.isfile(path):
        raise ConfigError(f"{what} '{path}' does not exist; {fix}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{what} '{path}' cannot be read ({e.strerror or type(e).__name__}); {fix}") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Windows editors) is fine
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} '{path}' is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                          "save it as UTF-8") from None
    data = _safe_load(text, f"{what} '{path}'")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}' must hold a mapping of keys at the top level, not a "
                          f"{type(data).__name__}")
    return data


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts/ CLIs: a bad command line is one `error:` line (exit 2),
    like every other user mistake, instead of the usage block plus an error."""

    def error(self, message: str):
        self.exit(2, f"error: {one_line(message)}; see {self.prog} --help\n")
