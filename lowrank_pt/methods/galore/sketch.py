"""A GaLore subspace from a one-pass sketch of the gradient, never the gradient itself.

Write the projected side as the left side of ``A``: ``A = G`` (m×n) for a left basis ``P``,
``A = Gᵀ`` (n×m) for a right basis ``Q`` (its rows are A's left singular vectors), so the basis
is always ``U``: the top-r left singular vectors of A (``rows × cols``). A refresh step sums,
over its micro-batches and ranks, two products linear in A:

- ``Y = A·Ω`` (rows × k, ``Ω`` Gaussian, cols × k): the range sketch; the basis lies in its span;
- ``W = Ψ·A`` (l × cols, ``Ψ`` l × rows): the co-range sketch, warm-started: its first r rows
  are the current basis ``Uᵀ`` (so W holds the low-rank gradient of the current subspace
  exactly), the rest Gaussian.

Each micro-batch's ``A`` is ``uᵀ·v`` for its activations (``u``, ``v`` = ``dy``, ``x`` or ``x``,
``dy``; T rows each), so ``Y += uᵀ·(v·Ω)`` and ``W += (u·Ψᵀ)ᵀ·v`` cost ``2·T·(rows + cols)·k``
and never form an m×n matrix. From the sums, the one-pass estimate ``Â = Q_y·X`` with
``Q_y = orth(Y)`` and ``X = (Ψ·Q_y)⁺·W`` gives the basis (``Q_y`` times X's top-r left
singular vectors) and ``Uᵀ·Â`` (the new subspace's low-rank gradient), in
``O((rows + cols)·k²)`` instead of an m×n SVD's ``O(m·n·min(m, n))``.

``Ω`` and ``Ψ`` must be the same on every rank (the ranks' sketches are summed), and they are
regenerated at every micro-batch instead of held: ``seeded_gaussian`` draws them from integer
hashing of (seed, index), the same numbers on any number of ranks, with no generator state
(the integers are exact everywhere; ``log``/``cos`` may differ in the last bit between device
kinds, so ranks of one run should share one kind, as data parallelism assumes anyway).
"""

from __future__ import annotations

import math

import torch

from lowrank_pt.optim import projector

_M1 = 0x5851F42D4C957F2D
_M2 = 0x14057B7EF767814F
_BITS = 24
_CHUNK = 1 << 22  # elements hashed at a time: bounds the int64 scratch to ~100 MB


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit integer mixer (multiply-xorshift rounds; int64 overflow wraps the same on every
    device). Torch's ``>>`` on int64 is arithmetic; the mask in ``seeded_gaussian`` only keeps low bits."""
    x = (x ^ (x >> 31)) * _M1
    x = (x ^ (x >> 29)) * _M2
    return x ^ (x >> 32)


def seeded_gaussian(rows: int, cols: int, seed: int, device=None) -> torch.Tensor:
    """A rows×cols float32 matrix of standard normal numbers that depends on ``seed`` alone: the
    same values on the CPU and on any GPU (Box-Muller over hashed 24-bit uniforms)."""
    out = torch.empty(rows * cols, dtype=torch.float32, device=device)
    base = (int(seed) * 0x9E3779B1) % (1 << 40)
    scale = 1.0 / (1 << _BITS)
    mask = (1 << _BITS) - 1
    for start in range(0, rows * cols, _CHUNK):
        idx = torch.arange(start, min(start + _CHUNK, rows * cols), device=device, dtype=torch.int64)
        h1 = _mix(idx * 2 + base) & mask
        h2 = _mix(idx * 2 + 1 + base) & mask
        u1 = (h1.float() + 0.5) * scale  # in (0, 1): log is finite
        u2 = h2.float() * scale
        out[start:start + idx.numel()] = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
    return out.view(rows, cols)


def widths(rank: int, oversample: int, shape: tuple[int, int]) -> tuple[int, int]:
    """``(k, l)``: columns of Ω and rows of Ψ for a rank-r basis of an m×n matrix. ``k = r + p``,
    ``l = r + 2p`` (l > k keeps ``Ψ·Q_y`` well conditioned for the least-squares solve), each
    capped at the matrix's sides."""
    small = min(shape)
    k = min(rank + oversample, small)
    return k, min(rank + 2 * oversample, small)


def a_shape(shape: tuple[int, int], side: str) -> tuple[int, int]:
    """``(rows, cols)`` of A: the matrix's shape for a left basis, transposed for a right one."""
    return (shape[0], shape[1]) if side == "left" else (shape[1], shape[0])


def sketch_numel(shape: tuple[int, int], rank: int, oversample: int, side: str) -> int:
    """Floats of the two sketches of one matrix: ``Y`` (rows × k) and ``W`` (l × cols)."""
    rows, cols = a_shape(shape, side)
    k, l = widths(rank, oversample, shape)
    return rows * k + l * cols


def orient(dy: torch.Tensor, x: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, v)`` with the micro-batch's ``A = uᵀ·v`` (A = G = dyᵀ·x for left, Gᵀ for right)."""
    return (dy, x) if side == "left" else (x, dy)


def basis_rows(basis: torch.Tensor, side: str) -> torch.Tensor:
    """The current basis as rows in A's row space (``Uᵀ``: r × rows)."""
    return basis.float().t() if side == "left" else basis.float()


def random_matrices(basis: torch.Tensor, side: str, rank: int, oversample: int, seed: int,
                    shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Ω, Ψ)`` of one matrix for one refresh: Ω (cols × k) Gaussian, and ``co_range_matrix``'s
    Ψ. The same on every rank and call."""
    cols = a_shape(shape, side)[1]
    k, _ = widths(rank, oversample, shape)
    return seeded_gaussian(cols, k, seed, basis.device), co_range_matrix(basis, side, rank, oversample, seed, shape)


def co_range_matrix(basis: torch.Tensor, side: str, rank: int, oversample: int, seed: int,
                    shape: tuple[int, int]) -> torch.Tensor:
    """Ψ (l × rows): the current basis rows when one is set, topped up (or all) Gaussian."""
    rows = a_shape(shape, side)[0]
    _, l = widths(rank, oversample, shape)
    if not projector.is_set(basis):
        return seeded_gaussian(l, rows, seed + 1, basis.device)
    warm = basis_rows(basis, side)
    return torch.cat([warm, seeded_gaussian(l - warm.shape[0], rows, seed + 1, basis.device)], dim=0)


def sketch(u: torch.Tensor, v: torch.Tensor, omega: torch.Tensor, psi: torch.Tensor):
    """``(Y, W) = (A·Ω, Ψ·A)`` of ``A = uᵀ·v`` in float32, without forming A."""
    u, v = u.float(), v.float()
    return u.t() @ (v @ omega), (u @ psi.t()).t() @ v


def basis_from_sketch(y: torch.Tensor, w: torch.Tensor, psi: torch.Tensor, rank: int, side: str,
                      sign_rule: str = "canonical") -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
    """``(basis, low, why)`` from the summed sketches: the new basis in its stored orientation
    (P: m×r or Q: r×n) and the estimated low-rank gradient ``project(G, basis)`` (r×n or m×r);
    ``(None, None, why)`` when the sketches cannot give a subspace, so the caller keeps its old one."""
    if not (bool(torch.isfinite(y).all()) and bool(torch.isfinite(w).all())):
        return None, None, "non-finite gradient"
    if not bool(y.abs().amax() > 0):
        return None, None, "zero gradient"
    try:
        q = torch.linalg.qr(y).Q  # rows × k
        # X = (Ψ·Q)⁺·W by QR of the tall l×k matrix Ψ·Q (l ≥ k): the same on CPU and GPU.
        q2, r2 = torch.linalg.qr(psi @ q)
        x = torch.linalg.solve_triangular(r2, q2.t() @ w, upper=True)  # k × cols
        ux, s, vh = torch.linalg.svd(x, full_matrices=False)
    except (RuntimeError, torch.linalg.LinAlgError) as e:
        return None, None, f"sketch solve failed: {str(e).splitlines()[0]}"
    u = q @ ux[:, :rank]  # rows × r
    coeff = s[:rank, None] * vh[:rank]  # Uᵀ·Â: r × cols
    if not (bool(torch.isfinite(u).all()) and bool(torch.isfinite(coeff).all())):
        return None, None, "non-finite singular vectors"
    if sign_rule == "canonical":
        pivot = u.abs().argmax(dim=0, keepdim=True)
        signs = torch.sign(u.gather(0, pivot))
        signs[signs == 0] = 1
        u, coeff = u * signs, coeff * signs.t()
    if side == "left":
        return u.contiguous(), coeff.contiguous(), ""
    return u.t().contiguous(), coeff.t().contiguous(), ""
