"""Structure-aware optimizers: per-matrix methods (APOLLO, APOLLO-Mini, Fira) that step on the
fragments of each matrix a ZeRO partition holds (``fragments``), and their update rules
(``projected``)."""

from lowrank_pt.optim.fragment_optimizer import FragmentOptimizer
from lowrank_pt.optim.projected import APOLLOAdamW, FiraAdamW, ProjectedAdam
from lowrank_pt.zero.partition import Fragment, planned_fragments

__all__ = ["APOLLOAdamW", "FiraAdamW", "Fragment", "FragmentOptimizer", "ProjectedAdam", "planned_fragments"]
