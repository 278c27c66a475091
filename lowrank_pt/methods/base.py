"""The one small interface every training method implements.

The trainer calls a method at fixed points of a recipe stage and never branches on which method
it runs. Order of calls in one stage (``zero.materialise`` makes the first six):

    method = MethodClass(options, stage, run)         # options: the method's own dataclass
    method.prepare_model(model)                         # wrap / freeze, before DeepSpeed sees it
    held = method.after_weights_loaded(model)           # the stage's weights are in (not at a resume)
    groups = method.param_groups(model)                 # what the optimizer trains
    optimizer = method.build_optimizer(groups, stage, run.engine)   # what DeepSpeed wraps
    engine = initialize(..., method.lr_lambda(total_steps), gradient_clipping=method.grad_clip())
    method.on_engine_ready(StageContext(engine, total_steps, timer, guard, objective))  # once
    method.load_state_dict(saved) if resuming
    for step in range(start, total_steps):
        loss = method.train_step(engine, micro_batches, step)   # inside method.step_context(...):
                                                                 # the objective's loss per micro-batch,
                                                                 # backward, before_optimizer_step, step
        events = method.after_step(engine, step)                 # e.g. merge-and-restart
    weights = method.plain_weights(engine)              # the dense model's weights, adapters merged

A method declares what the rest of the project asks of it: ``reshardable``, ``has_dense_form``,
``flops_per_token``, its ``Options`` (a ``MethodOptions`` with ``check()``). Adding a method means a
module with a subclass and one line in ``methods/__init__.py`` (CONTRIBUTING.md). A method with its
own optimizer (APOLLO, Fira) overrides ``build_optimizer`` and declares that optimizer's state
formula in ``optimizer_state_bytes``, which the planner and the memory tracker follow.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager, Iterator, Optional

import torch
from torch import nn

from lowrank_pt.core.timer import NULL_TIMER, NullTimer, PhaseTimer
from lowrank_pt.model import int8_trained, int8_weights
from lowrank_pt.model.llama import flops_per_token
from lowrank_pt.objectives.base import LMObjective
from lowrank_pt.optim import lowbit, schedule
from lowrank_pt.optim.lowbit import rounding_generator
from lowrank_pt.optim.adamw import build_optimizer
from lowrank_pt.zero import partition as fragments
from lowrank_pt.zero import state as zero_io
from lowrank_pt.zero.guard import NonFiniteGuard
from lowrank_pt.zero.params import full_shape


@dataclass
class MethodOptions:
    """The base of every method's options dataclass (its fields carry docstrings, which become
    the config reference)."""

    def check(self) -> None:
        """Refuse combinations of options that cannot work, with a ValueError naming the keys;
        called once the options are parsed, before any work."""


@dataclass
class NoOptions(MethodOptions):
    """This method takes no options."""


@dataclass
class StageContext:
    """What a method needs from its stage once the engine exists, handed over once."""

    engine: Any
    """The DeepSpeed engine that trains the prepared model."""
    total_steps: int
    """Optimizer steps of the whole stage (a resumed stage counts from its start)."""
    timer: "PhaseTimer | NullTimer" = NULL_TIMER
    """The stage's phase timer: the method opens its spans (forward, backward, optimizer, and its
    own merge / refresh work) on it."""
    guard: NonFiniteGuard = field(default_factory=NonFiniteGuard)
    """The run's non-finite guard: ``train_step`` asks it whether each optimizer step is skipped."""
    objective: LMObjective = field(default_factory=LMObjective)
    """The stage's objective (``lowrank_pt.objectives``): the loss of each micro-batch and its weight."""
    per_layer: Any = None
    """With ``update: per_layer``, the engine's ``zero.per_layer.PerLayerUpdates``: each tensor is
    stepped in the last micro-batch's backward. None: one optimizer step after the backward."""


def is_matrix(p: torch.Tensor) -> bool:
    """Whether ``p`` is a matrix (weight decay applies), by its full shape: a param built
    partitioned under ZeRO-3 holds a 1-D placeholder, whose own ``ndim`` says nothing."""
    return len(full_shape(p)) >= 2


def int8_weight_draws(count: int, index: int, row: int) -> torch.Generator:
    """The stochastic-rounding draws of an int8 weight's rows from ``row`` at its ``count``-th update
    (``model.int8_trained``), keyed apart from the optimizers' own bf16 roundings (whose keys are
    (step, tensor, offset))."""
    return rounding_generator(count, -8, index, row)


class Method:
    """Full-rank training of every parameter; the base every other method refines."""

    name: ClassVar[str] = "full"
    Options: ClassVar[type] = NoOptions
    default_grad_clip: ClassVar[float] = 1.0
    """Gradient-norm clipping when the stage's ``optimizer.grad_clip`` is null. DeepSpeed clips the
    global norm of the gradients of the trainable params, whatever they are for this method."""
    reshardable: ClassVar[bool] = True
    """Whether a checkpoint of this method resumes on another world size or ZeRO stage: its state
    is the engine's (masters, Adam's moments) plus its own ``state_dict``. False for a method
    whose optimizer keeps state laid out by the saving ZeRO partitions (APOLLO, Fira)."""
    has_dense_form: ClassVar[bool] = True
    """Whether the trained model is a dense Llama (``to_plain`` gives its weights): what export,
    a following stage and generation take. A method whose model has another architecture says
    False, and config validation refuses what needs the dense form."""
    has_frozen_base: ClassVar[bool] = False
    """Whether the method keeps frozen bases beside what it trains (LoRA, ReLoRA, GaLore's
    adapter): what ``engine.weight_dtype: int8`` stores in int8."""
    starts_from_scratch: ClassVar[bool] = False
    """Whether the method builds its model factored before any weight exists (SLTrain, CoLA): a
    stage of it cannot start from a dense model's weights (a previous stage, ``init_from``), which
    config validation refuses."""
    saved_values_per_token: int = 0
    """Values per token the method's modules keep for backward beyond what the dense model's
    activations hold (CoLA's low-rank activations), set by ``prepare_model``: the planner's
    activations add them."""


    def __init__(self, options: Any, stage: Any, run: Any):
        self.options = options
        self.stage = stage
        self.run = run
        self.context: Optional[StageContext] = None
        self.step_skipped = False
        """Whether the last ``train_step`` was skipped by the non-finite guard (nothing applied)."""

    @property
    def timer(self) -> "PhaseTimer | NullTimer":
        return self.context.timer if self.context is not None else NULL_TIMER

    @property
    def guard(self) -> NonFiniteGuard:
        if self.context is None:  # a method driven without a stage context still skips bad steps
            self.context = StageContext(engine=None, total_steps=0)
        return self.context.guard

    def grad_clip(self) -> float:
        """The clipping threshold of this stage: its ``optimizer.grad_clip``, else the method's
        default; none under per-layer updates (a global norm needs every gradient first)."""
        clip = self.stage.optimizer.grad_clip
        if clip is None:
            return 0.0 if self.update == "per_layer" else self.default_grad_clip
        return float(clip)

    plan_refresh = None
    """What decides GaLore's ``refresh: auto`` from the stage's plan (``planner.resolve_refresh``,
    given by the trainer through ``methods.build``: the planner builds methods, so methods do not
    import it). None: auto is the exact refresh."""

    def refresh_working_numel(self, groups: list[dict]) -> int:
        """fp32 elements a refresh of the method's own optimizer holds at once (the planner's
        refresh working set; ``groups`` as ``zero.partition.group_shapes`` gives them); none here."""
        return 0

    def decided_options(self) -> dict:
        """The stage's options with what the method decided at its start (an ``auto`` resolved):
        what the tracker plans and the summary records."""
        return dict(self.stage.options) if self.stage is not None else {}

    @property
    def update(self) -> str:
        """The stage's update mode (``stages.N.update``, else ``train.update``): step or per_layer."""
        if self.stage is None:
            return "step"
        return self.stage.update or (self.run.train.update if self.run is not None else "step")

    # --- before any work starts ---------------------------------------------------------------
    @classmethod
    def check_stage(cls, options: Any, stage: Any, run: Any, model_cfg: Any, total_steps: int) -> None:
        """Checks of a stage that need more than its options, made by config validation before any
        work starts: the schedule, the stage's length (``total_steps``), and where needed the
        model's shapes (``model_cfg`` is resolved: build it on the meta device,
        ``lowrank_pt.model.targets.check_targets``). Raise ValueError naming the key below the stage
        (``schedule.kind=...``, ``options.target_modules: ...``); validation names the stage."""
        if run is not None and (stage.update or run.train.update) == "per_layer":
            cls.check_per_layer(options, stage, run)
        if run is not None and run.engine.weight_dtype == "int8":
            if not cls.has_frozen_base:
                cls.check_int8_updated(run)
            if getattr(options, "base_in_fp32", False):
                raise ValueError("options.base_in_fp32=true with engine.weight_dtype=int8: the base is stored "
                                 "either in fp32 or in int8; drop one")
        sched = stage.schedule
        if sched.kind == "jagged_cosine" and sched.restart_every < 1:
            raise ValueError(f"schedule.kind=jagged_cosine re-warms the LR every schedule.restart_every steps, "
                             f"which is {sched.restart_every}: set it >= 1, or use kind cosine (method "
                             f"{stage.method} does not restart; relora sets its own restarts)")

    @classmethod
    def check_int8_updated(cls, run: Any) -> None:
        """Refuse int8 storage of the weights this method updates (``model.int8_trained``) where it
        cannot hold (ValueError naming the keys): it needs ZeRO 0 and bf16 masters, since
        DeepSpeed's ZeRO 1-3 groups and its fp32 masters would each hold a 16- or 32-bit copy of
        every weight beside the codes."""
        if run.engine.zero_stage != 0:
            raise ValueError(f"method={cls.name} with engine.weight_dtype=int8 at engine.zero_stage="
                             f"{run.engine.zero_stage}: the int8 weights this method updates are built for ZeRO 0 "
                             "(ZeRO 1-3 copy every trained weight into 16-bit flat groups); use zero_stage 0, or "
                             "weight_dtype bf16")
        if run.engine.master_weights != "bf16":
            raise ValueError(f"method={cls.name} with engine.weight_dtype=int8 and engine.master_weights="
                             f"{run.engine.master_weights}: fp32 masters would hold every int8 weight in 32 bits; "
                             "set engine.master_weights: bf16 (the int8 weight is its own master, updated with "
                             "stochastic rounding)")

    @classmethod
    def check_per_layer(cls, options: Any, stage: Any, run: Any) -> None:
        """Refuse ``update: per_layer`` where this method's steps cannot run per layer (ValueError
        naming the keys). Every method's update reads one tensor's gradient and state at a time;
        a method whose every step rewrites gradients together refuses here."""

    # --- before the engine exists -------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> None:
        """Wrap or freeze modules. Full-rank training trains everything."""
        for p in model.parameters():
            p.requires_grad_(True)

    def after_weights_loaded(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """After the stage's starting weights are in the prepared ``model`` (carried from the
        previous stage, ``init_from``, or the fresh init), before the engine exists; not called
        when a stage resumes from a checkpoint. Where weight-dependent initialisation belongs
        (LoRA's pissa: an SVD of each base). A ZeRO-3 model is partitioned here
        (``lowrank_pt.zero.params.read_whole`` reads a param whole). Returns, by param id, the fp32 value each
        trainable param it wrote holds on this rank (``zero_io.write_before_engine``'s), which
        become a bf16 engine's masters."""
        return {}

    def store_bases(self, model: nn.Module) -> None:
        """Once the stage's weights and the method's inits are in (or before a checkpoint is loaded
        over them), before the engine exists: with ``engine.weight_dtype: int8``, store the frozen
        bases as int8 codes and scales (``lowrank_pt.model.int8_weights``)."""
        if self.run is not None and self.run.engine.weight_dtype == "int8":
            if self.has_frozen_base:
                int8_weights.store_bases(model)
            else:
                int8_trained.store(model)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The stage's optimizer over this method's param groups of the prepared ``model``
        (``build_optimizer``); where the weights it updates are int8 codes, it steps them through
        their codes (``int8_trained.steps_through_codes``)."""
        optimizer = self.build_optimizer(self.param_groups(model), self.stage, self.run.engine)
        if int8_trained.stored_numel(model):
            int8_trained.steps_through_codes(optimizer, int8_weight_draws)
        return optimizer

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Optimizer groups of the trainable params: weight decay on matrices only."""
        decay, no_decay = [], []
        for _, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (decay if is_matrix(p) else no_decay).append(p)
        wd = self.stage.optimizer.weight_decay
        groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def lr_lambda(self, total_steps: int) -> Callable[[int], float]:
        """LR multiplier (of the stage's peak LR) for each optimizer step."""
        return schedule.build(self.stage.schedule, total_steps)

    def build_optimizer(self, param_groups: list[dict], stage: Any, engine_cfg: Any) -> torch.optim.Optimizer:
        """The client optimizer DeepSpeed wraps, over ``param_groups`` (this method's): the stage's
        AdamW (``optim.adamw.build_optimizer``; ``stage.optimizer`` its hyperparameters, ``engine_cfg``
        the run's engine section: offload, ZeRO stage), unless a method brings its own."""
        return build_optimizer(param_groups, stage.optimizer, offload=engine_cfg.offload_optimizer,
                               zero_stage=engine_cfg.zero_stage, master_weights=engine_cfg.master_weights)

    def optimizer_state_bytes(self, groups: list[dict], zero_stage: int, world: int, rank: int,
                              sub_group_size: int | None = 1_000_000_000) -> int:
        """Bytes of optimizer state ``rank`` holds once every param has stepped (what the memory
        tracker measures as ``optimizer_states``); ``groups`` are this method's param groups with
        shapes for params (``fragments.group_shapes``). The planner calls it, so a method that
        builds its own optimizer declares that optimizer's formula here.

        AdamW's: both moments of every element it steps, in ``optimizer.state_dtype``
        (``lowbit.state_bytes``: 8 bytes an element in fp32, 4 in bf16, int8 codes plus a scale
        per block), and a 4-byte step counter per tensor it steps: each param at stage 0, each
        group's padded slice (``pad(N, 2·W)/W``) at stages 1-2, each sub-group's pieces (``⌈n/W⌉``
        per param, end to end) at stage 3."""
        state_dtype = self.stage.optimizer.state_dtype if self is not None and self.stage is not None else "fp32"
        numels = [[math.prod(s) for s in g["shapes"]] for g in groups]
        if zero_stage == 0:
            return sum(lowbit.state_bytes(n, state_dtype) for g in numels for n in g)
        if zero_stage in (1, 2):
            return sum(lowbit.state_bytes(fragments.padded_group(sum(g), world) // world, state_dtype)
                       for g in numels)
        parts = [[fragments.piece_of(n, world) for n in g] for g in numels]
        return sum(lowbit.state_bytes(sum(p[i] for i in sub), state_dtype)
                   for p in parts for sub in fragments.stage3_sub_groups(p, sub_group_size))

    def flops_per_token(self, model_cfg, micro_tokens: int | None = None) -> int:
        """Training FLOPs per token of the model this method trains (what MFU divides by), with
        ``micro_tokens`` tokens per forward call (null: one sequence): the dense Llama's, whatever
        a low-rank method saves on its updates (see the formula). A method whose model is not the
        dense Llama declares its own (after ``prepare_model``)."""
        return flops_per_token(model_cfg)

    def describe(self) -> str:
        """A line on what the method decided for this stage (printed at the stage's start), or ""."""
        return ""

    def step_cache_bytes(self, tokens: int, accum: int, zero_stage: int, precision: str) -> int:
        """Bytes of weights the method keeps for the length of each optimizer step with ``tokens``
        per micro-batch and ``accum`` micro-batches (the tracker's ``step_cache``); the planner
        calls it on a model prepared on the meta device."""
        return 0

    # --- with the engine ----------------------------------------------------------------------
    def on_engine_ready(self, context: StageContext) -> None:
        """Called once after ``deepspeed.initialize`` with what the method needs from its stage."""
        self.context = context

    def train_step(self, engine, micro_batches: list[dict], step: int) -> float:
        """One optimizer step over ``micro_batches`` (gradient accumulation); its mean loss on
        this rank.

        Each micro-batch's loss is the stage objective's, weighted as the objective says
        (``token_weights``: in SFT by its share of the step's answer tokens on all ranks).
        """
        weights = self.objective.token_weights(micro_batches)
        total = 0.0
        where = f"stage {self.stage.name!r} step {step + 1}"
        per_layer = self.context.per_layer if self.context is not None else None
        layerwise = per_layer is not None and not self.needs_every_gradient(step)
        with self.step_context(engine, micro_batches, step):
            for batch, weight in zip(micro_batches, weights):
                with self.timer.phase("forward"):
                    loss = self.objective.loss(engine, batch)
                    if weight != 1.0:
                        loss = loss * weight
                boundary = engine.is_gradient_accumulation_boundary()
                updating = contextlib.nullcontext()
                if boundary and layerwise:
                    # Collective: the losses are checked before the backward that applies the updates.
                    self.step_skipped = self.guard.check(engine, total + loss.detach().float().item(), where,
                                                         gradients=False)
                    if not self.step_skipped:
                        updating = per_layer.updating(self, step)
                with self.timer.phase("backward"), updating:
                    engine.backward(loss)
                total += loss.detach().float().item()
                if boundary and not layerwise:
                    if per_layer is not None:  # DeepSpeed's all-reduce is off under per-layer updates
                        per_layer.reduce_gradients()
                    # Collective: a non-finite loss or gradient on any rank skips the step on every rank.
                    self.step_skipped = self.guard.check(engine, total, where)
                    if not self.step_skipped:
                        self.before_optimizer_step(engine, step)
                with self.timer.phase("optimizer"):
                    self.guard.step(engine)
        return total / len(micro_batches)

    def needs_every_gradient(self, step: int) -> bool:
        """Whether step ``step``'s ``before_optimizer_step`` reads or rewrites gradients together
        (a GaLore refresh from captured gradients, LoRA-GA's init): under ``update: per_layer``
        such a step runs as an ordinary one, holding its gradients until the optimizer step."""
        return False

    def before_param_update(self, engine, p: torch.Tensor, step: int) -> None:
        """Under ``update: per_layer``, just before ``p`` is stepped in the last backward of step
        ``step`` (its gradient reduced and final): a method's per-tensor share of
        ``before_optimizer_step`` (GaLore installs a subspace refreshed in the backward). Nothing here."""

    def step_context(self, engine, micro_batches: list[dict], step: int) -> ContextManager:
        """A context around one optimizer step (every micro-batch's forward and backward, the
        boundary's ``before_optimizer_step`` and the step): where a method installs what the
        step's backward must capture (GaLore's refresh, LoRA-GA's gradients) and takes it down
        however the step ends. Nothing here."""
        return contextlib.nullcontext()

    @property
    def objective(self) -> LMObjective:
        """The stage's objective (the LM loss before the engine's context arrives)."""
        return self.context.objective if self.context is not None else _LM

    def base_is_start_model(self) -> bool:
        """Whether the trained model with its adapters switched off (``lowrank.adapters_disabled``)
        is the stage's starting model throughout the stage: DPO's reference then costs nothing.
        Not for full-rank methods (no adapters), nor for those that merge into the base."""
        return False

    def before_optimizer_step(self, engine, step: int) -> None:
        """Between the last micro-batch's backward (gradients reduced) and ``engine.step()``:
        where a method may rewrite weights or gradients (GaLore's subspace refresh)."""

    def after_step(self, engine, step: int) -> dict:
        """Work after optimizer step ``step`` (0-based). Returns metrics/events to log."""
        return {}

    # --- checkpoints and stage hand-over ------------------------------------------------------
    def state_dict(self) -> dict:
        """Counters and tensors the engine does not hold; plain data only, never objects."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def plain_weights(self, engine) -> Iterator[tuple[str, torch.Tensor]]:
        """The plain model's weights (adapters merged), one module at a time: ``(name, full fp32
        value)``, identical on every rank. Only one module's tensors are whole at once, so a
        hand-over never holds the whole model on any rank. Collective at ZeRO stages 1-3: every
        rank iterates to the end, in step."""
        module = engine.module
        persistent = set(module.state_dict().keys())
        by_module: dict[str, list[tuple[str, torch.Tensor, bool]]] = {}
        for name, p in module.named_parameters():
            by_module.setdefault(name.rpartition(".")[0], []).append((name, p, True))
        for name, buf in module.named_buffers():
            if name in persistent:
                by_module.setdefault(name.rpartition(".")[0], []).append((name, buf, False))
        for members in by_module.values():
            part = {name: zero_io.full_param(engine, t) if is_param else t.detach().float().cpu().clone()
                    for name, t, is_param in members if not int8_trained.is_placeholder(t)}
            yield from self.to_plain(part, self.options).items()

    def export_weights(self, engine) -> dict[str, torch.Tensor]:
        """Full fp32 state dict of the plain model (adapters merged), identical on every rank
        (``plain_weights`` gathered into one dict: the whole model on every rank; for export and
        tests, not for hand-over). Collective at ZeRO stages 1-3."""
        return dict(self.plain_weights(engine))

    @classmethod
    def plain_model(cls, model_cfg, options: Any) -> nn.Module:
        """The model ``to_plain``'s weights load into (generation, export checks): the dense
        Llama, or the method's own architecture where it has no dense form."""
        from lowrank_pt.model.llama import LlamaModel

        return LlamaModel(model_cfg)

    @classmethod
    def to_plain(cls, state: dict[str, torch.Tensor], options: Any) -> dict[str, torch.Tensor]:
        """Turn a full state dict of a model this method prepared into the plain model's
        (adapters merged; int8 weights dequantised). Used for stage hand-over, ``init_from`` and
        export."""
        return int8_weights.dequantised(state)


_LM = LMObjective()
"""The objective of a method used before (or without) a stage context: the LM loss."""
