"""The options of the ``galore`` method (``lowrank_pt.methods.galore.method``), with their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch

from lowrank_pt.methods.base import MethodOptions
from lowrank_pt.methods.galore import cost
from lowrank_pt.model.targets import DEFAULT_TARGETS
from lowrank_pt.optim import projector

PROJECTOR_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SVD_CHOICES = (*projector.SVD_METHODS, "sketch")
REFRESH_CHOICES = ("auto", "step", "backward")


@dataclass
class GaLoreOptions(MethodOptions):
    rank: int = 128
    """Rank r of the gradient subspace of each targeted matrix (capped at the matrix's smaller side)."""
    update_proj_gap: int = 200
    """T: steps between subspace refreshes; the first subspace is computed at step 0."""
    scale: float = 0.25
    """alpha: the projected-back update is multiplied by this (GaLore's scale)."""
    proj_type: str = "std"
    """Side projected: std (the smaller side: right when rows >= cols), reverse_std (the larger
    side), left or right (fixed), as in galore-torch."""
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Linears trained by GaLore: a name or its last components (q_proj, mlp.down_proj), a glob
    over the full module name (layers.*.mlp.*) or a regex matching it. Other params train
    full-rank with AdamW. Every pattern must match at least one nn.Linear; a linear tied to an
    embedding is never wrapped (the same rules as lora)."""
    svd: str = "exact"
    """Subspace solver: exact (float32 torch.linalg.svd of the full gradient), randomized
    (subspace iteration on the full gradient, warm-started from the previous subspace) or
    sketch (streaming: the refresh step sums two sketches of each gradient, A·Ω and Ψ·A with
    Ψ warm-started from the current subspace, over its micro-batches and ranks, and never forms
    the m×n gradient; holds (m+n)·(r+p)-ish floats per matrix instead of m·n; a matrix whose
    sketch would not be smaller than its gradient is refreshed exactly). After the first, a
    sketch refresh's step still steps in the old subspace, where its gradient is exact, and the
    new subspace serves from the next step (the sketches estimate the new subspace's gradient
    only roughly)."""
    refresh: str = "auto"
    """Where a refresh computes the new subspaces. auto: step (exact) where the stage's plan
    (``lowrank-pt plan``) with it peaks within 90% of the rank's memory (its GPU's, or the host's
    share per rank), else backward with svd randomized at one micro-batch per step, else step
    with svd sketch (a svd set here is kept); decided at the stage's start, the same on every
    rank (the smallest memory), and printed. step: at the optimizer step, from what the
    backward captured over the step's micro-batches on each matrix's owner rank (the full
    gradient, or with svd=sketch its sketches). backward: each matrix inside its own backward,
    as soon as its gradient exists, one matrix at a time: B's gradient is formed in the new basis
    and nothing m×n outlives the matrix (exact: its gradient alone; randomized: subspace
    iteration through all-reduced (m or n)×(r+p) products, no m×n tensor at all); needs one
    micro-batch per step (grad_accum 1)."""
    svd_niter: int = 2
    """randomized: power iterations per refresh."""
    svd_oversample: int = 8
    """randomized and sketch: extra directions p searched beyond the rank (sketch: A·Ω has r+p
    columns, Ψ·A r+2p rows)."""
    moments_on_refresh: str = "keep"
    """keep: Adam's moments carry over unchanged, as published; reproject: carried into the new
    subspace (first moment exactly, second under an uncorrelated-coordinates approximation)."""
    sign_rule: str = "canonical"
    """Signs of the basis vectors at a refresh: canonical (each vector's largest entry positive,
    continuous in the gradient, so moments kept across a refresh keep their direction) or lapack
    (the signs the SVD returns, as galore-torch keeps them; they can flip under rounding-size
    changes of the gradient and reverse the kept momentum along a vector). galore-torch also
    adds eps before Adam's bias correction; this method adds it after, as torch's AdamW."""
    base_in_fp32: bool = False
    """Hold the frozen base W0 as an fp32 buffer, so bf16 runs merge without rounding W0 to
    bf16 at every refresh. Costs 4 bytes per weight on every rank (buffers are not sharded by
    ZeRO-3) instead of a sharded bf16 frozen param."""
    projector_dtype: str = "fp32"
    """Storage of each projector Q (r×n or m×r): fp32, or bf16 to halve it. Either way a frozen
    parameter, so ZeRO-3 shards it over the ranks like the weights it serves (1/world of it per
    rank) and gathers it with its layer; the update B·Q is formed in fp32. With bf16 the basis is
    rounded once per refresh, and the merge and B's gradient use the rounded basis the forward
    uses."""

    forward: str = "auto"
    """How each linear's forward and backward use W = d·W0 + α·B·Q (``lowrank_pt.methods.galore.cost``):
    call (W_eff built in forward and again in backward), step (built once per optimizer step and
    kept through its micro-batches: one m×n copy per matrix while a step runs; not at ZeRO-3),
    factored (never built: x·W0ᵀ + α·(x·Qᵀ)·Bᵀ), or auto: per matrix the fewest FLOPs for the
    stage's tokens per micro-batch, accumulation and ZeRO stage. The choice is printed at the
    stage's start."""
    forward_cache_gb: float = 1.0
    """auto: GiB per rank the step path's W_eff copies may take together (matrices past it get
    their cheapest other path)."""

    def check(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank={self.rank} must be >= 1")
        if self.update_proj_gap < 1:
            raise ValueError(f"update_proj_gap={self.update_proj_gap} must be >= 1")
        if not self.scale > 0:
            raise ValueError(f"scale={self.scale} must be > 0")
        if self.proj_type not in projector.PROJ_TYPES:
            raise ValueError(f"proj_type={self.proj_type!r}: allowed {list(projector.PROJ_TYPES)}")
        if self.svd not in SVD_CHOICES:
            raise ValueError(f"svd={self.svd!r}: allowed {list(SVD_CHOICES)}")
        if self.svd_niter < 0 or self.svd_oversample < 0:
            raise ValueError(f"svd_niter={self.svd_niter} and svd_oversample={self.svd_oversample} must be >= 0")
        if self.refresh not in REFRESH_CHOICES:
            raise ValueError(f"refresh={self.refresh!r}: allowed {list(REFRESH_CHOICES)}")
        if self.refresh == "backward" and self.svd == "sketch":
            raise ValueError("svd=sketch sums sketches over a step's micro-batches and needs refresh=step; "
                             "with refresh=backward, svd=randomized never forms the m×n gradient either")
        if self.moments_on_refresh not in ("keep", "reproject"):
            raise ValueError(f"moments_on_refresh={self.moments_on_refresh!r}: allowed ['keep', 'reproject']")
        if self.sign_rule not in projector.SIGN_RULES:
            raise ValueError(f"sign_rule={self.sign_rule!r}: allowed {list(projector.SIGN_RULES)}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")
        if self.forward not in cost.FORWARD_CHOICES:
            raise ValueError(f"forward={self.forward!r}: allowed {list(cost.FORWARD_CHOICES)}")
        if not self.forward_cache_gb >= 0:
            raise ValueError(f"forward_cache_gb={self.forward_cache_gb} must be >= 0")
        if self.projector_dtype not in PROJECTOR_DTYPES:
            raise ValueError(f"projector_dtype={self.projector_dtype!r}: allowed {list(PROJECTOR_DTYPES)}")
