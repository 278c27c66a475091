"""CoLA's linear: ``y = B·σ(A·x) (+ bias)``, a bottleneck of rank r with a nonlinearity inside, in
place of a dense linear from the first step. The model has no dense form: ``σ`` sits between the
factors, so no m×n matrix computes the same function.

- ``A`` (r×n) and ``B`` (m×r) are drawn N(0, 1)·r^(−1/4)·(m + n)^(−1/4), the published
  initialisation (the product's entries then have the variance of a ``1/√(m+n)`` dense init);
  ``σ`` is SiLU, the published choice.
- ``recompute`` (CoLA-M): the low-rank activations ``A·x`` and ``σ(A·x)`` are not kept for backward
  but formed again from the saved input, with the same operations (one more r×n product per
  token), so outputs and gradients are bit for bit those of the plain form (tested on CPU, fp32
  and bf16) while each linear keeps 2·r fewer values per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_pt.model.lowrank_linear import seeded_generator
from lowrank_pt.model.targets import replace_linears, select_linears

KEYS = ("cola_A", "cola_B")


def bottleneck(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``σ(x·Aᵀ)·Bᵀ``: the one expression both forms compute."""
    return F.linear(F.silu(F.linear(x, A)), B)


class _Recomputed(torch.autograd.Function):
    """``bottleneck`` keeping only its input and factors: the backward runs the same operations
    again under autograd and differentiates them."""

    @staticmethod
    def forward(ctx, x, A, B):
        ctx.save_for_backward(x, A, B)
        return bottleneck(x, A, B)

    @staticmethod
    def backward(ctx, dy):
        x, A, B = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(need) for t, need in zip((x, A), ctx.needs_input_grad)]
        with torch.enable_grad():
            h = F.silu(F.linear(*inputs))
        # The outer product's backward as autograd forms it for F.linear (the same kernels, so
        # the same bits on CPU, tested), without forming B·h again.
        dB = dy.reshape(-1, dy.shape[-1]).t().mm(h.detach().reshape(-1, h.shape[-1])) if ctx.needs_input_grad[2] else None
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(h, wanted, dy.matmul(B)) if wanted else ())
        return (*(next(grads) if t.requires_grad else None for t in inputs), dB)


class LowRankActivationLinear(nn.Module):
    """``y = B·σ(A·x) + bias`` in place of an ``nn.Linear`` (whose weight is dropped; its bias, if any,
    is kept as it is)."""

    def __init__(self, base: nn.Linear, rank: int, seed: int, index: int, recompute: bool = False):
        super().__init__()
        m, n = base.out_features, base.in_features
        if not 1 <= rank <= min(m, n):
            raise ValueError(f"rank={rank} must be in [1, min(out, in) = {min(m, n)}]")
        self.in_features, self.out_features, self.rank = n, m, rank
        self.recompute = recompute
        std = rank ** -0.25 * (m + n) ** -0.25
        device, dtype = base.weight.device, base.weight.dtype
        draw = lambda shape, part: (torch.randn(shape, generator=seeded_generator("cola", seed, index, part))  # noqa: E731
                                    .mul_(std).to(device, dtype))
        self.cola_A = nn.Parameter(draw((rank, n), "A"))
        self.cola_B = nn.Parameter(draw((m, rank), "B"))
        self.register_parameter("bias", base.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            out = _Recomputed.apply(x, self.cola_A, self.cola_B)
        else:
            out = bottleneck(x, self.cola_A, self.cola_B)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"sigma=silu{', recompute' if self.recompute else ''}")


def rank_of(out_features: int, in_features: int, rank: int | None, rank_fraction: float) -> int:
    """r of one linear: ``rank`` where given, else ``rank_fraction`` of its smaller side (at least 1)."""
    return rank if rank is not None else max(1, round(rank_fraction * min(out_features, in_features)))


def wrap_linears(model: nn.Module, target_patterns: list[str] | None, rank: int | None, rank_fraction: float,
                 seed: int = 0, recompute: bool = False) -> list[str]:
    """Replace every targeted linear by a ``LowRankActivationLinear`` (the i-th drawn from
    ``(seed, i)``); return their names in module order."""
    targets = select_linears(model, target_patterns)
    make = lambda index, _, linear: LowRankActivationLinear(  # noqa: E731
        linear, rank_of(linear.out_features, linear.in_features, rank, rank_fraction), seed, index, recompute)
    return list(replace_linears(model, targets, make))
