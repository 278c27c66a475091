"""Bytes a rank holds, by category, counted from the tensors DeepSpeed and the model actually keep.

Per-rank bytes by category (``params``, ``master_params``, ``optimizer_states``, ``grads``,
``method_buffers``, ``zero_buffers``) are read off DeepSpeed's buffers by ``lowrank_pt.zero.held``,
which documents each category; this module tracks them through a stage (at the optimizer step,
at a refresh, the weights a method keeps for a step), and the process's peaks.
"""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn

from lowrank_pt.zero.held import CATEGORIES, Ledger, state_bytes


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
    """Bytes of what a method keeps through every optimizer step beside its params (a GaLore
    adapter's ``w_eff`` on its ``step`` forward path, an SLTrain linear's ``support``), alive from
    the step's first forward."""
    ledger = Ledger()
    ledger.add("params", (getattr(m, key, None) for m in module.modules() for key in ("w_eff", "support")))
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
    stage: the layout does not change); under per-layer updates they are freed inside the backward,
    and ``zero.per_layer`` reports the most it held at once; the other categories whenever ``measure`` is called
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
        self.caches = any(hasattr(m, "w_eff") or hasattr(m, "support") for m in engine.module.modules())
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
        per_layer = getattr(self.engine, "per_layer_updates", None)
        if per_layer is not None:  # gradients freed inside the backward: the most it held at once
            now["grads"] = max(now["grads"], per_layer.peak_grad_bytes)
        if self.at_step is not None:
            now["grads"] = max(now["grads"], self.at_step["grads"])
            now["zero_buffers"] = max(now["zero_buffers"], self.at_step["zero_buffers"])
        if self.capture_peak:
            now["method_transient"] = self.capture_peak
        if self.step_cache_peak:
            now["step_cache"] = self.step_cache_peak
        now["total"] = sum(now[c] for c in CATEGORIES)
        return now
