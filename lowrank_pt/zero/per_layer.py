"""Per-layer optimizer updates (``train.update: per_layer``) at ZeRO 0: each trained tensor is
stepped as soon as its gradient is final in the last micro-batch's backward, and its gradient is
freed there, so a step never holds every gradient at once (at accumulation 1 the largest single
gradient is the most it holds).

Exactness: the update of a tensor reads only its own gradient and state (AdamW, the projected
optimizers' per-matrix rules), so stepping tensors one at a time in backward order gives the
same bits as one step over all of them. Micro-batches before the last accumulate their gradients
as usual (held, as in an ordinary step); only the last one's backward steps. Never one optimizer
step per micro-batch.

How it sits in DeepSpeed 0.19.8 at ZeRO 0 (read from ``runtime/engine.py``):

- after the boundary's backward the engine all-reduces every gradient (``allreduce_gradients``:
  sum, then ×1/world). By then the gradients are gone, and that pass would make zeros for them
  (``_get_gradients_for_reduction``), so it is switched off (``engine.enable_backward_allreduce``)
  and each gradient is all-reduced in its own hook with the same arithmetic: the same bits;
- ``engine.step()`` still runs after the backward: the optimizer finds no gradient left and does
  nothing, and the engine advances the LR schedule and its counters as at any step;
- no clipping (a global norm needs every gradient first: config refuses ``optimizer.grad_clip``
  with per-layer updates) and no precision wrapper (fp32, or bf16 with ``engine.master_weights:
  bf16``; DeepSpeed's ZeRO 0 bf16 wrapper would copy every gradient into fp32 masters at the
  step: config refuses that).

A step whose work needs every gradient at once (a GaLore refresh that captured full gradients, a
LoRA-GA initialisation) runs as an ordinary step: ``reduce_gradients`` then stands in for
DeepSpeed's pass.

Non-finite values (the guard): the step's loss is checked on every rank before the last backward
(``NonFiniteGuard.check``), and a bad one skips the step with nothing applied, as in an ordinary
step. A gradient that is not finite while the loss is cannot be skipped that way: the tensors
stepped before it in this backward have moved. The hook then stops (no further tensor is
stepped) and raises ``TrainingError``: the run ends before any further save, and the last
checkpoint, written before this step, is what ``resume=auto`` continues from. The all-reduce
before the check makes the verdict the same on every rank.
"""

from __future__ import annotations

import contextlib

import torch

from lowrank_pt.core import dist
from lowrank_pt.core.errors import TrainingError
from lowrank_pt.zero.held import inner_optimizer


class PerLayerUpdates:
    """Post-accumulate-grad hooks on every tensor the engine's optimizer trains (see the module doc)."""

    @classmethod
    def of(cls, engine, update: str) -> "PerLayerUpdates | None":
        """The hooks a stage whose ``update`` is per_layer needs; None for ordinary steps."""
        return cls(engine) if update == "per_layer" else None

    def __init__(self, engine):
        if int(engine.zero_optimization_stage()) != 0:
            raise ValueError(f"per-layer updates are built for ZeRO 0, not {engine.zero_optimization_stage()}")
        self.engine = engine
        self.optimizer = inner_optimizer(engine)
        if self.optimizer is not engine.optimizer:
            raise ValueError("per-layer updates need the engine to call the optimizer directly (no precision "
                             "wrapper): fp32, or bf16 with engine.master_weights=bf16")
        engine.enable_backward_allreduce = False  # each gradient is reduced in its hook instead
        engine.per_layer_updates = self  # the memory tracker reads the gradient bytes held
        self.group_of: dict[int, dict] = {}
        self.params: list[torch.Tensor] = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                self.group_of[id(p)] = group
                self.params.append(p)
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]
        self.method = None
        self.step = -1
        self.armed = False
        self.held_bytes = 0
        """Bytes of gradients held right now by the tensors this steps."""
        self.peak_grad_bytes = 0
        """The most gradient bytes held at once since the stage started (the tracker's ``grads``)."""
        self.stepped = 0
        """Tensors stepped in the current backward."""

    @contextlib.contextmanager
    def updating(self, method, step: int):
        """Around the backward of a step's last micro-batch: each tensor is stepped as its gradient
        becomes final (``method.before_param_update`` first)."""
        self.method, self.step, self.armed, self.stepped = method, step, True, 0
        try:
            yield
        finally:
            self.armed = False
            self.method = None

    def reduce_gradients(self) -> None:
        """An ordinary step's all-reduce (DeepSpeed's pass is off): every gradient, sum then ×1/world."""
        for p in self.params:
            if p.grad is not None:
                _mean_over_ranks(p.grad)

    def _hook(self, p: torch.Tensor) -> None:
        if not self.armed:  # a micro-batch before the last: the gradient accumulates and is held
            if p.grad is not None:
                self.held_bytes = self._held()
                self.peak_grad_bytes = max(self.peak_grad_bytes, self.held_bytes)
            return
        self.peak_grad_bytes = max(self.peak_grad_bytes, self._held())
        _mean_over_ranks(p.grad)
        if not bool(torch.isfinite(p.grad).all()):
            self.armed = False  # nothing more is stepped in this backward
            raise TrainingError(
                f"a gradient is not finite (shape {tuple(p.shape)}) while the loss is, with train.update="
                f"per_layer: {self.stepped} tensor(s) were already updated in this backward, so the step "
                "cannot be skipped; stopped before any further save. resume=auto continues from the last "
                "checkpoint; lower the learning rate, or train this stretch with update=step, whose guard "
                "skips such a step")
        self.method.before_param_update(self.engine, p, self.step)
        step_one(self.optimizer, p, self.group_of[id(p)])
        p.grad = None
        self.stepped += 1

    def _held(self) -> int:
        return sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _mean_over_ranks(grad: torch.Tensor) -> None:
    """DeepSpeed's ZeRO 0 reduction of one gradient (postscale: sum, then ×1/world)."""
    world = dist.world_size()
    if world > 1:
        dist.all_reduce_(grad)
        grad.mul_(1.0 / world)


def step_one(optimizer: torch.optim.Optimizer, p: torch.Tensor, group: dict) -> None:
    """``optimizer.step()`` on ``p`` alone: torch's optimizers step every tensor with a gradient in
    their groups, so they see a one-tensor view of ``p``'s group (its hyperparameters, the LR the
    schedule set) for the call; the state stays keyed by ``p``."""
    groups = optimizer.param_groups
    optimizer.param_groups = [{**group, "params": [p]}]
    try:
        optimizer.step()
    finally:
        optimizer.param_groups = groups
