"""Which parameter fragments a rank's optimizer steps under DeepSpeed ZeRO, and an optimizer base
that steps per fragment: the layer that lets per-matrix methods (APOLLO, Fira) run at every stage.

What DeepSpeed hands a client optimizer (0.19.8, measured; shared/DESIGN.md): at stage 0 the
params themselves (fp32), or an fp32 copy of each (bf16/fp16 wrappers); at stages 1-2 (and
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

from lowrank_pt import dist

ALIGN = 2
"""DeepSpeed's ``nccl_start_alignment_factor``: stages 1-2 pad a group's flat buffer to a multiple
of ALIGN·W elements, so each rank's slice is ``pad(N, ALIGN·W)/W``."""


def pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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
                part = int(p.ds_tensor.ds_numel)
                rank = torch.distributed.get_rank(group=p.ds_process_group)
                lo = rank * part
                if lo < p.ds_numel:
                    frags.append(Fragment(param_index[id(p)], lo, min(lo + part, int(p.ds_numel)), offset))
                offset += part
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

    @property
    def owner(self) -> int:
        """The holder that does whole-matrix work (an SVD at a refresh): holders take turns."""
        return self.holders[self.spec.index % len(self.holders)][0]


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
        keep every stage's products equal to stage 0's."""
        n = self.plan.shape[1]
        i_lo, i_hi = self.rows
        seg = flat[self.frag.offset:self.frag.offset + self.frag.numel]
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


class FragmentOptimizer(torch.optim.Optimizer):
    """AdamW on every full-rank fragment, a subclass's rule on every projected one, at any ZeRO
    stage (see the module doc).

    ``params``: param groups; a group with a ``rank`` key projects its 2-D params (its other
    keys are the method's options). ``names``: optional ``{id(param): name}`` for messages.
    ``defer_until_attached``: ignore ``step()`` until ``attach`` (DeepSpeed's stage-0 mixed
    precision wrapper takes a zero-gradient step while it is built; a method's optimizer skips it,
    so its limiter and schedules start at the first real step).
    """

    state_keys: tuple[str, ...] = ()
    """Per-piece state tensors of the subclass (besides the moments), see ``piece_state``."""

    def __init__(self, params, defaults: dict, names: dict[int, str] | None = None,
                 defer_until_attached: bool = False):
        super().__init__(params, defaults)
        names = names or {}
        self.specs: list[ParamSpec] = []
        self._index: dict[int, int] = {}
        for g, group in enumerate(self.param_groups):
            for p in group["params"]:
                shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 params built partitioned
                spec = ParamSpec(len(self.specs), g, names.get(id(p), f"group{g}.param{len(self.specs)}"), shape,
                                 "rank" in group and len(shape) == 2)
                self._index[id(p)] = spec.index
                self.specs.append(spec)
        self._group_options = [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]
        self._deferred = defer_until_attached
        self._pairs: list[tuple[torch.Tensor, FlatLayout]] | None = None
        self._layouts: dict[int, FlatLayout] = {}
        self._plans: dict[int, MatrixPlan] = {}
        self._cut_by_key: dict[tuple[int, int], list[MatrixPlan]] = {}
        self._geometry: dict[int, Geometry] = {}

    # --- what a subclass provides ---------------------------------------------------------------
    def matrix_options(self, spec: ParamSpec, group: dict) -> dict:
        """Static per-matrix facts the rule needs on every rank (rank, side, ...)."""
        return {}

    def moment_shape(self, plan: MatrixPlan, rank: int, frag: Fragment) -> tuple[int, int]:
        raise NotImplementedError

    def piece_state(self, plan: MatrixPlan, rank: int, frag: Fragment) -> dict[str, int]:
        """Elements of each per-piece state tensor (name -> numel), besides the moments."""
        return {}

    def init_piece_state(self, state: dict, piece: Piece) -> None:
        """Fill a new piece's slices of the per-piece state tensors."""

    def step_pieces(self, items: list[tuple[Piece, dict, torch.Tensor, torch.Tensor, dict]],
                    cut: list[MatrixPlan], steps: dict[tuple[int, int], int], device) -> None:
        """Step the projected pieces of one call: ``items`` are (piece, group, flat param, flat
        grad, state); ``cut`` the cut matrices of the call (the same list on every rank); ``steps``
        the step number (after this step's increment) of each of the call's flats by key;
        ``device`` the flats' device."""
        raise NotImplementedError

    # --- layout -----------------------------------------------------------------------------------
    def attach(self, engine) -> None:
        """Learn what DeepSpeed hands this optimizer (collective on every rank once, at stages 1-3)."""
        stage = int(engine.zero_optimization_stage())
        wrapper = engine.optimizer
        if wrapper is self:  # stage 0 fp32: DeepSpeed steps us on the params themselves
            pairs, partitioned = self._whole_pairs(), False
        else:
            pairs, partitioned = live_fragments(wrapper, self._index)
        if stage > 0 and not partitioned:
            raise RuntimeError(f"ZeRO stage {stage} but the optimizer wrapper holds whole params")
        self._install(pairs, partitioned and dist.world_size() > 1)
        self._deferred = False

    def _whole_pairs(self) -> list[tuple[torch.Tensor, FlatLayout]]:
        out = []
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                index = self._index[id(p)]
                out.append((p, FlatLayout((g, i), p.numel(), (Fragment(index, 0, p.numel(), 0),))))
        return out

    def _install(self, pairs, partitioned: bool) -> None:
        self._pairs = pairs  # keeps the tensors alive, so their ids stay theirs
        self._layouts = {id(t): lay for t, lay in pairs}
        self._geometry = {}
        mine = [lay for _, lay in pairs]
        rank = dist.rank()
        holders: dict[int, list[tuple[int, int, int]]] = {}
        keys: dict[int, tuple[int, int]] = {}
        for r, layouts in (enumerate(dist.all_gather_object(mine)) if partitioned else [(rank, mine)]):
            for lay in layouts:
                for f in lay.fragments:
                    holders.setdefault(f.param, []).append((r, f.start, f.end))
                    keys[f.param] = lay.key
        self._plans, self._cut_by_key = {}, {}
        for spec in self.specs:
            if not spec.projected or spec.index not in holders:
                continue
            plan = MatrixPlan(spec, keys[spec.index], tuple(sorted(holders[spec.index])),
                              self.matrix_options(spec, self._group_options[spec.group]))
            self._plans[spec.index] = plan
            if plan.cut:
                self._cut_by_key.setdefault(plan.key, []).append(plan)

    def _ensure_layout(self) -> None:
        if self._pairs is None:
            self._install(self._whole_pairs(), False)

    def geometry(self, t: torch.Tensor) -> Geometry:
        cached = self._geometry.get(id(t))
        if cached is not None:
            return cached
        lay = self._layouts.get(id(t))
        if lay is None:
            raise RuntimeError(f"{type(self).__name__}: a tensor of shape {tuple(t.shape)} that this optimizer "
                               "has no layout for; under DeepSpeed call optimizer.attach(engine) after "
                               "deepspeed.initialize")
        geo = self.flat_geometry(lay, dist.rank())
        self._geometry[id(t)] = geo
        return geo

    def flat_geometry(self, lay: FlatLayout, rank: int) -> Geometry:
        runs, pieces, full = [], [], 0
        for f in lay.fragments:
            if f.param not in self._plans:
                runs.append((f.offset, f.numel, full))
                full += f.numel
        moment = full
        extra = dict.fromkeys(self.state_keys, 0)
        for f in lay.fragments:
            plan = self._plans.get(f.param)
            if plan is None:
                continue
            shape = self.moment_shape(plan, rank, f)
            slices = {}
            for name, numel in self.piece_state(plan, rank, f).items():
                slices[name] = (extra[name], numel)
                extra[name] += numel
            pieces.append(Piece(plan, f, rank, len(pieces), moment, shape, slices))
            moment += math.prod(shape)
        return Geometry(runs, pieces, moment, extra)

    # --- the step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._deferred:
            return loss
        self._ensure_layout()
        items, keys, steps, device = [], [], {}, None
        for group in self.param_groups:
            for t in group["params"]:
                if t.grad is None:
                    continue
                device = t.device
                geo = self.geometry(t)
                key = self._layouts[id(t)].key
                keys.append(key)
                state = self.state[t]
                if not geo.pieces:
                    self._adamw(group, t, t.grad, state)
                    steps[key] = int(state["step"].item())
                    continue
                if not state:
                    self._init_state(state, t, geo)
                state["step"] += 1
                steps[key] = int(state["step"].item())
                flat, grad = t.view(-1), t.grad.view(-1)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                for offset, length, at in geo.runs:
                    self._adamw_update(group, flat[offset:offset + length], grad[offset:offset + length],
                                       m[at:at + length], v[at:at + length], steps[key])
                items += [(piece, group, flat, grad, state) for piece in geo.pieces]
        cut = sorted(itertools.chain.from_iterable(self._cut_by_key.get(k, []) for k in set(keys)),
                     key=lambda plan: plan.spec.index)
        if items or cut:
            self.step_pieces(items, cut, steps, device)
        return loss

    def _init_state(self, state: dict, t: torch.Tensor, geo: Geometry) -> None:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros(geo.moment_numel, dtype=torch.float32, device=t.device)
        state["exp_avg_sq"] = torch.zeros(geo.moment_numel, dtype=torch.float32, device=t.device)
        for name, numel in geo.extra_numel.items():
            if numel:
                state[name] = self.new_state_tensor(name, numel, t.device)
        for piece in geo.pieces:
            self.init_piece_state(state, piece)

    def new_state_tensor(self, name: str, numel: int, device) -> torch.Tensor:
        return torch.zeros(numel, dtype=torch.float32, device=device)

    def _adamw(self, group: dict, p: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
        """torch.optim.AdamW's single-tensor update, state and all."""
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        self._adamw_update(group, p, grad, state["exp_avg"], state["exp_avg_sq"], state["step"].item())

    @staticmethod
    def _adamw_update(group: dict, p, grad, exp_avg, exp_avg_sq, step: float) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if wd != 0:
            p.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))

    # --- reductions ---------------------------------------------------------------------------------
    @staticmethod
    def sum_over_holders(plans: list[MatrixPlan], shape_of, local: dict[int, torch.Tensor],
                         device) -> dict[int, torch.Tensor]:
        """For each plan (the same list on every rank), the sum over ranks of a statistic of shape
        ``shape_of(plan)``: ``local[index]`` where this rank contributes, zeros elsewhere. One
        all-reduce for all of them (none when every shape is empty). Returns views by index."""
        shapes = [tuple(shape_of(p)) for p in plans]
        sizes = [math.prod(s) for s in shapes]
        total = sum(sizes)
        if total == 0:
            return {p.spec.index: torch.zeros(s, device=device) for p, s in zip(plans, shapes)}
        buf = torch.zeros(total, dtype=torch.float32, device=device)
        out, at = {}, 0
        for plan, shape, size in zip(plans, shapes, sizes):
            piece = buf[at:at + size]
            contribution = local.get(plan.spec.index)
            if contribution is not None and size:
                piece.copy_(contribution.reshape(-1))
            out[plan.spec.index] = piece.view(shape)
            at += size
        dist.all_reduce_sum_(buf)
        return out

    # --- checkpoints ---------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, but integer state tensors (seeds) keep their dtype and device as saved."""
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        by_id = dict(zip(saved_ids, params))
        integers = {pid: {k: v.clone() for k, v in s.items() if torch.is_tensor(v) and not v.is_floating_point()}
                    for pid, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        for pid, values in integers.items():
            if pid in by_id:
                self.state[by_id[pid]].update(values)

    # --- the formula ---------------------------------------------------------------------------------
    @classmethod
    def planned_state_bytes(cls, groups: list[dict], zero_stage: int, world: int, rank: int,
                            sub_group_size: int | None = 1_000_000_000) -> int:
        """Bytes of ``self.state`` on ``rank`` once every tensor has stepped, from shapes alone:
        ``groups`` as the method's param groups, each ``{"shapes": [...], **options}``."""
        partitioned = zero_stage > 0 and world > 1
        shells = [{**{k: v for k, v in g.items() if k != "shapes"},
                   "params": [torch.empty(s, device="meta") for s in g["shapes"]]} for g in groups]
        opt = cls(shells)
        layouts = planned_fragments([[math.prod(s) for s in g["shapes"]] for g in groups], zero_stage,
                                    world if zero_stage > 0 else 1, sub_group_size)
        mine = layouts[rank if partitioned else 0]
        holders: dict[int, list] = {}
        keys: dict[int, tuple[int, int]] = {}
        for r, lays in (enumerate(layouts) if partitioned else [(rank, mine)]):
            for lay in lays:
                for f in lay.fragments:
                    holders.setdefault(f.param, []).append((r, f.start, f.end))
                    keys[f.param] = lay.key
        for spec in opt.specs:
            if spec.projected:
                opt._plans[spec.index] = MatrixPlan(spec, keys[spec.index], tuple(sorted(holders[spec.index])),
                                                    opt.matrix_options(spec, opt._group_options[spec.group]))
        total = 0
        for lay in mine:
            geo = opt.flat_geometry(lay, rank)
            if not geo.pieces:
                total += 4 + 8 * lay.numel  # torch AdamW: fp32 step, two moments of the flat's shape
                continue
            total += 4 + 8 * geo.moment_numel
            total += sum(numel * opt.state_element_size(name) for name, numel in geo.extra_numel.items())
        return total

    def state_element_size(self, name: str) -> int:
        return 4


def group_shapes(param_groups: Iterable[dict]) -> list[dict]:
    """``param_groups`` with each group's params replaced by their shapes (for formulas)."""
    return [{**{k: v for k, v in g.items() if k != "params"},
             "shapes": [tuple(getattr(p, "ds_shape", p.shape)) for p in g["params"]]} for g in param_groups]
