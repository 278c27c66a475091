"""GaLore (gradient low-rank projection) as a method, at every ZeRO stage, via frozen projectors.

Each targeted linear is a ``GaLoreLinear`` (``W = d·W0 + α·B·Q``): DeepSpeed trains ``B`` with
AdamW (eps ``α·eps`` in its own param group) and never sees a projector, so ZeRO 1-3, bf16,
gradient accumulation and checkpoints work unchanged. At steps 0, T, 2T, ... ``train_step``
runs the refresh between the last micro-batch's backward and the optimizer step:

1. the adapters' backward has also formed the full gradient ``dyᵀ·x`` of each micro-batch (or,
   with ``svd: sketch``, only its two sketches, ``lowrank_pt.methods.galore.sketch``) and summed each
   matrix's onto its owner rank (``lowrank_pt.core.owners``: balanced by bytes, so a rank holds the
   captures of ~1/world of the bytes, and the SVD work is spread over the ranks);
2. the owner computes the new basis; it and ``α·project(G)`` come back by broadcast, so every
   rank holds the same ``Q``;
3. ``W0 ← d·W0 + α·B·Q_old``, ``B ← 0``, ``d ← 1``, ``Q ← Q_new``, Adam's moments kept
   (published GaLore) or re-projected, and ``B``'s reduced gradient replaced by ``α·G·Q_newᵀ``;
4. the optimizer step runs as usual (clipping then sees the low-rank gradient norm).

With ``svd: sketch``, once a subspace exists, the refresh step's own update is made in the old
subspace (where its gradient is exact) and step 3 runs after the optimizer step: the new
subspace serves from the next step on.

With ``refresh: backward`` (one micro-batch per step) steps 1-2 happen inside each matrix's own
backward instead, one matrix at a time (``capture.BackwardRefresh``): its B gradient is formed
in the new basis there, and step 3 runs at the step from the kept new bases.

A refresh whose gradient is zero or non-finite, or whose SVD fails, keeps the old basis and
leaves the step as computed (``after_step`` reports it). Non-targeted params train full-rank.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import nn

from lowrank_pt.core import dist
from lowrank_pt.core.owners import balanced_owners
from lowrank_pt.methods import frozen_base
from lowrank_pt.methods.base import Method, is_matrix
from lowrank_pt.methods.galore import cost
from lowrank_pt.methods.galore.adapter import GaLoreLinear, merged_state_dict, wrap_linears
from lowrank_pt.methods.galore.capture import BackwardRefresh, GradientCapture, SketchCapture, plan_capture
from lowrank_pt.methods.galore.options import PROJECTOR_DTYPES, GaLoreOptions
from lowrank_pt.model.targets import check_targets
from lowrank_pt.optim import projector
from lowrank_pt.zero import frozen as zero_frozen
from lowrank_pt.zero import state as zero_io

log = logging.getLogger(__name__)


def _kept_on_host(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """What a rank keeps of a new basis ``value`` for the frozen ``p`` until the step: its part
    (``zero_frozen.frozen_part``), in host memory, so the device holds nothing of it meanwhile."""
    return zero_frozen.frozen_part(p, value).cpu()


class GaLore(Method):
    """GaLore-AdamW on the targeted linears through frozen projectors; AdamW on the rest."""

    name = "galore"
    Options = GaLoreOptions
    has_frozen_base = True
    default_grad_clip = 0.0
    """Off, as GaLore's own scripts. With clipping on, DeepSpeed clips the global norm of what it
    trains: B's gradient ``α·G·Qᵀ`` (the projected gradient, whose norm is at most α times the
    full gradient's) together with the full-rank params' gradients, not the norm of ``G``."""

    @classmethod
    def check_stage(cls, options, stage, run, model_cfg, total_steps: int) -> None:
        """The base checks, and every target_modules pattern matching a linear of the model."""
        super().check_stage(options, stage, run, model_cfg, total_steps)
        check_targets(model_cfg, options.target_modules)
        if options.forward == "step" and run is not None and run.engine.zero_stage == 3:
            raise ValueError("options.forward=step keeps a full W_eff per matrix through each step, which "
                             "ZeRO-3 exists to avoid: use call, factored or auto at ZeRO-3")
        if options.refresh == "backward" and run is not None:
            accum = stage.micro_and_accum(run.train)[1]
            if accum != 1:
                raise ValueError(f"options.refresh=backward refreshes each matrix inside its backward and needs "
                                 f"one micro-batch per step, but grad_accum is {accum}: set grad_accum 1, or "
                                 f"use refresh: step (with svd: sketch it holds sketches, not gradients)")

    def __init__(self, options, stage, run):
        super().__init__(options, stage, run)
        self.adapters: dict[str, GaLoreLinear] = {}
        self.refreshes = 0
        self.kept_bases = 0
        self.last_refresh_step = -1
        self.last_refresh: dict = {}
        """The latest refresh's report (seconds, kept subspaces), logged after its step."""
        self.pending: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        """A sketch refresh's new bases (this rank's part, in host memory) and r×r changes of
        basis (re-projected moments), installed after the refresh step's optimizer step."""
        self._layerwise: tuple | None = None
        """Under per-layer updates, the refresh being installed adapter by adapter in this step's
        backward: (step, kept bases, seconds, B's id -> adapter name)."""
        self.workload: tuple[int, int] | None = None
        """(tokens per micro-batch, micro-batches per step) the forward paths were chosen for."""
        self.refresh_decided = ""
        """refresh auto: what it decided, and why (printed at the stage's start)."""

    # --- before the engine exists -------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> None:
        if self.options.refresh == "auto":
            self.options = self._decide_refresh(model)
        o = self.options
        for p in model.parameters():
            p.requires_grad_(True)
        self.adapters = wrap_linears(model, o.target_modules, o.rank, o.scale, o.proj_type, o.base_in_fp32,
                                     PROJECTOR_DTYPES[o.projector_dtype])
        decay = self.stage.optimizer.weight_decay > 0
        for adapter in self.adapters.values():
            adapter.use_decay = decay
            plan_capture(adapter, o)
        if self.run is not None:  # the paths follow the run's workload (without one: call, or the option's)
            micro, accum = self.stage.micro_and_accum(self.run.train)
            self.workload = (micro * self.run.model.seq_len, accum)
            paths = self.forward_paths(*self.workload, self.run.engine.zero_stage, self.run.engine.precision)
        else:
            paths = [o.forward if o.forward != "auto" else "call"] * len(self.adapters)
        for adapter, path in zip(self.adapters.values(), paths):
            adapter.forward_path = path

    def _decide_refresh(self, model) -> GaLoreOptions:
        """``refresh: auto`` by ``self.plan_refresh`` (the trainer's: ``planner.resolve_refresh``) for
        this stage, against the smallest memory over the ranks, so every rank decides alike.
        Without it (the planner's own layout, which decides before it builds one): the exact refresh."""
        if self.plan_refresh is None or self.run is None:
            return replace(self.options, refresh="step")
        run, stage = self.run, self.stage
        micro, accum = stage.micro_and_accum(run.train)
        memory = dist.min_over_ranks(dist.memory_bytes_per_rank())
        chosen, self.refresh_decided, _ = self.plan_refresh(
            model.cfg, dict(stage.options), memory, zero_stage=run.engine.zero_stage, world=dist.world_size(),
            micro_batch=micro, seq_len=run.model.seq_len, precision=run.engine.precision,
            activation_checkpointing=run.model.activation_checkpointing, weight_decay=stage.optimizer.weight_decay,
            grad_accum=accum, state_dtype=stage.optimizer.state_dtype, master_weights=run.engine.master_weights,
            weight_dtype=run.engine.weight_dtype, grad_accum_dtype=run.engine.grad_accum_dtype, update=self.update)
        return replace(self.options, refresh=chosen["refresh"], svd=chosen.get("svd", self.options.svd))

    def decided_options(self) -> dict:
        """The stage's options, with what ``refresh: auto`` decided."""
        decided = super().decided_options()
        if self.refresh_decided:
            decided.update(refresh=self.options.refresh, svd=self.options.svd)
        return decided

    def forward_paths(self, tokens: int, accum: int, zero_stage: int, precision: str) -> list[str]:
        """Each adapter's forward path (``cost.assign``) for ``tokens`` per micro-batch and ``accum``
        micro-batches per step: the run's choice, and the planner's."""
        o = self.options
        adapters = list(self.adapters.values())
        return cost.assign([a.shape for a in adapters], [a.rank for a in adapters], [a.side for a in adapters],
                           tokens, accum, zero_stage, o.forward, int(o.forward_cache_gb * 2**30),
                           cost.element_bytes(precision))

    def step_cache_bytes(self, tokens: int, accum: int, zero_stage: int, precision: str) -> int:
        """The W_eff copies of the adapters on the ``step`` path, in the training dtype."""
        adapters = list(self.adapters.values())
        return cost.cache_bytes([a.shape for a in adapters], self.forward_paths(tokens, accum, zero_stage, precision),
                                cost.element_bytes(precision))

    def describe(self) -> str:
        """The forward paths chosen and their FLOPs against full rank on the targeted linears."""
        if not self.adapters or self.workload is None:
            return self.refresh_decided
        tokens, accum = self.workload
        adapters = list(self.adapters.values())
        counts: dict[str, int] = {}
        for a in adapters:
            counts[a.forward_path] = counts.get(a.forward_path, 0) + 1
        ours = sum(cost.flops(a.forward_path, a.shape, a.rank, a.side, tokens, accum) for a in adapters)
        full = sum(cost.full_rank_flops(a.shape, tokens, accum) for a in adapters)
        chosen = ", ".join(f"{p} x{n}" for p, n in counts.items())
        paths = (f"galore forward ({self.options.forward}, {tokens} tokens/micro-batch, accum {accum}): {chosen}; "
                 f"{ours / full:.3f}x full-rank FLOPs on the {len(adapters)} targeted linears")
        return "; ".join(filter(None, (paths, self.refresh_decided)))

    def param_groups(self, model: nn.Module) -> list[dict]:
        """B of every adapter in group 0 (eps scaled by alpha); then full-rank AdamW groups."""
        opt = self.stage.optimizer
        projected = [a.galore_b for a in self.adapters.values()]
        ids = {id(p) for p in projected}
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad and id(p) not in ids:
                (decay if is_matrix(p) else no_decay).append(p)
        groups = [{"params": projected, "weight_decay": opt.weight_decay, "eps": opt.eps * self.options.scale},
                  {"params": decay, "weight_decay": opt.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    # --- with the engine ----------------------------------------------------------------------
    def on_engine_ready(self, context) -> None:
        super().on_engine_ready(context)
        # Engine's module may be a different object than the one prepared (it is not, today);
        # find the adapters by name in what DeepSpeed trains.
        modules = dict(context.engine.module.named_modules())
        self.adapters = {name: modules[name] for name in self.adapters}

    def is_refresh_step(self, step: int) -> bool:
        return step % self.options.update_proj_gap == 0

    @contextlib.contextmanager
    def step_context(self, engine, micro_batches: list[dict], step: int) -> Iterator[None]:
        """At a refresh step each adapter's capture (owned by the rank that refreshes it); every
        step opens and closes the adapters' step caches; after an applied step, W0's share of
        the decoupled weight decay."""
        lr = engine.get_lr()[0]  # this step's LR (the scheduler moves on inside engine.step)
        if self.is_refresh_step(step):
            world, rank = dist.world_size(), dist.rank()
            o = self.options
            for index, (adapter, owner) in enumerate(zip(self.adapters.values(), self.owners(world))):
                if adapter.capture_kind == "backward":
                    if len(micro_batches) != 1:
                        raise ValueError(f"galore refresh=backward needs one micro-batch per step, got "
                                         f"{len(micro_batches)}")
                    keep = functools.partial(_kept_on_host, adapter.galore_basis)
                    adapter.capture = BackwardRefresh(adapter.shape, adapter.side, adapter.rank, o.svd, o.svd_niter,
                                                      o.svd_oversample, self.seed(step, index), o.sign_rule,
                                                      PROJECTOR_DTYPES[o.projector_dtype], keep,
                                                      reproject=o.moments_on_refresh == "reproject", owner=owner,
                                                      world=world, rank=rank)
                elif adapter.capture_kind == "sketch":
                    adapter.capture = SketchCapture(adapter.shape, adapter.side, adapter.rank, o.svd_oversample, self.seed(step, index),
                                                    owner=owner, world=world, rank=rank)
                else:
                    adapter.capture = GradientCapture(owner=owner, world=world, rank=rank)
        for adapter in self.adapters.values():
            adapter.open_step()
        try:
            yield
        finally:
            for adapter in self.adapters.values():
                adapter.capture = None
                adapter.close_step()
        wd = self.stage.optimizer.weight_decay
        if wd > 0 and not self.step_skipped:  # W0's share of decoupled decay, folded in at the next merge
            for adapter in self.adapters.values():
                adapter.galore_decay.mul_(1 - lr * wd)

    def before_optimizer_step(self, engine, step: int) -> None:
        """At refresh steps the backward also captured each matrix's full gradient: refresh now."""
        if self.is_refresh_step(step):
            for adapter in self.adapters.values():  # the install moves W0, B and Q
                adapter.close_step()
            with self.timer.phase("refresh"), self._moments_editable(engine):
                self._refresh(engine, step)

    def needs_every_gradient(self, step: int) -> bool:
        """A refresh step whose captures hold full gradients or sketches refreshes after the whole
        backward; one that refreshes in backward (``refresh: backward``) installs per adapter."""
        return self.is_refresh_step(step) and any(a.capture_kind != "backward" for a in self.adapters.values())

    def before_param_update(self, engine, p: torch.Tensor, step: int) -> None:
        """Per-layer updates at a refresh step: B's gradient is already in the new basis (solved in
        this adapter's backward), so its subspace is installed now, just before B is stepped."""
        if not self.is_refresh_step(step):
            return
        if self._layerwise is None or self._layerwise[0] != step:
            self._layerwise = (step, {}, 0.0, {id(a.galore_b): name for name, a in self.adapters.items()})
        _, kept, seconds, names = self._layerwise
        name = names.get(id(p))
        if name is None:
            return
        start = time.perf_counter()
        adapter = self.adapters[name]
        capture, adapter.capture = adapter.capture, None
        adapter.close_step()  # the install moves W0, B and Q
        reproject = self.options.moments_on_refresh == "reproject" and zero_io.moments_ready(engine)
        with self.timer.phase("refresh"), self._moments_editable(engine):
            self._install_solved(engine, name, adapter, capture, reproject, kept)
        self._layerwise = (step, kept, seconds + time.perf_counter() - start, names)

    def after_step(self, engine, step: int) -> dict:
        if self._layerwise is not None and self._layerwise[0] == step:
            _, kept, seconds, _ = self._layerwise
            self._layerwise = None
            self._count_refresh(step, kept, seconds)
        if self.pending:  # a sketch refresh: the new subspaces take over from the next step
            start = time.perf_counter()
            with self._moments_editable(engine):
                for name, (part, change) in self.pending.items():
                    adapter = self.adapters[name]
                    old = zero_io.full_param(engine, adapter.galore_basis)  # collective at ZeRO-3 (a gather)
                    self._install(engine, adapter, old, part, None, change is not None, change=change)
            self.pending = {}
            self.last_refresh["galore/refresh_s"] += time.perf_counter() - start
        return dict(self.last_refresh) if step == self.last_refresh_step else {}

    # --- the refresh --------------------------------------------------------------------------
    def _moments_editable(self, engine):
        """Where a refresh re-projects Adam's moments of B: int8 moments decoded for its length."""
        if self.options.moments_on_refresh == "reproject":
            return zero_io.moments_as_tensors(engine)
        return contextlib.nullcontext()

    def owners(self, world: int) -> list[int]:
        """The rank that holds each adapter's capture at a refresh and computes its subspace, in
        adapter order: balanced by the bytes held (m·n, or the sketches), the same on every rank."""
        return balanced_owners([a.capture_numel or a.out_features * a.in_features for a in self.adapters.values()],
                               world)

    @staticmethod
    def seed(step: int, index: int) -> int:
        """The random numbers of matrix ``index``'s refresh at ``step``: the same on every rank and resume."""
        return step * 100_003 + index

    def _subspace(self, capture, old: torch.Tensor, adapter: GaLoreLinear, step: int, index: int):
        """``(basis, low, why)`` on the owner: the new basis from the capture and the step's
        gradient projected onto it (unscaled); ``(None, None, why)`` to keep the old basis."""
        o = self.options
        if isinstance(capture, SketchCapture):
            return capture.subspace(old, o.sign_rule)
        grad = capture.mean()
        if grad is None:
            return None, None, "no gradient reached this matrix"
        solver = "exact" if o.svd == "sketch" else o.svd  # a matrix too small for sketches to pay
        new, why = projector.new_basis(grad, adapter.rank, adapter.side, solver, old.to(grad.device),
                                       o.svd_niter, o.svd_oversample, seed=self.seed(step, index),
                                       sign_rule=o.sign_rule)
        if new is None:
            return None, None, why
        new = new.to(PROJECTOR_DTYPES[o.projector_dtype]).float()  # as stored: B's gradient sees the forward's basis
        return new, projector.project(grad, new, adapter.side), ""

    def _refresh(self, engine, step: int) -> None:
        start = time.perf_counter()
        o = self.options
        world, rank = dist.world_size(), dist.rank()
        reproject = o.moments_on_refresh == "reproject" and zero_io.moments_ready(engine)
        kept: dict[str, str] = {}
        dtype = PROJECTOR_DTYPES[o.projector_dtype]
        owners = self.owners(world)
        for index, (name, adapter) in enumerate(self.adapters.items()):
            owner = owners[index]
            capture, adapter.capture = adapter.capture, None  # on the owner: summed over micro-batches and ranks
            if isinstance(capture, BackwardRefresh):  # solved in the backward; B's gradient is already in it
                self._install_solved(engine, name, adapter, capture, reproject, kept)
                continue
            old = zero_io.full_param(engine, adapter.galore_basis)  # collective at ZeRO-3 (a gather)
            device = adapter.galore_decay.device  # the module's device (dist stages CPU tensors)
            basis = torch.zeros(old.shape, dtype=torch.float32, device=device)
            low = torch.zeros(projector.low_rank_shape(adapter.shape, adapter.rank, adapter.side),
                              dtype=torch.float32, device=device)
            ok = torch.zeros((), dtype=torch.float32, device=device)
            why = ""
            # A sketch's estimate of the new subspace's gradient is rough (tests/unit/test_galore_sketch.py):
            # once a subspace exists, the refresh step steps in it, and the new one follows the step.
            deferred = isinstance(capture, SketchCapture) and projector.is_set(old)
            if rank == owner:
                new, new_low, why = self._subspace(capture, old, adapter, step, index)
                if new is not None:
                    basis.copy_(new.to(dtype).float())  # as stored: the forward and the merge see one basis
                    low.copy_(new_low * adapter.scale)
                    ok.fill_(1.0)
                del new, new_low
            del capture
            if world > 1:
                for t in (ok, basis, low):
                    dist.broadcast_(t, src=owner)
            if ok.item() == 0:
                kept[name] = why or f"see rank {owner}"
                continue
            if deferred:  # this step steps in the old subspace, where its gradient is exact
                change = projector.change_of_basis(old, basis, adapter.side) if reproject else None
                self.pending[name] = (_kept_on_host(adapter.galore_basis, basis), change)
                continue
            self._install(engine, adapter, old, basis, low, reproject)
        self._count_refresh(step, kept, time.perf_counter() - start)

    def _install_solved(self, engine, name: str, adapter: GaLoreLinear, capture: BackwardRefresh, reproject: bool,
                        kept: dict[str, str]) -> None:
        """Install what a refresh in backward solved for one adapter (or note why it kept its basis)."""
        if capture.held is None:  # the same on every rank (the owner's verdict was broadcast)
            kept[name] = capture.why
            return
        old = zero_io.full_param(engine, adapter.galore_basis)  # collective at ZeRO-3 (a gather)
        self._install(engine, adapter, old, capture.held, None, reproject, change=capture.change)

    def _count_refresh(self, step: int, kept: dict[str, str], seconds: float) -> None:
        self.refreshes += 1
        self.kept_bases += len(kept)
        self.last_refresh_step = step
        self.last_refresh = {"galore/refresh": 1, "galore/refresh_s": seconds, "galore/kept_subspace": len(kept)}
        if kept:
            self.last_refresh["galore/kept_subspace_modules"] = sorted(kept)
            log.warning("galore: step %d: %d of %d matrices keep their old subspace: %s", step, len(kept),
                        len(self.adapters), "; ".join(f"{n} ({why})" for n, why in kept.items()))

    def _install(self, engine, adapter: GaLoreLinear, old, basis, low, reproject: bool, change=None) -> None:
        """Merge B into W0 (through the old basis ``old``, as stored), zero B, switch the basis
        to ``basis``, fix moments and B's gradient. Every copy through ``zero_io``: W0 (a frozen
        param or an fp32 buffer), B (and its master), the basis (a frozen param, sharded at ZeRO-3).

        From a refresh in backward, or after a sketch refresh's step: ``basis`` is what the rank
        kept (``zero_frozen.frozen_part``), ``change`` the r×r change of basis, and ``low`` None (B's
        gradient is already in the new basis, or already stepped in the old one)."""
        b_param = adapter.galore_b
        b = zero_io.full_param(engine, b_param)
        old = old.cpu()
        if bool(b.abs().amax() > 0) or float(adapter.galore_decay) != 1.0:
            # d·W0 + α·B·Q (or α·P·B) on W0's device, each ZeRO-3 rank its own shard only
            left, right = (b, old) if adapter.side == "right" else (old, b)
            frozen_base.add_low_rank_product(engine, adapter, left, right, adapter.scale,
                                             (self.refreshes, list(self.adapters.values()).index(adapter), "base"),
                                             base_scale=float(adapter.galore_decay))
            zero_io.set_param(engine, b_param, torch.zeros_like(b))
        if reproject and projector.is_set(old):
            m = zero_io.optimizer_state(engine, b_param, "exp_avg")
            v = zero_io.optimizer_state(engine, b_param, "exp_avg_sq")
            if m is not None and v is not None:
                shape = projector.low_rank_shape(adapter.shape, adapter.rank, adapter.side)
                c = change if change is not None else projector.change_of_basis(old, basis.cpu(), adapter.side)
                m, v = projector.reproject_with(m.view(shape), v.view(shape), c.cpu(), adapter.side)
                zero_io.set_optimizer_state(engine, b_param, "exp_avg", m)
                zero_io.set_optimizer_state(engine, b_param, "exp_avg_sq", v)
        if low is None:
            zero_frozen.set_frozen_part(adapter.galore_basis, basis)
        else:
            zero_io.set_param(engine, adapter.galore_basis, basis)
            zero_io.set_grad(engine, b_param, low)
        adapter.galore_decay.fill_(1.0)

    # --- checkpoints and export ---------------------------------------------------------------
    def state_dict(self) -> dict:
        """Counters only: bases, decay factors and B live in the module state DeepSpeed saves
        (the bases as frozen params, sharded at ZeRO-3)."""
        return {"refreshes": self.refreshes, "kept_bases": self.kept_bases,
                "last_refresh_step": self.last_refresh_step}

    def load_state_dict(self, state: dict) -> None:
        self.refreshes = int(state.get("refreshes", 0))
        self.kept_bases = int(state.get("kept_bases", 0))
        self.last_refresh_step = int(state.get("last_refresh_step", -1))

    @classmethod
    def to_plain(cls, state: dict[str, torch.Tensor], options: GaLoreOptions) -> dict[str, torch.Tensor]:
        """Plain-model state dict with ``weight = d·W0 + α·B·Q`` merged and the adapters' tensors
        dropped (``export_weights``, stage hand-over, ``init_from`` and export)."""
        return merged_state_dict(state, options.scale, options.proj_type)
