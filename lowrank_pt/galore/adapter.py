"""The frozen-projector adapter: GaLore as ordinary parameters that DeepSpeed shards like any other.

A targeted linear becomes ``W = d·W0 + α·B·Q`` (right side) or ``d·W0 + α·P·B`` (left side):

- ``weight`` — ``W0``, frozen (a frozen param, or an fp32 buffer with ``base_in_fp32``);
- ``galore_b`` — ``B``, the only trainable part, low-rank shaped (m×r or r×n), zero between
  refreshes' merges; Adam on ``B`` with eps ``α·eps`` is GaLore-Adam on ``W``;
- ``galore_basis`` — ``Q``/``P``, a frozen parameter marked as a method buffer
  (``lowrank_pt.frozen``) in ``projector_dtype`` (fp32 or bf16): ZeRO-3 partitions it like the
  weights and gathers it with its layer; checkpointed like any frozen param; the method writes
  it through ``zero_io``, the same value on every rank;
- ``galore_decay`` — ``d``, a persistent scalar that carries decoupled weight decay of ``W0``
  lazily (``d *= 1 - lr·wd`` each step, folded into ``W0`` at the next merge) so no step rewrites
  the full base.

Forward and ``dx`` run at full-rank cost on ``W_eff`` materialised once per call; the backward
never forms the m×n weight gradient: ``dB = α·dyᵀ·(x·Qᵀ)`` (or ``α·(dy·P)ᵀ·x``). Only at a
refresh, when ``capture`` holds a ``lowrank_pt.galore.capture`` object, does it also hand
each micro-batch's ``dy`` and ``x`` over: the capture forms the full gradient ``dyᵀ·x`` or only
its two sketches, summed onto one owner rank.
``W_eff`` is recomputed in backward instead of saved: one m×n·r product per call, and under
ZeRO-3 nothing full-size outlives the layer's gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_pt.frozen import method_buffer
from lowrank_pt.galore import projector
from lowrank_pt.model import whole
from lowrank_pt.targets import replace_linears, select_linears


def effective_weight(w0, b, basis, decay, scale: float, side: str, dtype, use_decay: bool):
    """``d·W0 + α·B·Q`` (or ``d·W0 + α·P·B``) in float32, returned in ``dtype``."""
    b32, q32 = b.float(), basis.float()
    delta = b32 @ q32 if side == "right" else q32 @ b32
    base = w0.float()
    if use_decay:
        base = base * decay.float()
    return base.add(delta, alpha=scale).to(dtype)


class _GaLoreLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w0, b, basis, decay, layer):
        ctx.layer = layer
        ctx.save_for_backward(x, w0, b, basis, decay)
        w = effective_weight(w0, b, basis, decay, layer.scale, layer.side, x.dtype, layer.use_decay)
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, dy):
        x, w0, b, basis, decay = ctx.saved_tensors
        layer = ctx.layer
        dx = db = None
        if ctx.needs_input_grad[0]:
            w = effective_weight(w0, b, basis, decay, layer.scale, layer.side, dy.dtype, layer.use_decay)
            dx = dy @ w
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        capture = layer.capture
        if capture is not None and getattr(capture, "in_backward", False):
            new = capture.refresh(dy2, x2, basis)  # a refresh inside this backward: B's gradient in the new basis
            if new is not None:
                basis = new
            capture = None
        if ctx.needs_input_grad[2]:
            if layer.side == "right":  # dB = α·dyᵀ·(x·Qᵀ): m×r
                db = dy2.t() @ (x2 @ (basis.t() * layer.scale).to(x2.dtype))
            else:  # dB = α·(dy·P)ᵀ·x: r×n
                db = (dy2 @ (basis * layer.scale).to(dy2.dtype)).t() @ x2
            db = db.to(b.dtype)
        if capture is not None:  # a refresh step: the full gradient or its sketches
            capture.add_factors(dy2, x2, basis)
        return dx, None, db, None, None, None


class GaLoreLinear(nn.Module):
    """A bias-free or biased linear trained by GaLore through a frozen projector (see module doc)."""

    def __init__(self, linear: nn.Linear, rank: int, scale: float, proj_type: str,
                 base_in_fp32: bool = False, projector_dtype: torch.dtype = torch.float32):
        super().__init__()
        shape = (linear.out_features, linear.in_features)  # a ZeRO-3 param's own shape is its empty placeholder's
        self.out_features, self.in_features = shape
        self.side = projector.projection_side(shape, proj_type)
        self.rank = projector.effective_rank(shape, rank)
        self.scale = float(scale)
        self.use_decay = False
        self.capture = None  # a GradientCapture or SketchCapture, set by the method for a refresh step
        self.capture_kind = "gradient"
        """What a refresh captures (set by the method): gradient, sketch, or backward (refreshed in it)."""
        self.capture_numel = self.out_features * self.in_features
        """fp32 elements the owner holds at a refresh (the full gradient, or the sketches: set by the method)."""
        self.refresh_held: tuple[int, int, int] | None = None
        """A refresh in backward: (elements, bytes each) of the new basis kept until the step, and
        r where the r×r change of basis is kept too (else 0)."""
        self.refresh_working = 0
        """A refresh in backward: fp32 elements alive while this matrix's subspace is computed."""
        w0 = linear.weight
        if base_in_fp32:
            with whole(w0):  # a buffer is never partitioned: it takes the full value
                self.register_buffer("weight", w0.detach().float().clone())
        else:  # the linear's own param, frozen: ZeRO keeps it partitioned and checkpoints its name
            w0.requires_grad_(False)
            self.weight = w0
        self.bias = linear.bias
        low = projector.low_rank_shape(shape, self.rank, self.side)
        self.galore_b = nn.Parameter(torch.zeros(low, dtype=w0.dtype, device=w0.device))
        basis = projector.basis_shape(shape, self.rank, self.side)
        # .to() after building: under deepspeed.zero.Init torch.zeros yields the training dtype.
        self.galore_basis = method_buffer(torch.zeros(basis, device=w0.device).to(projector_dtype))
        self.register_buffer("galore_decay", torch.ones((), dtype=torch.float32, device=w0.device))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def forward(self, x):
        y = _GaLoreLinearFn.apply(x, self.weight, self.galore_b, self.galore_basis, self.galore_decay, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def merged(self, weight, b, basis, decay) -> torch.Tensor:
        """The plain weight ``d·W0 + α·back(B)`` (float32) from full values of the pieces."""
        return effective_weight(weight, b, basis, decay, self.scale, self.side, torch.float32, True)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, side={self.side}, "
                f"scale={self.scale}")


def merged_state_dict(state: dict[str, torch.Tensor], scale: float, proj_type: str) -> dict[str, torch.Tensor]:
    """The plain model's state dict from a GaLore-wrapped one: ``weight = d·W0 + α·back(B)``,
    the adapter's tensors dropped. ``state`` holds full tensors; it is not modified. The side
    of each matrix follows from its shape and ``proj_type``, as when it was wrapped."""
    prefixes = [k[: -len(".galore_b")] for k in state if k.endswith(".galore_b")]
    out = dict(state)
    for prefix in prefixes:
        b, basis = out.pop(f"{prefix}.galore_b"), out.pop(f"{prefix}.galore_basis")
        decay = out.pop(f"{prefix}.galore_decay", torch.ones(()))
        w0 = out[f"{prefix}.weight"]
        side = projector.projection_side(tuple(w0.shape), proj_type)
        out[f"{prefix}.weight"] = effective_weight(w0, b, basis, decay, scale, side, torch.float32, True)
    return out


def wrap_linears(model: nn.Module, patterns, rank: int, scale: float, proj_type: str,
                 base_in_fp32: bool = False, projector_dtype: torch.dtype = torch.float32) -> dict[str, GaLoreLinear]:
    """Replace every targeted ``nn.Linear`` (``lowrank_pt.targets``: each pattern must match, tied
    weights are skipped) by a ``GaLoreLinear``, in place. Returns the adapters by module name, in
    ``model.named_modules()`` order."""
    make = lambda _i, _n, linear: GaLoreLinear(linear, rank, scale, proj_type, base_in_fp32,  # noqa: E731
                                               projector_dtype)
    return replace_linears(model, select_linears(model, patterns), make)
