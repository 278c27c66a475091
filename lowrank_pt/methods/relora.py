"""ReLoRA: LoRA that periodically merges its update into the base and starts a new one.

After optimizer step ``step`` (0-based) with ``(step + 1) % restart_every == 0`` and
``step + 1 < total_steps``, on every rank identically:

1. merge ``W0 += s·B·A`` (A, B read from the fp32 masters; with DoRA ``W0 ← m ⊙ V/‖V‖_row``, the
   function as it stands, and the magnitude set to the new base's row norms, ``|m|``: the same
   function, ``m`` keeps its value and its moments),
2. re-initialise ``A`` (Kaiming, from ``seeded_generator(seed, restart, module index)``) and ``B = 0``
   in the module and in DeepSpeed's fp32 masters; with ``init`` pissa / milora / olora the merged
   base is factored again instead (residual in the base), and with lora_ga the first step after
   the restart captures the full gradient and installs its factors, as at step 0,
3. prune the optimizer moments of ``A`` and ``B`` (``reset_mode``); other params' moments stay.

The LR follows a jagged cosine: step ``k·restart_every`` is the first step after restart ``k`` and
re-warms from ~0 over ``restart_warmup_steps``. The sum of the updates is of full rank although
each cycle's is of rank r. Every write goes through ``zero.state`` and ``zero.frozen``, which
reach the copies each ZeRO stage keeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lowrank_pt.methods import frozen_base
from lowrank_pt.methods.lora import LoRA, LoRAOptions
from lowrank_pt.model.lowrank_linear import (
    WEIGHT_INITS,
    init_factors,
    init_lora_A,
    lowrank_modules,
    merged_weight,
    row_norms,
    seeded_generator,
)
from lowrank_pt.optim import schedule
from lowrank_pt.zero import state as zero_io

RESET_MODES = ("none", "zero", "random", "magnitude")
MOMENTS = zero_io.MOMENTS


@dataclass
class ReLoRAOptions(LoRAOptions):
    restart_every: Optional[int] = None
    """Required. Optimizer steps between merge-and-restarts (restarts after steps N-1, 2N-1, ...)."""
    restart_warmup_steps: Optional[int] = None
    """Steps over which the LR re-warms from ~0 after each restart (the jagged cosine); null takes
    restart_every // 10 (the paper's ~100 for 1000). Set it here, not in the stage schedule: a
    schedule.restart_warmup_steps that disagrees is an error."""
    reset_mode: str = "magnitude"
    """What a restart does to the optimizer moments of A and B: none | zero (all) | random (zero a
    random reset_fraction of entries, one mask for both moments) | magnitude (zero the
    reset_fraction smallest |values| of each moment; exp_avg is also zeroed where exp_avg_sq was)."""
    reset_fraction: float = 0.999
    """Fraction of each moment tensor zeroed by the random and magnitude modes."""

    def rewarm_steps(self) -> int:
        """restart_warmup_steps with its null default resolved."""
        if self.restart_warmup_steps is None:
            return (self.restart_every or 0) // 10
        return self.restart_warmup_steps

    def check(self) -> None:
        super().check()
        if self.restart_every is None or self.restart_every < 1:
            raise ValueError(f"restart_every={self.restart_every}: required, must be >= 1")
        if not 0 <= self.rewarm_steps() < self.restart_every:
            raise ValueError(f"restart_warmup_steps={self.restart_warmup_steps} must be in "
                             f"[0, restart_every={self.restart_every})")
        if self.reset_mode not in RESET_MODES:
            raise ValueError(f"reset_mode={self.reset_mode!r}: allowed {list(RESET_MODES)}")
        if not 0.0 <= self.reset_fraction <= 1.0:
            raise ValueError(f"reset_fraction={self.reset_fraction} must be in [0, 1]")


def random_keep_mask(shape, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Bool mask of ``shape`` with exactly ``round(fraction·numel)`` False entries drawn from ``generator``."""
    n = math.prod(shape)
    keep = torch.ones(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=generator)[: round(fraction * n)]] = False
    return keep.view(shape)


def magnitude_keep_mask(value: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask keeping the largest-|value| entries and dropping exactly ``round(fraction·numel)``
    of the smallest (ties broken by position)."""
    flat = value.abs().flatten()
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    n_keep = flat.numel() - round(fraction * flat.numel())
    if n_keep > 0:
        keep[torch.topk(flat, n_keep, sorted=False).indices] = True
    return keep.view_as(value)


class ReLoRA(LoRA):
    """LoRA with merge-and-restart every ``restart_every`` steps and a jagged cosine LR."""

    name = "relora"
    Options = ReLoRAOptions

    def __init__(self, options, stage, run):
        super().__init__(options, stage, run)
        self.restarts = 0

    @classmethod
    def check_stage(cls, options, stage, run, model_cfg, total_steps: int) -> None:
        """The targets (as lora), a schedule ReLoRA can restart (cosine or jagged_cosine, no
        schedule.restart_* that disagrees with the options), and a restart inside the stage."""
        cfg = stage.schedule
        if cfg.kind not in ("cosine", "jagged_cosine"):
            raise ValueError(f"schedule.kind={cfg.kind!r}: relora needs cosine or jagged_cosine "
                             "(its LR re-warms after every restart)")
        for key, ours in (("restart_every", options.restart_every), ("restart_warmup_steps", options.rewarm_steps())):
            theirs = getattr(cfg, key)
            if theirs and theirs != ours:
                raise ValueError(f"schedule.{key}={theirs} disagrees with options.{key}={ours}; "
                                 "set it in the method options only")
        if options.restart_every >= total_steps:
            raise ValueError(f"options.restart_every={options.restart_every} is not shorter than the stage "
                             f"({total_steps} steps): ReLoRA would never merge and restart (the last step "
                             "never restarts); give a smaller restart_every, or use method lora")
        cls.check_targets(options, model_cfg)

    def lr_lambda(self, total_steps: int) -> Callable[[int], float]:
        """Jagged cosine: the stage's warmup_steps and min_lr_ratio, restarts from the options."""
        cfg, o = self.stage.schedule, self.options
        if cfg.kind not in ("cosine", "jagged_cosine"):
            raise ValueError(f"schedule.kind={cfg.kind!r}: relora needs cosine or jagged_cosine")
        for key, ours in (("restart_every", o.restart_every), ("restart_warmup_steps", o.rewarm_steps())):
            theirs = getattr(cfg, key)
            if theirs and theirs != ours:
                raise ValueError(f"schedule.{key}={theirs} disagrees with the relora option {key}={ours}; "
                                 "set it in the method options only")
        return schedule.LRSchedule("jagged_cosine", total_steps, cfg.warmup_steps, cfg.min_lr_ratio,
                                   restart_every=o.restart_every, restart_warmup_steps=o.rewarm_steps())

    def is_restart_step(self, step: int) -> bool:
        """After optimizer step ``step``; never after the stage's last step (the hand-over merges)."""
        last = self.context is not None and step + 1 >= self.context.total_steps
        return (step + 1) % self.options.restart_every == 0 and not last

    def base_is_start_model(self) -> bool:
        """Restarts merge into the base: after the first one it is no longer the starting model."""
        return False

    def is_lora_ga_step(self, step: int) -> bool:
        """Step 0 and the first step after every restart (whose B is 0 again)."""
        return self.options.init == "lora_ga" and step % self.options.restart_every == 0

    def after_step(self, engine, step: int) -> dict:
        if not self.is_restart_step(step):
            return {}
        with self.timer.phase("merge"), zero_io.moments_as_tensors(engine):  # int8 moments: pruned decoded
            self.restart(engine)
        return {"relora/restart": self.restarts}

    @torch.no_grad()
    def restart(self, engine) -> None:
        """Merge, re-initialise and prune, for every wrapped module. Collective: every rank calls it."""
        self.restarts += 1
        o = self.options
        for index, (_, m) in enumerate(lowrank_modules(engine.module)):
            A, B = zero_io.full_param(engine, m.lora_A), zero_io.full_param(engine, m.lora_B)
            magnitude = zero_io.full_param(engine, m.lora_magnitude) if m.dora else None
            stored_norms = None
            rounding = (o.seed, self.restarts, index, "base")  # an int8 base's stochastic rounding
            if o.init in WEIGHT_INITS:  # the SVD/QR of the whole merged matrix
                merged = merged_weight(frozen_base.read(engine, m), A, B, m.scale, magnitude)
                new_A, new_B, base = init_factors(o.init, merged, m.rank, m.scale)
                frozen_base.write(engine, m, base, rounding)
            else:  # on W0's device, each ZeRO-3 rank its own shard only
                new_A = init_lora_A(m.rank, m.in_features, seeded_generator(o.seed, self.restarts, index))
                new_B = torch.zeros_like(B)
                if m.dora:  # the row norms of the merged matrix summed over the shards
                    stored_norms = frozen_base.normalise_rows_of_sum(engine, m, B, A, m.scale, magnitude, rounding)
                else:
                    frozen_base.add_low_rank_product(engine, m, B, A, m.scale, rounding)
            zero_io.set_param(engine, m.lora_A, new_A)
            zero_io.set_param(engine, m.lora_B, new_B)
            if m.dora:  # the base's row norms as stored: m/‖V‖ = 1, the function kept
                if stored_norms is None:
                    stored_norms = row_norms(frozen_base.read(engine, m), new_A, new_B, m.scale)
                zero_io.set_param(engine, m.lora_magnitude, stored_norms)
            for factor, p, shape in (("A", m.lora_A, A.shape), ("B", m.lora_B, B.shape)):
                self._reset_moments(engine, p, shape, (o.seed, self.restarts, index, factor))

    def _reset_moments(self, engine, p, shape, seed_parts: tuple) -> None:
        """Prune ``exp_avg`` and ``exp_avg_sq`` of ``p`` together.

        An entry must never keep ``exp_avg`` while losing ``exp_avg_sq``: A's gradient is exactly 0
        at the first step after a restart (B = 0), so Adam would move it by lr·m/eps. Random pruning
        therefore uses one mask for both moments; magnitude pruning keeps an ``exp_avg`` entry only
        where ``exp_avg_sq`` is kept too.
        """
        mode, fraction = self.options.reset_mode, self.options.reset_fraction
        if mode == "none":
            return
        if mode == "zero":
            for key in MOMENTS:
                zero_io.set_optimizer_state(engine, p, key, torch.zeros(shape))
            return
        m = zero_io.optimizer_state(engine, p, "exp_avg")  # collective at stages 1-3
        v = zero_io.optimizer_state(engine, p, "exp_avg_sq")
        if m is None or v is None:
            return  # no step taken yet: nothing to prune
        if mode == "random":
            keep_m = keep_v = random_keep_mask(shape, fraction, seeded_generator("prune", *seed_parts))
        else:
            keep_v = magnitude_keep_mask(v, fraction)
            keep_m = magnitude_keep_mask(m, fraction) & keep_v
        zero_io.set_optimizer_state(engine, p, "exp_avg", torch.where(keep_m, m, 0.0))
        zero_io.set_optimizer_state(engine, p, "exp_avg_sq", torch.where(keep_v, v, 0.0))

    def state_dict(self) -> dict:
        return {"restarts": self.restarts}

    def load_state_dict(self, state: dict) -> None:
        self.restarts = int(state["restarts"])
