"""LoRA for pre-training: targeted linears become ``W0 + s·B·A`` with ``W0`` frozen, for the whole
stage (the baseline ReLoRA improves on by merging and restarting), and for post-training (SFT
stages), with the options of the LoRA literature:

- ``init``: kaiming (A random, B = 0), pissa / milora / olora (factors of W0, residual left in the
  base; computed in ``after_weights_loaded``, once the stage's weights are in), lora_ga (factors
  from the full gradient of the first step: captured in its backward, installed in
  ``before_optimizer_step`` before the optimizer moves);
- ``scaling``: ``alpha/r`` or rsLoRA's ``alpha/sqrt(r)``;
- ``lr_ratio`` (LoRA+): every B in its own param group at ``lr_ratio`` times the stage's LR;
- ``precondition``: the r×r scaled-gradient preconditioner (Riemannian preconditioned LoRA /
  ScaledGD), applied to the reduced gradients of A and B before every optimizer step;
- ``dora``: weight-decomposed LoRA (a trainable magnitude per output row).

Embeddings, norms and the head stay full-rank and trainable, as in the ReLoRA paper's LoRA
baseline. The optimizer sees only trainable params, so its state is ``2·r·(m+n)`` fp32 values per
wrapped m×n matrix instead of ``2·m·n`` (DoRA adds ``2·m``). Every edit of a weight or gradient
once the engine exists goes through ``zero_io`` (every copy, every ZeRO stage).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, List

import torch
from torch import nn

from lowrank_pt.core import dist
from lowrank_pt.core.owners import balanced_owners
from lowrank_pt.methods import frozen_base
from lowrank_pt.methods.base import Method, MethodOptions
from lowrank_pt.methods.galore.capture import GradientCapture
from lowrank_pt.model.llama import LlamaModel
from lowrank_pt.model.lowrank_linear import (
    INITS,
    SCALINGS,
    WEIGHT_INITS,
    init_factors,
    lora_ga_factors,
    lowrank_modules,
    merged_state_dict,
    row_norms,
    wrap_linears,
)
from lowrank_pt.model.targets import DEFAULT_TARGETS, check_targets, select_linears
from lowrank_pt.zero import state as zero_io
from lowrank_pt.zero.params import read_whole

PRECONDITIONERS = ("none", "riemannian")


@dataclass
class LoRAOptions(MethodOptions):
    rank: int = 128
    """Rank r of the update B·A of each targeted linear."""
    alpha: float = 32.0
    """The update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the input of the low-rank path (training only)."""
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Linears to wrap: names or dotted suffixes (q_proj), globs (layers.*.mlp.*) or regexes matching
    the whole module name. Every pattern must match at least one nn.Linear; a linear tied to an
    embedding is never wrapped."""
    seed: int = 0
    """Seed of the initial A (Kaiming-uniform); every rank draws the same values from it."""
    init: str = "kaiming"
    """Initial factors: kaiming (A Kaiming-uniform, B = 0, the base untouched) | pissa (the r
    principal singular triplets of W0: A = diag(√(S_r/s))·V_rᵀ, B = U_r·diag(√(S_r/s)), the base
    keeps the residual W0 − s·B·A) | milora (the same with the r minor triplets) | olora (W0 = QR:
    B = Q[:, :r], A = R[:r], residual in the base) | lora_ga (A = ζ·V[:, :r]ᵀ, B = ζ·U[:, r:2r] of
    the full gradient G = U·S·Vᵀ of W0 at the stage's first step, summed over its micro-batches
    and ranks, ζ = m^¼/√lora_ga_gamma, residual in the base, and that step's factor gradients
    recomputed for them). Each keeps the model's function (in bf16 the residual base is rounded).
    pissa, milora and olora need rank <= min(m, n), lora_ga 2·rank <= min(m, n). Under relora,
    pissa/milora/olora re-factor the merged base at every restart, lora_ga re-captures at the
    first step after it."""
    scaling: str = "alpha/r"
    """Scale s of the update: alpha/r (LoRA) | alpha/sqrt(r) (rsLoRA: the update's size stays put
    as the rank grows)."""
    lr_ratio: float = 1.0
    """LoRA+: B's learning rate is lr_ratio times the stage's (A's and everything else's); B sits
    in its own param group (weight decay as the stage's), following the stage's schedule. 1: off
    (LoRA+ suggests 2-16, with a somewhat lower base LR)."""
    precondition: str = "none"
    """none | riemannian: before every optimizer step, ∇A ← (BᵀB + δI)⁻¹·∇A and ∇B ← ∇B·(AAᵀ + δI)⁻¹
    (the r×r scaled-gradient preconditioner of Riemannian preconditioned LoRA / ScaledGD, on the
    reduced gradients, before clipping and AdamW), so a step moves B·A independently of how the
    product is split between A and B (to first order, for δ → 0). Costs per step and wrapped m×n
    matrix: A, B and their gradients read whole on every rank (at ZeRO 1-3 a gather of
    4·r·(m+n) values: about the adapters' gradient traffic again), two r×r solves, O(r²·(m+n))
    flops."""
    precondition_delta: float = 1.0e-6
    """δ of the preconditioner: the damping that keeps (BᵀB + δI) invertible while B ≈ 0."""
    dora: bool = False
    """DoRA: each wrapped linear becomes m ⊙ V/‖V‖_row with V = W0 + s·B·A, ‖V‖_row the norm of each
    output's row over the input dimension (a constant in the backward, as peft's default) and m a
    trainable magnitude per output (initialised to ‖V‖_row: the same function; no weight
    decay). Merged as m ⊙ V/‖V‖_row at hand-over and export. Costs one m×n·r product per forward."""
    train_full_rank: bool = True
    """Train the params no adapter wraps (embeddings, norms, the head, linears left unwrapped) at
    full rank, as the ReLoRA paper's LoRA baseline. false freezes them, as peft does: the stage
    then trains the adapters alone, and ``lowrank-pt export --adapter`` can write it as a peft
    adapter (an adapter cannot carry full-rank changes)."""
    lora_ga_gamma: float = 16.0
    """init=lora_ga: γ of the stable scale ζ = m^¼/√γ of the factors."""
    base_in_fp32: bool = False
    """Hold the frozen base W0 as an fp32 buffer, so bf16 runs merge without rounding W0 to
    bf16 at every merge (ReLoRA's restarts, the lora_ga residual). Costs 4 bytes per weight on
    every rank (buffers are not sharded by ZeRO-3) instead of a sharded bf16 frozen param, and a
    cast of W0 to bf16 at every use."""

    def check(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank={self.rank} must be >= 1")
        if self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("target_modules: give at least one pattern (default: attention and MLP projections)")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r}: allowed {list(INITS)}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling={self.scaling!r}: allowed {list(SCALINGS)}")
        if not self.lr_ratio > 0:
            raise ValueError(f"lr_ratio={self.lr_ratio} must be > 0 (1: plain LoRA)")
        if self.precondition not in PRECONDITIONERS:
            raise ValueError(f"precondition={self.precondition!r}: allowed {list(PRECONDITIONERS)}")
        if not self.precondition_delta > 0:
            raise ValueError(f"precondition_delta={self.precondition_delta} must be > 0")
        if not self.lora_ga_gamma > 0:
            raise ValueError(f"lora_ga_gamma={self.lora_ga_gamma} must be > 0")


class LoRA(Method):
    """Frozen full-rank bases plus trainable low-rank factors; no merges."""

    name = "lora"
    Options = LoRAOptions
    has_frozen_base = True

    @classmethod
    def check_stage(cls, options, stage, run, model_cfg, total_steps: int) -> None:
        """The base checks, and every target_modules pattern matching a linear of the model."""
        super().check_stage(options, stage, run, model_cfg, total_steps)
        cls.check_targets(options, model_cfg)

    @classmethod
    def check_targets(cls, options, model_cfg) -> None:
        """Each target_modules pattern matches an nn.Linear of the model (built on the meta device)."""
        check_targets(model_cfg, options.target_modules)
        with torch.device("meta"):
            model = LlamaModel(model_cfg)
        shapes = [(n, m.out_features, m.in_features) for n, m in select_linears(model, options.target_modules)]
        try:
            check_init_fits(options, shapes)
        except ValueError as e:
            raise ValueError(f"options.{e}") from None

    def prepare_model(self, model: nn.Module) -> None:
        super().prepare_model(model)  # everything trainable; wrapping then freezes the bases
        o = self.options
        self.wrapped = wrap_linears(model, o.target_modules, o.rank, o.alpha, o.dropout, seed=o.seed,
                                    scaling=o.scaling, dora=o.dora, base_in_fp32=o.base_in_fp32)
        check_init_fits(o, [(n, m.out_features, m.in_features) for n, m in lowrank_modules(model)])
        if not o.train_full_rank:
            adapters = {id(p) for _, m in lowrank_modules(model) for p in m.adapter_params()}
            for p in model.parameters():
                p.requires_grad_(id(p) in adapters)

    def param_groups(self, model: nn.Module) -> list[dict]:
        """The base groups (weight decay on matrices only; DoRA's magnitudes are vectors: none),
        with LoRA+ every B moved to a last group at ``lr_ratio`` times the stage's LR (group 0 keeps
        the stage's LR, the one the trainer logs)."""
        groups = super().param_groups(model)
        if self.options.lr_ratio == 1.0:
            return groups
        bs = [m.lora_B for _, m in lowrank_modules(model)]
        ids = {id(p) for p in bs}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]
        groups = [g for g in groups if g["params"]]
        opt = self.stage.optimizer
        return groups + [{"params": bs, "weight_decay": opt.weight_decay, "lr": opt.lr * self.options.lr_ratio}]

    @torch.no_grad()
    def after_weights_loaded(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """pissa / milora / olora: factor each wrapped base as it now is (carried, loaded or fresh)
        and leave the residual in it; DoRA: the magnitudes become ``‖W0 + s·B·A‖_row``. One module
        whole at a time (a ZeRO-3 param is gathered to read it; each rank writes its own shard).
        Returns the fp32 values of the trainable params written, for a bf16 engine's masters."""
        o = self.options
        if o.init not in WEIGHT_INITS and not o.dora:
            return {}
        held = {}
        for _, m in lowrank_modules(model):
            w = read_whole(m.weight)
            if o.init in WEIGHT_INITS:
                A, B, w = init_factors(o.init, w, m.rank, m.scale)
                zero_io.write_before_engine(m.weight, w)
                w = read_whole(m.weight)  # as stored (a bf16 base is rounded): what DoRA's norm sees
                held[id(m.lora_A)] = zero_io.write_before_engine(m.lora_A, A)
                held[id(m.lora_B)] = zero_io.write_before_engine(m.lora_B, B)
            else:
                A, B = read_whole(m.lora_A), read_whole(m.lora_B)
            if o.dora:
                held[id(m.lora_magnitude)] = zero_io.write_before_engine(m.lora_magnitude,
                                                                        row_norms(w, A, B, m.scale))
        return held

    def base_is_start_model(self) -> bool:
        """kaiming starts B at 0 (DoRA: m at the base's row norms), so the base alone computes the
        stage's starting model, and LoRA never merges: DPO's reference is the adapters switched
        off. pissa / milora / olora / lora_ga leave a residual in the base: not that."""
        return self.options.init == "kaiming"

    @classmethod
    def check_per_layer(cls, options, stage, run) -> None:
        if options.precondition != "none":
            raise ValueError(f"options.precondition={options.precondition} with update=per_layer: the "
                             "preconditioner rewrites A's and B's gradients together at every step, after the "
                             "backward; use update step, or precondition none")

    def needs_every_gradient(self, step: int) -> bool:
        """LoRA-GA's initialisation reads every module's full gradient and rewrites the factors'."""
        return self.is_lora_ga_step(step) or self.options.precondition != "none"

    # --- with the engine ----------------------------------------------------------------------
    def is_lora_ga_step(self, step: int) -> bool:
        """Whether the factors are (re)initialised from the full gradient at this step."""
        return self.options.init == "lora_ga" and step == 0

    @contextlib.contextmanager
    def step_context(self, engine, micro_batches: list[dict], step: int) -> Iterator[None]:
        """At the LoRA-GA step each module captures its full gradient, held by the rank that
        initialises it (``ga_owners``: balanced by bytes)."""
        if not self.is_lora_ga_step(step):
            yield
            return
        world, rank = dist.world_size(), dist.rank()
        modules = lowrank_modules(engine.module)
        for (_, m), owner in zip(modules, self.ga_owners(modules, world)):
            m.capture = GradientCapture(owner=owner, world=world, rank=rank)
        try:
            yield
        finally:
            for _, m in modules:
                m.capture = None

    @staticmethod
    def ga_owners(modules, world: int) -> list[int]:
        """The rank that holds each module's full gradient at the LoRA-GA step and computes its
        factors, balanced by the gradient's bytes (``core.owners``), the same on every rank."""
        return balanced_owners([m.out_features * m.in_features for _, m in modules], world)

    def before_optimizer_step(self, engine, step: int) -> None:
        if self.is_lora_ga_step(step):
            with self.timer.phase("init"):
                self._lora_ga_init(engine)
        if self.options.precondition != "none":
            with self.timer.phase("precondition"):
                self._precondition(engine)

    @torch.no_grad()
    def _lora_ga_init(self, engine) -> None:
        """Install the LoRA-GA factors from each module's captured full gradient ``G`` (the mean
        over micro-batches and ranks, as DeepSpeed reduces gradients): ``W0 ← W0 − s·B·A`` so the
        function is kept, and the step's factor gradients replaced by those of the new factors at
        the same point, ``∇A = s·Bᵀ·G``, ``∇B = s·G·Aᵀ`` (dropout aside), so this very step trains
        them. The owner computes, everyone receives; a module whose gradient is zero or not finite
        keeps its factors. Collective."""
        world, rank = dist.world_size(), dist.rank()
        o = self.options
        modules = lowrank_modules(engine.module)
        for (name, m), owner in zip(modules, self.ga_owners(modules, world)):
            grad = m.capture.mean() if m.capture is not None else None
            m.capture = None
            A = torch.zeros(m.rank, m.in_features)
            B = torch.zeros(m.out_features, m.rank)
            gA, gB = torch.zeros_like(A), torch.zeros_like(B)
            ok = torch.zeros(())
            if rank == owner and grad is not None:
                grad = grad.float().cpu()
                if bool(torch.isfinite(grad).all()) and bool(grad.abs().max() > 0):
                    A, B = lora_ga_factors(grad, m.rank, o.lora_ga_gamma)
                    gA, gB = m.scale * (B.t() @ grad), m.scale * (grad @ A.t())
                    ok.fill_(1.0)
            del grad
            if world > 1:
                for t in (ok, A, B, gA, gB):
                    dist.broadcast_(t, src=owner)
            if ok.item() == 0:
                continue
            # W0 + s·(B_old·A_old − B·A) as one product [B_old, B]·[A_old; −A], rounded once, on
            # W0's device, each ZeRO-3 rank its own shard only
            left = torch.cat([zero_io.full_param(engine, m.lora_B), B], dim=1)
            right = torch.cat([zero_io.full_param(engine, m.lora_A), -A], dim=0)
            frozen_base.add_low_rank_product(engine, m, left, right, m.scale, (o.seed, "lora_ga", getattr(self, "restarts", 0), name))
            zero_io.set_param(engine, m.lora_A, A)
            zero_io.set_param(engine, m.lora_B, B)
            zero_io.set_grad(engine, m.lora_A, gA)
            zero_io.set_grad(engine, m.lora_B, gB)

    @torch.no_grad()
    def _precondition(self, engine) -> None:
        """``∇A ← (BᵀB + δI)⁻¹·∇A``, ``∇B ← ∇B·(AAᵀ + δI)⁻¹`` on every wrapped module's reduced
        gradients (float64 r×r solves, identical on every rank). Collective."""
        delta = self.options.precondition_delta
        for _, m in lowrank_modules(engine.module):
            A, B = zero_io.full_param(engine, m.lora_A), zero_io.full_param(engine, m.lora_B)
            gA, gB = zero_io.full_grad(engine, m.lora_A), zero_io.full_grad(engine, m.lora_B)
            if gA is None or gB is None:
                continue
            gA, gB = precondition_grads(A, B, gA, gB, delta)
            zero_io.set_grad(engine, m.lora_A, gA)
            zero_io.set_grad(engine, m.lora_B, gB)

    @classmethod
    def to_plain(cls, state: dict[str, torch.Tensor], options) -> dict[str, torch.Tensor]:
        """The plain model's state dict with ``W0 + s·B·A`` folded in (with DoRA ``m ⊙ V/‖V‖_row``;
        the scale travels in the state as each module's ``lora_scale`` buffer)."""
        return merged_state_dict(state)


def check_init_fits(options: LoRAOptions, shapes: list[tuple[str, int, int]]) -> None:
    """pissa / milora / olora take ``rank`` singular triplets or QR columns of each wrapped m×n
    base (rank <= min(m, n)), lora_ga ``2·rank`` of its gradient; ValueError naming the first
    linear that is too small."""
    need = {"lora_ga": 2 * options.rank, **{k: options.rank for k in WEIGHT_INITS}}.get(options.init)
    for name, rows, cols in shapes:
        if need is not None and need > min(rows, cols):
            raise ValueError(f"init={options.init} needs {need} <= min(out, in) of every wrapped linear; "
                             f"{name} is {rows}x{cols} (rank={options.rank})")


def precondition_grads(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor,
                       delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``((BᵀB + δI)⁻¹·∇A, ∇B·(AAᵀ + δI)⁻¹)`` in float64, returned as float32. Rescaling
    ``A → c·A``, ``B → B/c`` rescales the gradients ``∇A → ∇A/c``, ``∇B → c·∇B`` and these results
    ``→ c·(·)``, ``→ (·)/c``, so the first-order change of ``B·A`` they give, ``δB·A + B·δA``, does
    not change (exactly for δ = 0)."""
    A64, B64 = A.double(), B.double()
    eye = torch.eye(A.shape[0], dtype=torch.float64)
    new_A = torch.linalg.solve(B64.t() @ B64 + delta * eye, grad_A.double().reshape(A.shape))
    new_B = torch.linalg.solve(A64 @ A64.t() + delta * eye, grad_B.double().reshape(B.shape).t()).t()
    return new_A.float(), new_B.float()
