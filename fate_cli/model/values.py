"""Numbers and text that come from users (options, chat's /set, prompts) checked in one place.

Typer checks an option's type and simple bounds, but lets NaN and infinity through and knows nothing of
what a number must be for torch (a seed fits in 64 bits) or for memory (a budget list of a billion
entries). Every user number goes through a Number here, which names the option and what to give instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from fate_cli.errors import UsageError

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits


@dataclass(frozen=True)
class Number:
    kind: type  # int or float
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is refused
    example: str = ""

    def describe(self) -> str:
        noun = "a whole number" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            lo = f"above {_fmt(self.low)}" if self.low_open else f"from {_fmt(self.low)}"
            return f"{noun} {lo} to {_fmt(self.high)}"
        if self.low is not None:
            return f"{noun} {'above' if self.low_open else 'of at least'} {_fmt(self.low)}"
        return noun

    def fits(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value <= self.high

    def check(self, value: object, label: str) -> int | float:
        """`value` as given for `label` (an option like --seed), or a UsageError saying what to give."""
        if not self.fits(value):
            hint = f", e.g. {label} {self.example}" if self.example else ""
            raise UsageError(f"{label} {value!r} is out of range; give {self.describe()}{hint}")
        return self.kind(value)

    def parse(self, text: str, label: str) -> int | float:
        """`text` read as this number (chat's /set NAME VALUE), checked."""
        try:
            value = self.kind(text.strip())
        except ValueError:
            raise UsageError(f"{label} needs {self.describe()}, not {text.strip()!r}; "
                             f"give one, e.g. {label} {self.example}") from None
        return self.check(value, label)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


SAMPLING: dict[str, Number] = {
    "temperature": Number(float, 0.0, example="0.7"),
    "top_p": Number(float, 0.0, 1.0, low_open=True, example="0.9"),
    "top_k": Number(int, 0, example="40"),
    "seed": Number(int, 0, SEED_MAX, example="7"),
    "max_tokens": Number(int, 1, 2**31 - 1, example="256"),
}
BUDGET_SHARE = Number(float, 0.0, 1e6, low_open=True, example="50%")  # bench --vram N%, of the hot-tier bytes
SHARD_MB = Number(float, 0.0, float(1 << 24), low_open=True, example="1024")  # 16 TiB: above any store
MAX_BUDGETS = 1000  # rows a --vram range may ask for; a typo like 1KB-1TB+1KB would ask for a billion


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_sampling(temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None) -> None:
    """The command line's sampling options; None means not given."""
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            SAMPLING[name].check(value, option(name))


def check_text(text: str, what: str) -> str:
    """Text fate will tokenize: invalid UTF-8 from a terminal or a pipe arrives as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start].encode("utf-8", "surrogateescape")
        raise UsageError(
            f"{what} is not valid UTF-8 (byte 0x{bad.hex()} at character {err.start}); give UTF-8 text"
        ) from None
    return text


_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")


def check_repo_id(repo: str) -> str:
    """A Hub repo id as the Hub accepts it (org/name: letters, digits, '-', '_', '.'), checked before any request."""
    parts = repo.split("/")
    if len(parts) != 2 or not all(_REPO_PART.fullmatch(p) and "--" not in p and ".." not in p for p in parts):
        raise UsageError(
            f"'{repo}' is not a valid Hub repo id; write it as org/name with letters, digits, '-', '_' and '.' "
            "(as on huggingface.co)"
        )
    return repo
