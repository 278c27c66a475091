"""Reads and edits of a wrapped module's frozen base ``W0``, wherever it is kept: the one place
that chooses between a frozen param or fp32 buffer (``lowrank_pt.zero.frozen`` and
``lowrank_pt.zero.state``: shard by shard at ZeRO-3) and int8 codes (``lowrank_pt.model.int8_weights``,
re-quantised with stochastic rounding from a generator seeded by ``seed_parts``, the same on
every rank; one matrix whole at a time, each ZeRO-3 rank keeping its shard).

Every function is called on every rank with identical arguments.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_pt.model import int8_weights
from lowrank_pt.model.lowrank_linear import seeded_generator
from lowrank_pt.zero import frozen as zero_frozen
from lowrank_pt.zero import state as zero_io


def read(engine, module: nn.Module) -> torch.Tensor:
    """The full fp32 value of the base, a fresh CPU tensor, the same on every rank."""
    if int8_weights.is_int8(module):
        return int8_weights.read(module)
    return zero_io.full_param(engine, module.weight)


def write(engine, module: nn.Module, value: torch.Tensor, seed_parts: tuple) -> None:
    """Store ``value`` (full shape) as the base."""
    if int8_weights.is_int8(module):
        int8_weights.assign(module, value, seeded_generator(*seed_parts))
    else:
        zero_io.set_param(engine, module.weight, value)


def add_low_rank_product(engine, module: nn.Module, left: torch.Tensor, right: torch.Tensor, scale: float,
                         seed_parts: tuple, base_scale: float = 1.0) -> None:
    """A merge: ``W0 ← base_scale·W0 + scale·left·right`` (fp32, rounded once into the base's storage)."""
    if not int8_weights.is_int8(module):
        zero_frozen.add_low_rank_product(engine, module.weight, left, right, scale, base_scale=base_scale)
        return
    w = int8_weights.read(module)
    if base_scale != 1.0:
        w = w * base_scale
    w.add_(left.detach().float().cpu() @ right.detach().float().cpu(), alpha=scale)
    int8_weights.assign(module, w, seeded_generator(*seed_parts))


def normalise_rows_of_sum(engine, module: nn.Module, left: torch.Tensor, right: torch.Tensor, scale: float,
                          magnitude: torch.Tensor, seed_parts: tuple) -> torch.Tensor:
    """DoRA's merge: ``W0 ← m ⊙ V / ‖V‖_row`` with ``V = W0 + scale·left·right``; returns the row
    norms of the base as now stored (fp32, full, the same on every rank)."""
    if not int8_weights.is_int8(module):
        return zero_frozen.normalise_rows_of_sum(engine, module.weight, left, right, scale, magnitude)
    v = int8_weights.read(module)
    v.add_(left.detach().float().cpu() @ right.detach().float().cpu(), alpha=scale)
    v = v * (magnitude.detach().float().cpu() / torch.linalg.vector_norm(v, dim=1))[:, None]
    int8_weights.assign(module, v, seeded_generator(*seed_parts))
    return torch.linalg.vector_norm(int8_weights.read(module), dim=1)
