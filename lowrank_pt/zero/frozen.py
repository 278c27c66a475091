"""Edits of frozen parameters (bases, projectors) where ZeRO keeps them, shard by shard.

A frozen param has no fp32 master and no moments: its only copies are the module's (whole at
stages 0-2, an fp32 buffer whole on every rank) or, at ZeRO-3, each rank's flat shard
(``ds_tensor``) plus a resident full copy for a persistent param. The merges here form on each
rank only what its own shard needs, on the device holding it, so no rank materialises a full
base; ``lowrank_pt.zero.state`` keeps the copies of trainable params (masters, moments, grads).

Every function here is called on every rank with identical arguments.
"""

from __future__ import annotations

import torch

from lowrank_pt.core import dist as collectives
from lowrank_pt.zero.params import (
    full_numel,
    full_shape,
    holds_full_value,
    is_partitioned,
    is_persistent,
    local_shard,
    piece,
    piece_range,
)


def add_low_rank_product(engine, p: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: float,
                         base_scale: float = 1.0) -> None:
    """A merge: ``p ← base_scale·p + scale·left·right`` in place, for a frozen m×n ``p`` (base
    param or fp32 buffer) and full factors ``left`` (m×r), ``right`` (r×n). fp32 on the device
    holding ``p`` (or its shard), rounded once into its dtype. A ZeRO-3 ``p`` is never gathered:
    each rank forms only the rows of ``left·right`` that overlap its flat slice and adds them into
    its ``ds_tensor`` (a persistent param's resident full copy is updated too). Other stages and
    buffers hold ``p`` whole. Frozen: no master, no moments. No communication."""
    if p.requires_grad:
        raise ValueError("add_low_rank_product edits frozen bases only (a trainable param has masters)")
    if is_partitioned(p):
        shard, n = piece(p), full_shape(p)[1]
        lo, hi = piece_range(p)
        if hi > lo:  # rows lo//n .. (hi-1)//n, cut to [lo, hi)
            first, last = lo // n, (hi - 1) // n
            rows = _on(left[first : last + 1], shard) @ _on(right, shard)
            _scaled_add(shard.data[: hi - lo], rows.reshape(-1)[lo - first * n : hi - first * n], scale, base_scale)
        if not holds_full_value(p):
            return
    _scaled_add(p.data, (_on(left, p) @ _on(right, p)).view_as(p), scale, base_scale)


def normalise_rows_of_sum(engine, p: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: float,
                          magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's merge: ``p ← m ⊙ V / ‖V‖_row`` with ``V = p + scale·left·right``, in place, for a
    frozen m×n ``p`` and full factors and magnitude ``m``; returns the row norms of ``p`` as now
    stored (fp32, full, the same on every rank: DoRA's next magnitude). A ZeRO-3 ``p`` is never
    gathered: each rank forms the rows of ``V`` that overlap its flat slice, the per-row sums of
    squares of the pieces are summed over the ranks (m floats each, twice), and each rank scales
    its own piece. Collective at ZeRO-3 only."""
    if p.requires_grad:
        raise ValueError("normalise_rows_of_sum edits frozen bases only (a trainable param has masters)")
    if not _sharded_only(p):  # whole here (a persistent ZeRO-3 param: its full copy, then its shard)
        full = p.data if p.data.numel() == full_numel(p) else None
        if full is not None:
            full = full.view(full_shape(p))
            v = full.float() + scale * (_on(left, full) @ _on(right, full))
            full.copy_((v * (_on(magnitude, full) / torch.linalg.vector_norm(v, dim=1))[:, None]).to(full.dtype))
            if is_partitioned(p):
                piece(p).data.copy_(local_shard(p, full).to(piece(p).dtype))
            return torch.linalg.vector_norm(full.float(), dim=1).cpu()
    shard, (m, n) = piece(p), full_shape(p)
    lo, hi = piece_range(p)
    held = shard.data[: max(hi - lo, 0)]
    rows = torch.arange(lo, max(hi, lo), device=shard.device) // n  # the output row of each element held
    v = held.float()
    if hi > lo:
        first, last = lo // n, (hi - 1) // n
        product = _on(left[first : last + 1], shard) @ _on(right, shard)
        v = v + scale * product.reshape(-1)[lo - first * n : hi - first * n]

    def row_norms_of(values):
        squares = torch.zeros(m, dtype=torch.float32, device=shard.device)
        squares.index_add_(0, rows, values * values)
        return collectives.all_reduce_sum_(squares).sqrt()

    held.copy_((v * (_on(magnitude, shard) / row_norms_of(v))[rows]).to(held.dtype))
    return row_norms_of(held.float()).cpu()


def frozen_part(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """What this rank must keep of a full ``value`` to write the frozen ``p`` later with
    ``set_frozen_part``: its ZeRO-3 shard (in the shard's dtype), or the whole value in ``p``'s
    dtype where ``p`` is not partitioned or keeps a resident full copy (a persistent param).
    No communication."""
    if p.requires_grad:
        raise ValueError("frozen_part holds frozen params only (a trainable param has masters)")
    if _sharded_only(p):
        return local_shard(p, value).to(piece(p).dtype)
    return value.detach().to(p.device, p.dtype).reshape(full_shape(p))


def set_frozen_part(p: torch.Tensor, part: torch.Tensor) -> None:
    """Write what ``frozen_part`` kept into the frozen ``p`` (its shard, or the whole value and a
    persistent param's shard with it). No communication; every rank calls it, outside the
    forward and backward (a gathered non-persistent param would keep its old full copy until released)."""
    if _sharded_only(p):
        piece(p).data.copy_(part)
        return
    if not is_partitioned(p):
        p.data.copy_(part.view_as(p))
        return
    # A persistent ZeRO-3 param: its shard, and its full copy where one is resident now (it may
    # also hold its empty placeholder, until its next gather brings the shards back).
    piece(p).data.copy_(local_shard(p, part).to(piece(p).dtype))
    if p.data.numel() == full_numel(p):
        p.data.copy_(part.reshape(p.data.shape))


def _sharded_only(p) -> bool:
    """A ZeRO-3 param that lives as its shard between gathers (not a persistent one)."""
    return is_partitioned(p) and not is_persistent(p)


def _on(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.detach().to(like.device, torch.float32)


def _scaled_add(target: torch.Tensor, delta: torch.Tensor, scale: float, base_scale: float) -> None:
    base = target.float() * base_scale if base_scale != 1.0 else target.float()
    target.copy_(base.add_(delta, alpha=scale).to(target.dtype))
