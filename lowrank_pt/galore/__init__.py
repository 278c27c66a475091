"""GaLore: gradient low-rank projection, as a frozen-projector adapter (any ZeRO stage) and as an
optimizer (``GaLoreAdamW``, ZeRO stage 0 / plain PyTorch), sharing one projector."""

from lowrank_pt.galore.adapter import GaLoreLinear, wrap_linears
from lowrank_pt.galore.optimizer import GaLoreAdamW
from lowrank_pt.galore.projector import new_basis, project, project_back, projection_side, reproject_moments

__all__ = ["GaLoreAdamW", "GaLoreLinear", "new_basis", "project", "project_back", "projection_side",
           "reproject_moments", "wrap_linears"]
