"""Which rank does each matrix's share of a periodic job (GaLore's refresh, LoRA-GA's init, an
APOLLO/Fira SVD of a matrix cut over ranks: hold the matrix's full gradient, compute its
subspace), balanced by bytes. The one rule for all of them.

Owners by index (``i % world``) put the same kind of matrix on the same rank whenever the world
size divides the number of matrices per layer: with 7 linears per LLaMA block and 7 ranks, three
ranks own every MLP matrix (m·n = 4096·11008 at 7B) and four own the attention ones (4096²),
2.7x the bytes. A greedy largest-first assignment (each matrix, biggest first, to the rank
holding the fewest bytes so far) keeps every rank within one matrix of the mean.
"""

from __future__ import annotations


def balanced_owners(sizes: list[int], world: int, allowed: list[list[int]] | None = None) -> list[int]:
    """The owner rank of each entry of ``sizes`` (bytes, or anything proportional to them);
    ``allowed[i]``, where given, the ranks entry i may go to (a matrix's holders, for work on
    what they hold), else every rank.

    Deterministic, from ``sizes`` and ``world`` alone, so every rank computes the same owners
    without communicating: ties in size go to the earlier entry, ties in load to the lower rank."""
    if world < 1:
        raise ValueError(f"world={world} must be >= 1")
    load = [0] * world
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        ranks = allowed[index] if allowed is not None else range(world)
        rank = min(ranks, key=lambda r: (load[r], r))
        owners[index] = rank
        load[rank] += sizes[index]
    return owners


def owned_bytes(sizes: list[int], world: int) -> list[int]:
    """The total of ``sizes`` each rank owns under ``balanced_owners``."""
    held = [0] * world
    for size, rank in zip(sizes, balanced_owners(sizes, world)):
        held[rank] += size
    return held
