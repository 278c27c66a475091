"""GaLore's gradient projector as plain functions over tensors, shared by the adapter and the optimizer.

A projected matrix ``W`` (m×n) trains in an r-dimensional subspace of one of its sides:

- ``right``: basis ``Q`` (r×n), rows orthonormal. Low-rank gradient ``R = G·Qᵀ`` (m×r), update
  back to full size ``R·Q``.
- ``left``: basis ``P`` (m×r), columns orthonormal. ``R = Pᵀ·G`` (r×n), back ``P·R``.

The basis is the top-r singular vectors of the full gradient ``G`` on that side, recomputed every
``update_proj_gap`` steps. Nothing here holds state: the basis is a tensor that its owner keeps
(a module buffer or an optimizer state entry), so checkpoints never pickle a projector object.
"""

from __future__ import annotations

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right")
SVD_METHODS = ("exact", "randomized")
SIGN_RULES = ("canonical", "lapack")


def projection_side(shape: tuple[int, int], proj_type: str) -> str:
    """``"left"`` or ``"right"`` for a matrix of ``shape`` (rows, cols), as galore-torch picks it.

    ``std`` projects the smaller side (right when rows >= cols), so the low-rank state is
    r × max(rows, cols); ``reverse_std`` projects the larger side; ``left``/``right`` are fixed.
    """
    rows, cols = shape
    if proj_type == "std":
        return "right" if rows >= cols else "left"
    if proj_type == "reverse_std":
        return "left" if rows >= cols else "right"
    if proj_type in ("left", "right"):
        return proj_type
    raise ValueError(f"proj_type={proj_type!r}: allowed {list(PROJ_TYPES)}")


def effective_rank(shape: tuple[int, int], rank: int) -> int:
    """The rank actually used: an SVD of an m×n matrix has at most min(m, n) directions."""
    return max(1, min(rank, *shape))


def basis_shape(shape: tuple[int, int], rank: int, side: str) -> tuple[int, int]:
    rows, cols = shape
    return (rank, cols) if side == "right" else (rows, rank)


def low_rank_shape(shape: tuple[int, int], rank: int, side: str) -> tuple[int, int]:
    """Shape of the projected gradient (and of Adam's moments) of a ``shape`` matrix."""
    rows, cols = shape
    return (rows, rank) if side == "right" else (rank, cols)


def project(full: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    return full @ basis.t() if side == "right" else basis.t() @ full


def project_back(low: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    return low @ basis if side == "right" else basis @ low


def is_set(basis: torch.Tensor) -> bool:
    """An all-zero basis means "no subspace yet" (before the first successful refresh)."""
    return bool(basis.abs().amax() > 0)


def new_basis(grad: torch.Tensor, rank: int, side: str, method: str = "exact",
              previous: torch.Tensor | None = None, niter: int = 2, oversample: int = 8,
              seed: int = 0, *, sign_rule: str = "canonical") -> tuple[torch.Tensor | None, str]:
    """Top-``rank`` singular vectors of ``grad`` on ``side``, in float32; ``(None, why)`` when the
    gradient cannot give a subspace (non-finite, zero, failed or non-finite SVD) so the caller
    keeps its old one.

    ``exact`` is ``torch.linalg.svd`` (galore-torch's choice). ``sign_rule`` sets the signs of
    the vectors: ``canonical`` (default) flips them by ``canonical_signs``; ``lapack`` keeps the
    signs the solver returns, as galore-torch does (to reproduce its runs). ``randomized``
    is a range finder with ``niter`` power iterations; when ``previous`` holds a basis it is the
    start block (warm start: the subspace drifts slowly between refreshes), topped up with
    ``oversample`` random directions drawn from a generator seeded by ``seed``, so every rank and
    every resumed run draws the same numbers without touching the global RNG.
    """
    if sign_rule not in SIGN_RULES:
        raise ValueError(f"sign_rule={sign_rule!r}: allowed {list(SIGN_RULES)}")
    g = grad.detach().float()
    if not bool(torch.isfinite(g).all()):
        return None, "non-finite gradient"
    if not bool(g.abs().amax() > 0):
        return None, "zero gradient"
    try:
        if method == "exact":
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            basis = vh[:rank] if side == "right" else u[:, :rank]
        elif method == "randomized":
            # Left singular vectors of A are the basis: A = G for left, Gᵀ for right.
            a = g if side == "left" else g.t()
            start = None
            if previous is not None and is_set(previous):
                start = previous.float() if side == "left" else previous.float().t()
            vectors, _ = top_left_vectors(lambda m: a @ m, lambda m: a.t() @ m, a.shape, rank, niter, oversample,
                                          start, seed, a.device)
            basis = vectors if side == "left" else vectors.t()
        else:
            raise ValueError(f"svd={method!r}: allowed {list(SVD_METHODS)}")
    except (RuntimeError, torch.linalg.LinAlgError) as e:  # LAPACK non-convergence and the like
        return None, f"svd failed: {str(e).splitlines()[0]}"
    if not bool(torch.isfinite(basis).all()):
        return None, "non-finite singular vectors"
    if sign_rule == "canonical":
        basis = canonical_signs(basis, side)
    return basis.contiguous(), ""


def canonical_signs(basis: torch.Tensor, side: str) -> torch.Tensor:
    """Flip each basis vector so that its largest-magnitude entry is positive.

    A singular vector's sign is arbitrary, and LAPACK's choice is not continuous in the input:
    measured here (MKL), a 1e-6 relative perturbation of a 64×64 gradient flipped 6 of its top 8
    right singular vectors. GaLore keeps Adam's moments across a refresh, so a flipped vector
    reverses the momentum along it: two runs whose gradients differ by rounding (another ZeRO
    stage, another reduction order) would part ways at the next refresh. With this convention
    the basis is a continuous function of the gradient (away from ties in magnitude).
    """
    vectors = basis.t() if side == "right" else basis  # one vector per column
    pivot = vectors.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(vectors.gather(0, pivot))
    signs[signs == 0] = 1
    vectors = vectors * signs
    return vectors.t() if side == "right" else vectors


def top_left_vectors(mul, tmul, shape: tuple[int, int], rank: int, niter: int, oversample: int,
                     start: torch.Tensor | None, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate top-``rank`` left singular vectors of a ``shape`` (rows × cols) matrix ``A``
    known only through ``mul(M) = A·M`` and ``tmul(N) = Aᵀ·N``, by subspace iteration; with the
    largest singular value found (0 for a zero matrix). ``start`` (rows × r) is the warm start.

    Through the two products the matrix need never exist: inside a backward, ``A`` is a sum of
    ``uᵀ·v`` over micro-batch activations and ranks (``lowrank_pt.methods.galore.capture``)."""
    rows, cols = shape
    width = min(rank + oversample, rows, cols)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if start is not None:
        extra = max(0, width - start.shape[1])
        omega = torch.randn(cols, extra, generator=gen).to(device)
        block = torch.cat([start.to(device), mul(omega)], dim=1)
    else:
        block = mul(torch.randn(cols, width, generator=gen).to(device))
    y = torch.linalg.qr(block).Q
    for _ in range(niter):
        z = torch.linalg.qr(tmul(y)).Q
        y = torch.linalg.qr(mul(z)).Q
    u_small, s, _ = torch.linalg.svd(tmul(y).t(), full_matrices=False)  # Yᵀ·A = (Aᵀ·Y)ᵀ
    return (y @ u_small)[:, :rank], s[0] if s.numel() else torch.zeros(())


def change_of_basis(old: torch.Tensor, new: torch.Tensor, side: str) -> torch.Tensor:
    """The r×r map ``C`` that re-expresses low-rank coordinates in the new basis.

    A low-rank matrix ``L`` stands for the full matrix ``project_back(L, old)``; its coordinates
    in ``new`` are ``project(project_back(L, old), new)``, which is ``L·Cᵀ`` (right, with
    ``C = Q_new·Q_oldᵀ``) or ``C·L`` (left, with ``C = P_newᵀ·P_old``).
    """
    old, new = old.float(), new.float()
    return new @ old.t() if side == "right" else new.t() @ old


def reproject_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, old: torch.Tensor,
                      new: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's moments carried from the ``old`` subspace to the ``new`` one.

    First moment: exact change of basis of the part of it that lies in the new subspace
    (``m·Cᵀ`` / ``C·m``); what lies outside is dropped, as the new basis cannot hold it.
    Second moment: Adam keeps only per-coordinate variances, not the covariances a change of
    basis would need. Treating the old coordinates as uncorrelated, coordinate i of the new
    basis is ``Σ_j C_ij·x_j`` with variance ``Σ_j C_ij²·v_j``: ``v·(C∘C)ᵀ`` / ``(C∘C)·v``.
    This is exact when ``C`` is a permutation up to signs (the same subspace found again) and
    keeps ``v`` non-negative; it under-states the variance of coordinates whose old components
    were correlated. Both moments keep their dtype.
    """
    return reproject_with(exp_avg, exp_avg_sq, change_of_basis(old, new, side), side)


def reproject_with(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, c: torch.Tensor,
                   side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``reproject_moments`` given the change of basis ``c`` (r×r) instead of the two bases."""
    c = c.float()
    c2 = c * c
    m, v = exp_avg.float(), exp_avg_sq.float()
    if side == "right":
        m_new, v_new = m @ c.t(), v @ c2.t()
    else:
        m_new, v_new = c @ m, c2 @ v
    return m_new.to(exp_avg.dtype), v_new.to(exp_avg_sq.dtype)
