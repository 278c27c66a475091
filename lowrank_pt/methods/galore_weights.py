"""GaLore as its paper publishes the optimizer (Zhao et al. 2024, arXiv 2403.03507), on the weights
themselves: each targeted matrix's gradient ``G`` is projected onto its top-r singular subspace
(``R = G·Qᵀ`` or ``Pᵀ·G``, refreshed every ``update_proj_gap`` steps by an SVD of ``G``), Adam
runs on ``R``, and the update goes straight back into the weight, ``W ← W - η_t·α·back(ψ)``. Other
params train with AdamW.

Beside the ``galore`` method (an adapter ``W = W0 + α·B·Q`` that DeepSpeed's own optimizer trains
through ``B``), the model keeps one copy of each weight and no ``B``: with per-layer updates
(``train.update: per_layer``) each matrix's full gradient lives only inside its own backward,
which is the published one-GPU memory recipe. The projection, Adam's moments on it and the basis
are optimizer state (``lowrank_pt.optim.GaLoreAdamW``), stepped on ZeRO's fragments of each matrix
at every stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from lowrank_pt.methods.base import MethodOptions
from lowrank_pt.methods.projected import ProjectedMethod
from lowrank_pt.model.targets import DEFAULT_TARGETS
from lowrank_pt.optim import GaLoreAdamW


@dataclass
class GaLoreWeightsOptions(MethodOptions):
    rank: int = 128
    """Rank r of the gradient subspace of each targeted matrix (capped at its smaller side); the
    GaLore paper's 7B run uses 1024, 1B 512."""
    update_proj_gap: int = 200
    """T: steps between subspace refreshes (an SVD of the full gradient); the first at step 0.
    Adam's moments carry over, as published."""
    scale: float = 0.25
    """alpha: the projected-back update is multiplied by it (GaLore's scale)."""
    proj_type: str = "std"
    """Side projected: std (the smaller side: right when rows >= cols), reverse_std, left or right,
    as galore-torch."""
    sign_rule: str = "canonical"
    """Signs of the basis vectors, as galore's sign_rule: canonical (continuous in the gradient, so
    kept moments keep their direction) or lapack (the SVD's own signs, as galore-torch keeps them)."""
    svd: str = "exact"
    """How a refresh finds the top-r subspace: exact (torch.linalg.svd, as galore-torch) or
    randomized (subspace iteration, 2 power iterations, 8 extra directions: its working set is
    the gradient and a few (m + n)×(r + 8) blocks instead of the SVD's factors)."""
    projector_dtype: str = "fp32"
    """Storage of each basis (optimizer state, r·n or m·r per matrix): fp32, or bf16 to halve it,
    rounded once per refresh (the projection and the update use the rounded basis, in fp32)."""
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Linears whose weights GaLore steps (the same patterns as galore and lora); every other param
    trains with AdamW."""

    def check(self) -> None:
        GaLoreWeights.check_options(self)


class GaLoreWeights(ProjectedMethod):
    """GaLore's optimizer on the targeted linears' weights (``lowrank_pt.optim.GaLoreAdamW``)."""

    name = "galore_weights"
    Options = GaLoreWeightsOptions
    Optimizer = GaLoreAdamW
    default_grad_clip = 0.0
    """Off, as GaLore's own scripts (and the galore method)."""

    @classmethod
    def group_options_of(cls, o) -> dict:
        return {"rank": o.rank, "update_proj_gap": o.update_proj_gap, "alpha": o.scale, "proj_type": o.proj_type,
                "sign_rule": o.sign_rule, "basis_dtype": o.projector_dtype, "svd": o.svd}
