"""Open a model for a command: resolve the name, pick device and dtype, load weights and tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fate_cli.errors import UsageError
from fate_cli.model.loader import LoadedModel, load_model
from fate_cli.registry import ResolvedModel, resolve
from fate_cli.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"unknown device '{name}'; use cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"--device {name} was asked for but CUDA is not available (torch {torch.__version__}, "
            f"{'no GPU visible' if torch.version.cuda else 'a CPU-only build'}); use --device cpu"
        )
    return torch.device(name)


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"unknown dtype '{name}'; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Runtime:
    resolved: ResolvedModel
    loaded: LoadedModel
    tokenizer: Tokenizer

    @property
    def model(self):  # noqa: ANN201 - the Transformer
        return self.loaded.model

    def describe(self) -> str:
        a, d = self.loaded.args, self.loaded.device
        where = torch.cuda.get_device_name(d) if d.type == "cuda" else "CPU"
        return (
            f"{self.resolved.name} ({a.family}, {a.num_layers} layers, {a.num_experts} experts, top-{a.top_k}) "
            f"on {d.type} [{where}], {dtype_name(self.loaded.dtype)}, experts resident, backend torch eager"
        )


def open_model(name: str | None, device: str | None = None, dtype: str | None = None) -> Runtime:
    resolved = resolve(name)
    dev = pick_device(device)
    # Trained weights produce denormal activations, which slow CPU float math ~80x; they round to zero.
    torch.set_flush_denormal(True)
    tokenizer = Tokenizer(resolved.path)
    loaded = load_model(resolved.path, dev, pick_dtype(dtype, dev))
    return Runtime(resolved, loaded, tokenizer)
