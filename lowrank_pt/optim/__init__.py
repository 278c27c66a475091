"""Structure-aware optimizers: per-matrix methods (APOLLO, APOLLO-Mini, Fira, GaLore on the
weights: ``published``) that step on the fragments of each matrix a ZeRO partition holds
(``fragments``), and their update rules (``projected``)."""

from lowrank_pt.optim.dion import DionAdamW
from lowrank_pt.optim.fragment_optimizer import FragmentOptimizer
from lowrank_pt.optim.muon import MuonAdamW
from lowrank_pt.optim.projected import ProjectedAdam
from lowrank_pt.optim.published import APOLLOAdamW, FiraAdamW, GaLoreAdamW
from lowrank_pt.zero.partition import Fragment, planned_fragments

__all__ = ["APOLLOAdamW", "DionAdamW", "FiraAdamW", "Fragment", "FragmentOptimizer", "GaLoreAdamW", "MuonAdamW", "ProjectedAdam",
           "planned_fragments"]
