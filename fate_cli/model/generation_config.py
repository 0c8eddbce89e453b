"""A checkpoint's generation_config.json: the sampling defaults a run uses when the command line is silent.

Checked with the same ranges as the command line's options (fate_cli.model.values), so a default that
would end a run in a traceback (a string temperature, a NaN, a negative top_k) is refused at load with
the file and field named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fate_cli.errors import BadModel
from fate_cli.model.values import SAMPLING


@dataclass(frozen=True)
class GenerationDefaults:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


def generation_defaults(gen: dict[str, Any], path: Path, given: set[str] = frozenset()) -> GenerationDefaults:
    """The fields of generation_config.json (`gen`, already read from `path`) that sampling uses; those the
    command line gives (`given`) are not read, so an option can stand in for a broken default."""
    base = GenerationDefaults()
    do_sample = gen.get("do_sample", False)
    if do_sample is None:
        do_sample = False
    if not isinstance(do_sample, bool):
        raise BadModel(f"{path}: field 'do_sample' must be true or false, not {do_sample!r}; fix the file")
    values: dict[str, Any] = {}
    for name in ("temperature", "top_p", "top_k"):
        value = gen.get(name)
        if value is None or name in given:
            continue
        spec = SAMPLING[name]
        if spec.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not spec.fits(value):
            raise BadModel(
                f"{path}: field '{name}' must be {spec.describe()}, not {value!r}; fix the file, or give "
                f"--{name.replace('_', '-')} on the command line"
            )
        values[name] = value
    return GenerationDefaults(do_sample, **{**{k: getattr(base, k) for k in ("temperature", "top_p", "top_k")},
                                            **values})
