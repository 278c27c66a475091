"""Bytes a rank holds, by category, counted from the tensors DeepSpeed and the model actually keep.

Categories (per rank):

- ``params``: the module's copy of every parameter in the training dtype, frozen ones included
  (stages 1-2: the flat bf16/fp32 buffers the params are views of; stage 3: the rank's
  partitions, ``ds_tensor``).
- ``master_params``: fp32 master copies where DeepSpeed keeps them apart from the params
  (stage 0 bf16: ``fp32_groups``; stages 1-2: ``single_partition_of_fp32_groups``, also at
  fp32, where they are clones; stage 3: ``fp32_partitioned_groups_flat``).
- ``optimizer_states``: every tensor in the inner torch optimizer's ``state`` (Adam's two
  moments and its step counters; a peer optimizer's projector objects kept there included).
- ``grads``: reduced gradients held between the last backward of a step and the optimizer
  step: ``p.grad`` (stage 0), ``averaged_gradients`` (stages 1-2), the stage-3 flat gradient
  partition buffer.
- ``method_buffers``: the module's persistent buffers (GaLore decay factors, LoRA scales, an
  fp32 base), which DeepSpeed never partitions, so every rank holds them whole; and the frozen
  params a method marks as its buffers (``lowrank_pt.frozen``: GaLore projectors), which ZeRO-3
  partitions like the weights (stage 3: the rank's partition, ``ds_tensor``).
- ``zero_buffers``: ZeRO's gradient-reduction buckets (stage 3 keeps one of
  ``reduce_bucket_size`` elements for the whole run; stages 1-2 allocate theirs during
  backward only, so they read 0 here).

Storage is counted once: views (a param inside a flat buffer, a partition of a flat group) are
deduplicated by their storage, and a storage belongs to the first category above that holds it.
Bytes are the storage's, padding included (see ``planner`` for DeepSpeed's padding rules).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from lowrank_pt.frozen import is_method_buffer

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


def inner_optimizer(engine_optimizer):
    """The torch optimizer that holds the moments (DeepSpeed's wrappers keep it in ``.optimizer``)."""
    inner = getattr(engine_optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else engine_optimizer


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
    ledger.add("method_buffers", (getattr(p, "ds_tensor", p) for p in owned))
    ledger.add("params", (getattr(p, "ds_tensor", p) for p in params))
    for attr in _PARAM_ATTRS:
        ledger.add("params", tensors_in(getattr(opt, attr, None)))
    masters = [t for attr in _MASTER_ATTRS for t in tensors_in(getattr(opt, attr, None))]
    ledger.add("master_params", masters)
    inner = inner_optimizer(opt) if opt is not None else None
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


def capture_bytes(module: nn.Module) -> int:
    """Bytes of what a GaLore refresh captured that this rank holds: each adapter's
    ``capture`` (a tensor, or an object whose ``tensors()`` are the full gradient or the
    sketches, kept by the rank that owns the matrix), alive from the step's backward until the
    refresh uses it."""
    ledger = Ledger()
    for m in module.modules():
        capture = getattr(m, "capture", None)
        held = [capture] if isinstance(capture, torch.Tensor) else getattr(capture, "tensors", list)()
        ledger.add("grads", held)
    return ledger.bytes["grads"]


def step_cache_bytes(module: nn.Module) -> int:
    """Bytes of the weights a method keeps for the length of an optimizer step (a GaLore
    adapter's ``w_eff`` on its ``step`` forward path), alive from the step's first forward."""
    ledger = Ledger()
    ledger.add("params", (getattr(m, "w_eff", None) for m in module.modules()))
    return ledger.bytes["params"]


# --- peaks ------------------------------------------------------------------------------------


def _read_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peaks() -> bool:
    """Reset the device's and the process's memory high-water marks. Returns whether the host
    peak could be reset (Linux ``/proc/self/clear_refs``); elsewhere it stays the process's."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peaks() -> dict[str, int]:
    """Peak device memory (allocated, reserved) since the last reset, and peak host RSS."""
    out = {}
    if torch.cuda.is_available():
        out["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        out["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    hwm = _read_hwm()
    if hwm is None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        hwm = rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux
    out["peak_rss_bytes"] = int(hwm)
    return out


class MemoryTracker:
    """State bytes of one engine through a stage.

    Gradients exist only between the last backward of a step and the optimizer step, so they are
    counted when the timer opens the ``optimizer`` phase at an accumulation boundary (once per
    stage: the layout does not change); the other categories whenever ``measure`` is called
    (optimizer states exist from the first step on). The full gradients GaLore captures for a
    refresh are counted when a ``refresh`` phase opens, as ``method_transient``; the weights kept
    for a step (``step_cache_bytes``) at every optimizer phase, their peak as ``step_cache``.
    """

    def __init__(self, engine, timer=None):
        self.engine = engine
        self.at_step: dict[str, int] | None = None
        self.capture_peak = 0
        self.step_cache_peak = 0
        # Only a method whose modules can keep a step's weights pays for looking at every step.
        self.caches = any(hasattr(m, "w_eff") for m in engine.module.modules())
        if timer is not None and getattr(timer, "enabled", False):
            timer.on_enter("optimizer", self._on_optimizer)
            timer.on_enter("refresh", self._on_refresh)

    def _on_optimizer(self) -> None:
        if self.caches:
            self.step_cache_peak = max(self.step_cache_peak, step_cache_bytes(self.engine.module))
        if self.at_step is not None:
            return
        boundary = getattr(self.engine, "is_gradient_accumulation_boundary", None)
        if boundary is None or boundary():
            self.at_step = state_bytes(self.engine)

    def _on_refresh(self) -> None:
        self.capture_peak = max(self.capture_peak, capture_bytes(self.engine.module))

    def measure(self) -> dict[str, int]:
        """Bytes by category (grads as held at the optimizer step), plus ``total``."""
        now = state_bytes(self.engine)
        if self.at_step is not None:
            now["grads"] = max(now["grads"], self.at_step["grads"])
            now["zero_buffers"] = max(now["zero_buffers"], self.at_step["zero_buffers"])
        if self.capture_peak:
            now["method_transient"] = self.capture_peak
        if self.step_cache_peak:
            now["step_cache"] = self.step_cache_peak
        now["total"] = sum(now[c] for c in CATEGORIES)
        return now


def release_host_heap() -> bool:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``); False where unavailable.

    glibc serves allocations above its mmap threshold with mmap and returns them on free, but
    the threshold rises (to 32 MiB) after the first such free, so later tensors below it come
    from the heap, whose freed pages stay in the process. Measured on a 350m ZeRO-3 CPU build
    (tools/bench_host_memory.py): 2.2 GiB resident after building a model whose shard is 0.6
    GiB. Called after a model build and a stage hand-over, where one-off tensors churn."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
