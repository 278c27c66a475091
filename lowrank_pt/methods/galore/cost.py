"""What one GaLore linear costs per optimizer step by the way its forward uses ``W = d·W0 + α·B·Q``,
and the choice among those ways.

Three paths, each exact (they differ by rounding only):

- ``call``: ``W_eff`` built in forward and rebuilt in backward (nothing m×n outlives the layer:
  what ZeRO-3 needs); two m×n·r products per micro-batch.
- ``step``: ``W_eff`` built once per optimizer step, kept on the layer through the step's
  micro-batches and their backwards, dropped before the optimizer step moves B. One m×n·r
  product per step, at the price of one m×n copy in the training dtype per matrix while the
  step runs; never at ZeRO-3, where the weight itself is not resident.
- ``factored``: never built: ``y = d·x·W0ᵀ + α·(x·Qᵀ)·Bᵀ`` (right side; ``α·(x·Bᵀ)·Pᵀ`` left),
  ``dx = d·dy·W0 + α·(dy·B)·Q``; costs T·r·(m+n) products instead of m·n·r ones, so it wins
  when the tokens per micro-batch are few against the matrix.

Counted in matmul FLOPs (2 per multiply-add) of one m×n linear with T tokens per micro-batch and
``accum`` micro-batches per step, the same count ``torch.utils.flop_counter`` makes of the
adapter's forward and backward (tests/unit/test_galore_forward.py); full rank is ``6·T·m·n`` per
micro-batch. Both paths share ``4·T·m·n`` (y and dx on the full matrix) and B's gradient,
``2·T·r·(m+n)``, so at r = d/2 no path is below ``(4 + 2)/6 = 1`` × full rank before the optimizer.
"""

from __future__ import annotations

PATHS = ("call", "step", "factored")
FORWARD_CHOICES = ("auto", *PATHS)


def flops(path: str, shape: tuple[int, int], rank: int, side: str, tokens: int, accum: int = 1) -> int:
    """Matmul FLOPs of one optimizer step (``accum`` micro-batches of ``tokens``) of a GaLore
    linear of ``shape`` (out, in) at ``rank``, projected on ``side``, by ``path``."""
    m, n = shape
    r, t = rank, tokens
    dense = 4 * t * m * n  # y = x·W_effᵀ and dx = dy·W_eff
    grad_b = 2 * t * r * (m + n)  # x·Qᵀ then dyᵀ·(x·Qᵀ)  (or dy·P then (dy·P)ᵀ·x)
    build = 2 * m * n * r  # B·Q (or P·B)
    if path == "call":
        return accum * (dense + grad_b + 2 * build)
    if path == "step":
        return accum * (dense + grad_b) + build
    if path == "factored":
        # y's and dx's low-rank terms, T·r·(m+n) each; B's gradient reuses x·Qᵀ (dy·P) from them
        reused = 2 * t * r * (m if side == "right" else n)
        return accum * (dense + 2 * grad_b + reused)
    raise ValueError(f"path={path!r}: allowed {list(PATHS)}")


def full_rank_flops(shape: tuple[int, int], tokens: int, accum: int = 1) -> int:
    """The same linear trained full-rank: y, dx and the weight gradient, ``6·T·m·n`` per micro-batch."""
    m, n = shape
    return accum * 6 * tokens * m * n


def allowed(zero_stage: int) -> tuple[str, ...]:
    """The paths a ZeRO stage allows: ``step`` keeps a full weight per matrix, which ZeRO-3 exists to avoid."""
    return PATHS if zero_stage < 3 else ("call", "factored")


def choose(shape: tuple[int, int], rank: int, side: str, tokens: int, accum: int, zero_stage: int,
           cache_budget: int | None = None, dtype_bytes: int = 4) -> str:
    """The cheapest allowed path by FLOPs; ``step`` only if its m×n copy (``dtype_bytes`` each)
    fits ``cache_budget`` bytes (None: no limit). Ties go to the earlier path of ``PATHS``."""
    m, n = shape
    paths = [p for p in allowed(zero_stage)
             if p != "step" or cache_budget is None or m * n * dtype_bytes <= cache_budget]
    return min(paths, key=lambda p: (flops(p, shape, rank, side, tokens, accum), PATHS.index(p)))


def assign(shapes: list[tuple[int, int]], ranks: list[int], sides: list[str], tokens: int, accum: int,
           zero_stage: int, forward: str = "auto", cache_budget: int | None = None,
           dtype_bytes: int = 4) -> list[str]:
    """The path of each matrix, in order: ``forward`` itself unless it is ``auto``; with ``auto``
    each matrix's cheapest (``choose``), the W_eff caches of the ``step`` ones together within
    ``cache_budget`` bytes (taken in order while they fit)."""
    if forward != "auto":
        return [forward] * len(shapes)
    left = cache_budget
    out = []
    for shape, rank, side in zip(shapes, ranks, sides):
        path = choose(shape, rank, side, tokens, accum, zero_stage, left, dtype_bytes)
        if path == "step" and left is not None:
            left -= shape[0] * shape[1] * dtype_bytes
        out.append(path)
    return out


def element_bytes(precision: str) -> int:
    """Bytes of one element of the training dtype (fp32, or bf16/fp16): what a W_eff copy takes."""
    return 4 if precision == "fp32" else 2


def cache_bytes(shapes: list[tuple[int, int]], paths: list[str], dtype_bytes: int) -> int:
    """Bytes of the W_eff copies the ``step`` matrices keep while an optimizer step runs."""
    return sum(m * n * dtype_bytes for (m, n), p in zip(shapes, paths) if p == "step")
