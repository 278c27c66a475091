"""Dion (Ahn et al. 2025, "Dion: distributed orthonormalized updates", arXiv 2504.05295) on the
2-D params of its groups, AdamW on the rest, at any ZeRO stage.

A Dion matrix (m×n) keeps its momentum ``M`` (m×n, fp32) and a right factor ``Q`` (n×r, fp32;
r = ``rank``, or ``rank_fraction`` of min(m, n)), drawn from a seeded normal and column-normalised
at the first step. Each step, one power iteration warm-started from ``Q``:

    B ← M + G
    P ← orthonormalise(B·Q)                     (QR: m×r with orthonormal columns)
    R ← Bᵀ·P                                    (n×r)
    M ← B − (1 − μ)·P·Rᵀ                        (error feedback: what the update did not take stays)
    Q ← R with each column normalised
    W ← W·(1 − η·λ) − η·s(m, n)·P·Qᵀ

with ``s = √max(1, m/n)`` (``adjust_lr: original``, the paper's) or ``0.2·√max(m, n)``
(``match_rms_adamw``, as Muon's). At r = min(m, n) on a fixed gradient the iteration converges to
Muon's orthonormal update ``U·Vᵀ``.

Under ZeRO 1-3 a matrix's rows can lie on several ranks (a cut matrix): ``B·Q`` is formed from
each holder's rows and summed (m×r), every holder orthonormalises the same sum (the same bits on
every rank), ``Bᵀ·P`` is summed from the row blocks (n×r), and each holder updates its own
elements; ``Q`` is kept by every holder. Per cut matrix and step the collective carries
``4·(m + n)·r`` bytes, never m×n: the power iteration's products are r wide.
"""

from __future__ import annotations

import math

import torch

from lowrank_pt.optim.muon import ADJUST_LR, OrthonormalAdamW, update_scale
from lowrank_pt.zero.partition import MatrixPlan, ParamSpec, Piece


def dion_rank(shape: tuple[int, int], rank: int | None, rank_fraction: float | None) -> int:
    """r of a matrix: ``rank``, else ``rank_fraction`` of its smaller side (at least 1), capped at it."""
    side = min(shape)
    r = rank if rank is not None else max(1, math.ceil(float(rank_fraction) * side))
    return min(int(r), side)


def column_normalise(r: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return r / r.norm(dim=0, keepdim=True).clamp(min=eps)


class DionAdamW(OrthonormalAdamW):
    """Dion on the 2-D params of groups with ``dion: True``; torch's AdamW elsewhere (see the
    module doc). Group keys: ``rank`` or ``rank_fraction`` (0.25), ``momentum`` (μ, 0.95),
    ``adjust_lr`` (original), ``seed`` (of the first Q)."""

    projected_key = "dion"
    state_keys = ("momentum", "q")
    lowbit_keys = ("momentum",)
    GROUP_DEFAULTS: dict = {"rank": None, "rank_fraction": 0.25, "momentum": 0.95, "adjust_lr": "original",
                            "seed": 0}

    @staticmethod
    def check_rule(group: dict) -> None:
        check_group(group)

    def matrix_options(self, spec: ParamSpec, group: dict) -> dict:
        return {"r": dion_rank(spec.shape, group["rank"], group["rank_fraction"]), "momentum": float(group["momentum"]),
                "scale": update_scale(spec.shape, group["adjust_lr"]), "seed": int(group["seed"]) + spec.index}

    def moment_shape(self, plan: MatrixPlan, rank: int, frag) -> tuple[int, int]:
        return 0, 0  # no Adam moments: the momentum and Q, ``piece_state``

    def piece_state(self, plan: MatrixPlan, rank: int, frag) -> dict[str, int]:
        return {"momentum": frag.numel, "q": plan.shape[1] * plan.options["r"]}

    def init_piece_state(self, state: dict, piece: Piece) -> None:
        n, r = piece.plan.shape[1], piece.plan.options["r"]
        at, numel = piece.extra["q"]
        gen = torch.Generator().manual_seed(piece.plan.options["seed"])
        q = column_normalise(torch.randn(n, r, generator=gen, dtype=torch.float32))
        state["q"][at:at + numel] = q.reshape(-1).to(state["q"].device)

    def step_pieces(self, items, cut, steps, device) -> None:
        held = {it[0].plan.spec.index: it for it in items}
        work = {}
        for piece, _, _, grad, state in items:  # B = M + G, kept as the momentum's storage
            at, numel = piece.extra["momentum"]
            b = state["momentum"][at:at + numel]
            b.add_(piece.segment(grad).float())
            qa, qn = piece.extra["q"]
            q = state["q"][qa:qa + qn].view(piece.plan.shape[1], piece.plan.options["r"])
            block = self._row_block(piece, b) if piece.plan.cut else b.view(piece.plan.shape)
            work[piece.plan.spec.index] = {"b": b, "q": q, "block": block, "P": block @ q}
        summed = self.sum_over_holders(cut, lambda p: (p.shape[0], p.options["r"]), {
            i: self._rows_placed(held[i][0], w["P"]) for i, w in work.items() if held[i][0].plan.cut}, device)
        for i, w in work.items():
            piece = held[i][0]
            full_p = summed[i] if piece.plan.cut else w["P"]
            w["P"] = torch.linalg.qr(full_p).Q  # every holder: the same input, the same bits
            i_lo, i_hi = piece.rows
            w["P_rows"] = w["P"][i_lo:i_hi] if piece.plan.cut else w["P"]
            w["R"] = w["block"].t() @ w["P_rows"]
        summed = self.sum_over_holders(cut, lambda p: (p.shape[1], p.options["r"]),
                                       {i: w["R"] for i, w in work.items() if held[i][0].plan.cut}, device)
        for i, w in work.items():
            piece, group, flat = held[i][0], held[i][1], held[i][2]
            o = piece.plan.options
            r_full = summed[i] if piece.plan.cut else w["R"]
            fed_back = w["P_rows"] @ r_full.t()  # P·Rᵀ on the rank's rows
            w["b"].sub_(piece.own(fed_back) if piece.plan.cut else fed_back.reshape(-1), alpha=1 - o["momentum"])
            w["q"].copy_(column_normalise(r_full))
            update = w["P_rows"] @ w["q"].t()
            self._apply(piece, group, flat, steps[piece.plan.key],
                             piece.own(update) if piece.plan.cut else update.reshape(-1))

    @staticmethod
    def _row_block(piece: Piece, values: torch.Tensor) -> torch.Tensor:
        """The fragment's ``values`` (its own elements, flat) in its row block, zeros around them."""
        i_lo, i_hi = piece.rows
        out = torch.zeros((i_hi - i_lo) * piece.plan.shape[1], dtype=values.dtype, device=values.device)
        out[piece.lo:piece.lo + values.numel()] = values
        return out.view(i_hi - i_lo, piece.plan.shape[1])

    @staticmethod
    def _rows_placed(piece: Piece, p_rows: torch.Tensor) -> torch.Tensor:
        """The rank's rows of B·Q (its row block's, partial on a row it shares) in an m×r zero matrix."""
        m, r = piece.plan.shape[0], p_rows.shape[1]
        out = torch.zeros(m, r, dtype=p_rows.dtype, device=p_rows.device)
        i_lo, i_hi = piece.rows
        out[i_lo:i_hi] = p_rows
        return out


def check_group(group: dict) -> None:
    """Refuse an option a Dion group cannot run with (a ValueError naming it)."""
    if group.get("rank") is not None and int(group["rank"]) < 1:
        raise ValueError(f"rank={group['rank']} must be >= 1 (or null: rank_fraction)")
    if group.get("rank") is None and not 0 < float(group["rank_fraction"]) <= 1:
        raise ValueError(f"rank_fraction={group['rank_fraction']} must be in (0, 1]")
    if not 0.0 <= float(group["momentum"]) < 1.0:
        raise ValueError(f"momentum={group['momentum']} must be in [0, 1)")
    if group["adjust_lr"] not in ADJUST_LR:
        raise ValueError(f"adjust_lr={group['adjust_lr']!r}: allowed {list(ADJUST_LR)}")
