"""The frozen-projector adapter: GaLore as ordinary parameters that DeepSpeed shards like any other.

A targeted linear becomes ``W = d·W0 + α·B·Q`` (right side) or ``d·W0 + α·P·B`` (left side):

- ``weight`` — ``W0``, frozen (a frozen param, an fp32 buffer with ``base_in_fp32``, or int8
  codes with ``weight_scale`` beside them: ``lowrank_pt.model.int8_weights``, dequantised at each use);
- ``galore_b`` — ``B``, the only trainable part, low-rank shaped (m×r or r×n), zero between
  refreshes' merges; Adam on ``B`` with eps ``α·eps`` is GaLore-Adam on ``W``;
- ``galore_basis`` — ``Q``/``P``, a frozen parameter marked as a method buffer
  (``lowrank_pt.zero.method_buffers``) in ``projector_dtype`` (fp32 or bf16): ZeRO-3 partitions it like the
  weights and gathers it with its layer; checkpointed like any frozen param; the method writes
  it through ``zero_io``, the same value on every rank;
- ``galore_decay`` — ``d``, a persistent scalar that carries decoupled weight decay of ``W0``
  lazily (``d *= 1 - lr·wd`` each step, folded into ``W0`` at the next merge) so no step rewrites
  the full base.

Forward and ``dx`` run at full-rank cost on ``W_eff`` or on W0 and the factors, by the layer's
``forward_path`` (``lowrank_pt.methods.galore.cost``: built per call, built once per optimizer step and
kept through its micro-batches, or never built); the backward never forms the m×n weight
gradient: ``dB = α·dyᵀ·(x·Qᵀ)`` (or ``α·(dy·P)ᵀ·x``). Only at a refresh, when ``capture`` holds a
``lowrank_pt.methods.galore.capture`` object, does it also hand each micro-batch's ``dy`` and ``x``
over: the capture forms the full gradient ``dyᵀ·x`` or only its two sketches, summed onto one
owner rank. On the ``call`` path ``W_eff`` is recomputed in backward instead of saved: one
m×n·r product per call, and under ZeRO-3 nothing full-size outlives the layer's gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_pt.model import int8_weights
from lowrank_pt.model.targets import replace_linears, select_linears
from lowrank_pt.optim import projector
from lowrank_pt.zero.method_buffers import method_buffer
from lowrank_pt.zero.params import gathered


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
        xq = None  # the factored path's α·x·Qᵀ (right side), reused by B's gradient
        if layer.forward_path == "factored":
            x2 = x.reshape(-1, x.shape[-1])
            y = _scaled_base(F.linear(x2, layer.base_as(w0, x2.dtype)), decay, layer)
            if layer.side == "right":  # d·x·W0ᵀ + (α·x·Qᵀ)·Bᵀ
                xq = x2 @ (basis.t() * layer.scale).to(x2.dtype)
                y = y + xq @ b.t().to(x2.dtype)
            else:  # d·x·W0ᵀ + (α·x·Bᵀ)·Pᵀ
                y = y + (x2 @ (b.t() * layer.scale).to(x2.dtype)) @ basis.t().to(x2.dtype)
            y = y.reshape(*x.shape[:-1], layer.out_features)
        else:
            y = F.linear(x, layer.weight_for(w0, b, basis, decay, x.dtype))
        ctx.save_for_backward(x, w0, b, basis, decay, xq)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w0, b, basis, decay, xq = ctx.saved_tensors
        layer = ctx.layer
        dx = db = dyp = None
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[0]:
            if layer.forward_path == "factored":  # d·dy·W0 + (α·dy·B)·Q  (or (α·dy·P)·B)
                dx = _scaled_base(dy2 @ layer.base_as(w0, dy2.dtype), decay, layer)
                if layer.side == "right":
                    dx = dx + (dy2 @ (b * layer.scale).to(dy2.dtype)) @ basis.to(dy2.dtype)
                else:
                    dyp = dy2 @ (basis * layer.scale).to(dy2.dtype)
                    dx = dx + dyp @ b.to(dy2.dtype)
                dx = dx.reshape(x.shape)
            else:
                dx = dy @ layer.weight_for(w0, b, basis, decay, dy.dtype)
        capture = layer.capture
        if capture is not None and getattr(capture, "in_backward", False):
            new = capture.refresh(dy2, x2, basis)  # a refresh inside this backward: B's gradient in the new basis
            if new is not None:
                basis, xq, dyp = new, None, None
            capture = None
        if ctx.needs_input_grad[2]:
            if layer.side == "right":  # dB = α·dyᵀ·(x·Qᵀ): m×r
                xq = xq if xq is not None else x2 @ (basis.t() * layer.scale).to(x2.dtype)
                db = dy2.t() @ xq
            else:  # dB = α·(dy·P)ᵀ·x: r×n
                dyp = dyp if dyp is not None else dy2 @ (basis * layer.scale).to(dy2.dtype)
                db = dyp.t() @ x2
            db = db.to(b.dtype)
        if capture is not None:  # a refresh step: the full gradient or its sketches
            capture.add_factors(dy2, x2, basis)
        return dx, None, db, None, None, None


def _scaled_base(y, decay, layer):
    """``d·y`` where the layer carries decoupled weight decay of W0, else ``y``."""
    return y * decay.to(y.dtype) if layer.use_decay else y


class GaLoreLinear(nn.Module):
    """A bias-free or biased linear trained by GaLore through a frozen projector (see module doc)."""

    has_frozen_base = True
    """``weight`` is frozen: ``int8_weights.store_bases`` may store it in int8."""

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
        """A refresh in backward (or by sketch): (elements, bytes each) of the new basis kept until
        the step (until after it), and r where the r×r change of basis is kept too (else 0)."""
        self.refresh_working = 0
        """A refresh in backward: fp32 elements alive while this matrix's subspace is computed."""
        self.forward_path = "call"
        """How forward and backward use W (``lowrank_pt.methods.galore.cost``; set by the method): call, step or factored."""
        self.w_eff: torch.Tensor | None = None
        """The ``step`` path's W_eff, kept from the step's first forward until ``close_step``."""
        self._step_open = False
        w0 = linear.weight
        if base_in_fp32:
            with gathered([w0], modifier_rank=0):  # a buffer is never partitioned: it takes the full value
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

    def open_step(self) -> None:
        """An optimizer step's micro-batches start: on the ``step`` path, W_eff is built at the
        first forward and reused until ``close_step`` (B, Q, d and W0 do not change meanwhile)."""
        self._step_open = self.forward_path == "step"
        self.w_eff = None

    def close_step(self) -> None:
        """Before anything moves the weights (the optimizer step, a refresh's install): drop W_eff."""
        self._step_open = False
        self.w_eff = None

    def base_as(self, w0: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The stored base ``w0`` (this layer's ``weight``) in ``dtype``: an int8 one dequantised."""
        return int8_weights.dequantise(w0, self.weight_scale, dtype) if int8_weights.is_int8(self) else w0.to(dtype)

    def weight_for(self, w0, b, basis, decay, dtype) -> torch.Tensor:
        """W_eff in ``dtype``: the step's kept copy inside an open step, else built now."""
        w0 = self.base_as(w0, torch.float32) if int8_weights.is_int8(self) else w0
        if not self._step_open:
            return effective_weight(w0, b, basis, decay, self.scale, self.side, dtype, self.use_decay)
        if self.w_eff is None or self.w_eff.dtype != dtype:
            self.w_eff = effective_weight(w0, b, basis, decay, self.scale, self.side, dtype, self.use_decay)
        return self.w_eff

    def forward(self, x):
        y = _GaLoreLinearFn.apply(x, self.weight, self.galore_b, self.galore_basis, self.galore_decay, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def merged(self, weight, b, basis, decay) -> torch.Tensor:
        """The plain weight ``d·W0 + α·back(B)`` (float32) from full values of the pieces."""
        return effective_weight(weight, b, basis, decay, self.scale, self.side, torch.float32, True)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, side={self.side}, "
                f"scale={self.scale}, forward={self.forward_path}")


def merged_state_dict(state: dict[str, torch.Tensor], scale: float, proj_type: str) -> dict[str, torch.Tensor]:
    """The plain model's state dict from a GaLore-wrapped one: ``weight = d·W0 + α·back(B)``,
    the adapter's tensors dropped. ``state`` holds full tensors; it is not modified (an int8 base
    is dequantised first). The side of each matrix follows from its shape and ``proj_type``, as
    when it was wrapped."""
    state = int8_weights.dequantised(state)
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
    """Replace every targeted ``nn.Linear`` (``lowrank_pt.model.targets``: each pattern must match, tied
    weights are skipped) by a ``GaLoreLinear``, in place. Returns the adapters by module name, in
    ``model.named_modules()`` order."""
    make = lambda _i, _n, linear: GaLoreLinear(linear, rank, scale, proj_type, base_in_fp32,  # noqa: E731
                                               projector_dtype)
    return replace_linears(model, select_linears(model, patterns), make)
