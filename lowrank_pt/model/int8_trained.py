"""Weights the optimizer updates, stored in int8 (``engine.weight_dtype: int8`` for methods that
update dense weights: full, apollo, apollo_mini, fira, galore_weights, muon, dion; ZeRO 0, bf16 masters).

Each of the blocks' bias-free projections (q/k/v/o, gate/up/down; embeddings, norms, the head and
Qwen2's biased q/k/v stay bf16)
keeps its weight as int8 codes (``weight_codes``, a frozen param) and fp32 scales
(``weight_scale``), the format of ``int8_weights`` (one scale per ``BLOCK`` elements of a row,
1 + 4/256 bytes per element), and a count of its updates (``weight_updates``, a buffer). Its
``weight`` stays the trainable param that the optimizer, the per-layer hooks and the param groups
know, with its m×n shape, but between steps it holds no values: its data is one bf16 element
expanded to m×n (2 bytes).

- Forward and backward dequantise the codes (one m×n transient per call) and autograd saves the
  codes, not a 16-bit weight; backward returns ``dW = dyᵀ·x`` for ``weight``, accumulated into
  ``weight.grad`` as for any weight.
- A step of such a weight (``updating``, which ``steps_through_codes`` puts around the
  optimizer's update of each one): its data becomes the dequantised fp32 matrix, the optimizer
  updates it in fp32 as it would a master, and the result is re-quantised into the codes and scales
  with stochastic rounding (``floor(x/scale + u)``, unbiased, so updates smaller than a code's
  step still move the weight in expectation), the placeholder back. One matrix is whole at a time.
  The rounding draws are keyed by the matrix's index, its update count and the row: every rank
  draws the same bits (ZeRO-0 replicas stay identical), per-layer updates equal an ordinary step,
  and a resumed run draws what the straight run did.
- Checkpoints hold the codes under ``weight`` beside ``weight_scale``, the layout of a frozen int8
  base, so ``int8_weights.dequantised`` turns both into fp32 weights (export, hand-over).

Why not ZeRO 1-3: DeepSpeed copies every trainable param into its flat bf16 groups (and masters)
there, so the whole 16-bit model would exist beside the codes.
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_pt.model.int8_weights import SCALE_KEY, dequantise, quantise, scale_shape
from lowrank_pt.zero.method_buffers import method_buffer

CODES_KEY = "weight_codes"
UPDATES_KEY = "weight_updates"
ROWS_PER_DRAW = 256
"""Rows re-quantised at a time, each run of rows with its own keyed draws: the fp32 working copies
stay a few MB whatever the matrix."""
_OWNER = "int8_trained_owner"

RowGenerator = Callable[[int, int, int], torch.Generator]
"""``(update count, matrix index, first row) -> generator`` of one run of rows' rounding draws."""


class _TrainedInt8Linear(torch.autograd.Function):
    """``x·Wᵀ`` with ``W`` given by codes and scales; the gradient of ``W`` goes to ``weight``
    (the placeholder). Saves the codes and ``x``, as a linear saves its weight and input."""

    @staticmethod
    def forward(ctx, x, codes, scale, weight):
        ctx.save_for_backward(x, codes, scale)
        return F.linear(x, dequantise(codes, scale, x.dtype))

    @staticmethod
    def backward(ctx, dy):
        x, codes, scale = ctx.saved_tensors
        dx = dy @ dequantise(codes, scale, dy.dtype) if ctx.needs_input_grad[0] else None
        dw = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return dx, None, None, dw


class Int8TrainedLinear(nn.Linear):
    """A bias-free ``nn.Linear`` whose weight lives in int8 codes (see the module doc); made by
    ``store`` from a plain one, never built directly."""

    index: int = 0
    """The matrix's place among the model's int8 weights (the key of its rounding draws)."""

    def forward(self, x):
        return _TrainedInt8Linear.apply(x, self.weight_codes, self.weight_scale, self.weight)

    def _apply(self, fn, recurse=True):
        # ``module.to(device)`` on an m×n expanded placeholder would allocate all of it: move
        # its one element, then expand it again.
        p = self.weight
        shape = p.shape
        p.data = p.data[:1, :1]
        try:
            return super()._apply(fn, recurse)
        finally:
            p.data = p.data.expand(shape)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = destination.pop(prefix + CODES_KEY)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        targets = {"weight": self.weight_codes, SCALE_KEY: self.weight_scale, UPDATES_KEY: self.weight_updates}
        for name, target in targets.items():
            value = state_dict.get(prefix + name)
            if value is None:
                missing_keys.append(prefix + name)
            elif value.shape != target.shape or value.dtype != target.dtype:
                error_msgs.append(f"{prefix}{name}: the checkpoint holds {value.dtype} {tuple(value.shape)}, "
                                  f"the int8 weight needs {target.dtype} {tuple(target.shape)} (saved with "
                                  "another engine.weight_dtype?)")
            else:
                with torch.no_grad():
                    target.copy_(value)


def is_placeholder(p: torch.Tensor) -> bool:
    """Whether ``p`` is the trainable stand-in of an int8 weight."""
    return getattr(p, _OWNER, None) is not None


def owner(p: torch.Tensor) -> Int8TrainedLinear:
    return getattr(p, _OWNER)()


def _placeholder_data(shape: tuple[int, int], device) -> torch.Tensor:
    return torch.zeros(1, 1, dtype=torch.bfloat16, device=device).expand(shape)


def store(model: nn.Module, names: tuple[str, ...] = ("layers.",)) -> int:
    """Store the trainable weight of every bias-free ``nn.Linear`` under ``names`` (the blocks) as
    int8 codes and scales, rounded to nearest; returns how many. Before the engine exists (its
    params are bf16 from here on: int8 weights need ``engine.precision: bf16``)."""
    count = 0
    for name, m in model.named_modules():
        if type(m) is not nn.Linear or m.bias is not None or not name.startswith(names):
            continue
        w = m.weight
        if not w.requires_grad:
            continue
        if w.device.type == "meta":
            codes = torch.empty(w.shape, dtype=torch.int8, device="meta")
            scale = torch.empty(scale_shape(tuple(w.shape)), device="meta")
        else:
            codes, scale = quantise(w.detach())
        m.__class__ = Int8TrainedLinear
        m.index = count
        m.weight_codes = nn.Parameter(codes, requires_grad=False)
        m.weight_scale = method_buffer(scale)
        m.register_buffer(UPDATES_KEY, torch.zeros((), dtype=torch.int64, device=w.device))
        w.data = _placeholder_data(tuple(w.shape), w.device)
        setattr(w, _OWNER, weakref.ref(m))
        # DeepSpeed broadcasts every param from rank 0 at start; this one has nothing to send (the
        # codes are sent), and its expanded data could not be. DeepSpeed skips params so marked.
        w.ds_optim_param = True
        count += 1
    return count


def stored_numel(model: nn.Module) -> list[int]:
    """Elements of each int8 weight of ``model``."""
    return [m.weight_codes.numel() for m in model.modules() if isinstance(m, Int8TrainedLinear)]


def value(module: Int8TrainedLinear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight the codes stand for (a new tensor)."""
    return dequantise(module.weight_codes, module.weight_scale, dtype).contiguous()


@contextlib.contextmanager
def updating(p: torch.Tensor, generator: RowGenerator) -> Iterator[None]:
    """Around an optimizer's update of the int8 weight ``p``: ``p`` holds the dequantised fp32
    matrix inside, and what the update left there is stored back, stochastically rounded with
    ``generator``'s draws, as the module's codes and scales (see the module doc)."""
    module = owner(p)
    shape = p.shape
    p.data = value(module)
    try:
        yield
        count = int(module.weight_updates) + 1
        codes, scale = module.weight_codes, module.weight_scale
        with torch.no_grad():
            for row in range(0, shape[0], ROWS_PER_DRAW):
                rows = slice(row, row + ROWS_PER_DRAW)
                c, s = quantise(p.data[rows], generator(count, module.index, row))
                codes[rows], scale[rows] = c, s.to(scale.dtype)
            module.weight_updates.fill_(count)
    finally:
        p.data = _placeholder_data(tuple(shape), module.weight_codes.device)


def steps_through_codes(optimizer: torch.optim.Optimizer, generator: RowGenerator) -> torch.optim.Optimizer:
    """Make ``optimizer.step`` update each int8 weight it trains inside ``updating`` (one at a
    time, with that one alone in its group's view) and every other param as before, in one call.
    The optimizers here keep per-tensor state and step counts, so stepping tensors apart gives the
    same result as stepping them together (per-layer updates rely on it as well)."""
    inner = optimizer.step

    def step(self, closure=None):
        groups = optimizer.param_groups
        coded = [(g, p) for g in groups for p in g["params"] if is_placeholder(p) and p.grad is not None]
        if not coded:
            return inner(closure)
        try:
            optimizer.param_groups = [{**g, "params": [p for p in g["params"] if not is_placeholder(p)]}
                                      for g in groups]
            loss = inner(closure)
            for g, p in coded:
                optimizer.param_groups = [{**g, "params": [p]}]
                with updating(p, generator):
                    inner()
        finally:
            optimizer.param_groups = groups
        return loss

    optimizer.step = types.MethodType(step, optimizer)  # bound, as LR schedulers expect to wrap it
    return optimizer


def largest_step_bytes(numels: list[int]) -> int:
    """What a step of int8 weights holds beyond the stored ones: the largest matrix dequantised in
    fp32 (the optimizer updates it there) and, while it is dequantised, the fp32 blocks it is made
    from (8 bytes an element at the peak); the re-quantisation works a run of rows at a time."""
    return 8 * max(numels, default=0)
