"""Timed spans for the phases of a training step: ``with timer.phase("forward"): ...``.

A phase's time is *exclusive*: a span opened inside another (a GaLore refresh inside an optimizer
span, say) is subtracted from its parent, so the phases of a step add up to the step, and what no
span covers is reported as ``other``. Spans opened outside ``start_step``/``end_step`` (evaluation,
checkpointing) count in the stage totals only.

On a GPU the clock is read after ``torch.cuda.synchronize()``: without it a span would measure
the kernel launches, not the work. The sync costs some overlap of host and device work; pass
``sync=False`` to trade honesty of the breakdown for that overlap.

Methods hold ``NULL_TIMER`` until the trainer gives them a real one: its spans cost one
attribute lookup and a no-op context manager.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Callable, Iterator

import torch

PHASES = ("data", "forward", "backward", "optimizer", "method", "refresh", "merge", "eval", "checkpoint")
"""Phase names the trainer and the methods use (any other name works too and is reported as is):
data (fetching micro-batches), forward, backward, optimizer (engine.step), method (a method's
after_step work), refresh (GaLore subspace refresh), merge (ReLoRA merge-and-restart), eval,
checkpoint."""


class NullTimer:
    """The do-nothing timer: every span is free, nothing is recorded."""

    enabled = False

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield

    def start_step(self) -> None:
        pass

    def end_step(self) -> dict[str, float]:
        return {}


NULL_TIMER = NullTimer()


def _cuda_sync() -> None:
    torch.cuda.synchronize()


class PhaseTimer:
    """Exclusive wall time per phase, per step and per stage.

    ``start_step()``/``end_step()`` bracket one optimizer step; ``end_step`` returns that step's
    seconds by phase plus ``step`` (the whole span) and ``other`` (step minus the phases).
    ``totals`` holds seconds by phase over the stage (eval and checkpoint included) and
    ``step_seconds``/``steps`` the sum and count of step spans.
    """

    enabled = True

    def __init__(self, sync: bool | None = None, clock: Callable[[], float] = time.perf_counter):
        if sync is None:
            sync = torch.cuda.is_available()
        self._sync = _cuda_sync if sync else None
        self._clock = clock
        self._stack: list[list] = []  # [name, start, child_seconds]
        self._step_start: float | None = None
        self._step: dict[str, float] = defaultdict(float)
        self.totals: dict[str, float] = defaultdict(float)
        self.step_seconds = 0.0
        self.steps = 0
        self._listeners: dict[str, list[Callable[[], None]]] = defaultdict(list)

    def now(self) -> float:
        if self._sync is not None:
            self._sync()
        return self._clock()

    def on_enter(self, name: str, callback: Callable[[], None]) -> None:
        """Call ``callback()`` each time a ``name`` span opens (before its clock starts, so its
        cost is not charged to the phase). The memory tracker uses it to count gradients at the
        start of the optimizer phase, where they are all held."""
        self._listeners[name].append(callback)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        for callback in self._listeners.get(name, ()):
            callback()
        frame = [name, self.now(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            end = self.now()
            self._stack.pop()
            elapsed = end - frame[1]
            exclusive = elapsed - frame[2]
            if self._stack:
                self._stack[-1][2] += elapsed
            self.totals[name] += exclusive
            if self._step_start is not None:
                self._step[name] += exclusive

    def start_step(self) -> None:
        self._step = defaultdict(float)
        self._step_start = self.now()

    def end_step(self) -> dict[str, float]:
        """Seconds by phase of the step just ended, with ``step`` and ``other``."""
        if self._step_start is None:
            raise RuntimeError("end_step() without start_step()")
        total = self.now() - self._step_start
        self._step_start = None
        out = dict(self._step)
        out["other"] = max(0.0, total - sum(out.values()))
        out["step"] = total
        self.totals["other"] += out["other"]
        self.step_seconds += total
        self.steps += 1
        return out

    def reset(self) -> None:
        """Forget the stage totals (a new stage starts)."""
        self.totals = defaultdict(float)
        self.step_seconds = 0.0
        self.steps = 0
