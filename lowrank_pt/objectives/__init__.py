"""What a stage optimises: the language-model loss (``lm``), SFT on chat replies (``sft``), DPO on
preference pairs (``dpo``). An objective owns the stage kind: its loss per micro-batch, rows per
example, token weights, data, evaluation and sampler (``base``, ``dpo``). This registry is the one
place that reads which kind a stage is; nothing else tests a stage's ``sft`` or ``dpo`` section."""

from __future__ import annotations

from lowrank_pt.objectives.base import LMObjective, SFTObjective
from lowrank_pt.objectives.dpo import DPOObjective

OBJECTIVES: dict[str, type[LMObjective]] = {"lm": LMObjective, "sft": SFTObjective, "dpo": DPOObjective}


def stage_kind(stage) -> str:
    """``sft``, ``dpo`` or ``lm``: which section of the stage (config validation lets at most one be set)."""
    if getattr(stage, "sft", None) is not None:
        return "sft"
    if getattr(stage, "dpo", None) is not None:
        return "dpo"
    return "lm"


def objective_class(stage) -> type[LMObjective]:
    """The stage's objective class (its class-level facts: rows per example, chat, loader)."""
    return OBJECTIVES[stage_kind(stage)]


def build_objective(stage, method) -> LMObjective:
    """The stage's objective. DPO takes its reference from the adapters where the method says its
    base is the stage's starting model (``Method.base_is_start_model``), else precomputes it."""
    cls = objective_class(stage)
    if cls is DPOObjective:
        reference = "adapters" if method.base_is_start_model() else "precomputed"
        return DPOObjective(stage, stage.dpo.beta, reference)
    return cls(stage)


__all__ = ["OBJECTIVES", "DPOObjective", "LMObjective", "SFTObjective", "build_objective", "objective_class",
           "stage_kind"]
