"""Which parameter fragments a rank's optimizer steps under DeepSpeed ZeRO, and the design of the
optimizer base that steps per fragment (``fragment_optimizer.FragmentOptimizer``): the layer that
lets per-matrix methods (APOLLO, Fira) run at every stage.

What DeepSpeed hands a client optimizer (0.19.8, measured on CPU with gloo, 1 and 2 ranks;
tests/zero check it): at stage 0 the params themselves (fp32), or an fp32 copy of each (bf16/fp16
wrappers); at stages 1-2 (and
``BF16_Optimizer``) one flat 1-D fp32 tensor per param group holding this rank's slice of the
group's params laid end to end, padded to a multiple of 2·W; at stage 3 one flat tensor per
sub-group, each param's own ``⌈n/W⌉``-element piece end to end. Slices cut through matrices.

Design
------
- **DeepSpeed keeps its jobs**: partitioning, fp32 masters, gradient reduction, clipping,
  overflow skips, checkpoints. The client optimizer is a ``torch.optim.Optimizer`` subclass
  (``FragmentOptimizer``) whose ``step()``, given flat tensors, dispatches per fragment.
- **Layout from DeepSpeed's own records.** ``attach(engine)``, once after
  ``deepspeed.initialize``, reads them: stages 1-2 ``p._hp_mapping`` (``lp_fragment_address``:
  the range of the flattened param; ``hp_fragment_address``: where it sits in the flat slice);
  stage 3 ``p.ds_tensor`` (elements from ``rank·ds_numel``, the pieces of a sub-group end to end);
  stage 0 the param (or its fp32 copy) whole. Every rank then shares its fragment list once
  (``dist.all_gather_object``), so every rank knows which ranks hold which elements of every
  matrix (its "holders"). ``planned_fragments`` derives the same lists from sizes alone, for the
  planner (tests check the two agree at every stage).
- **Row blocks.** A fragment of a row-major m×n matrix is elements ``[a, b)``: a partial row,
  whole rows, a partial row. A method works on the fragment's row block, rows ``⌊a/n⌋`` to
  ``⌈b/n⌉`` with zeros outside ``[a, b)`` (a view, no copy, when the fragment is whole rows and
  always at stage 0), so its projections, norms and updates are dense products; only the
  fragment's own elements are written back.
- **Statistics, not gradients.** A matrix that one rank holds whole needs nothing from the
  others. A matrix cut by a partition boundary ("cut"; at stage 3 every matrix is) is held in row
  blocks by several ranks; the method names the small per-matrix statistics that must be whole
  (a projection ``P[:, rows]·G[rows, :]``, r×n, summed over the row blocks; per-column scales; a
  norm's sum of squares) and ``sum_over_holders`` sums them over the ranks: one packed
  ``dist.all_reduce_sum_`` per phase for all the cut matrices of a ``step()`` call. A whole
  gradient is never gathered on a regular step. Every rank joins every reduction of a call, with
  zeros where it holds nothing, in the same order: the layout is global knowledge. The
  alternative, gathering each cut matrix's gradient onto one rank and stepping it there, would
  move the full gradient every step (ZeRO's reduce-scatter volume again) and put the whole
  matrix's update on one rank.
- **State as tensors** in ``self.state[flat]``, so DeepSpeed's checkpoints hold it and a resume
  is exact. A flat without projected matrices keeps torch AdamW's state exactly (moments of the
  flat's shape, fp32 step), and its params train bit for bit as ``torch.optim.AdamW``; a flat with
  projected fragments keeps one compact moment buffer (its full-rank fragments first, then each
  projected fragment's low-rank moments) and the method's small per-fragment tensors (the
  subclass's ``piece_state``). ``FragmentOptimizer.planned_state_bytes`` is the formula the
  planner and the memory tracker compare against; it follows from the same geometry.
- torch's ``Optimizer.load_state_dict`` casts every state tensor but ``step`` to the param's
  dtype; integer state (seeds) is restored as saved.

Plain PyTorch (no DeepSpeed) needs no ``attach``: every param is its own whole fragment.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Iterable

import torch

from lowrank_pt.core.owners import balanced_owners
from lowrank_pt.zero.params import full_shape, piece_range, piece_size

DEEPSPEED_REDUCE_BUCKET = 500_000_000
"""DeepSpeed's default ``zero_optimization.reduce_bucket_size`` (elements)."""
REDUCE_BUCKET_FLOOR = 5_000_000
"""The least ``default_reduce_bucket`` gives: a small model reduces its gradients in one bucket
instead of many tiny collectives."""


def default_reduce_bucket(hidden_size: int) -> int:
    """Our ``zero_optimization.reduce_bucket_size`` where the run sets none (``engine.reduce_bucket_size``
    null): ``hidden_size²`` elements, at least ``REDUCE_BUCKET_FLOOR``, instead of DeepSpeed's
    500M. ZeRO-3 keeps a bucket for the whole run (1 GB in bf16 at DeepSpeed's size, 32 MB at
    LLaMA 7B's 4096² here) and stages 1-2 one during each backward; a bucket of a layer's matrix
    or more keeps the reductions few and large."""
    return max(hidden_size * hidden_size, REDUCE_BUCKET_FLOOR)
DEEPSPEED_SUB_GROUP = 1_000_000_000
"""DeepSpeed's default ``zero_optimization.sub_group_size`` (elements, stage 3)."""
DEEPSPEED_ALLREDUCE_BUCKET = 500_000_000
"""Elements per bucket of DeepSpeed's ZeRO-0 gradient all-reduce (``engine.allreduce_gradients``'
default): it gathers gradients until a bucket passes this many, flattens them into one new
tensor, reduces it and copies back, so a step holds one flattened copy of a bucket beside the
gradients, even on one rank."""


def allreduce_bucket_numel(sizes: list[int], bucket: int = DEEPSPEED_ALLREDUCE_BUCKET) -> int:
    """The largest flattened bucket DeepSpeed's ZeRO-0 all-reduce makes of gradients of ``sizes``
    (elements, in order): tensors are added until the bucket passes ``bucket``."""
    largest = numel = 0
    for n in sizes:
        numel += n
        if numel > bucket:
            largest, numel = max(largest, numel), 0
    return max(largest, numel)

ALIGN = 2
"""DeepSpeed's ``nccl_start_alignment_factor``: stages 1-2 pad a group's flat buffer to a multiple
of ALIGN·W elements, so each rank's slice is ``pad(N, ALIGN·W)/W``."""


def pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_group(numel: int, world: int) -> int:
    """Elements of a param group's flat buffer at stages 1-2: its params end to end, padded to a
    multiple of ALIGN·W (each rank's slice is this divided by W)."""
    return pad(numel, ALIGN * world)


def piece_of(numel: int, world: int) -> int:
    """Elements of each rank's ZeRO-3 piece of a param of ``numel`` elements (the last padded)."""
    return -(-numel // world)


def slice_grad_elements(group: list[int], world: int, rank: int) -> int:
    """Elements of the gradients ``rank`` holds at stages 1-2 for a param group of ``group``
    sizes: every param whose flat range overlaps the rank's slice, whole (DeepSpeed keeps the
    overlapping params' gradients), plus the alignment padding on the last rank."""
    part = padded_group(sum(group), world) // world
    lo, hi = rank * part, (rank + 1) * part
    total, offset = 0, 0
    for n in group:
        if offset < hi and offset + n > lo:
            total += n
        offset += n
    if rank == world - 1:  # the last slice carries the group's alignment padding as a zero tensor
        total += part * world - sum(group)
    return total


def stage3_sub_groups(partition_numels: list[int], size: int | None) -> list[list[int]]:
    """Indices of the params of each stage-3 sub-group (DeepSpeed closes one once its params'
    partitions reach ``size`` elements)."""
    if size is None or size >= sum(partition_numels):
        return [list(range(len(partition_numels)))]
    out, current, running = [], [], 0
    for i, n in enumerate(partition_numels):
        current.append(i)
        running += n
        if running >= size or i == len(partition_numels) - 1:
            out.append(current)
            current, running = [], 0
    return out


ALIGNMENT = 64
"""Bytes: torch's CPU allocator aligns every new tensor to this; BLAS takes its fast, stage-0 path."""


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it starts at an ``ALIGNMENT``-byte boundary, else an aligned copy."""
    return t if t.data_ptr() % ALIGNMENT == 0 else t.clone()


@dataclass(frozen=True)
class Fragment:
    """Elements ``[start, end)`` of the flattened param ``param`` (its index in the optimizer's
    params, over all groups in order), at ``offset`` in the flat tensor a rank steps."""

    param: int
    start: int
    end: int
    offset: int

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class FlatLayout:
    """One tensor a rank steps: its key (group, sub-group; (group, param) at stage 0, where each
    param is its own tensor), its length and the fragments in it, by offset."""

    key: tuple[int, int]
    numel: int
    fragments: tuple[Fragment, ...]


def planned_fragments(groups: list[list[int]], zero_stage: int, world: int,
                      sub_group_size: int | None = 1_000_000_000) -> list[list[FlatLayout]]:
    """Each rank's flat tensors and their fragments, from the params' sizes (``groups``: numels
    per param group, in order), by DeepSpeed 0.19.8's rules (default ``parameter_alignment``
    off, no round-robin reordering). Stage 0 replicates: every rank holds every param whole."""
    out: list[list[FlatLayout]] = [[] for _ in range(world)]
    first = list(itertools.accumulate([0] + [len(g) for g in groups]))
    for g, numels in enumerate(groups):
        ids = range(first[g], first[g] + len(numels))
        if zero_stage == 0:
            for rank in range(world):
                out[rank] += [FlatLayout((g, i), n, (Fragment(pid, 0, n, 0),))
                              for i, (pid, n) in enumerate(zip(ids, numels))]
        elif zero_stage in (1, 2):
            part = pad(sum(numels), ALIGN * world) // world
            starts = list(itertools.accumulate([0] + numels))
            for rank in range(world):
                lo, hi = rank * part, (rank + 1) * part
                frags = []
                for pid, o, n in zip(ids, starts, numels):
                    s, e = max(o, lo), min(o + n, hi)
                    if s < e:
                        frags.append(Fragment(pid, s - o, e - o, s - lo))
                out[rank].append(FlatLayout((g, 0), part, tuple(frags)))
        elif zero_stage == 3:
            parts = [-(-n // world) for n in numels]
            for s, members in enumerate(stage3_sub_groups(parts, sub_group_size)):
                for rank in range(world):
                    frags, offset = [], 0
                    for i in members:
                        lo = rank * parts[i]
                        if lo < numels[i]:
                            frags.append(Fragment(ids[i], lo, min(lo + parts[i], numels[i]), offset))
                        offset += parts[i]
                    out[rank].append(FlatLayout((g, s), offset, tuple(frags)))
        else:
            raise ValueError(f"zero_stage={zero_stage}: allowed 0, 1, 2, 3")
    return out


def live_fragments(engine_optimizer, param_index: dict[int, int]) -> tuple[list[tuple[torch.Tensor, FlatLayout]], bool]:
    """The tensors this rank's inner optimizer steps and their layouts, read from the DeepSpeed
    wrapper ``engine_optimizer``; ``param_index`` maps ``id(module param)`` to its index in the
    client optimizer. Returns (pairs, partitioned): partitioned is False at stage 0, where every
    rank holds every param whole."""
    opt = engine_optimizer
    pairs: list[tuple[torch.Tensor, FlatLayout]] = []
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        per_group: dict[int, int] = {}
        for sub, params in enumerate(opt.fp16_groups):
            g = int(opt.sub_group_to_group_id[sub])
            s = per_group.get(g, 0)
            per_group[g] = s + 1
            flat = opt.fp32_partitioned_groups_flat[sub]
            frags, offset = [], 0
            for p in params:
                lo, hi = piece_range(p)
                if hi > lo:
                    frags.append(Fragment(param_index[id(p)], lo, hi, offset))
                offset += piece_size(p)
            if offset != flat.numel():
                raise RuntimeError(f"ZeRO-3 sub-group {sub}: pieces sum to {offset} elements, the flat "
                                   f"partition holds {flat.numel()} (a DeepSpeed layout this code does not know)")
            pairs.append((flat, FlatLayout((g, s), flat.numel(), tuple(frags))))
        return pairs, True
    for flats_attr, lp_attr in (("single_partition_of_fp32_groups", "bit16_groups"),
                                ("fp32_groups_flat_partition", "bf16_groups")):
        if hasattr(opt, flats_attr) and hasattr(opt, lp_attr):  # ZeRO-1/2, BF16_Optimizer
            for g, (flat, params) in enumerate(zip(getattr(opt, flats_attr), getattr(opt, lp_attr))):
                frags = []
                for p in params:
                    mapping = getattr(p, "_hp_mapping", None)
                    if mapping is None:
                        continue
                    lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                    frags.append(Fragment(param_index[id(p)], int(lp.start), int(lp.start + lp.numel), int(hp.start)))
                frags.sort(key=lambda f: f.offset)
                pairs.append((flat, FlatLayout((g, 0), flat.numel(), tuple(frags))))
            return pairs, True
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):  # stage 0 mixed precision
        for g, (lows, highs) in enumerate(zip(opt.fp16_groups, opt.fp32_groups)):
            for i, (p, master) in enumerate(zip(lows, highs)):
                pairs.append((master, FlatLayout((g, i), p.numel(), (Fragment(param_index[id(p)], 0, p.numel(), 0),))))
        return pairs, False
    raise TypeError(f"{type(opt).__name__}: not a DeepSpeed optimizer wrapper this layer knows")


@dataclass(frozen=True)
class ParamSpec:
    """A param of the client optimizer: its index, group, name and shape, and whether its group
    projects it (a 2-D param of a group with a ``rank`` key)."""

    index: int
    group: int
    name: str
    shape: tuple[int, ...]
    projected: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class MatrixPlan:
    """Global facts of one projected matrix, the same on every rank: shape, the ranks that hold
    it and the element range each holds, and the rows that a partition boundary splits."""

    spec: ParamSpec
    key: tuple[int, int]
    holders: tuple[tuple[int, int, int], ...]
    """(rank, start, end) of each holder, by rank; one entry (this rank) when not partitioned."""
    options: dict = field(default_factory=dict)
    """The method's static per-matrix facts (rank, side, ...), from ``matrix_options``."""
    owner: int = -1
    """The holder that does whole-matrix work (an SVD at a refresh); ``assign_owners`` sets it."""

    @property
    def shape(self) -> tuple[int, int]:
        return self.spec.shape  # type: ignore[return-value]

    @property
    def cut(self) -> bool:
        return len(self.holders) > 1

    @property
    def split_rows(self) -> tuple[int, ...]:
        """Rows that hold a fragment boundary strictly inside them (shared by two holders)."""
        n = self.shape[1]
        rows = {x // n for _, s, e in self.holders for x in (s, e) if x % n}
        return tuple(sorted(rows))

    def holder_index(self, rank: int) -> int:
        return [h[0] for h in self.holders].index(rank)

    def columns(self, rank: int) -> tuple[int, int]:
        """Columns whose statistics ``rank`` keeps, when a method splits a matrix's columns among
        its holders (all of them when it is not cut)."""
        n = self.shape[1]
        if not self.cut:
            return 0, n
        k, h = self.holder_index(rank), len(self.holders)
        return k * n // h, (k + 1) * n // h



def assign_owners(plans: list[MatrixPlan], world: int, cost=None) -> None:
    """Each matrix's owner among its holders, balanced over the ranks (``core.owners``) by
    ``cost(plan)`` (default: the matrix's size, what its gathered gradient weighs): a matrix cut
    over several ranks has its whole-matrix work (the full gradient summed onto one rank, its SVD
    or orthonormalisation) on the least loaded of them. The same on every rank."""
    sizes = [cost(p) if cost is not None else p.spec.numel for p in plans]
    owners = balanced_owners(sizes, world, [[h[0] for h in p.holders] for p in plans])
    for plan, owner in zip(plans, owners):
        plan.owner = owner


@dataclass
class Piece:
    """A projected matrix's fragment on this rank, with its row block and state slices."""

    plan: MatrixPlan
    frag: Fragment
    rank: int
    slot: int
    """Index of this piece among the flat's projected fragments (its limiter entry, its seed)."""
    moment_offset: int
    moment_shape: tuple[int, int]
    extra: dict = field(default_factory=dict)
    """name -> (offset, shape) of the method's per-piece state slices."""

    @property
    def rows(self) -> tuple[int, int]:
        n = self.plan.shape[1]
        return self.frag.start // n, -(-self.frag.end // n)

    @property
    def lo(self) -> int:
        """Position of the fragment's first element in its row block."""
        return self.frag.start - self.rows[0] * self.plan.shape[1]

    def block(self, flat: torch.Tensor) -> torch.Tensor:
        """The fragment of ``flat`` (1-D) as its row block (rows × n), zeros outside the fragment:
        a view when the fragment is whole rows at an aligned address (always at stage 0), else a
        fresh copy. BLAS kernels round differently at different alignments (measured: a product
        with a matrix 1-3 floats off a 16-byte boundary differs by ~1e-6), so aligned operands
        keep every stage's products equal to stage 0's. A bf16 ``flat`` (bf16 masters' gradients)
        comes out in fp32, a copy of this block only: the statistics are computed in fp32."""
        n = self.plan.shape[1]
        i_lo, i_hi = self.rows
        seg = flat[self.frag.offset:self.frag.offset + self.frag.numel]
        if seg.dtype != torch.float32:
            seg = seg.float()
        if self.lo == 0 and self.frag.numel == (i_hi - i_lo) * n:
            return aligned(seg.view(i_hi - i_lo, n))
        out = torch.zeros((i_hi - i_lo) * n, dtype=seg.dtype, device=seg.device)
        out[self.lo:self.lo + self.frag.numel] = seg
        return out.view(i_hi - i_lo, n)

    def own(self, block: torch.Tensor) -> torch.Tensor:
        """The fragment's own elements of a row block, flat."""
        return block.reshape(-1)[self.lo:self.lo + self.frag.numel]

    def segment(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.frag.offset:self.frag.offset + self.frag.numel]


@dataclass
class Geometry:
    """Static layout of one flat's state: full-rank runs and projected pieces."""

    runs: list[tuple[int, int, int]]
    """(offset in the flat, length, offset in the compact moments) of each full-rank fragment."""
    pieces: list[Piece]
    moment_numel: int
    extra_numel: dict[str, int]


def group_shapes(param_groups: Iterable[dict]) -> list[dict]:
    """``param_groups`` with each group's params replaced by their shapes (for formulas)."""
    return [{**{k: v for k, v in g.items() if k != "params"},
             "shapes": [full_shape(p) for p in g["params"]]} for g in param_groups]
