"""A method's own frozen tensors (GaLore's projectors) held as parameters, not buffers.

DeepSpeed never partitions a buffer: at ZeRO-3 every rank would hold all of them whole. A frozen
parameter (``requires_grad=False``) is partitioned like the weights it serves and gathered with
its layer for forward and backward, and no optimizer sees it (param groups take trainable params
only). The mark lets the memory tracker and the planner count such params as method buffers
rather than model weights; a method reads and writes their values through ``zero_io`` like any
other param.
"""

from __future__ import annotations

import torch
from torch import nn

_MARK = "lowrank_method_buffer"


def method_buffer(value: torch.Tensor) -> nn.Parameter:
    """``value`` as a frozen, marked parameter (its dtype kept)."""
    p = nn.Parameter(value, requires_grad=False)
    setattr(p, _MARK, True)
    return p


def is_method_buffer(p: torch.Tensor) -> bool:
    return bool(getattr(p, _MARK, False))
