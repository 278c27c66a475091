"""What a refresh step collects of one matrix's gradient in the backward, onto the matrix's owner.

Each micro-batch's contribution is reduced to the owner rank inside the backward, as soon as it
exists: the other ranks keep nothing, so at a refresh a rank holds the captures of the matrices
it owns only (``lowrank_pt.core.owners``). Every rank must run the same adapters in the same order
(one model, one graph), like any data-parallel backward.

- ``GradientCapture``: the full gradient ``dyᵀ·x`` (m×n fp32), for an exact or randomized SVD
  and for LoRA-GA's initialisation;
- ``SketchCapture``: the two sketches of ``lowrank_pt.methods.galore.sketch`` (``(m + n)·(r + p)``-ish
  floats), for the streaming refresh over several micro-batches.

``BackwardRefresh`` is the other streaming refresh, for a step of one micro-batch: it computes
the matrix's new subspace inside the matrix's own backward, as soon as its gradient exists,
so a rank holds one matrix's refresh at a time (see the class).
"""

from __future__ import annotations

import math

import torch

from lowrank_pt.core import dist
from lowrank_pt.methods.galore import sketch
from lowrank_pt.optim import projector


def plan_capture(adapter, o) -> None:
    """Set what ``adapter``'s refresh captures under options ``o`` and what it holds, for the planner
    and the tracker: ``capture_kind`` (backward with refresh=backward, sketch with svd=sketch where
    the sketches are smaller than the gradient, else gradient), ``capture_numel``,
    ``refresh_held`` and ``refresh_working``."""
    m, n = adapter.shape
    reproject = adapter.rank if o.moments_on_refresh == "reproject" else 0
    small = sketch.sketch_numel(adapter.shape, adapter.rank, o.svd_oversample, adapter.side) < math.prod(adapter.shape)
    adapter.capture_kind = ("backward" if o.refresh == "backward" else
                            "sketch" if o.svd == "sketch" and small else "gradient")
    if adapter.capture_kind == "backward":  # kept until the step: the new basis (its ZeRO-3 shard) and C
        adapter.capture_numel = 0
        adapter.refresh_held = (adapter.galore_basis.numel(), adapter.galore_basis.element_size(), reproject)
        rows, cols = sketch.a_shape(adapter.shape, adapter.side)
        k = min(adapter.rank + o.svd_oversample, m, n)
        # exact: the gradient, then its SVD's factors; randomized: the iteration's blocks and the basis
        adapter.refresh_working = (m * n + min(m, n) * (m + n) if o.svd == "exact"
                                   else 2 * (rows + cols) * k + 2 * adapter.rank * rows)
    elif adapter.capture_kind == "sketch":  # and the new basis, kept from the refresh to after the step
        adapter.capture_numel = sketch.sketch_numel(adapter.shape, adapter.rank, o.svd_oversample, adapter.side)
        adapter.refresh_held = (adapter.galore_basis.numel(), adapter.galore_basis.element_size(), reproject)


def _reduce_to_owner(t: torch.Tensor, owner: int, world: int, rank: int) -> bool:
    """Sum ``t`` over the ranks onto ``owner``; whether this rank keeps the result."""
    if world > 1:
        dist.reduce_sum_(t, dst=owner)
    return rank == owner


class GradientCapture:
    """Sums the full gradient of one matrix over the micro-batches of a step and over the ranks."""

    def __init__(self, owner: int = 0, world: int = 1, rank: int = 0):
        self.owner, self.world, self.rank = owner, world, rank
        self.grad: torch.Tensor | None = None

    def add(self, grad: torch.Tensor) -> None:
        if not _reduce_to_owner(grad, self.owner, self.world, self.rank):
            return
        self.grad = grad if self.grad is None else self.grad.add_(grad)

    def add_factors(self, dy: torch.Tensor, x: torch.Tensor, basis: torch.Tensor) -> None:
        """One micro-batch of a linear (``dy``: T×m, ``x``: T×n); ``basis`` unused."""
        self.add(dy.t().float() @ x.float())

    def mean(self) -> torch.Tensor | None:
        """The gradient averaged over ranks (on the owner; None elsewhere or if never run)."""
        if self.grad is None or self.rank != self.owner:
            return None
        return self.grad.div_(self.world)

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.grad is None else [self.grad]


class SketchCapture:
    """Sums the sketches ``Y = A·Ω`` and ``W = Ψ·A`` of one matrix's gradient over the
    micro-batches of a step and over the ranks (one reduce of both per micro-batch)."""

    def __init__(self, shape: tuple[int, int], side: str, rank_r: int, oversample: int, seed: int,
                 owner: int = 0, world: int = 1, rank: int = 0):
        self.shape, self.side, self.r, self.oversample, self.seed = shape, side, rank_r, oversample, seed
        self.owner, self.world, self.rank = owner, world, rank
        self.y: torch.Tensor | None = None
        self.w: torch.Tensor | None = None

    def add_factors(self, dy: torch.Tensor, x: torch.Tensor, basis: torch.Tensor) -> None:
        """One micro-batch of a linear (``dy``: T×m, ``x``: T×n) under the current ``basis``."""
        omega, psi = sketch.random_matrices(basis, self.side, self.r, self.oversample, self.seed, self.shape)
        u, v = sketch.orient(dy, x, self.side)
        y, w = sketch.sketch(u, v, omega, psi)
        del omega, psi
        both = torch.cat([y.reshape(-1), w.reshape(-1)])  # one collective for the two
        if not _reduce_to_owner(both, self.owner, self.world, self.rank):
            return
        y, w = both[: y.numel()].view_as(y), both[y.numel():].view_as(w)
        if self.y is None:
            self.y, self.w = y, w
        else:
            self.y.add_(y)
            self.w.add_(w)

    def subspace(self, old_basis: torch.Tensor, sign_rule: str):
        """``(basis, low, why)`` on the owner (``sketch.basis_from_sketch``), from the sketches
        averaged over ranks; ``old_basis`` is the basis the backward saw (Ψ is rebuilt from it)."""
        if self.y is None or self.rank != self.owner:
            return None, None, "no gradient reached this matrix"
        psi = sketch.co_range_matrix(old_basis.to(self.y.device), self.side, self.r, self.oversample,
                                     self.seed, self.shape)
        return sketch.basis_from_sketch(self.y.div_(self.world), self.w.div_(self.world), psi, self.r,
                                        self.side, sign_rule)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.y, self.w) if t is not None]


class BackwardRefresh:
    """Refreshes one matrix's subspace inside its backward (a step of one micro-batch).

    The adapter's backward calls ``refresh(dy, x, basis)`` and computes B's gradient in the basis
    it returns, ``α·project(G_local, new)``: DeepSpeed's own reduction of B's gradient averages
    that into ``α·project(Ḡ, new)``, the exact low-rank gradient of the new subspace, with no
    m×n gradient kept anywhere. The subspace comes from the rank-averaged gradient ``Ḡ``:

    - ``exact``: ``Ḡ`` is formed for this matrix only, summed onto the owner, which takes its SVD;
    - ``randomized``: subspace iteration warm-started from the current basis
      (``projector.top_left_vectors``) on ``Ḡ`` as an operator: each product ``Ḡ·M`` is the
      ranks' ``uᵀ·(v·M)`` summed by one all-reduce of ``(m or n)·(r + p)`` floats, so ``Ḡ`` is
      never formed on any rank.

    The owner's basis is broadcast (one basis on every rank). What is kept until the optimizer
    step, where the method merges ``B`` through the old basis and installs the new one: ``keep``'s
    part of the new basis (the method keeps ``zero_frozen.frozen_part``, the rank's shard at ZeRO-3,
    in host memory: between the backward and the step the device holds nothing of the refresh)
    and, for re-projected moments only, the r×r change of basis.
    """

    in_backward = True

    def __init__(self, shape: tuple[int, int], side: str, rank_r: int, svd: str, niter: int, oversample: int,
                 seed: int, sign_rule: str, dtype: torch.dtype, keep, reproject: bool = False, owner: int = 0,
                 world: int = 1, rank: int = 0):
        self.shape, self.side, self.r, self.svd = shape, side, rank_r, svd
        self.niter, self.oversample, self.seed, self.sign_rule, self.dtype = niter, oversample, seed, sign_rule, dtype
        self.keep, self.reproject = keep, reproject
        self.owner, self.world, self.rank = owner, world, rank
        self.held: torch.Tensor | None = None
        self.change: torch.Tensor | None = None
        self.why = "no gradient reached this matrix"

    def refresh(self, dy: torch.Tensor, x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor | None:
        """The new basis (in its stored dtype) to compute B's gradient in, or None to keep ``basis``.
        Collective: every rank calls it for every matrix, in the same order."""
        new, why = self._solve(dy, x, basis)  # every rank: the reduce, or the iteration's all-reduces
        if self.rank != self.owner:
            new = None  # the owner's is broadcast
        out = torch.zeros(projector.basis_shape(self.shape, self.r, self.side), dtype=torch.float32,
                          device=basis.device)
        ok = torch.zeros((), dtype=torch.float32, device=basis.device)
        if new is not None:
            out.copy_(new)
            ok.fill_(1.0)
        if self.world > 1:
            dist.broadcast_(ok, src=self.owner)
            dist.broadcast_(out, src=self.owner)
        if ok.item() == 0:
            self.why = why or f"see rank {self.owner}"
            return None
        new = out.to(self.dtype)
        if self.reproject and projector.is_set(basis):
            self.change = projector.change_of_basis(basis, new, self.side)
        self.held = self.keep(new)
        self.why = ""
        return new

    def _solve(self, dy, x, basis):
        if self.svd == "exact":
            grad = dy.t().float() @ x.float()
            if not _reduce_to_owner(grad, self.owner, self.world, self.rank):
                return None, ""
            return projector.new_basis(grad.div_(self.world), self.r, self.side, "exact", sign_rule=self.sign_rule)
        u, v = sketch.orient(dy.float(), x.float(), self.side)
        def mean(t):
            return dist.all_reduce_sum_(t).div_(self.world) if self.world > 1 else t

        start = sketch.basis_rows(basis, self.side).t() if projector.is_set(basis) else None
        vectors, top = projector.top_left_vectors(lambda m: mean(u.t() @ (v @ m)), lambda n: mean(v.t() @ (u @ n)),
                                                  (u.shape[1], v.shape[1]), self.r, self.niter, self.oversample,
                                                  start, self.seed, u.device)
        if not bool(torch.isfinite(vectors).all()):
            return None, "non-finite gradient"
        if not bool(top > 0):
            return None, "zero gradient"
        new = vectors if self.side == "left" else vectors.t()
        if self.sign_rule == "canonical":
            new = projector.canonical_signs(new, self.side)
        return new.contiguous(), ""

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.held, self.change) if t is not None]
