"""Memory sizes as users write them (`8GB`, `8GiB`, `7.5G`, `800MB`), and the automatic VRAM budget."""

from __future__ import annotations

import re

import torch

from fate_cli.errors import UsageError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
AUTO_MARGIN = 0.10  # of free GPU memory, left for the CUDA context, other processes and fragmentation
AUTO_MARGIN_MIN = 512 * 1024**2


def parse_size(text: str) -> int:
    """'8GB' -> 8e9 bytes, '8GiB' -> 8 * 2**30; a bare number is bytes. Refuses zero, negatives, nonsense."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise UsageError(f"cannot read the size '{text}'; write it like 8GB, 8GiB, 7.5G or 800MB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise UsageError(f"the size '{text}' must be more than zero; write it like 8GB")
    return value


def format_size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"


def auto_budget(device: torch.device) -> int:
    """Free GPU memory less a safety margin; on CPU, available RAM less the same margin."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        from cache.host_memory import available_ram

        free = available_ram()
    return max(0, int(free - max(AUTO_MARGIN * free, AUTO_MARGIN_MIN)))
