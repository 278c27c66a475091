"""SLTrain: every targeted linear trained as ``W = s·B·A + S`` from the first step, ``S`` sparse on a
fixed random support (``lowrank_pt.model.sltrain``); the factors, the sparse values and every
untargeted param train with the stage's AdamW. Its plain form is the dense sum, so export, a
following stage and generation take the model as a dense Llama."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowrank_pt.methods.factored import FactoredMethod, FactoredOptions
from lowrank_pt.model import sltrain


@dataclass
class SLTrainOptions(FactoredOptions):
    rank: int = 128
    """r of each B·A (the published 60M setting; capped by nothing: it must fit every targeted linear)."""
    alpha: float = 32.0
    """The low-rank product is scaled by alpha / rank (the published 32)."""
    density: float = 0.03
    """δ: the share of each m×n weight that S holds (the published 0.03; positions fixed at init)."""

    def check(self) -> None:
        super().check()
        if self.rank < 1:
            raise ValueError(f"rank={self.rank} must be >= 1")
        if not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha} must be > 0")
        if not 0.0 < self.density < 1.0:
            raise ValueError(f"density={self.density} must be in (0, 1)")


class SLTrain(FactoredMethod):
    """Sparse plus low-rank linears trained from scratch (``SparseLowRankLinear``)."""

    name = "sltrain"
    Options = SLTrainOptions
    module_type = sltrain.SparseLowRankLinear

    @classmethod
    def wrap(cls, model: nn.Module, options) -> list[str]:
        o = options
        return sltrain.wrap_linears(model, o.target_modules, o.rank, o.alpha, o.density, o.seed)

    def prepare_model(self, model: nn.Module) -> None:
        super().prepare_model(model)
        self.support_bytes = sum(m.count * (4 if m.out_features * m.in_features < 2**31 else 8)
                                 for m in self.modules(model))

    def linear_flops(self, m: int, n: int, r: int, tokens: int) -> int:
        """``6·m·n`` per token (x·Wᵀ forward; dx and dW backward) and, per forward call of
        ``tokens`` tokens, four m×r×n products: W = B·A in forward and again in backward, Bᵀ·dW
        and dW·Aᵀ."""
        return 6 * m * n + 4 * 2 * m * n * r // tokens

    def step_cache_bytes(self, tokens: int, accum: int, zero_stage: int, precision: str) -> int:
        """The supports, drawn once and kept on every rank (``SparseLowRankLinear.support``)."""
        return self.support_bytes

    def describe(self) -> str:
        values = sum(sltrain.support_size(m, n, self.options.density) for m, n, _ in self.shapes)
        factors = sum(r * (m + n) for m, n, r in self.shapes)
        dense = sum(m * n for m, n, _ in self.shapes)
        return (f"sltrain: {len(self.shapes)} linears as s·B·A + S (rank {self.options.rank}, density "
                f"{self.options.density:g}): {factors + values:,} trained values where dense weights hold {dense:,} "
                f"({(factors + values) / dense:.1%}); supports {self.support_bytes / 2**20:.1f} MiB per rank")

    @classmethod
    def to_plain(cls, state: dict[str, torch.Tensor], options) -> dict[str, torch.Tensor]:
        """The dense sum ``s·B·A + S`` of every replaced linear, as its ``weight``."""
        return sltrain.dense_state_dict(state, options.alpha)
