"""A small generic loader: YAML files and ``--set`` overrides -> typed dataclasses.

It knows nothing about fedasr's sections (those are :mod:`fedasr.config`). Unknown keys
and values of the wrong type are :class:`FedasrError` s that name the key
(``fl.rounds: expected an integer, got 'ten'``); file problems name the file.

A dataclass takes part with its fields' type hints, and optionally with

- ``validate(self, prefix)``: called on the built object (``prefix`` is its key, e.g. ``fl``);
- ``parse(cls, value, prefix)`` (a classmethod): builds the object itself from the raw
  value (which need not be a mapping), for a section whose keys are not fixed fields.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from fedasr.errors import FedasrError, OptionError


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp, key: str) -> Any:
    """``value`` as type ``tp`` (a dataclass, bool/int/float/str, dict, list[...], Optional/
    union of these); a value that does not fit is an error naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except FedasrError:
                continue
        raise FedasrError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        parse = getattr(tp, "parse", None)
        if parse is not None:  # the class checks its raw value itself
            return parse(value, key)
        if not isinstance(value, dict):
            raise FedasrError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise FedasrError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise FedasrError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise FedasrError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise FedasrError(f"{key}: expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise FedasrError(f"{key}: expected a mapping, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, list):
            (inner,) = typing.get_args(tp) or (Any,)
            return [v if inner is Any else coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        raise FedasrError(f"{key}: expected a list, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from the mapping ``data`` and validate it; unknown keys and
    bad types name the key (``prefix.key``)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise FedasrError(f"{key}: unknown key (known: {', '.join(sorted(names))})")
        kwargs[k] = coerce(v, hints[k], key)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate:
        validate(prefix)
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``--set a.b=value`` overrides (value parsed as YAML) to a raw config dict."""
    data = yaml.safe_load(yaml.safe_dump(data or {}))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise OptionError(f"--set {item}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise OptionError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = value
    return data


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict:
    """A YAML file whose top level is a mapping; problems are errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FedasrError(f"{path}: {what} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise FedasrError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise FedasrError(f"{path}: expected a mapping at the top level")
    return data


def merge_mappings(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_mappings(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_recipe(path: str | Path, what: str = "config file", _seen: tuple = ()) -> dict:
    """A recipe file; ``extends: OTHER.yaml`` (relative to the file) starts from another recipe
    and changes only what this one says (mappings merge, lists and values replace)."""
    path = Path(path)
    data = read_yaml_mapping(path, what)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise FedasrError(f"{path}: extends: expected a file name, got {parent!r}")
    base, seen = (path.parent / parent).resolve(), _seen + (path.resolve(),)
    if base in seen:
        raise FedasrError(f"{path}: extends: {parent} leads back to this file")
    return merge_mappings(read_recipe(base, what, seen), data)
