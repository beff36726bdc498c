"""Helpers for ``configs/*.py`` files (big_vision style ``get_config(arg)``).

A config file is launched as ``--config configs/voc.py:split=1464,backbone=r101`` and any field
can then be overridden with ``--config.train.epochs=40``. ``parse_arg`` turns the string after
the colon into a ConfigDict whose value types come from the defaults, so a typo or a bad value
fails at start-up with the offending key named, not hours later.

``Setting`` / ``section``: each package states its config fields once (name, default, meaning); the
config files build their sections from them and override only what their dataset needs, and the
docs' settings tables are generated from the same lists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _coerce(key: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"config argument {key}={raw!r}: expected a boolean ({'/'.join(_TRUE + _FALSE)})")
    if default is None or isinstance(default, str):
        return raw
    try:
        return type(default)(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config argument {key}={raw!r}: expected {type(default).__name__}") from e


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses ``"a=1,b=x,flag"`` against ``defaults`` (which fix the allowed keys and types).

    A bare key sets a boolean to True (``runlocal``). Unknown keys raise ``ValueError``
    listing the allowed ones.
    """
    out = ml_collections.ConfigDict(dict(defaults))
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; allowed: {sorted(defaults)}")
        if not sep:
            if not isinstance(defaults[key], bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        else:
            out[key] = _coerce(key, raw.strip(), defaults[key])
    return out


def check_choice(name: str, value: Any, choices: Any) -> Any:
    """Raises a ``ValueError`` naming the field if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"config field {name}={value!r}: expected one of {list(choices)}")
    return value


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None) -> float:
    """Raises a ``ValueError`` naming the field if ``value`` lies outside ``[lo, hi]``."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"config field {name}={value!r}: expected a value in [{lo}, {hi}]")
    return value


@dataclasses.dataclass(frozen=True)
class Setting:
    """One config field: its name, default (stated here and nowhere else) and what it means (the docs'
    settings tables are generated from these: ``tools/make_settings_docs.py``)."""

    name: str
    default: Any
    doc: str


def section(settings: Sequence[Setting], **overrides: Any) -> ml_collections.ConfigDict:
    """A config section holding every setting's default, with ``overrides`` (unknown names are an error)."""
    names = {s.name for s in settings}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; the section has: {sorted(names)}")
    out = ml_collections.ConfigDict()
    for s in settings:
        value = overrides.get(s.name, s.default)
        out[s.name] = value() if callable(value) and not isinstance(value, type) else value
    return out
