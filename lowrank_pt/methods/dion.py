"""Dion: the hidden matrices stepped by a rank-r orthonormal update from one warm-started power
iteration with error feedback, everything else AdamW, in one stage (``lowrank_pt.optim.DionAdamW``,
at any ZeRO stage; the model is not changed, as for ``muon``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from lowrank_pt.methods.base import MethodOptions
from lowrank_pt.methods.projected import ProjectedMethod
from lowrank_pt.model.targets import DEFAULT_TARGETS
from lowrank_pt.optim.dion import DionAdamW, check_group, dion_rank


@dataclass
class DionOptions(MethodOptions):
    rank: Optional[int] = None
    """r of each matrix's update (capped at its smaller side); null: rank_fraction of it."""
    rank_fraction: float = 0.25
    """r as a fraction of each matrix's smaller side, where rank is null (the paper's 1/4 and 1/16)."""
    momentum: float = 0.95
    """μ: the share of B the error feedback keeps (M ← B − (1 − μ)·P·Rᵀ)."""
    adjust_lr: str = "original"
    """The update's scale: original (√max(1, m/n), the paper's) or match_rms_adamw (0.2·√max(m, n),
    as muon's)."""
    seed: int = 0
    """Seed of each matrix's first right factor Q (plus the matrix's index)."""
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Linears whose weights Dion steps; every other param trains with AdamW."""

    def check(self) -> None:
        Dion.check_options(self)


class Dion(ProjectedMethod):
    """Dion on the targeted linears' weights, AdamW elsewhere (``lowrank_pt.optim.DionAdamW``)."""

    name = "dion"
    Options = DionOptions
    Optimizer = DionAdamW

    @classmethod
    def check_options(cls, options) -> None:
        check_group({**DionAdamW.GROUP_DEFAULTS, **cls.group_options_of(options)})

    @classmethod
    def group_options_of(cls, o) -> dict:
        return {"dion": True, "rank": o.rank, "rank_fraction": o.rank_fraction, "momentum": o.momentum,
                "adjust_lr": o.adjust_lr, "seed": o.seed}

    def refresh_working_numel(self, groups: list[dict]) -> int:
        """A step works on one matrix at a time: B·Q, its QR, Bᵀ·P and P·Rᵀ (an m×n row block),
        in fp32 elements: the largest Dion matrix's."""
        o = self.group_options()
        shapes = [s for g in groups if g.get("dion") for s in g["shapes"] if len(s) == 2]
        return max((m * n + 3 * (m + n) * dion_rank((m, n), o["rank"], o["rank_fraction"]) for m, n in shapes),
                   default=0)
