"""The shape a tier store's manifest (and its build journal, progress.json) must have before anything reads it.

A manifest is JSON anyone can edit, damage or truncate. Every field the store's readers use is checked
here against a schema: its type, its range, and for names and digests their form, so that a damaged
manifest is refused with the path of the first wrong field instead of a KeyError or TypeError deep in a
run. Whether the fields agree with each other (layouts, shard plan, fingerprint) is checked by
quant.store, which recomputes them the way a build does.

A schema is a plain value: a type or a Rule for a leaf, a dict for an object with exactly these keys,
`{KEY: schema}` for a mapping whose keys are checked by KEY's rule, a one-element list for a list.
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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _matches(pattern: str) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and re.fullmatch(pattern, v) is not None


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


def check(value: Any, schema: Any, path: str = "") -> None:
    """Raise ManifestError naming the first field of `value` that does not fit `schema`."""
    where = path or "the top level"
    if isinstance(schema, Rule):
        if not schema.ok(value):
            raise ManifestError(f"{where} must be {schema.what}, not {_short(value)}")
    elif isinstance(schema, list):
        if not isinstance(value, list):
            raise ManifestError(f"{where} must be a list, not {_short(value)}")
        for n, item in enumerate(value):
            check(item, schema[0], f"{path}[{n}]")
    elif isinstance(schema, dict):
        if not isinstance(value, dict):
            raise ManifestError(f"{where} must be an object, not {_short(value)}")
        key_rule = next(iter(schema)) if len(schema) == 1 and isinstance(next(iter(schema)), Rule) else None
        if key_rule is not None:
            for key, item in value.items():
                check(key, key_rule, f"{path}{'.' if path else ''}<key {key!r}>")
                check(item, schema[key_rule], f"{path}{'.' if path else ''}{key}")
            return
        missing = [k for k in schema if k not in value]
        if missing:
            raise ManifestError(f"{path + ' ' if path else ''}lacks the field {missing[0]!r}")
        for key, sub in schema.items():
            check(value[key], sub, f"{path}{'.' if path else ''}{key}")
    else:
        raise TypeError(f"not a schema: {schema!r}")


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
