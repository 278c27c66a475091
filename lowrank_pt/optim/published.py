"""The published projected optimizers as ``ProjectedAdam`` group defaults: APOLLO and APOLLO-Mini,
Fira, and GaLore on the weights. The update rules themselves are ``lowrank_pt.optim.projected``."""

from __future__ import annotations

from lowrank_pt.optim.projected import ProjectedAdam

_COMMON = dict(update_proj_gap=200, proj_type="std", norm_growth_limit=1.01, seed=1, sign_rule="canonical",
               scale=1.0, scale_front=False, alpha=0.25, residual="scaled", basis_dtype="fp32", svd="exact")


class APOLLOAdamW(ProjectedAdam):
    """APOLLO (Zhu et al., arXiv 2412.05270) on the 2-D params of groups with a ``rank``; torch
    AdamW elsewhere. Group keys and defaults (apollo-torch's): ``rank`` (256 in the paper's
    60M-350M runs), ``update_proj_gap`` 200, ``scale`` 1 (the update is multiplied by √scale),
    ``proj`` random, ``proj_type`` std, ``scale_type`` channel, ``scale_front`` False,
    ``norm_growth_limit`` 1.01, ``seed`` 1. APOLLO-Mini is rank 1, ``scale_type`` tensor, scale 128."""

    GROUP_DEFAULTS = {**_COMMON, "update": "apollo", "proj": "random", "scale_type": "channel"}


class FiraAdamW(ProjectedAdam):
    """Fira (Chen et al., arXiv 2410.01623) on the 2-D params of groups with a ``rank``; torch AdamW
    elsewhere. Group keys and defaults (fira's): ``rank`` (128 in its 60M run), ``update_proj_gap``
    200, ``alpha`` 0.25, ``proj_type`` std, ``norm_growth_limit`` 1.01, ``residual`` scaled,
    ``sign_rule`` canonical (lapack: the SVD's own signs, as fira)."""

    GROUP_DEFAULTS = {**_COMMON, "update": "fira", "proj": "svd", "scale_type": "channel"}


class GaLoreAdamW(ProjectedAdam):
    """GaLore's published optimizer (Zhao et al., arXiv 2403.03507; galore-torch's GaLoreAdamW) on
    the 2-D params of groups with a ``rank``: Adam on the gradient projected onto its top-r singular
    subspace, the update projected back into the weight itself; torch AdamW elsewhere. Group keys
    and defaults (galore-torch's): ``rank``, ``update_proj_gap`` 200, ``alpha`` 0.25 (its
    ``scale``), ``proj_type`` std, ``sign_rule`` canonical (lapack: the SVD's own signs)."""

    GROUP_DEFAULTS = {**_COMMON, "update": "galore", "proj": "svd", "scale_type": "channel",
                      "norm_growth_limit": 0.0}
