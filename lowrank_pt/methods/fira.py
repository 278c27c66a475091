"""Fira (Chen et al. 2024, arXiv 2410.01623) as a method, at every ZeRO stage: GaLore's projected
Adam update of each targeted matrix (``α·P·ψ(R)``, ``R = Pᵀ·G`` on the top-r singular vectors of
the gradient, refreshed every ``update_proj_gap`` steps) plus the rest of the gradient,
``G - α·P·R``, scaled channel by channel by ``‖ψ(R)_c‖/‖R_c‖``, with a norm-growth limiter: a
full-rank update from GaLore's optimizer state (Adam's moments of ``R`` and the basis). Other
params train with AdamW.

The update rule, and how it runs on ZeRO's fragments of each matrix, is ``lowrank_pt.optim``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from lowrank_pt.methods.base import MethodOptions
from lowrank_pt.methods.projected import ProjectedMethod
from lowrank_pt.model.targets import DEFAULT_TARGETS
from lowrank_pt.optim import FiraAdamW


@dataclass
class FiraOptions(MethodOptions):
    rank: int = 128
    """Rank r of the gradient subspace of each targeted matrix (capped at its smaller side); Fira's
    LLaMA 60M run uses 128, 130M-350M 256, 1B 512."""
    update_proj_gap: int = 200
    """T: steps between subspace refreshes (an SVD of the full gradient); the first at step 0.
    Adam's moments carry over, as published. At a refresh each cut matrix's full gradient is summed
    onto one of its holders, which computes the SVD and broadcasts the basis."""
    scale: float = 0.25
    """alpha: the projected-back Adam update is multiplied by it (fira's alpha, GaLore's scale)."""
    proj_type: str = "std"
    """Side projected: std (the smaller side: right when rows >= cols), reverse_std, left or right,
    as galore. The residual's scales are per channel of the other side."""
    residual: str = "scaled"
    """The gradient part that the norm-based scaling trains: scaled, G - alpha·P·Pᵀ·G (what fira
    1.0.2 computes, the published runs), or exact, G - P·Pᵀ·G (the part outside the subspace)."""
    norm_growth_limit: float = 1.01
    """The norm of the scaled residual may grow by at most this factor per step; 0 turns the
    limiter off."""
    sign_rule: str = "canonical"
    """Signs of the basis vectors, as galore's sign_rule: canonical (continuous in the gradient, so
    kept moments keep their direction; the default) or lapack (the SVD's own signs, as fira keeps
    them; they can flip under a rounding-size change of the gradient)."""
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Linears whose weights Fira steps (the same patterns as galore and lora); every other param
    trains with AdamW."""

    def check(self) -> None:
        Fira.check_options(self)


class Fira(ProjectedMethod):
    """Fira on the targeted linears' weights (``lowrank_pt.optim.FiraAdamW``); AdamW on the rest."""

    name = "fira"
    Options = FiraOptions
    Optimizer = FiraAdamW

    @classmethod
    def group_options_of(cls, o) -> dict:
        return {"rank": o.rank, "update_proj_gap": o.update_proj_gap, "alpha": o.scale, "proj_type": o.proj_type,
                "residual": o.residual, "norm_growth_limit": o.norm_growth_limit, "sign_rule": o.sign_rule}
