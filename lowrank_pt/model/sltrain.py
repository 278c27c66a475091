"""SLTrain's linear: ``W = s·B·A + S``, a low-rank product plus a sparse matrix on a fixed random
support, trained from the first step (no dense weight exists while it trains).

- ``A`` (r×n) Kaiming-uniform (a = √5, ``nn.Linear``'s own), ``B`` (m×r) zero, ``s = alpha / r``;
  ``S``'s values U(−1/√n, 1/√n), on ``round(density·m·n)`` positions drawn uniformly without
  replacement: the published initialisation.
- The support is a function of ``(seed, module index)`` (``support``): only the two integers are
  stored (the ``sparse_key`` buffer), so checkpoints, ZeRO partitions and exports carry no index
  array. Each process draws it once, on the CPU whatever the device (the same positions
  everywhere), and keeps it as ``support`` (int32 where m·n < 2³¹): 4 bytes per value, on every
  rank, counted by the planner and the tracker as ``step_cache``.
- Forward forms the dense ``W`` (one matrix at a time) and computes ``x·Wᵀ``; the backward forms it
  again rather than keeping it, so what a linear saves for backward is its input, as a dense
  linear's. The gradients are the dense expression's: ``dW = dyᵀ·x``, ``dA = s·Bᵀ·dW``,
  ``dB = s·dW·Aᵀ``, ``dS = dW`` on the support.

``dense_weight`` gives the plain model's weight (export, a following stage, generation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_pt.model.lowrank_linear import init_lora_A, seeded_generator
from lowrank_pt.model.targets import replace_linears, select_linears

KEYS = ("sltrain_A", "sltrain_B", "sparse_values", "sparse_key")
"""What a ``SparseLowRankLinear`` holds in a state dict, besides an optional ``bias``."""


def support_size(out_features: int, in_features: int, density: float) -> int:
    """Entries of ``S``: ``round(density·m·n)``, at least one."""
    return max(1, round(density * out_features * in_features))


def support(out_features: int, in_features: int, count: int, seed: int, index: int) -> torch.Tensor:
    """The sorted flat positions (row-major in the m×n weight) of ``S``'s ``count`` values, drawn
    uniformly without replacement from ``(seed, index)``: the same on every rank and machine."""
    numel = out_features * in_features
    positions = torch.randperm(numel, generator=seeded_generator("sltrain-support", seed, index))[:count]
    positions = positions.sort().values
    return positions.to(torch.int32) if numel < 2**31 else positions


def dense_weight(A: torch.Tensor, B: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """``s·B·A + S`` (m×n) in the factors' dtype."""
    w = (B @ A).mul_(scale)
    return w.view(-1).index_add_(0, positions.to(w.device), values.to(w.dtype)).view_as(w)


class _SparseLowRank(torch.autograd.Function):
    """``x·(s·B·A + S)ᵀ``, keeping ``x`` and the factors for backward, never the dense weight."""

    @staticmethod
    def forward(ctx, x, A, B, values, positions, scale):
        ctx.save_for_backward(x, A, B, values)
        ctx.positions, ctx.scale = positions, scale
        return F.linear(x, dense_weight(A, B, values, positions, scale))

    @staticmethod
    def backward(ctx, dy):
        x, A, B, values = ctx.saved_tensors
        positions, scale = ctx.positions, ctx.scale
        w = dense_weight(A, B, values, positions, scale)
        dx = dy @ w if ctx.needs_input_grad[0] else None
        del w
        dw = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        dA = (B.t() @ dw).mul_(scale)
        dB = (dw @ A.t()).mul_(scale)
        dvalues = dw.view(-1).index_select(0, positions.to(dw.device).long())
        return dx, dA, dB, dvalues, None, None


class SparseLowRankLinear(nn.Module):
    """``y = x·(s·B·A + S)ᵀ + bias`` in place of an ``nn.Linear`` (whose weight is dropped; its bias,
    if any, is kept as it is)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, density: float, seed: int, index: int):
        super().__init__()
        m, n = base.out_features, base.in_features
        if not 1 <= rank <= min(m, n):
            raise ValueError(f"rank={rank} must be in [1, min(out, in) = {min(m, n)}]")
        self.in_features, self.out_features, self.rank = n, m, rank
        self.density, self.count = density, support_size(m, n, density)
        device, dtype = base.weight.device, base.weight.dtype
        self.sltrain_A = nn.Parameter(init_lora_A(rank, n, seeded_generator("sltrain", seed, index, "A"))
                                      .to(device, dtype))
        self.sltrain_B = nn.Parameter(torch.zeros(m, rank, device=device, dtype=dtype))
        bound = 1.0 / math.sqrt(n)
        values = torch.empty(self.count).uniform_(-bound, bound, generator=seeded_generator("sltrain", seed, index, "S"))
        self.sparse_values = nn.Parameter(values.to(device, dtype))
        self.register_parameter("bias", base.bias)
        self.scale = float(alpha) / rank
        # Travels with the weights (checkpoints, exports): with alpha, what gives the dense form. An
        # integer buffer, which no bf16 cast touches.
        self.register_buffer("sparse_key", torch.tensor([seed, index], dtype=torch.int64))
        self.support: torch.Tensor | None = None
        """The positions of S, drawn at the first forward (not a buffer: never saved nor partitioned)."""

    def positions(self) -> torch.Tensor:
        if self.support is None:
            seed, index = (int(v) for v in self.sparse_key.tolist())
            self.support = support(self.out_features, self.in_features, self.count, seed, index).to(
                self.sparse_values.device)
        return self.support

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _SparseLowRank.apply(x, self.sltrain_A, self.sltrain_B, self.sparse_values, self.positions(), self.scale)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"density={self.density:g} ({self.count} values), scale={self.scale:g}")


def wrap_linears(model: nn.Module, target_patterns: list[str] | None, rank: int, alpha: float, density: float,
                 seed: int = 0) -> list[str]:
    """Replace every targeted linear by a ``SparseLowRankLinear`` (the i-th drawn from ``(seed, i)``);
    return their names in module order."""
    targets = select_linears(model, target_patterns)
    return list(replace_linears(model, targets,
                                lambda index, _, linear: SparseLowRankLinear(linear, rank, alpha, density, seed, index)))


def dense_state_dict(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The plain model's state dict from a full state dict of an SLTrain model trained with
    ``alpha``: each ``s·B·A + S`` (``s = alpha / r``) as ``PREFIX.weight`` (fp32), the factors and
    values dropped. ``state`` is not modified."""
    prefixes = {k[: -len(".sltrain_A")] for k in state if k.endswith(".sltrain_A")}
    out = {k: v for k, v in state.items() if k.rpartition(".")[0] not in prefixes or k.rpartition(".")[2] not in KEYS}
    for prefix in prefixes:
        A, B = state[f"{prefix}.sltrain_A"].float(), state[f"{prefix}.sltrain_B"].float()
        values = state[f"{prefix}.sparse_values"].float()
        seed, index = (int(v) for v in state[f"{prefix}.sparse_key"].tolist())
        positions = support(B.shape[0], A.shape[1], values.numel(), seed, index)
        out[f"{prefix}.weight"] = dense_weight(A, B, values, positions, float(alpha) / A.shape[0])
    return out
