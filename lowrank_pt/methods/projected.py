"""What APOLLO, APOLLO-Mini and Fira share as methods: every param trains full-rank, and the
targeted linears' weights are stepped by a structure-aware optimizer (``lowrank_pt.optim``) that
DeepSpeed wraps at any ZeRO stage.

The model is not changed (no adapter): the method only chooses the optimizer groups (the targeted
matrices in one projected group carrying the method's options; other matrices and vectors in
AdamW groups, weight decay on matrices only), builds its optimizer (``build_optimizer``) and hands
it the engine once it exists (``on_engine_ready`` → ``optimizer.attach``), so it learns which
fragments of which matrices each flat partition holds. All of the method's state (moments,
seeds, bases, limiter norms) is optimizer state, saved and restored by DeepSpeed's checkpoints.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from lowrank_pt.methods.base import Method, is_matrix
from lowrank_pt.model.targets import check_targets, select_linears
from lowrank_pt.optim.projected import ProjectedAdam, check_group


class ProjectedMethod(Method):
    """Full-rank training whose targeted matrices a ``ProjectedAdam`` steps (see the module doc)."""

    Optimizer: ClassVar[type[ProjectedAdam]] = ProjectedAdam
    reshardable: ClassVar[bool] = False
    """Its optimizer state (seeds, bases, limiter norms) is laid out by the saving ZeRO partitions:
    a resume on another world size or ZeRO stage is refused (``lowrank_pt/checkpoint/reshard.py``)."""

    def __init__(self, options, stage, run):
        super().__init__(options, stage, run)
        self.optimizer: ProjectedAdam | None = None
        self._names: dict[int, str] = {}

    @classmethod
    def check_stage(cls, options, stage, run, model_cfg, total_steps: int) -> None:
        """The base checks, and every target_modules pattern matching a linear of the model. Adam's
        moments (by channel and projection) take ``optimizer.state_dtype`` like AdamW's; the
        limiter norms, seeds and SVD bases stay fp32.
        bf16 masters are taken: the optimizer computes each update in fp32 and rounds it into the
        bf16 weights stochastically, as ``LowBitAdamW`` does."""
        super().check_stage(options, stage, run, model_cfg, total_steps)
        check_targets(model_cfg, options.target_modules)

    @classmethod
    def check_options(cls, options) -> None:
        """Refuse options the optimizer refuses, at config time (a ValueError)."""
        probe = {**cls.Optimizer.GROUP_DEFAULTS, **cls.group_options_of(options)}
        check_group(probe)

    @classmethod
    def group_options_of(cls, options) -> dict:
        """The projected group's keys for ``Optimizer`` (rank, update_proj_gap, ...) from ``options``."""
        raise NotImplementedError

    def group_options(self) -> dict:
        return self.group_options_of(self.options)

    def param_groups(self, model: nn.Module) -> list[dict]:
        """The targeted linears' weights (projected, with the method's options), other matrices
        (weight decay) and vectors (none)."""
        wd = self.stage.optimizer.weight_decay
        self._names = {id(p): name for name, p in model.named_parameters()}
        projected = [m.weight for _, m in select_linears(model, self.options.target_modules)]
        ids = {id(p) for p in projected}
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad and id(p) not in ids:
                (decay if is_matrix(p) else no_decay).append(p)
        groups = [{"params": projected, "weight_decay": wd, **self.group_options()},
                  {"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def build_optimizer(self, param_groups, stage, engine_cfg) -> torch.optim.Optimizer:
        opt = stage.optimizer
        self.optimizer = self.Optimizer(param_groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                        weight_decay=opt.weight_decay, names=self._names,
                                        defer_until_attached=True, state_dtype=opt.state_dtype)
        return self.optimizer

    def on_engine_ready(self, context) -> None:
        super().on_engine_ready(context)
        if self.optimizer is None:
            raise RuntimeError(f"{self.name}: the engine's optimizer must come from method.build_optimizer")
        self.optimizer.attach(context.engine)

    def optimizer_state_bytes(self, groups, zero_stage, world, rank, sub_group_size=1_000_000_000) -> int:
        state_dtype = self.stage.optimizer.state_dtype if self.stage is not None else "fp32"
        return self.Optimizer.planned_state_bytes(groups, zero_stage, world, rank, sub_group_size, state_dtype)

    def refresh_working_numel(self, groups: list[dict]) -> int:
        """An SVD refresh (``proj: svd``) holds one matrix's gradient in fp32 and, at a time, its
        SVD's factors (U and Vᴴ, as GaLore's exact refresh counts them) or, with ``svd:
        randomized``, three (m + n)×(r + 8) blocks of the subspace iteration: the largest
        projected matrix's."""
        options = {**self.Optimizer.GROUP_DEFAULTS, **self.group_options()}
        if options["proj"] != "svd":
            return 0
        shapes = [s for g in groups if "rank" in g for s in g["shapes"] if len(s) == 2]
        if options["svd"] == "randomized":
            width = lambda m, n: min(int(options["rank"]) + 8, m, n)  # noqa: E731
            return max((m * n + 3 * (m + n) * width(m, n) for m, n in shapes), default=0)
        return max((m * n + min(m, n) * (m + n) for m, n in shapes), default=0)

    def after_step(self, engine, step: int) -> dict:
        """Reports SVD refreshes that kept the previous basis (a zero or non-finite gradient)."""
        kept = getattr(self.optimizer, "kept_bases", 0)  # SVD refreshes only (not Muon's optimizer)
        new, self._reported = kept - getattr(self, "_reported", 0), kept
        return {f"{self.name}/kept_bases": new} if new else {}
