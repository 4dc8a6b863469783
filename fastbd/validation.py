"""Checking a ``Config`` dataclass when it is built: every field against its type annotation,
the fields given a rule against their range or choices, with a message naming the field.

    def __post_init__(self) -> None:
        check_fields(self, n_masks=at_least(1), prune_fraction=fraction(high_open=True),
                     mask_strategy=one_of("full", "interval", "random"))

Types: ``int`` takes integers only (not ``True``, ``1.5`` or ``"8"``); ``float`` takes integers
and finite floats; ``bool``, ``str``, ``X | None``, ``tuple[...]``
(lists from JSON/YAML become tuples), ``list[...]``, ``dict[..., ...]`` and nested dataclasses
are checked; other annotations are not. Rules are functions ``(name, value) -> None`` that raise
``ValueError``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable

Rule = Callable[[str, object], None]


def check_fields(config: object, **rules: Rule) -> None:
    """Type-check every field of the dataclass instance ``config`` and apply ``rules`` (field
    name → rule). A ``tuple[...]`` field given as a list is stored back as a tuple. Raises
    ``ValueError`` naming the first field that fails."""
    hints = typing.get_type_hints(type(config))
    names = {f.name for f in dataclasses.fields(config)}
    unknown = set(rules) - names
    if unknown:
        raise TypeError(f"rules for fields {type(config).__name__} has not: {sorted(unknown)}")
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        checked = _check_type(field.name, value, hints.get(field.name, typing.Any))
        if checked is not value:
            object.__setattr__(config, field.name, checked)
        if field.name in rules and checked is not None:
            rules[field.name](field.name, checked)


def _kind(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_type(name: str, value: object, hint: object) -> object:
    """``value`` if it fits ``hint`` (a list converted for a tuple hint), else ``ValueError``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _check_type(name, value, option)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0] if len(errors) == 1 else
                         f"{name} must be one of {', '.join(map(_type_name, options))} or None, "
                         f"got {_kind(value)}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {_kind(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number, got {_kind(value)}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {_kind(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, tuple | list):
            raise ValueError(f"{name} must be a sequence, got {_kind(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            items = [_check_type(f"{name}[{i}]", v, args[0])
                     for i, v in enumerate(value)]
        else:
            if len(value) != len(args):
                raise ValueError(f"{name} must hold {len(args)} values, got {len(value)}: "
                                 f"{value!r}")
            items = [_check_type(f"{name}[{i}]", v, a)
                     for i, (v, a) in enumerate(zip(value, args, strict=True))]
        return tuple(items)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{name} must be a list, got {_kind(value)}")
        for i, item in enumerate(value):
            _check_type(f"{name}[{i}]", item, args[0] if args else typing.Any)
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {_kind(value)}")
        key_hint, value_hint = args if args else (typing.Any, typing.Any)
        for key, item in value.items():
            _check_type(f"{name} key", key, key_hint)
            _check_type(f"{name}[{key!r}]", item, value_hint)
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise ValueError(f"{name} must be a {hint.__name__}, got {_kind(value)}")
        return value
    return value


def _type_name(hint: object) -> str:
    return getattr(hint, "__name__", str(hint))


def at_least(low: float) -> Rule:
    """``value ≥ low``."""
    def rule(name: str, value: object) -> None:
        if value < low:
            raise ValueError(f"{name} must be ≥ {low}, got {value!r}")
    return rule


def above(low: float) -> Rule:
    """``value > low``."""
    def rule(name: str, value: object) -> None:
        if not value > low:
            raise ValueError(f"{name} must be > {low}, got {value!r}")
    return rule


def fraction(low_open: bool = False, high_open: bool = False) -> Rule:
    """``value`` in the unit interval, its ends open as asked."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"

    def rule(name: str, value: object) -> None:
        inside = (value > 0 if low_open else value >= 0) and (
            value < 1 if high_open else value <= 1)
        if not inside:
            raise ValueError(f"{name} must be in {left}0, 1{right}, got {value!r}")
    return rule


def one_of(*choices: object) -> Rule:
    """``value`` is one of ``choices``."""
    def rule(name: str, value: object) -> None:
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got "
                             f"{value!r}")
    return rule


def each(rule: Rule) -> Rule:
    """``rule`` for every item of a sequence value."""
    def check(name: str, value: object) -> None:
        for i, item in enumerate(value):
            rule(f"{name}[{i}]", item)
    return check


def ordered_range(low: float, high: float | None = None, low_open: bool = False) -> Rule:
    """A ``(lo, hi)`` pair with ``low ≤ lo ≤ hi`` (``low < lo`` when ``low_open``) and
    ``hi ≤ high`` when ``high`` is given."""
    def rule(name: str, value: object) -> None:
        lo, hi = value
        bad_low = lo <= low if low_open else lo < low
        if bad_low or hi < lo or (high is not None and hi > high):
            bounds = (f"{'<' if low_open else '≤'} lo ≤ hi"
                      + (f" ≤ {high}" if high is not None else ""))
            raise ValueError(f"{name} must be (lo, hi) with {low} {bounds}, got {value!r}")
    return rule


def all_of(*rules: Rule) -> Rule:
    """Every one of ``rules``."""
    def rule(name: str, value: object) -> None:
        for each_rule in rules:
            each_rule(name, value)
    return rule
