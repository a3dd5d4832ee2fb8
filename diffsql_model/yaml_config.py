"""Dataclass configs that load from and save to YAML (one config object per concern).

`from_dict` is strict: an unknown key is an error naming the key and the known ones, so a typo
in a YAML file or a `--set` override never passes silently.
"""
from __future__ import annotations

import dataclasses
import pathlib
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit its dataclass."""


def _resolve_type(cls, field: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    return hints.get(field.name, field.type)


def _convert(tp, value, where: str):
    """Convert a YAML value to the annotated type (nested dataclasses, Optional, tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _from_dict(tp, value, where)
    if origin is typing.Union:
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(non_none[0], value, where)
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_t = args[0] if args else Any
        items = [_convert(item_t, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # PyYAML (YAML 1.1) reads `2e-4` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _from_dict(cls, data: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown key(s) {sorted(unknown)}; known: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        sub = f"{where}.{name}" if where else name
        kwargs[name] = _convert(_resolve_type(cls, fields[name]), value, sub)
    return cls(**kwargs)


def _to_plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, pathlib.Path):
        return str(value)
    return value


class YamlConfig:
    """Mixin for dataclasses: `from_dict`, `to_dict`, `load_yaml`, `save_yaml`, `with_overrides`."""

    @classmethod
    def from_dict(cls, data: dict | None):
        return _from_dict(cls, dict(data or {}), "")

    def to_dict(self) -> dict:
        return _to_plain(self)

    @classmethod
    def load_yaml(cls, path: str | pathlib.Path):
        path = pathlib.Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with path.open() as f:
            data = yaml.safe_load(f) or {}
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def save_yaml(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def with_overrides(self, overrides: list[str]):
        """Apply `key.sub=value` strings (values parsed as YAML) and re-validate."""
        data = self.to_dict()
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value")
            key, raw = item.split("=", 1)
            node = data
            parts = key.strip().split(".")
            for p in parts[:-1]:
                if not isinstance(node.get(p), dict):
                    raise ConfigError(f"override {item!r}: {p!r} is not a config section")
                node = node[p]
            if parts[-1] not in node:
                raise ConfigError(f"override {item!r}: unknown key {parts[-1]!r}; known: {sorted(node)}")
            node[parts[-1]] = yaml.safe_load(raw)
        return type(self).from_dict(data)
