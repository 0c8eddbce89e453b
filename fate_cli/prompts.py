"""Prompt files (`--prompts FILE` of run and bench): one prompt per paragraph, or per line if no line is blank."""

from __future__ import annotations

import re
from pathlib import Path

from fate_cli.errors import UsageError


def read_prompts(path_text: str) -> list[str]:
    path = Path(path_text)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read --prompts {path} ({getattr(err, 'strerror', None) or err}); "
                         f"give a UTF-8 text file, "
            "one prompt per line or per paragraph") from None
    if re.search(r"\n\s*\n", text.strip()):
        prompts = [p.strip() for p in re.split(r"\n\s*\n", text)]
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UsageError(f"--prompts {path} holds no text; write one prompt per line or per paragraph")
    return prompts
