"""APOLLO, APOLLO-Mini and Fira as fragment optimizers: full-rank updates of each projected matrix,
shaped by Adam statistics of a low-rank projection of its gradient, at every ZeRO stage.

For a projected matrix ``W`` (m×n) with gradient ``G``, rank r and a projection side chosen as
GaLore's ``proj_type`` does (``std``: the smaller side, right when m >= n), with ``t`` the
matrix's step count from 1 and a refresh whenever ``t-1`` is a multiple of ``update_proj_gap``:

1. The projection: ``right``: ``Q`` (r×n), ``R = G·Qᵀ`` (m×r); ``left``: ``P`` (m×r), ``R = Pᵀ·G``
   (r×n). ``proj: random`` (APOLLO) draws it from N(0, 1/r) with a generator seeded by the
   matrix's seed, which a refresh advances (apollo-torch's seeding: matrix k starts from
   ``seed + k``, each refresh takes the last of 15 int64 draws seeded by the previous seed); only
   the seed is state: the matrix is regenerated at every step (one ``randn`` of r·n or m·r).
   ``proj: svd`` (Fira; APOLLO's alternative) stores the top-r singular vectors of ``G``,
   recomputed at refreshes, with ``sign_rule`` as the galore method's.
2. Adam's moments on ``R`` (kept across refreshes, as both references): ``m``, ``v``, and
   ``ψ = m / (√v + eps)``; the bias correction goes into the step size
   ``η_t = lr·√(1-β2^t)/(1-β1^t)``, as both references do.
3. Channel scales over the side that is not projected (rows of ``G`` for a right projection,
   columns for a left one): ``s_c = ‖ψ_c‖ / (‖R_c‖ + 1e-8)``; ``scale_type: tensor`` (APOLLO-Mini)
   one ``s = ‖ψ‖ / (‖R‖ + 1e-8)``.
4. The scaled gradient: APOLLO ``S = G·diag(s)``; Fira ``S = (G - α'·back(R))·diag(s)`` with
   ``back`` the projection back (``R·Q`` / ``P·R``) and ``α' = α`` (``residual: scaled``, what
   fira 1.0.2 computes) or 1 (``residual: exact``, the part of ``G`` outside the subspace).
5. The norm-growth limiter (``norm_growth_limit`` γ, 1.01; 0 turns it off): with ``S_prev`` the
   previous step's limited norm, ``S ← S / max(‖S‖ / (‖S_prev‖ + 1e-8), γ)·γ`` — the norm grows by
   at most γ per step.
6. The update: APOLLO ``W ← W - η_t·√scale·S`` (``scale_front`` applies ``√scale`` before the
   limiter, as apollo-torch's option); Fira ``W ← W - η_t·(α·back(ψ) + S)``; GaLore (its published
   optimizer, galore-torch's GaLoreAdamW, on the weight itself) ``W ← W - η_t·α·back(ψ)``, with no
   scales, residual or limiter (steps 3-5 skipped). Weight decay is
   torch's decoupled decay, ``W ← (1 - lr·wd)·W`` before the update (both references decay after
   it: they differ by ``lr²·wd`` times the update).

Params that are not projected (1-D params, groups without ``rank``) train with torch's AdamW.

Under ZeRO (``fragments``): each rank steps the row blocks it holds. The moments live where their
channels do: a right-projected matrix's moments by rows, on the ranks that hold the rows (a row
that a partition boundary splits is kept by both its holders, computed identically); a
left-projected matrix's moments by columns, split evenly among its holders. Whole per-matrix
statistics are summed over the holders, phase by phase, in one packed all-reduce each:

- A (projection): ``R``'s rows that a boundary splits (right, r each), or ``R`` itself (left,
  r×n: ``Σ P[rows]ᵀ·G[rows]``);
- B (scales): the per-column scales (APOLLO, left: n), ``ψ`` (Fira, left: r×n, for ``P·ψ``), or
  the two sums of squares of a tensor scale;
- C (limiter): the sum of squares of ``S`` (one number).

At a refresh of an SVD projection the owner of a cut matrix (one of its holders, balanced by
bytes: ``zero.partition.assign_owners``) receives the matrix's full gradient (``dist.reduce_sum_``,
one matrix at a time: the transient is one m×n fp32 buffer), computes the basis and broadcasts it; holders keep what they use (``Q`` whole, the rows
of ``P`` they hold). Refreshes are the only steps that move a whole gradient.
"""

from __future__ import annotations

import logging
import math

import torch

from lowrank_pt.core import dist
from lowrank_pt.optim import projector
from lowrank_pt.optim.fragment_optimizer import FragmentOptimizer
from lowrank_pt.optim.lowbit import round_to_bf16, rounding_generator
from lowrank_pt.zero.partition import Fragment, MatrixPlan, ParamSpec, Piece, aligned

log = logging.getLogger(__name__)

PROJECTIONS = ("random", "svd")
SCALE_TYPES = ("channel", "tensor")
RESIDUALS = ("scaled", "exact")
UPDATES = ("apollo", "fira", "galore")
BASIS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEED_DRAWS = 15
"""apollo-torch's seed chain: a refresh seeds a CPU generator with the previous seed and takes the
last of this many int64 draws."""


def next_seed(seed: int) -> int:
    """The seed of a random projection's next refresh (apollo-torch's chain, to reproduce it)."""
    gen = torch.Generator().manual_seed(int(seed))
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (SEED_DRAWS,), generator=gen)[-1])


class ProjectedAdam(FragmentOptimizer):
    """AdamW on full-rank params; APOLLO or Fira (a group's ``update``) on the 2-D params of every
    group that has a ``rank``. See the module doc for the update and the options."""

    state_keys = ("limiter", "seed", "basis")
    GROUP_DEFAULTS: dict = {}

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, names: dict[int, str] | None = None,
                 defer_until_attached: bool = False, state_dtype: str = "fp32", **group_defaults):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        **{**self.GROUP_DEFAULTS, **group_defaults})
        super().__init__(params, defaults, names=names, defer_until_attached=defer_until_attached,
                         state_dtype=state_dtype)
        projected = [s.index for s in self.specs if s.projected]
        self._order = {index: k for k, index in enumerate(projected)}
        for group in self.param_groups:
            if "rank" in group:
                check_group(group)
        dtypes = {g.get("basis_dtype", "fp32") for g in self.param_groups if "rank" in g} or {"fp32"}
        if len(dtypes) > 1:
            raise ValueError(f"one basis_dtype per optimizer, got {sorted(dtypes)}")
        self.basis_dtype = BASIS_DTYPES[dtypes.pop()]
        """Storage of the SVD bases (a group's ``basis_dtype``): fp32, or bf16, rounded once per
        refresh; the projection and the update use the stored basis, in fp32."""
        self.kept_bases = 0
        """SVD refreshes that kept the previous basis (a zero or non-finite gradient, a failed SVD)."""

    # --- static per-matrix facts --------------------------------------------------------------------
    def matrix_options(self, spec: ParamSpec, group: dict) -> dict:
        shape = spec.shape
        return {"side": projector.projection_side(shape, group["proj_type"]),
                "r": projector.effective_rank(shape, int(group["rank"])), "gap": int(group["update_proj_gap"]),
                "proj": group["proj"], "update": group["update"], "scale_type": group["scale_type"],
                "limit": float(group["norm_growth_limit"]), "sign_rule": group["sign_rule"], "svd": group["svd"],
                "seed": int(group["seed"]) + self._order[spec.index]}

    def moment_shape(self, plan: MatrixPlan, rank: int, frag: Fragment) -> tuple[int, int]:
        r, n = plan.options["r"], plan.shape[1]
        if plan.options["side"] == "right":
            return -(-frag.end // n) - frag.start // n, r
        lo, hi = plan.columns(rank)
        return r, hi - lo

    def piece_state(self, plan: MatrixPlan, rank: int, frag: Fragment) -> dict[str, int]:
        o, n = plan.options, plan.shape[1]
        out = {"limiter": 1}
        if o["proj"] == "random":
            out["seed"] = 1
        else:
            rows = -(-frag.end // n) - frag.start // n
            out["basis"] = o["r"] * n if o["side"] == "right" else rows * o["r"]
        return out

    def new_state_tensor(self, name: str, numel: int, device) -> torch.Tensor:
        if name == "basis":
            return torch.zeros(numel, dtype=self.basis_dtype, device=device)
        if name == "seed":  # on the host: it seeds a generator every step, without a device sync
            return torch.zeros(numel, dtype=torch.int64)
        if name == "limiter":  # negative: no previous norm yet
            return torch.full((numel,), -1.0, dtype=torch.float32, device=device)
        return torch.zeros(numel, dtype=torch.float32, device=device)

    def state_element_size(self, name: str) -> int:
        if name == "basis":
            return self.basis_dtype.itemsize
        return 8 if name == "seed" else 4

    def init_piece_state(self, state: dict, piece: Piece) -> None:
        if "seed" in piece.extra:
            state["seed"][piece.extra["seed"][0]] = piece.plan.options["seed"]

    # --- the step -------------------------------------------------------------------------------------
    def step_pieces(self, items, cut, steps, device) -> None:
        held = {it[0].plan.spec.index: it for it in items}
        rank = dist.rank()

        def refreshing(plan: MatrixPlan) -> bool:
            return (steps[plan.key] - 1) % plan.options["gap"] == 0

        # 0. refreshes: advance seeds; new SVD bases (cut matrices through their owner, in order)
        for piece, _, _, _, state in items:
            o = piece.plan.options
            if o["proj"] == "random" and refreshing(piece.plan) and steps[piece.plan.key] > 1:
                at = piece.extra["seed"][0]
                state["seed"][at] = next_seed(int(state["seed"][at]))
        for piece, _, _, grad, state in items:
            if piece.plan.options["proj"] == "svd" and not piece.plan.cut and refreshing(piece.plan):
                self._install_basis(piece, state, self._new_basis(piece.plan, piece.block(grad)))
        for plan in cut:
            if plan.options["proj"] == "svd" and refreshing(plan):
                self._refresh_cut(plan, held.get(plan.spec.index), rank, device)

        # 1. projections, and phase A: R made whole for cut matrices
        work = {}
        for piece, group, flat, grad, state in items:
            block = piece.block(grad)
            basis = self._basis(piece, state, device)
            low = block @ basis.t() if piece.plan.options["side"] == "right" else basis.t() @ block
            work[piece.plan.spec.index] = {"basis": basis, "R": low, "t": steps[piece.plan.key]}
            del block

        def shape_a(plan):
            r = plan.options["r"]
            return (len(plan.split_rows), r) if plan.options["side"] == "right" else (r, plan.shape[1])

        local = {}
        for plan in cut:
            if plan.spec.index not in held:
                continue
            piece, w = held[plan.spec.index][0], work[plan.spec.index]
            if plan.options["side"] == "left":
                local[plan.spec.index] = w["R"]
            else:
                local[plan.spec.index] = self._split_rows_of(piece, w["R"])
        summed = self.sum_over_holders(cut, shape_a, local, device)
        for index, w in work.items():
            piece = held[index][0]
            if not piece.plan.cut:
                continue
            if piece.plan.options["side"] == "left":
                w["R"] = summed[index]
            else:
                self._put_split_rows(piece, w["R"], summed[index])

        # 2. Adam's moments on the channels this rank keeps; ψ
        for piece, group, flat, grad, state in items:
            w = work[piece.plan.spec.index]
            beta1, beta2 = group["betas"]
            own_r = self._own_channels(piece, w["R"])
            numel = math.prod(piece.moment_shape)
            m = state["exp_avg"][piece.moment_offset:piece.moment_offset + numel].view(piece.moment_shape)
            v = state["exp_avg_sq"][piece.moment_offset:piece.moment_offset + numel].view(piece.moment_shape)
            m.mul_(beta1).add_(own_r, alpha=1.0 - beta1)
            v.mul_(beta2).addcmul_(own_r, own_r, value=1.0 - beta2)
            w["R_own"], w["psi"] = own_r, m / v.sqrt().add_(group["eps"])

        # 3. scales, and phase B: what a holder needs of other holders' channels
        def shape_b(plan):
            o = plan.options
            if o["update"] == "apollo" and o["scale_type"] == "tensor":
                return (2,)
            if o["side"] == "right":
                return (0,)
            return (plan.shape[1],) if o["update"] == "apollo" else (o["r"], plan.shape[1])

        local = {}
        for piece, group, flat, grad, state in items:
            plan, w = piece.plan, work[piece.plan.spec.index]
            o = plan.options
            channel_dim = 1 if o["side"] == "right" else 0
            if o["update"] == "apollo" and o["scale_type"] == "tensor":
                if plan.cut:
                    skip = 1 if o["side"] == "right" and piece.frag.start % plan.shape[1] else 0
                    psi, r_own = w["psi"][skip:], w["R_own"][skip:]
                    local[plan.spec.index] = torch.stack([psi.square().sum(), r_own.square().sum()])
                else:
                    w["s"] = w["psi"].norm() / (w["R_own"].norm() + 1e-8)
            elif o["update"] == "apollo":
                w["s"] = w["psi"].norm(dim=channel_dim) / (w["R_own"].norm(dim=channel_dim) + 1e-8)
                if plan.cut and o["side"] == "left":
                    lo, hi = plan.columns(rank)
                    full = torch.zeros(plan.shape[1], device=device)
                    full[lo:hi] = w["s"]
                    local[plan.spec.index] = full
            elif plan.cut and o["side"] == "left":  # fira, galore: ψ of every column, for P·ψ
                lo, hi = plan.columns(rank)
                full = torch.zeros(o["r"], plan.shape[1], device=device)
                full[:, lo:hi] = w["psi"]
                local[plan.spec.index] = full
        summed = self.sum_over_holders(cut, shape_b, local, device)
        for piece, group, flat, grad, state in items:
            plan, w = piece.plan, work[piece.plan.spec.index]
            o = plan.options
            if o["update"] == "apollo" and o["scale_type"] == "tensor" and plan.cut:
                total = summed[plan.spec.index]
                w["s"] = total[0].sqrt() / (total[1].sqrt() + 1e-8)
            elif o["update"] == "apollo" and plan.cut and o["side"] == "left":
                w["s"] = summed[plan.spec.index]
            elif o["update"] in ("fira", "galore"):
                if plan.cut and o["side"] == "left":
                    w["psi"] = summed[plan.spec.index]
                if o["update"] == "fira":
                    channel_dim = 1 if o["side"] == "right" else 0
                    w["s"] = w["psi"].norm(dim=channel_dim) / (w["R"].norm(dim=channel_dim) + 1e-8)

        # 4-6. the scaled gradient S of each row block, the limiter (phase C: the sum of squares of
        # a cut matrix's S), the update. S is made when used and dropped (one block at a time): a
        # cut matrix's S is formed twice, for its norm and for its update.
        limited = [plan for plan in cut if plan.options["limit"] > 0]
        local = {}
        for item in items:
            piece = item[0]
            if piece.plan.cut and piece.plan.options["limit"] > 0:
                scaled = self._scaled(item, work[piece.plan.spec.index])
                local[piece.plan.spec.index] = piece.own(scaled).square().sum().reshape(1)
                del scaled
            else:
                self._finish(item, work[piece.plan.spec.index], None)
        summed = self.sum_over_holders(limited, lambda plan: (1,), local, device)
        for item in items:
            index = item[0].plan.spec.index
            if item[0].plan.cut and item[0].plan.options["limit"] > 0:
                self._finish(item, work[index], summed[index][0].sqrt())

    # --- pieces of the step ---------------------------------------------------------------------------
    def _scaled(self, item, w: dict) -> torch.Tensor:
        """S of a row block: APOLLO ``G·s`` (√scale in front with scale_front), Fira ``(G - α'·back(R))·s``."""
        piece, group, _, grad, _ = item
        o = piece.plan.options
        s = w["s"]
        if s.dim() == 1 and o["side"] == "right":
            s = s.unsqueeze(1)  # one scale per row; a left projection's broadcast over rows
        block = piece.block(grad)
        if o["update"] == "apollo":
            scaled = block * s
            if group["scale_front"]:
                scaled *= math.sqrt(group["scale"])
            return scaled
        back = self._back(piece, w["R"], w["basis"])
        residual = back * group["alpha"] if group["residual"] == "scaled" else back
        return (block - residual) * s

    def _finish(self, item, w: dict, norm: torch.Tensor | None) -> None:
        """Limit S (``norm``: a cut matrix's, summed over its holders; else S's own) and update."""
        piece, group, flat, grad, state = item
        plan = piece.plan
        if plan.options["update"] == "galore":
            self._apply(piece, group, flat, w["t"], self._back(piece, w["psi"], w["basis"]) * group["alpha"])
            return
        scaled = self._scaled(item, w)
        limit = plan.options["limit"]
        if limit > 0:
            norm = scaled.norm() if norm is None else norm
            previous = state["limiter"][piece.extra["limiter"][0]]
            ratio = norm / (previous + 1e-8)
            factor = torch.where((previous >= 0) & (ratio > limit), ratio / limit, torch.ones_like(ratio))
            scaled = scaled / factor
            previous.copy_(norm / factor)
        if plan.options["update"] == "apollo":
            update = scaled
            if not group["scale_front"]:
                update *= math.sqrt(group["scale"])
        else:
            update = self._back(piece, w["psi"], w["basis"]) * group["alpha"] + scaled
        self._apply(piece, group, flat, w["t"], update)

    @staticmethod
    def _apply(piece: Piece, group: dict, flat: torch.Tensor, t: int, update: torch.Tensor) -> None:
        """Decoupled weight decay, then ``W ← W - η_t·update`` on the rank's part of the row block."""
        beta1, beta2 = group["betas"]
        step_size = group["lr"] * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
        stored = piece.segment(flat)
        segment = stored if stored.dtype == torch.float32 else stored.float()  # bf16 masters: update in fp32
        if group["weight_decay"] != 0:
            segment.mul_(1 - group["lr"] * group["weight_decay"])
        segment.add_(piece.own(update), alpha=-step_size)
        if segment is not stored:  # rounded back stochastically: small updates kept in expectation
            stored.copy_(round_to_bf16(segment, rounding_generator(t, piece.frag.param, piece.frag.start)))

    def _basis(self, piece: Piece, state: dict, device) -> torch.Tensor:
        """The projection this step: right ``Q`` (r×n); left the block's rows of ``P`` (rows×r)."""
        o, (m, n) = piece.plan.options, piece.plan.shape
        r = o["r"]
        i_lo, i_hi = piece.rows
        if o["proj"] == "random":
            seed = int(state["seed"][piece.extra["seed"][0]])
            gen = torch.Generator(device=device).manual_seed(seed)
            shape = (r, n) if o["side"] == "right" else (m, r)
            drawn = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) / math.sqrt(r)
            return drawn if o["side"] == "right" else drawn[i_lo:i_hi]
        at, numel = piece.extra["basis"]
        flat = aligned(state["basis"][at:at + numel]).float()  # bf16 bases: one fp32 copy while stepped
        return flat.view(r, n) if o["side"] == "right" else flat.view(i_hi - i_lo, r)

    @staticmethod
    def _back(piece: Piece, low: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """A low-rank matrix back in the row block's shape: ``low·Q`` (right) or ``P[rows]·low`` (left)."""
        return low @ basis if piece.plan.options["side"] == "right" else basis @ low

    @staticmethod
    def _own_channels(piece: Piece, low: torch.Tensor) -> torch.Tensor:
        if piece.plan.options["side"] == "right":
            return low  # the block's rows
        lo, hi = piece.plan.columns(piece.rank)
        return low[:, lo:hi] if (lo, hi) != (0, piece.plan.shape[1]) else low

    @staticmethod
    def _split_rows_of(piece: Piece, low: torch.Tensor) -> torch.Tensor:
        plan = piece.plan
        i_lo, i_hi = piece.rows
        out = torch.zeros(len(plan.split_rows), low.shape[1], device=low.device)
        for j, row in enumerate(plan.split_rows):
            if i_lo <= row < i_hi:
                out[j] = low[row - i_lo]
        return out

    @staticmethod
    def _put_split_rows(piece: Piece, low: torch.Tensor, summed: torch.Tensor) -> None:
        i_lo, i_hi = piece.rows
        for j, row in enumerate(piece.plan.split_rows):
            if i_lo <= row < i_hi:
                low[row - i_lo] = summed[j]

    def _new_basis(self, plan: MatrixPlan, grad: torch.Tensor) -> torch.Tensor | None:
        o = plan.options
        basis, why = projector.new_basis(grad, o["r"], o["side"], o["svd"], seed=o["seed"], sign_rule=o["sign_rule"])
        if basis is None:
            self.kept_bases += 1
            log.warning("%s: %s keeps its previous basis: %s", type(self).__name__, plan.spec.name, why)
        return basis

    @staticmethod
    def _install_basis(piece: Piece, state: dict, basis: torch.Tensor | None) -> None:
        if basis is None:
            return
        if piece.plan.options["side"] == "left":
            i_lo, i_hi = piece.rows
            basis = basis[i_lo:i_hi]
        at, numel = piece.extra["basis"]
        state["basis"][at:at + numel].copy_(basis.reshape(-1))

    def _refresh_cut(self, plan: MatrixPlan, item, rank: int, device) -> None:
        """New SVD basis of a cut matrix: its full gradient summed onto the owner, who computes the
        basis and broadcasts it (with an ok flag) to every rank."""
        m, n = plan.shape
        o = plan.options
        full = torch.zeros(m * n, dtype=torch.float32, device=device)
        if item is not None:
            piece, _, _, grad, _ = item
            full[piece.frag.start:piece.frag.end] = piece.segment(grad)
        dist.reduce_sum_(full, dst=plan.owner)
        shape = projector.basis_shape(plan.shape, o["r"], o["side"])
        message = torch.zeros(math.prod(shape) + 1, dtype=torch.float32, device=device)
        if rank == plan.owner:
            basis = self._new_basis(plan, full.view(m, n))
            if basis is not None:
                message[:-1] = basis.reshape(-1)
                message[-1] = 1.0
        del full
        dist.broadcast_(message, src=plan.owner)
        if item is not None and bool(message[-1] > 0):
            self._install_basis(item[0], item[4], message[:-1].view(shape))


def check_group(group: dict) -> None:
    """Refuse an option a projected group cannot run with (a ValueError naming it)."""
    if int(group["rank"]) < 1:
        raise ValueError(f"rank={group['rank']} must be >= 1")
    if int(group["update_proj_gap"]) < 1:
        raise ValueError(f"update_proj_gap={group['update_proj_gap']} must be >= 1")
    for key, allowed in (("proj", PROJECTIONS), ("proj_type", projector.PROJ_TYPES), ("scale_type", SCALE_TYPES),
                         ("residual", RESIDUALS), ("update", UPDATES), ("sign_rule", projector.SIGN_RULES),
                         ("basis_dtype", BASIS_DTYPES), ("svd", projector.SVD_METHODS)):
        if group[key] not in allowed:
            raise ValueError(f"{key}={group[key]!r}: allowed {list(allowed)}")
    if group["update"] == "fira" and (group["proj"] != "svd" or group["scale_type"] != "channel"):
        raise ValueError("fira projects on the gradient's singular vectors (proj=svd) with channel scales")
    if group["update"] == "galore" and (group["proj"] != "svd" or float(group["norm_growth_limit"]) != 0):
        raise ValueError("galore projects on the gradient's singular vectors (proj=svd) and has no norm-growth "
                         "limiter (norm_growth_limit=0)")
    if float(group["norm_growth_limit"]) < 0 or 0 < float(group["norm_growth_limit"]) < 1:
        raise ValueError(f"norm_growth_limit={group['norm_growth_limit']}: 0 (off) or >= 1")
    if not float(group["scale"]) > 0 or not float(group["alpha"]) > 0:
        raise ValueError(f"scale={group['scale']} and alpha={group['alpha']} must be > 0")
