"""The low-rank linear of LoRA and ReLoRA (GaLore's frozen projector is ``galore/adapter.py``).

A targeted ``nn.Linear`` becomes ``y = x·W0ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ`` with ``W0`` frozen, ``A`` (r×n)
and ``B`` (m×r) trainable, ``s = alpha / r``. Every piece is an ordinary parameter or buffer, so
DeepSpeed partitions, masters and checkpoints them at every ZeRO stage without special cases.

Names stay those of the plain model plus two factors and the scale (``q_proj.weight``,
``q_proj.lora_A``, ``q_proj.lora_B``, ``q_proj.lora_scale``): ``merged_state_dict`` folds them back
into the plain model's state dict for the next recipe stage or an export.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_pt.targets import replace_linears, select_linears

_ADAPTER_KEYS = ("lora_A", "lora_B", "lora_scale")


def seeded_generator(*parts) -> torch.Generator:
    """A CPU generator seeded from ``parts`` (ints, strings) through a stable hash.

    The same parts give the same stream in every process, unlike Python's ``hash`` or the global
    RNG, which is what keeps re-initialisations identical on every rank.
    """
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def init_lora_A(rank: int, in_features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh fp32 ``A`` (rank × in_features): Kaiming-uniform with a=√5, nn.Linear's own init
    (U(-1/√n, 1/√n))."""
    a = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """``W0 + s·B·A`` computed in fp32, returned in ``weight``'s dtype (a bf16 ``W0`` is rounded)."""
    delta = lora_B.detach().float() @ lora_A.detach().float()
    return (weight.detach().float() + scale * delta).to(weight.dtype)


class LowRankLinear(nn.Module):
    """``nn.Linear`` with a frozen base ``weight`` and a trainable low-rank update ``s·B·A``.

    At init ``B = 0``, so the module computes exactly what ``base`` did. ``weight`` (and ``bias``)
    are ``base``'s own parameters, moved here so ZeRO-3 gathers them with the factors and
    checkpoints keep their plain names; ``bias`` keeps its ``requires_grad``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank={rank} must be >= 1")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        w = base.weight
        w.requires_grad_(False)
        self.weight = w
        self.register_parameter("bias", base.bias)
        self.lora_A = nn.Parameter(init_lora_A(rank, self.in_features, generator).to(w.device, w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        # The scale travels with the weights (checkpoints, full_state_dict) so merged_state_dict
        # needs nothing else. DeepSpeed casts params only, so it stays fp32 under bf16.
        self.register_buffer("lora_scale", torch.tensor(self.scale, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def wrap_linears(model: nn.Module, target_patterns: list[str] | None, rank: int, alpha: float,
                 dropout: float = 0.0, seed: int = 0) -> list[str]:
    """Replace every targeted ``nn.Linear`` (``lowrank_pt.targets``) by a ``LowRankLinear``; return
    the wrapped names in module order. ``A`` of the i-th wrapped module is drawn from
    ``seeded_generator(seed, 0, i)``: the same on every rank, the global RNG untouched.
    """
    targets = select_linears(model, target_patterns)
    make = lambda index, _, linear: LowRankLinear(linear, rank, alpha, dropout,  # noqa: E731
                                                  generator=seeded_generator(seed, 0, index))
    return list(replace_linears(model, targets, make))


def lowrank_modules(model: nn.Module) -> list[tuple[str, LowRankLinear]]:
    """The wrapped modules in module order (the index used for seeding re-inits)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear)]


def merged_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain model's state dict from a wrapped model's: ``weight + s·B·A``, adapters dropped.

    ``state`` holds full tensors (e.g. ``zero_io.full_state_dict``); it is not modified.
    """
    prefixes = {k[: -len(".lora_A")] for k in state if k.endswith(".lora_A")}
    out = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in prefixes and leaf in _ADAPTER_KEYS:
            continue
        if prefix in prefixes and leaf == "weight":
            missing = [f"{prefix}.{k}" for k in _ADAPTER_KEYS if f"{prefix}.{k}" not in state]
            if missing:
                raise ValueError(f"merged_state_dict: {missing} missing from the state dict")
            value = merged_weight(value, state[f"{prefix}.lora_A"], state[f"{prefix}.lora_B"],
                                  float(state[f"{prefix}.lora_scale"]))
        out[key] = value
    return out
