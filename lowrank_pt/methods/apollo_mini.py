"""APOLLO-Mini (arXiv 2412.05270): APOLLO at rank 1 with one scale per matrix (``scale_type:
tensor``) and ``scale`` 128, the paper's SGD-like-memory variant: its optimizer state is two
numbers per channel of each targeted matrix plus a seed and a norm."""

from __future__ import annotations

from dataclasses import dataclass

from lowrank_pt.methods.apollo import APOLLO, APOLLOOptions


@dataclass
class APOLLOMiniOptions(APOLLOOptions):
    rank: int = 1
    """Rank of the random projection (APOLLO-Mini: 1)."""
    scale: float = 128.0
    """The update is multiplied by √scale (APOLLO-Mini: 128, so √128 ≈ 11.3: a rank-1 scale
    underestimates the full-rank one)."""
    scale_type: str = "tensor"
    """tensor (APOLLO-Mini: one scale per matrix) or channel."""

    def check(self) -> None:
        APOLLOMini.check_options(self)


class APOLLOMini(APOLLO):
    """APOLLO with APOLLO-Mini's defaults (rank 1, tensor scale, scale 128)."""

    name = "apollo_mini"
    Options = APOLLOMiniOptions
