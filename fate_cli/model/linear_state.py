"""The per-row state of linear-attention layers, carried beside the KV cache.

A Gated DeltaNet layer keeps, for each row, a fixed-size recurrent state ([value heads, key dim, value dim],
float32) and the last kernel - 1 inputs of its causal convolution. Unlike keys and values, this state sums
up every token so far and cannot be cut back to an earlier position: a caller that wants to continue from an
earlier point keeps a snapshot taken there (chat does, at the end of each prompt) or prefills again.
Buffers are allocated once and updated in place, so a captured decode step replays over them.
"""

from __future__ import annotations

import torch

from fate_cli.model.args import ModelArgs


class LinearState:
    """conv [layers, batch, conv channels, kernel - 1] at the model's dtype; ssm [layers, batch, value heads,
    key dim, value dim] in float32. Layer index: the layer's position among the linear-attention layers."""

    def __init__(self, conv: torch.Tensor, ssm: torch.Tensor):
        self.conv, self.ssm = conv, ssm

    @classmethod
    def empty(cls, args: ModelArgs, batch: int, dtype: torch.dtype, device: torch.device | str) -> LinearState:
        lin, n = args.linear, len(args.linear_layer_ids)
        assert lin is not None
        conv = torch.zeros(n, batch, lin.conv_dim, lin.conv_kernel - 1, dtype=dtype, device=device)
        ssm = torch.zeros(n, batch, lin.num_value_heads, lin.key_head_dim, lin.value_head_dim,
                          dtype=torch.float32, device=device)
        return cls(conv, ssm)

    @staticmethod
    def bytes_per_row(args: ModelArgs, dtype: torch.dtype) -> int:
        lin = args.linear
        if lin is None:
            return 0
        conv = lin.conv_dim * (lin.conv_kernel - 1) * torch.finfo(dtype).bits // 8
        ssm = lin.num_value_heads * lin.key_head_dim * lin.value_head_dim * 4
        return len(args.linear_layer_ids) * (conv + ssm)

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.ssm.nbytes

    def rows(self, start: int, stop: int) -> LinearState:
        """Rows start..stop, sharing this state's memory."""
        return LinearState(self.conv[:, start:stop], self.ssm[:, start:stop])

    def copy_row(self, src: int, dst: int) -> None:
        """Row `src`'s state into row `dst` (a batch compacting its rows)."""
        self.conv[:, dst] = self.conv[:, src]
        self.ssm[:, dst] = self.ssm[:, src]

    def snapshot(self, device: torch.device | str | None = None) -> LinearState:
        """A copy, to restore later (on `device`, e.g. in host memory, to spare the GPU's)."""
        return LinearState(self.conv.to(device, copy=True), self.ssm.to(device, copy=True))

    def restore(self, saved: LinearState) -> None:
        """Put a snapshot back, in place (a captured step keeps pointing at these buffers)."""
        self.conv.copy_(saved.conv)
        self.ssm.copy_(saved.ssm)
