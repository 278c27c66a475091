"""Muon (Jordan et al. 2024; the scaled form of Liu et al. 2025, "Muon is scalable for LLM
training") on the 2-D params of its groups, AdamW on the rest, at any ZeRO stage.

A Muon matrix keeps one fp32 momentum buffer ``B`` shaped like it. Each step, as ``torch.optim.Muon``
(whose single-tensor arithmetic this follows, so stage 0 equals it to the bit):

    B ← B + (1 − μ)(G − B)                      (momentum μ, default 0.95)
    U ← G + μ(B − G)   (Nesterov; else U ← B)
    O ← NewtonSchulz5(U)                        (in bf16: U/‖U‖_F, then 5 quintic steps with
                                                 coefficients (3.4445, −4.7750, 2.0315) on the
                                                 wide orientation)
    W ← W·(1 − η·λ) − η·s(m, n)·O

with the update scale ``adjust_lr``: ``match_rms_adamw`` (default), ``s = 0.2·√max(m, n)``, which
gives the update the RMS of an AdamW update, so AdamW's learning rate and weight decay carry over
(Liu et al.); ``original``, ``s = √max(1, m/n)`` (Jordan's).

Newton–Schulz needs the whole ``U``. Under ZeRO 1-3 a matrix's rows can lie on several ranks
(a cut matrix): each holder writes its fragment of ``U`` into a zero m×n buffer, the buffers are
summed onto the matrix's owner (``partition.assign_owners``: balanced by Newton–Schulz FLOPs), which
orthonormalises it and broadcasts ``O``; each holder keeps its fragment. Per cut matrix and step
that is one reduce and one broadcast of m·n fp32 values, and one m×n buffer alive at a time on
each rank; a matrix that one rank holds whole is orthonormalised there with no communication.
"""

from __future__ import annotations

import math

import torch

from lowrank_pt.core import dist
from lowrank_pt.optim.fragment_optimizer import FragmentOptimizer
from lowrank_pt.optim.lowbit import round_to_bf16, rounding_generator
from lowrank_pt.zero.partition import MatrixPlan, ParamSpec, Piece

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR = ("match_rms_adamw", "original")


def newton_schulz(u: torch.Tensor, steps: int = 5, coefficients=NS_COEFFICIENTS, eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The quintic Newton–Schulz orthonormalisation of ``u`` (m×n) in ``dtype`` (bf16, as
    torch.optim.Muon's)."""
    a, b, c = coefficients
    x = u.to(dtype, copy=True)  # the input may be the momentum buffer itself (no Nesterov)
    tall = u.size(0) > u.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def update_scale(shape: tuple[int, int], adjust_lr: str) -> float:
    """``s(m, n)``: the multiplier of the learning rate for a Muon matrix (see the module doc)."""
    m, n = shape
    return 0.2 * math.sqrt(max(m, n)) if adjust_lr == "match_rms_adamw" else math.sqrt(max(1.0, m / n))


class OrthonormalAdamW(FragmentOptimizer):
    """What Muon and Dion share: AdamW's hyperparameters plus the rule's group keys
    (``GROUP_DEFAULTS``, checked by ``check_rule`` on every group the rule steps), and the update
    ``W ← W·(1 − η·λ) − η·s·O`` of a fragment (``_apply``)."""

    GROUP_DEFAULTS: dict = {}

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 names: dict[int, str] | None = None, defer_until_attached: bool = False, state_dtype: str = "fp32",
                 **group_defaults):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        **{**self.GROUP_DEFAULTS, **group_defaults})
        super().__init__(params, defaults, names=names, defer_until_attached=defer_until_attached,
                         state_dtype=state_dtype)
        for group in self.param_groups:
            if group.get(self.projected_key):
                self.check_rule(group)

    @staticmethod
    def check_rule(group: dict) -> None:
        """Refuse a group option the rule cannot run with (a ValueError naming it)."""

    @staticmethod
    def _apply(piece: Piece, group: dict, flat: torch.Tensor, t: int, update: torch.Tensor) -> None:
        """Decoupled weight decay, then ``W ← W − η·s·O`` on the rank's fragment (torch.optim.Muon's
        order); a bf16 weight (bf16 masters) is updated in fp32 and stochastically rounded back."""
        stored = piece.segment(flat)
        segment = stored if stored.dtype == torch.float32 else stored.float()
        segment.mul_(1 - group["lr"] * group["weight_decay"])
        segment.add_(update.view(-1), alpha=-group["lr"] * piece.plan.options["scale"])
        if segment is not stored:
            stored.copy_(round_to_bf16(segment, rounding_generator(t, piece.frag.param, piece.frag.start)))


class MuonAdamW(OrthonormalAdamW):
    """Muon on the 2-D params of groups with ``muon: True``; torch's AdamW on everything else
    (see the module doc). Group keys: ``momentum`` (0.95), ``nesterov`` (True), ``ns_steps`` (5),
    ``adjust_lr`` (match_rms_adamw)."""

    projected_key = "muon"
    state_keys = ("momentum",)
    lowbit_keys = ("momentum",)
    ns_dtype: torch.dtype = torch.bfloat16
    """Newton–Schulz's arithmetic (bf16, as published). bf16 turns a one-ulp difference of a
    gradient (another ZeRO stage's reduction order) into a bf16 step of the update: the tests
    compare ZeRO stages in fp32 as well, where the arithmetic, not bf16, is what they see."""
    GROUP_DEFAULTS: dict = {"momentum": 0.95, "nesterov": True, "ns_steps": 5, "adjust_lr": "match_rms_adamw"}

    @staticmethod
    def check_rule(group: dict) -> None:
        check_group(group)

    def owner_cost(self, plan: MatrixPlan) -> int:
        """Newton–Schulz's FLOPs, ∝ m·n·min(m, n) (each step forms X·Xᵀ, min(m, n) square, and two
        products with it): owners balanced by the work, not by the bytes gathered. For LLaMA's
        hidden matrices (the smaller side is the hidden size in all of them) that is the same
        balance; a thin matrix (4096×64) weighs 1/64 of its share by bytes."""
        m, n = plan.shape
        return m * n * min(m, n)

    def matrix_options(self, spec: ParamSpec, group: dict) -> dict:
        return {"momentum": float(group["momentum"]), "nesterov": bool(group["nesterov"]),
                "ns_steps": int(group["ns_steps"]), "scale": update_scale(spec.shape, group["adjust_lr"])}

    def moment_shape(self, plan: MatrixPlan, rank: int, frag) -> tuple[int, int]:
        return 0, 0  # no Adam moments: one momentum buffer, ``piece_state``

    def piece_state(self, plan: MatrixPlan, rank: int, frag) -> dict[str, int]:
        return {"momentum": frag.numel}

    def step_pieces(self, items, cut, steps, device) -> None:
        held = {it[0].plan.spec.index: it for it in items}
        updates: dict[int, torch.Tensor] = {}
        for piece, _, _, grad, state in items:
            o = piece.plan.options
            at, numel = piece.extra["momentum"]
            buf = state["momentum"][at:at + numel]
            g = piece.segment(grad).float()
            buf.lerp_(g, 1 - o["momentum"])
            u = g.lerp(buf, o["momentum"]) if o["nesterov"] else buf
            if not piece.plan.cut:
                updates[piece.plan.spec.index] = newton_schulz(u.view(piece.plan.shape), o["ns_steps"],
                                                               dtype=self.ns_dtype).reshape(-1)
            else:
                updates[piece.plan.spec.index] = u
        rank = dist.rank()
        for plan in cut:  # the same list, in the same order, on every rank
            m, n = plan.shape
            full = torch.zeros(m * n, dtype=torch.float32, device=device)
            item = held.get(plan.spec.index)
            if item is not None:
                full[item[0].frag.start:item[0].frag.end] = updates[plan.spec.index]
            dist.reduce_sum_(full, dst=plan.owner)
            if rank == plan.owner:
                full = newton_schulz(full.view(m, n), plan.options["ns_steps"], dtype=self.ns_dtype).float().reshape(-1)
            dist.broadcast_(full, src=plan.owner)
            if item is not None:
                updates[plan.spec.index] = full[item[0].frag.start:item[0].frag.end]
            del full
        for piece, group, flat, _, _ in items:
            self._apply(piece, group, flat, steps[piece.plan.key], updates[piece.plan.spec.index])


def check_group(group: dict) -> None:
    """Refuse an option a Muon group cannot run with (a ValueError naming it)."""
    if not 0.0 <= float(group["momentum"]) < 1.0:
        raise ValueError(f"momentum={group['momentum']} must be in [0, 1)")
    if not 1 <= int(group["ns_steps"]) < 100:
        raise ValueError(f"ns_steps={group['ns_steps']} must be in [1, 100)")
    if group["adjust_lr"] not in ADJUST_LR:
        raise ValueError(f"adjust_lr={group['adjust_lr']!r}: allowed {list(ADJUST_LR)}")
