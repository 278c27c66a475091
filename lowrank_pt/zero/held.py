"""Bytes a rank holds, by category, counted from the tensors DeepSpeed and the model actually keep.

Categories (per rank):

- ``params``: the module's copy of every parameter in the training dtype, frozen ones included
  (stages 1-2: the flat bf16/fp32 buffers the params are views of; stage 3: the rank's
  partitions, ``ds_tensor``), int8 bases (``lowrank_pt.model.int8_weights``) in their own dtype.
- ``master_params``: fp32 master copies where DeepSpeed keeps them apart from the params
  (stage 0 bf16: ``fp32_groups``; stages 1-2: ``single_partition_of_fp32_groups``, also at
  fp32, where they are clones; stage 3: ``fp32_partitioned_groups_flat``, which in fp32
  training and with bf16 masters are the param partitions themselves, counted as params).
- ``optimizer_states``: every tensor in the inner torch optimizer's ``state`` (Adam's two
  moments and its step counters; a peer optimizer's projector objects kept there included).
- ``grads``: reduced gradients held between the last backward of a step and the optimizer
  step: ``p.grad`` (stage 0), ``averaged_gradients`` (stages 1-2), the stage-3 flat gradient
  partition buffer.
- ``method_buffers``: the module's persistent buffers (GaLore decay factors, LoRA scales, an
  fp32 base), which DeepSpeed never partitions, so every rank holds them whole; and the frozen
  params a method marks as its buffers (``lowrank_pt.zero.method_buffers``: GaLore projectors), which ZeRO-3
  partitions like the weights (stage 3: the rank's partition, ``ds_tensor``).
- ``zero_buffers``: ZeRO's gradient-reduction buckets (stage 3 keeps one of
  ``reduce_bucket_size`` elements for the whole run; stages 1-2 allocate theirs during
  backward only, so they read 0 here).

Storage is counted once: views (a param inside a flat buffer, a partition of a flat group) are
deduplicated by their storage, and a storage belongs to the first category above that holds it.
Bytes are the storage's, padding included (see ``planner`` for DeepSpeed's padding rules).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from lowrank_pt.zero.method_buffers import is_method_buffer
from lowrank_pt.zero.params import is_partitioned, piece

CATEGORIES = ("params", "master_params", "optimizer_states", "grads", "method_buffers", "zero_buffers")
"""In the order a shared storage is attributed."""
STATE_CATEGORIES = ("params", "master_params", "optimizer_states", "grads", "method_buffers")
"""The categories the planner predicts exactly (zero_buffers depend on DeepSpeed's bucket config)."""

_PARAM_ATTRS = ("bit16_groups_flat", "bf16_groups_flat", "lp_param_buffer", "fp16_partitioned_groups_flat")
_MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition",
                 "fp32_groups_flat", "fp32_groups")
_GRAD_ATTRS = ("averaged_gradients", "grad_partitions_flat_buffer", "fp32_groups_gradients_flat")


def tensors_in(obj, objects: bool = False, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors in nested lists, tuples and dicts (and a list's ``flat_partition``); with
    ``objects``, also in the attributes of plain objects (a peer optimizer's projector kept in
    its state), a few levels deep."""
    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value, objects, depth + 1)
    elif isinstance(obj, (list, tuple)):
        flat = getattr(obj, "flat_partition", None)
        if isinstance(flat, torch.Tensor):
            yield flat
        for value in obj:
            yield from tensors_in(value, objects, depth + 1)
    elif objects and hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        for value in vars(obj).values():
            yield from tensors_in(value, objects, depth + 1)


class Ledger:
    """Bytes by category, each storage counted once."""

    def __init__(self):
        self.seen: set[tuple[str, int]] = set()
        self.bytes: dict[str, int] = {c: 0 for c in CATEGORIES}

    def add(self, category: str, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if storage.nbytes() == 0:
                continue
            key = (str(t.device), storage.data_ptr())
            if key in self.seen:
                continue
            self.seen.add(key)
            self.bytes[category] = self.bytes.get(category, 0) + storage.nbytes()


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The optimizer whose ``step`` updates the weights: the client optimizer DeepSpeed wraps
    (its precision or ZeRO wrapper calls its ``step``), or at stage 0 fp32 the engine's own."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else opt


def built_reduce_bucket(engine) -> int:
    """The ``zero_optimization.reduce_bucket_size`` the engine was built with (elements): what its
    ZeRO-3 reduce bucket holds, and what the planner is given for it."""
    return int(engine.zero_reduce_bucket_size())


def persistent_buffers(module: nn.Module) -> Iterator[torch.Tensor]:
    """Buffers that go into the state dict, read without calling ``state_dict`` (which ZeRO-3 hooks)."""
    for m in module.modules():
        for name, buf in m._buffers.items():
            if buf is not None and name not in m._non_persistent_buffers_set:
                yield buf


def state_bytes(engine) -> dict[str, int]:
    """Bytes this rank holds now, by category (see the module doc). No communication."""
    ledger = Ledger()
    module, opt = engine.module, engine.optimizer
    params = list(module.parameters())
    owned = [p for p in params if is_method_buffer(p)]
    params = [p for p in params if not is_method_buffer(p)]
    ledger.add("method_buffers", (piece(p) if is_partitioned(p) else p for p in owned))
    ledger.add("params", (piece(p) if is_partitioned(p) else p for p in params))
    for attr in _PARAM_ATTRS:
        ledger.add("params", tensors_in(getattr(opt, attr, None)))
    masters = [t for attr in _MASTER_ATTRS for t in tensors_in(getattr(opt, attr, None))]
    ledger.add("master_params", masters)
    inner = inner_optimizer(engine) if opt is not None else None
    if inner is not None:
        ledger.add("optimizer_states", tensors_in(list(getattr(inner, "state", {}).values()), objects=True))
    ledger.add("grads", (p.grad for p in params))
    for attr in _GRAD_ATTRS:
        ledger.add("grads", tensors_in(getattr(opt, attr, None)))
    ledger.add("grads", (t.grad for t in masters))
    if inner is not None:
        ledger.add("grads", (p.grad for g in inner.param_groups for p in g["params"]))
    ledger.add("method_buffers", persistent_buffers(module))
    for bucket in (getattr(opt, "ipg_buckets", None) or {}).values():
        ledger.add("zero_buffers", tensors_in(getattr(bucket, "buffer", None)))
    return dict(ledger.bytes)
