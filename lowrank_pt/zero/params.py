"""A ZeRO-3 param's placeholder fields, named in one place.

A param built under ``deepspeed.zero.Init`` (or converted by a ZeRO-3 engine) holds an empty
placeholder as its ``data``; its real shape and size are ``ds_shape`` and ``ds_numel``, and this
rank's piece of the flattened value is ``ds_tensor``: ``ds_tensor.ds_numel`` elements starting at
``rank · ds_tensor.ds_numel`` (the last rank's piece padded). Everything outside ``zero`` asks
these functions instead of reading the fields. No function here communicates, except
``gathered`` and ``read_whole`` (a ZeRO-3 all-gather every rank joins).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def is_partitioned(p) -> bool:
    """Whether ``p`` is a ZeRO-3 param (built under ``deepspeed.zero.Init`` or converted by the engine)."""
    return hasattr(p, "ds_tensor")


def full_shape(p) -> tuple[int, ...]:
    """The shape of ``p``'s full value (a ZeRO-3 param's own ``shape`` is its empty placeholder's)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def full_numel(p) -> int:
    """The number of elements of ``p``'s full value."""
    return int(getattr(p, "ds_numel", p.numel()))


def piece(p) -> torch.Tensor:
    """This rank's piece of a ZeRO-3 param: the flat tensor the rank keeps between gathers."""
    return p.ds_tensor


def piece_range(p) -> tuple[int, int]:
    """``[lo, hi)``: the elements of the flattened full value this rank's piece holds (``hi`` cut at
    the end: a padded last piece holds fewer than its size; ``hi <= lo`` where it holds none)."""
    part = int(p.ds_tensor.ds_numel)
    lo = dist.get_rank(group=p.ds_process_group) * part
    return lo, min(lo + part, full_numel(p))


def piece_size(p) -> int:
    """Elements of this rank's piece, padding included (equal on every rank)."""
    return int(p.ds_tensor.ds_numel)


def local_shard(p, value: torch.Tensor) -> torch.Tensor:
    """This rank's piece of the full ``value`` in ZeRO-3's padded partitioning of ``p`` (fp32,
    zeros where the last rank's piece runs past the end), on the piece's device."""
    lo, hi = piece_range(p)
    out = torch.zeros(piece_size(p), dtype=torch.float32)
    if hi > lo:
        out[: hi - lo] = value.detach().reshape(-1)[lo:hi].float()
    return out.to(p.ds_tensor.device)


def is_persistent(p) -> bool:
    """A ZeRO-3 param small enough to stay whole on every rank (below the persistence threshold)."""
    return bool(getattr(p, "ds_persist", False))


def holds_full_value(p) -> bool:
    """Whether ``p.data`` holds the full value now (always outside ZeRO-3; a persistent or
    gathered ZeRO-3 param too)."""
    if not is_partitioned(p):
        return True
    # DeepSpeed is imported where a ZeRO-3 param exists: the model package uses these helpers on
    # plain-torch models too (generation, export), which need not pay DeepSpeed's import.
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return p.ds_status == ZeroParamStatus.AVAILABLE and p.data.numel() == p.ds_numel


def gathered(params, modifier_rank: int | None = None):
    """A context in which every param of ``params`` holds its full value: ZeRO-3 params are
    gathered (all ranks join; with ``modifier_rank``, that rank's writes are kept and re-partitioned),
    anything else is its own."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed  # as above: only where a ZeRO-3 param exists

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def read_whole(p: torch.Tensor) -> torch.Tensor:
    """A fresh fp32 CPU copy of the full value of ``p`` (a ZeRO-3 param gathered for the copy)."""
    with gathered([p]):
        return p.detach().float().cpu().clone()


def partition_like(like: torch.Tensor, params: list[torch.Tensor]) -> None:
    """Partition ``params`` (new, whole, on every rank alike) as ZeRO-3 partitions ``like``'s
    model: each rank keeps its shard from here on. Nothing where ``like`` is not partitioned."""
    if is_partitioned(like):
        like.convert_to_zero_parameters(param_list=list(params))
