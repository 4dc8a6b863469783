"""``Config`` dataclasses from JSON or YAML files: the fields a file sets, on top of a base
config; unknown keys, malformed files and bad values raise ``ValueError`` naming the file."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path
from typing import TypeVar

from fastbd.storage import read_text_file

T = TypeVar("T")


def refuse_unknown_keys(raw: object, cls: type, where: str) -> None:
    """``raw`` must be a mapping of ``cls``'s field names (``ValueError`` naming ``where``)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping of {cls.__name__} fields, got {raw!r}")
    unknown = set(raw) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{where}: unknown config keys {sorted(unknown)}")


def read_config_file(path: str | Path) -> dict:
    """The mapping a ``.json`` / ``.yaml`` / ``.yml`` file holds (YAML by suffix, else JSON);
    an empty YAML file is an empty mapping."""
    text = read_text_file(path, "config")
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({error})".replace("\n", " ")) from None
        return {} if raw is None else raw
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg}, column "
                         f"{error.colno})") from None


def load_config(path: str | Path | None, cls: type[T], nested: dict[str, type] | None = None,
                base: T | None = None) -> T:
    """An instance of the dataclass ``cls``: ``base`` (default ``cls()``) with the fields the
    file at ``path`` sets (None: ``base`` itself). ``nested`` maps a field name to the
    dataclass its value updates field by field (e.g. ``{"classifier": ClassifierConfig}``).
    Every value is checked by the config's own validation; errors name the file."""
    base = cls() if base is None else base
    if path is None:
        return base
    raw = read_config_file(path)
    refuse_unknown_keys(raw, cls, str(path))
    for name, inner in (nested or {}).items():
        if name in raw:
            refuse_unknown_keys(raw[name], inner, f"{path}: {name}")
            try:
                raw[name] = replace(getattr(base, name), **raw[name])
            except ValueError as error:
                raise ValueError(f"{path}: in section {name!r}: {error}") from None
    try:
        return replace(base, **raw)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
