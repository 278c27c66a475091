"""LoRA for pre-training: targeted linears become ``W0 + s·B·A`` with ``W0`` frozen, for the whole
stage (the baseline ReLoRA improves on by merging and restarting).

Embeddings, norms and the head stay full-rank and trainable, as in the ReLoRA paper's LoRA
baseline. The optimizer sees only trainable params, so its state is ``2·r·(m+n)`` fp32 values per
wrapped m×n matrix instead of ``2·m·n``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn

from lowrank_pt.lowrank import merged_state_dict, wrap_linears
from lowrank_pt.methods.base import Method
from lowrank_pt.targets import DEFAULT_TARGETS, check_targets


@dataclass
class LoRAOptions:
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

    def check(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank={self.rank} must be >= 1")
        if self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("target_modules: give at least one pattern (default: attention and MLP projections)")


class LoRA(Method):
    """Frozen full-rank bases plus trainable low-rank factors; no merges."""

    name = "lora"
    Options = LoRAOptions

    @classmethod
    def check_stage(cls, options, stage, run, model_cfg, total_steps: int) -> None:
        """The base checks, and every target_modules pattern matching a linear of the model."""
        super().check_stage(options, stage, run, model_cfg, total_steps)
        cls.check_targets(options, model_cfg)

    @classmethod
    def check_targets(cls, options, model_cfg) -> None:
        """Each target_modules pattern matches an nn.Linear of the model (built on the meta device)."""
        try:
            check_targets(model_cfg, options.target_modules)
        except ValueError as e:
            raise ValueError(f"options.{e}") from None

    def prepare_model(self, model: nn.Module) -> None:
        super().prepare_model(model)  # everything trainable; wrapping then freezes the bases
        o = self.options
        self.wrapped = wrap_linears(model, o.target_modules, o.rank, o.alpha, o.dropout, seed=o.seed)

    @classmethod
    def to_plain(cls, state: dict[str, torch.Tensor], options) -> dict[str, torch.Tensor]:
        """The plain model's state dict with ``W0 + s·B·A`` folded in (the scale travels in the
        state as each module's ``lora_scale`` buffer)."""
        return merged_state_dict(state)
