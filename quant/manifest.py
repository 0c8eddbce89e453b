"""The shape a tier store's manifest (and its build journal, progress.json) must have before anything reads it.

A manifest is JSON anyone can edit, damage or truncate. Every field the store's readers use is checked
here against a schema: its type, its range, and for names and digests their form, so that a damaged
manifest is refused with the path of the first wrong field instead of a KeyError or TypeError deep in a
run. Whether the fields agree with each other (layouts, shard plan, fingerprint) is checked by
quant.store, which recomputes them the way a build does.

A schema is a plain value: a type or a Rule for a leaf, a dict for an object with these keys (a key given as
`MayLack("name")` may be absent), `{KEY: schema}` for a mapping whose keys are checked by KEY's rule, a
one-element list for a list.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ManifestError(ValueError):
    """A manifest or journal field that is missing, of the wrong type, or out of range."""


@dataclass(frozen=True)
class Rule:
    what: str  # how the error describes an acceptable value
    ok: Callable[[Any], bool]


class MayLack(str):
    """A record's key that may be absent (a field only some stores write)."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _matches(pattern: str) -> Callable[[Any], bool]:
    match = re.compile(pattern).fullmatch
    return lambda v: isinstance(v, str) and match(v) is not None


_PLAIN = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}"  # no separator, no leading dot: cannot point outside its folder

HEX64 = Rule("a sha256 in hex", _matches(r"[0-9a-f]{64}"))
FILE_NAME = Rule("a plain file name", _matches(_PLAIN))  # store files sit in the store folder
SOURCE_NAME = Rule("a file name inside the model folder", _matches(f"{_PLAIN}(?:/{_PLAIN})*"))
POSITIVE = Rule("a positive integer", lambda v: _is_int(v) and 0 < v < 1 << 62)
COUNT = Rule("an integer of at least 0", lambda v: _is_int(v) and 0 <= v < 1 << 62)
INT = Rule("an integer", _is_int)
TEXT = Rule("a string", lambda v: isinstance(v, str))
TEXT_OR_NULL = Rule("a string or null", lambda v: v is None or isinstance(v, str))
EXPERT_KEY = Rule("a <tier>.<layer>.<expert> key", _matches(r"[a-z]+\.\d+\.\d+"))
ANY_OBJECT = Rule("an object", lambda v: isinstance(v, dict))

SOURCE_RECORD = {"sha256": HEX64, "size": COUNT, "mtime_ns": INT}
SHARD_RECORD = {"sha256": HEX64, "size": COUNT}

MANIFEST_SCHEMA: dict = {
    "format": TEXT,
    "format_version": INT,
    "complete": Rule("true or false", lambda v: isinstance(v, bool)),
    "created": TEXT,
    "fingerprint": HEX64,
    "model": {
        "family": TEXT,
        "hidden_size": POSITIVE,
        "moe_intermediate_size": POSITIVE,
        "num_experts": POSITIVE,
        "moe_layers": [COUNT],
        "source_dtype": TEXT,
        MayLack("expert_bias"): Rule("true (written only where the experts have biases)", lambda v: v is True),
    },
    "source": {"path": TEXT, "repo": TEXT_OR_NULL, "revision": TEXT_OR_NULL, "files": {SOURCE_NAME: SOURCE_RECORD}},
    "params": ANY_OBJECT,  # its fields are QuantParams', checked by QuantParams.from_json
    "quantizer": ANY_OBJECT,  # informational: what quantized, never read back
    "tiers": {TEXT: ANY_OBJECT},  # checked by comparison with the tiers a build would plan
    "files": {FILE_NAME: SHARD_RECORD},
    "experts": {EXPERT_KEY: {"file": FILE_NAME, "sha256": HEX64}},
}

JOURNAL_SCHEMA: dict = {
    "fingerprint": HEX64,
    "sources": {SOURCE_NAME: SOURCE_RECORD},
    "shards": {FILE_NAME: {**SHARD_RECORD, "experts": {EXPERT_KEY: HEX64}}},
}


class _Bad(Exception):
    """A misfit found deep in a value; the keys leading to it are added on the way out (so that a value that
    fits, the usual case, costs no path strings)."""

    def __init__(self, what: str):
        self.what, self.keys = what, []


def check(value: Any, schema: Any, path: str = "") -> None:
    """Raise ManifestError naming the first field of `value` that does not fit `schema`."""
    try:
        _checker(schema)(value)
    except _Bad as bad:
        where = path
        for key in reversed(bad.keys):
            where += key if key.startswith("[") else f"{'.' if where else ''}{key}"
        raise ManifestError(f"{where or 'the top level'} {bad.what}") from None


_CHECKERS: dict[int, Callable[[Any], None]] = {}


def _checker(schema: Any) -> Callable[[Any], None]:
    """The schema turned into nested closures once, so that checking a manifest of ten thousand experts does
    not dispatch on the schema's types for every field."""
    if id(schema) not in _CHECKERS:
        _CHECKERS[id(schema)] = _compile(schema)
    return _CHECKERS[id(schema)]


def _compile(schema: Any) -> Callable[[Any], None]:
    if isinstance(schema, Rule):
        ok, what = schema.ok, schema.what

        def leaf(value: Any) -> None:
            if not ok(value):
                raise _Bad(f"must be {what}, not {_short(value)}")

        return leaf
    if isinstance(schema, list):
        item_check = _compile(schema[0])

        def items(value: Any) -> None:
            if not isinstance(value, list):
                raise _Bad(f"must be a list, not {_short(value)}")
            for n, item in enumerate(value):
                try:
                    item_check(item)
                except _Bad as bad:
                    bad.keys.append(f"[{n}]")
                    raise

        return items
    if not isinstance(schema, dict):
        raise TypeError(f"not a schema: {schema!r}")
    first = next(iter(schema))
    if len(schema) == 1 and isinstance(first, Rule):  # a mapping: keys by a rule, values by one schema
        key_ok, key_what, value_check = first.ok, first.what, _compile(schema[first])

        def mapping(value: Any) -> None:
            if not isinstance(value, dict):
                raise _Bad(f"must be an object, not {_short(value)}")
            for key, item in value.items():
                if not key_ok(key):
                    raise _Bad(f"has the key {_short(key)}, which is not {key_what}")
                try:
                    value_check(item)
                except _Bad as bad:
                    bad.keys.append(key)
                    raise

        return mapping
    fields = [(key, _compile(sub)) for key, sub in schema.items()]

    def record(value: Any) -> None:
        if not isinstance(value, dict):
            raise _Bad(f"must be an object, not {_short(value)}")
        for key, field_check in fields:
            if key not in value:
                if isinstance(key, MayLack):
                    continue
                raise _Bad(f"lacks the field {key!r}")
            try:
                field_check(value[key])
            except _Bad as bad:
                bad.keys.append(key)
                raise

    return record


def is_valid(value: Any, schema: Any) -> bool:
    try:
        check(value, schema)
    except ManifestError:
        return False
    return True


def first_difference(found: Any, expected: Any, path: str = "") -> str | None:
    """The path of the first place where `found` differs from `expected`, or None when they are equal."""
    if isinstance(expected, dict) and isinstance(found, dict):
        for key in [*expected, *(k for k in found if k not in expected)]:
            where = f"{path}{'.' if path else ''}{key}"
            if key not in found or key not in expected:
                return where
            diff = first_difference(found[key], expected[key], where)
            if diff:
                return diff
        return None
    if isinstance(expected, list) and isinstance(found, list) and len(found) == len(expected):
        for n, (a, b) in enumerate(zip(found, expected)):
            diff = first_difference(a, b, f"{path}[{n}]")
            if diff:
                return diff
        return None
    same = found == expected and type(found) is type(expected)
    return None if same else (path or "the top level")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
