"""Muon: the hidden matrices (the targeted linears' weights) orthonormalised-momentum updates,
everything else (embeddings, head, norms) AdamW, in one stage (``lowrank_pt.optim.MuonAdamW``,
at any ZeRO stage). The model is not changed; the method chooses the optimizer groups and builds
the optimizer, as APOLLO does (``methods.projected``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from lowrank_pt.methods.base import MethodOptions
from lowrank_pt.methods.projected import ProjectedMethod
from lowrank_pt.model.targets import DEFAULT_TARGETS
from lowrank_pt.optim.muon import MuonAdamW, check_group


@dataclass
class MuonOptions(MethodOptions):
    momentum: float = 0.95
    """μ of the momentum buffer (Muon's 0.95)."""
    nesterov: bool = True
    """Orthonormalise the Nesterov look-ahead G + μ(B − G) (as published), else the buffer B."""
    ns_steps: int = 5
    """Quintic Newton–Schulz iterations (5, as published; in bf16)."""
    adjust_lr: str = "match_rms_adamw"
    """The update's scale: match_rms_adamw (0.2·√max(m, n): the RMS of an AdamW update, so AdamW's
    learning rate and weight decay carry over, Liu et al. 2025) or original (√max(1, m/n), Jordan's)."""
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Linears whose weights Muon steps (the same patterns as lora); every other param trains with AdamW."""

    def check(self) -> None:
        Muon.check_options(self)


class Muon(ProjectedMethod):
    """Muon on the targeted linears' weights, AdamW elsewhere (``lowrank_pt.optim.MuonAdamW``)."""

    name = "muon"
    Options = MuonOptions
    Optimizer = MuonAdamW

    @classmethod
    def check_options(cls, options) -> None:
        check_group({**MuonAdamW.GROUP_DEFAULTS, **cls.group_options_of(options)})

    @classmethod
    def group_options_of(cls, o) -> dict:
        return {"muon": True, "momentum": o.momentum, "nesterov": o.nesterov, "ns_steps": o.ns_steps,
                "adjust_lr": o.adjust_lr}

    def refresh_working_numel(self, groups: list[dict]) -> int:
        """A step orthonormalises one matrix at a time: its fp32 update (summed onto its owner when
        ZeRO cuts it) and, in bf16, the iterate, its Gram matrix and the next iterate, counted in
        fp32 elements: the largest Muon matrix's."""
        shapes = [s for g in groups if g.get("muon") for s in g["shapes"] if len(s) == 2]
        return max((m * n + (2 * m * n + 2 * min(m, n) ** 2) // 2 for m, n in shapes), default=0)
