"""Type checks for the JSON records calibatt reads back from files (bundle metadata, cache manifests).

A record may have been edited, or written by another version: a field of the wrong type is reported by its
path, so the file ends in one clear error instead of a KeyError or TypeError deep in the code that uses it.

A spec is a type (`int` excludes bool, `float` takes ints and refuses NaN and infinities), None (the value
null), a tuple of specs (any of them), a one-element list (a list of such items) or a dict (an object holding
at least these keys; others are allowed).
"""

from __future__ import annotations

import math

_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object"}


def _ok(value, spec) -> bool:
    if spec is None:
        return value is None
    if spec is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if spec is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, spec)


def _name(spec) -> str:
    if isinstance(spec, tuple):
        return " or ".join(_name(s) for s in spec)
    return "null" if spec is None else _NAMES.get(spec, getattr(spec, "__name__", str(spec)))


def problem(value, spec, path: str = "") -> str | None:
    """Where `value` departs from `spec` ('field.sub[3] should be an integer'), or None."""
    where = path or "the record"
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return f"'{where}' should be an object"
        for key, sub in spec.items():
            if key not in value:
                return f"'{path + '.' if path else ''}{key}' is missing"
            found = problem(value[key], sub, f"{path + '.' if path else ''}{key}")
            if found:
                return found
        return None
    if isinstance(spec, list):
        if not isinstance(value, list):
            return f"'{where}' should be a list"
        for i, item in enumerate(value):
            found = problem(item, spec[0], f"{path}[{i}]")
            if found:
                return found
        return None
    alternatives = spec if isinstance(spec, tuple) else (spec,)
    if any(_ok(value, s) for s in alternatives):
        return None
    return f"'{where}' should be {_name(spec)}"
