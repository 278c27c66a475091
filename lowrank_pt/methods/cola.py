"""CoLA: every targeted linear trained as the bottleneck ``B·σ(A·x)`` from the first step
(``lowrank_pt.model.cola``), so its activations are low-rank too; with ``recompute`` (CoLA-M) the
low-rank activations are formed again in backward instead of kept. The model has no dense Llama
form: hand-over to a following stage is refused by config validation, and export writes the
model in this project's own format (``checkpoint.export``), which ``generate`` loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from lowrank_pt.methods.factored import FactoredMethod, FactoredOptions
from lowrank_pt.model import cola


@dataclass
class CoLAOptions(FactoredOptions):
    rank: Optional[int] = None
    """r of every bottleneck; null: rank_fraction of each linear's smaller side."""
    rank_fraction: float = 0.25
    """r as a share of each linear's smaller side where rank is null (the published d/4)."""
    recompute: bool = False
    """CoLA-M: keep only each bottleneck's input for backward and form A·x and σ(A·x) again there
    (2·r fewer values per token and linear kept, one more r×n product per token computed)."""

    def check(self) -> None:
        super().check()
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank={self.rank} must be >= 1 (or null: rank_fraction)")
        if not 0.0 < self.rank_fraction <= 1.0:
            raise ValueError(f"rank_fraction={self.rank_fraction} must be in (0, 1]")


class CoLA(FactoredMethod):
    """Low-rank-activation linears trained from scratch (``LowRankActivationLinear``)."""

    name = "cola"
    Options = CoLAOptions
    module_type = cola.LowRankActivationLinear
    has_dense_form = False

    @classmethod
    def wrap(cls, model: nn.Module, options) -> list[str]:
        o = options
        return cola.wrap_linears(model, o.target_modules, o.rank, o.rank_fraction, o.seed, o.recompute)

    def prepare_model(self, model: nn.Module) -> None:
        super().prepare_model(model)
        # A·x and σ(A·x) of every bottleneck, kept for backward unless recomputed there.
        self.saved_values_per_token = 0 if self.options.recompute else sum(2 * r for _, _, r in self.shapes)

    def linear_flops(self, m: int, n: int, r: int, tokens: int) -> int:
        """``6·r·(m + n)`` per token (two products forward, four backward), and with recompute the
        r×n product once more in backward."""
        return 6 * r * (m + n) + (2 * r * n if self.options.recompute else 0)

    def describe(self) -> str:
        ranks = sorted({r for _, _, r in self.shapes})
        factors = sum(r * (m + n) for m, n, r in self.shapes)
        dense = sum(m * n for m, n, _ in self.shapes)
        return (f"cola: {len(self.shapes)} linears as B·silu(A·x) (rank {'/'.join(map(str, ranks))}"
                f"{', low-rank activations recomputed in backward' if self.options.recompute else ''}): "
                f"{factors:,} trained values where dense weights hold {dense:,} ({factors / dense:.1%}); "
                "no dense form: export writes lowrank_pt's own format")

    @classmethod
    def plain_model(cls, model_cfg, options) -> nn.Module:
        return cls.build_model(model_cfg, options)

    @classmethod
    def to_plain(cls, state: dict[str, torch.Tensor], options) -> dict[str, torch.Tensor]:
        """The model's own weights: there is no dense form to merge into."""
        return dict(state)
