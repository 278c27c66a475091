"""``FragmentOptimizer``: the optimizer base that steps per fragment of each matrix a ZeRO
partition holds (the layout it reads is :mod:`lowrank_pt.zero.partition`; the design is
described there)."""

from __future__ import annotations

import contextlib
import itertools
import math

import torch

from lowrank_pt.core import dist
from lowrank_pt.optim import lowbit
from lowrank_pt.optim.lowbit import round_to_bf16, rounding_generator
from lowrank_pt.zero.params import full_shape
from lowrank_pt.zero.partition import (
    FlatLayout,
    Fragment,
    Geometry,
    MatrixPlan,
    ParamSpec,
    Piece,
    assign_owners,
    live_fragments,
    planned_fragments,
)


class FragmentOptimizer(torch.optim.Optimizer):
    """AdamW on every full-rank fragment, a subclass's rule on every projected one, at any ZeRO
    stage (see the module doc).

    ``params``: param groups; a group with the ``projected_key`` (``rank``) steps its 2-D params by
    the subclass's rule (its other keys are the method's options). ``names``: optional ``{id(param): name}`` for messages.
    ``defer_until_attached``: ignore ``step()`` until ``attach`` (DeepSpeed's stage-0 mixed
    precision wrapper takes a zero-gradient step while it is built; a method's optimizer skips it,
    so its limiter and schedules start at the first real step).
    """

    projected_key: str = "rank"
    """The group key that marks a group whose 2-D params the subclass's rule steps."""
    state_keys: tuple[str, ...] = ()
    """Per-piece state tensors of the subclass (besides the moments), see ``piece_state``."""
    lowbit_keys: tuple[str, ...] = ()
    """Those of ``state_keys`` stored in ``state_dtype`` like Adam's moments (signed values: a
    momentum buffer); the others stay as ``new_state_tensor`` makes them."""

    def __init__(self, params, defaults: dict, names: dict[int, str] | None = None,
                 defer_until_attached: bool = False, state_dtype: str = "fp32"):
        super().__init__(params, defaults)
        if state_dtype not in lowbit.STATE_DTYPES:
            raise ValueError(f"state_dtype={state_dtype!r}: allowed {lowbit.STATE_DTYPES}")
        self.state_dtype = state_dtype
        """How Adam's moments are stored between steps (``optimizer.state_dtype``): each step
        works on them in fp32 (``moments_as_tensors``)."""
        names = names or {}
        self.specs: list[ParamSpec] = []
        self._index: dict[int, int] = {}
        for g, group in enumerate(self.param_groups):
            for p in group["params"]:
                shape = full_shape(p)
                spec = ParamSpec(len(self.specs), g, names.get(id(p), f"group{g}.param{len(self.specs)}"), shape,
                                 self.projected_key in group and len(shape) == 2)
                self._index[id(p)] = spec.index
                self.specs.append(spec)
        self._group_options = [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]
        self._built_groups = [list(group["params"]) for group in self.param_groups]
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
        """Every param this optimizer was built with, whole: from its groups as built, not as they
        stand (``int8_trained.steps_through_codes`` steps views of them, one int8 weight apart)."""
        out = []
        for g, group in enumerate(self._built_groups):
            for i, p in enumerate(group):
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
        assign_owners(list(self._plans.values()), dist.world_size(), self.owner_cost)

    def owner_cost(self, plan: MatrixPlan) -> int:
        """What balances a cut matrix's whole-matrix work over its owners: its size (the gradient
        gathered onto the owner), unless the rule's work grows faster than that."""
        return plan.spec.numel

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
        with self.moments_as_tensors():
            self._step()
        return loss

    def _step(self) -> None:
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
                    self._adamw(group, t, t.grad, state, (self._index.get(id(t), -1), *key))
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
                                       m[at:at + length], v[at:at + length], steps[key],
                                       (self._index.get(id(t), -1), *key, offset))
                items += [(piece, group, flat, grad, state) for piece in geo.pieces]
        cut = sorted(itertools.chain.from_iterable(self._cut_by_key.get(k, []) for k in set(keys)),
                     key=lambda plan: plan.spec.index)
        if items or cut:
            self.step_pieces(items, cut, steps, device)

    @contextlib.contextmanager
    def moments_as_tensors(self):
        """Inside the block Adam's moments are fp32 tensors ``exp_avg`` / ``exp_avg_sq`` (what the
        step works on), and so is each of ``lowbit_keys``; with bf16 or int8 ``state_dtype`` they
        are decoded on entry and stored back on exit (bf16 rounded to nearest; int8 8-bit
        blockwise, ``optim.lowbit``). A state made inside the block (a first step) is stored on
        exit. The decoded tensors are a transient of 4 bytes per element of this rank's states."""
        if self.state_dtype == "fp32":
            yield
            return
        for group in self.param_groups:
            for t in group["params"]:
                if self.state.get(t):
                    geo = self.geometry(t)
                    shape = (geo.moment_numel,) if geo.pieces else tuple(t.shape)
                    lowbit.decode_moments(self.state[t], self.state_dtype, shape)
                    for key in self.lowbit_keys:
                        lowbit.decode_state(self.state[t], key, True, self.state_dtype, geo.extra_numel.get(key, 0))
        try:
            yield
        finally:
            for state in self.state.values():
                lowbit.store_moments(state, self.state_dtype)
                for key in self.lowbit_keys:
                    lowbit.store_state(state, key, True, self.state_dtype)

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

    def _adamw(self, group: dict, p: torch.Tensor, grad: torch.Tensor, state: dict, key: tuple = ()) -> None:
        """torch.optim.AdamW's single-tensor update, state and all (``key``: what ``p`` is, for
        its stochastic rounding: ``lowbit.rounding_generator``)."""
        if not state:  # fp32 moments, also for a bf16 param (bf16 masters)
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        state["step"] += 1
        self._adamw_update(group, p, grad, state["exp_avg"], state["exp_avg_sq"], state["step"].item(), key)

    @staticmethod
    def _adamw_update(group: dict, p, grad, exp_avg, exp_avg_sq, step: float, key: tuple = ()) -> None:
        """torch's AdamW step on ``p``; a bf16 ``p`` (bf16 masters) is updated in fp32 and
        stochastically rounded back (``lowbit.round_to_bf16``, its bits keyed by ``step`` and ``key``)."""
        stored = p
        if p.dtype != torch.float32:
            p, grad = p.float(), grad.float()
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if wd != 0:
            p.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))
        if stored is not p:
            stored.copy_(round_to_bf16(p, rounding_generator(step, *key)))

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
        """torch's load, but every state tensor (seeds, fp32 moments beside a bf16 param) keeps the
        dtype it was saved with (``lowbit.load_keeping_dtypes``)."""
        lowbit.load_keeping_dtypes(self, state_dict, super().load_state_dict)

    # --- the formula ---------------------------------------------------------------------------------
    @classmethod
    def planned_state_bytes(cls, groups: list[dict], zero_stage: int, world: int, rank: int,
                            sub_group_size: int | None = 1_000_000_000, state_dtype: str = "fp32") -> int:
        """Bytes of ``self.state`` on ``rank`` once every tensor has stepped, from shapes alone:
        ``groups`` as the method's param groups, each ``{"shapes": [...], **options}``; Adam's
        moments and ``lowbit_keys`` in ``state_dtype`` (``lowbit.state_bytes``: both moments and the
        step; ``lowbit.tensor_bytes``)."""
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
        assign_owners(list(opt._plans.values()), max(world, rank + 1), opt.owner_cost)
        total = 0
        for lay in mine:
            geo = opt.flat_geometry(lay, rank)
            if not geo.pieces:  # AdamW: fp32 step, two moments of the flat's shape
                total += lowbit.state_bytes(lay.numel, state_dtype)
                continue
            total += lowbit.state_bytes(geo.moment_numel, state_dtype)
            total += sum(lowbit.tensor_bytes(numel, state_dtype) if name in opt.lowbit_keys
                         else numel * opt.state_element_size(name) for name, numel in geo.extra_numel.items())
        return total

    def state_element_size(self, name: str) -> int:
        return 4
