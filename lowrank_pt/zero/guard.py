"""The non-finite guard: an optimizer step whose loss or gradient is not finite on any rank is
skipped on every rank, counted, and after ``train.max_nonfinite_steps`` in a row the run stops.

What DeepSpeed 0.19.8 does by itself with an inf/NaN gradient (read from its source):

- ZeRO 0 fp32 (no wrapper: the engine calls the client optimizer): nothing. The step applies
  the gradient as it is, and one NaN turns every weight and moment it reaches into NaN.
- ZeRO 0 bf16 (``FP16_UnfusedOptimizer``): skips when a gradient or the global norm is inf/NaN.
- ZeRO 1/2 (``DeepSpeedZeroOptimizer``): fp32 skips when the global norm is invalid (its norm
  helpers report inf/NaN as -1); bf16 skips on its all-reduced overflow check
  (``bf16.check_grad_overflow``, true by default).
- ZeRO 3: skips when the global norm is invalid, fp32 and bf16.
- Where it skips, the engine leaves the LR scheduler where it was and counts
  ``engine.skipped_steps``. None of them looks at the loss: a loss that is NaN on one rank while
  the gradients stay finite (a term without a gradient) is stepped.

So the guard decides itself, the same way at every stage and precision: once per optimizer
step, between the last micro-batch's backward (gradients reduced) and ``engine.step()``, each
rank checks its loss and the gradients it holds (``zero_io.local_gradients``: its partition
from ZeRO 1 on), and one all-reduce of a per-rank flag vector (``dist.all_reduce_``) tells every
rank which ranks saw what, so every rank takes the same decision. A skipped step:

- runs no ``Method.before_optimizer_step`` (GaLore's refresh, LoRA-GA's init, preconditioning:
  they would read the bad gradient; a skipped refresh keeps the old subspace until the next);
- still calls ``engine.step()``, so DeepSpeed does its bookkeeping (clears its gradient buffers,
  counts the micro-steps), but the inner optimizer's ``step`` (``held.inner_optimizer``: what
  DeepSpeed's wrapper calls, or the engine itself at ZeRO 0 fp32) does nothing: no weight,
  master or moment changes, and Adam's step count stays. Where DeepSpeed skips by itself the
  inner step is not even called; the outcome is the same;
- advances the LR schedule by one step, as an applied step does (where DeepSpeed skipped and
  left the scheduler, the guard steps it). The trainer's step count advances over a skipped
  step (its batch is consumed), and everything else counts those same steps: the stage's
  length, ReLoRA's restarts and jagged re-warms, GaLore's refresh gap, the eval and save
  cadence. A schedule held back by the skips would re-warm out of phase with the restarts and
  end the stage above its final LR. (DeepSpeed holds it back because its fp16 loss scaler skips
  steps routinely; here a skip is an exception.)

Collectives go through ``lowrank_pt.core.dist``; every rank calls ``check`` at every boundary.
"""

from __future__ import annotations

import functools
import math
import sys

import torch

from lowrank_pt.core import dist
from lowrank_pt.core.errors import TrainingError
from lowrank_pt.zero import state as zero_io
from lowrank_pt.zero.held import inner_optimizer

LOSS, GRADIENT = 1, 2
"""Bits of a rank's flag: its loss, or a gradient it holds, is not finite."""


class NonFiniteGuard:
    """Skips non-finite optimizer steps on every rank; one per run (the count spans stages)."""

    def __init__(self, max_in_a_row: int = 5):
        self.max_in_a_row = max_in_a_row
        """Consecutive skipped steps that stop the run (0: never stop)."""
        self.skipped = 0
        """Steps skipped since this process started."""
        self.in_a_row = 0
        self.first_of_row = ""
        self.skip_next_step = False
        self.last_skipped = False
        self.grad_norm: float | None = None
        """At ZeRO 0, the global L2 norm of the gradients the last checked step held (every rank
        holds them whole after the all-reduce), before any clipping; None elsewhere (DeepSpeed's
        ZeRO optimizers report theirs: ``engine.get_global_grad_norm``)."""

    def check(self, engine, loss_sum: float, where: str, gradients: bool = True) -> bool:
        """Whether the step about to be taken is skipped: ``loss_sum`` (this rank's losses of the
        step) and this rank's gradients are checked, and one all-reduce shares every rank's
        flags. Collective: every rank calls it at the boundary, before ``before_optimizer_step``.
        ``gradients`` False: the loss alone, before the backward that applies per-layer updates
        (``zero.per_layer``, which checks each gradient in its hook).
        Raises ``TrainingError`` at the ``max_in_a_row``-th skip in a row (before any update)."""
        self._wrap(engine)
        flags = torch.zeros(dist.world_size(), dtype=torch.int32)
        bad_gradient = gradients and not _finite(engine)
        self.grad_norm = _norm(engine) if gradients and engine.zero_optimization_stage() == 0 else None
        flags[dist.rank()] = (0 if math.isfinite(loss_sum) else LOSS) | (GRADIENT if bad_gradient else 0)
        dist.all_reduce_(flags)
        self.skip_next_step = self.last_skipped = bool(flags.any())
        if not self.skip_next_step:
            self.in_a_row = 0
            return False
        self.skipped += 1
        self.in_a_row += 1
        loss_ranks = [r for r, f in enumerate(flags.tolist()) if f & LOSS]
        grad_ranks = [r for r, f in enumerate(flags.tolist()) if f & GRADIENT]
        what = "; ".join(text for text in (f"loss not finite on rank(s) {loss_ranks}" if loss_ranks else "",
                                           f"gradient not finite on rank(s) {grad_ranks}" if grad_ranks else "")
                         if text)
        if self.in_a_row == 1:
            self.first_of_row = where
        if self.max_in_a_row and self.in_a_row >= self.max_in_a_row:
            self.skip_next_step = False
            raise TrainingError(
                f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient ({self.first_of_row} "
                f"to {where}; last: {what}): stopped (train.max_nonfinite_steps={self.max_in_a_row}). No "
                "skipped step changed the weights or the optimizer state, and no checkpoint was written "
                "after the last one: lower the learning rate (stages.N.optimizer.lr), clip gradients "
                "(stages.N.optimizer.grad_clip), try fp32, or check the data, then resume=auto continues "
                "from the last checkpoint")
        if dist.rank() == 0:
            print(f"warning: {where}: {what}: step skipped on every rank ({self.in_a_row} in a row, "
                  f"{self.skipped} in all)", file=sys.stderr, flush=True)
        return True

    def step(self, engine) -> None:
        """``engine.step()``; after a skipping ``check``, without the inner optimizer's update and
        with the LR schedule advanced (see the module's docstring)."""
        if not (self.skip_next_step and engine.is_gradient_accumulation_boundary()):
            engine.step()
            return
        try:
            engine.step()
        finally:
            self.skip_next_step = False
        if not engine.was_step_applied() and engine.lr_scheduler is not None:
            engine.lr_scheduler.step()  # DeepSpeed saw the overflow too and left the schedule

    def grad_norm_record(self, engine) -> dict:
        """``{"grad_norm": ...}`` of the last step, before clipping: DeepSpeed's ZeRO 1-3 optimizers'
        (from the partitions), else this guard's from the whole gradients at ZeRO 0; ``{}`` where
        neither has one (per-layer updates)."""
        norm = engine.get_global_grad_norm()
        norm = self.grad_norm if norm is None else norm
        return {} if norm is None else {"grad_norm": float(norm)}

    def events(self) -> dict:
        """What the trainer logs after a skipped step (the skips so far); nothing after a good one."""
        return {"guard/skipped_steps": self.skipped} if self.last_skipped else {}

    def _wrap(self, engine) -> None:
        """Let the inner optimizer's ``step`` do nothing while a skipped step runs (once per optimizer)."""
        inner = inner_optimizer(engine)
        if getattr(inner, "_nonfinite_guard", None) is self:
            return
        original = inner.step

        @functools.wraps(original)  # keeps the marks torch's LR scheduler put on it
        def guarded_step(*args, **kwargs):
            if self.skip_next_step:
                return None
            return original(*args, **kwargs)

        inner.step = guarded_step
        inner._nonfinite_guard = self


def _norm(engine) -> float | None:
    """The L2 norm of every gradient this rank holds, in fp32."""
    grads = zero_io.local_gradients(engine)
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def _finite(engine) -> bool:
    """Whether every gradient this rank holds for the coming step is finite."""
    grads = zero_io.local_gradients(engine)
    if not grads:
        return True
    bad = torch.stack([(~torch.isfinite(g)).any() for g in grads]).any()
    return not bool(bad)
