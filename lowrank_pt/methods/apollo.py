"""APOLLO (Zhu et al. 2024, arXiv 2412.05270, "SGD-like memory, AdamW-level performance") as a
method, at every ZeRO stage: each targeted matrix's full gradient ``G`` is scaled channel by
channel with Adam statistics of a random projection ``R = P·G`` (rank r, redrawn from a seed every
``update_proj_gap`` steps), the update ``√scale·G·diag(s)`` capped by a norm-growth limiter.
Optimizer state: Adam's moments of ``R`` (r per channel), one seed and one norm per matrix — the
projection is regenerated from its seed, never stored. Other params train with AdamW.

The update rule, and how it runs on ZeRO's fragments of each matrix, is ``lowrank_pt.optim``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from lowrank_pt.methods.base import MethodOptions
from lowrank_pt.methods.projected import ProjectedMethod
from lowrank_pt.model.targets import DEFAULT_TARGETS
from lowrank_pt.optim import APOLLOAdamW


@dataclass
class APOLLOOptions(MethodOptions):
    rank: int = 256
    """Rank r of the projection of each targeted matrix's gradient (capped at the matrix's smaller
    side). The APOLLO paper's LLaMA 60M-350M runs use 256, 1B 512."""
    update_proj_gap: int = 200
    """T: steps between projection refreshes (a new random matrix from the next seed); the first
    projection is drawn at step 0. Adam's moments carry over, as published."""
    scale: float = 1.0
    """The update is multiplied by √scale (apollo-torch's scale: 1 for APOLLO, 128 for
    APOLLO-Mini)."""
    proj: str = "random"
    """random (APOLLO: a Gaussian N(0, 1/r) matrix regenerated from its seed at every step, nothing
    stored) or svd (the gradient's top-r singular vectors at each refresh, stored as optimizer
    state; one full gradient per matrix is summed onto one rank at a refresh)."""
    proj_type: str = "std"
    """Side projected: std (the smaller side: right when rows >= cols), reverse_std, left or right,
    as galore. The channels scaled are those of the other side."""
    scale_type: str = "channel"
    """channel (one scale per row of G for a right projection, per column for a left one) or tensor
    (one scale per matrix: APOLLO-Mini)."""
    scale_front: bool = False
    """Apply √scale before the norm-growth limiter instead of after it (apollo-torch's scale_front)."""
    norm_growth_limit: float = 1.01
    """The norm of the scaled gradient may grow by at most this factor per step (Fira's limiter,
    as apollo-torch applies it); 0 turns the limiter off (apollo-torch's disable_nl)."""
    seed: int = 1
    """The k-th targeted matrix (0-based, module order) draws its first projection from seed + k;
    each refresh takes the next seed of apollo-torch's chain (the same numbers as apollo-torch
    when its projected params come first). The current seed is optimizer state."""
    sign_rule: str = "canonical"
    """proj=svd only: signs of the singular vectors, as galore's sign_rule."""
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Linears whose weights APOLLO steps (the same patterns as galore and lora); every other param
    trains with AdamW."""

    def check(self) -> None:
        APOLLO.check_options(self)


class APOLLO(ProjectedMethod):
    """APOLLO on the targeted linears' weights (``lowrank_pt.optim.APOLLOAdamW``); AdamW on the rest."""

    name = "apollo"
    Options = APOLLOOptions
    Optimizer = APOLLOAdamW

    @classmethod
    def group_options_of(cls, o) -> dict:
        return {"rank": o.rank, "update_proj_gap": o.update_proj_gap, "scale": o.scale, "proj": o.proj,
                "proj_type": o.proj_type, "scale_type": o.scale_type, "scale_front": o.scale_front,
                "norm_growth_limit": o.norm_growth_limit, "seed": o.seed, "sign_rule": o.sign_rule}
