"""The low-rank linear of LoRA and ReLoRA (GaLore's frozen projector is ``galore/adapter.py``).

A targeted ``nn.Linear`` becomes ``y = x·W0ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ`` with ``W0`` frozen, ``A`` (r×n)
and ``B`` (m×r) trainable, ``s = alpha / r`` (or ``alpha / √r``, rsLoRA). Every piece is an ordinary
parameter or buffer, so DeepSpeed partitions, masters and checkpoints them at every ZeRO stage
without special cases.

With DoRA a trainable magnitude ``m`` (one entry per output row) rescales the direction:
``y = m ⊙ x·Vᵀ / ‖V‖_row + bias`` with ``V = W0 + s·B·A`` and ``‖V‖_row`` the norm of each row of
``V`` over the input dimension (each output's column norm in DoRA's ``d×k`` notation), treated as
a constant in the backward (DoRA's section 4.3, as peft does by default).

Names stay those of the plain model plus the adapter's own (``q_proj.weight``, ``q_proj.lora_A``,
``q_proj.lora_B``, ``q_proj.lora_scale``, with DoRA ``q_proj.lora_magnitude``):
``merged_state_dict`` folds them back into the plain model's state dict for the next recipe stage
or an export.

Initialisations (``init_factors``): ``kaiming`` (A Kaiming-uniform, B = 0: the base is untouched),
and three that factor the base weight and leave the residual in it, so ``W0' + s·B·A = W0`` and the
function is kept: ``pissa`` (the r principal singular triplets), ``milora`` (the r minor ones),
``olora`` (the first r columns of W0's QR factorisation). ``lora_ga_factors`` aligns the factors with
the top singular directions of the full gradient (the method captures it at its first step).
"""

from __future__ import annotations

import contextlib
import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_pt.model import int8_weights
from lowrank_pt.model.targets import replace_linears, select_linears
from lowrank_pt.zero.params import gathered, read_whole

_ADAPTER_KEYS = ("lora_A", "lora_B", "lora_scale")
INITS = ("kaiming", "pissa", "milora", "olora", "lora_ga")
WEIGHT_INITS = ("pissa", "milora", "olora")
"""Inits computed from the base weight alone (after the stage's weights are loaded)."""
SCALINGS = ("alpha/r", "alpha/sqrt(r)")


def seeded_generator(*parts) -> torch.Generator:
    """A CPU generator seeded from ``parts`` (ints, strings) through a stable hash.

    The same parts give the same stream in every process, unlike Python's ``hash`` or the global
    RNG, which is what keeps re-initialisations identical on every rank.
    """
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def lora_scale(alpha: float, rank: int, scaling: str = "alpha/r") -> float:
    """``s``: ``alpha / r`` (LoRA) or ``alpha / √r`` (rsLoRA, rank-stabilised)."""
    if scaling == "alpha/r":
        return float(alpha) / rank
    if scaling == "alpha/sqrt(r)":
        return float(alpha) / math.sqrt(rank)
    raise ValueError(f"scaling={scaling!r}: allowed {list(SCALINGS)}")


def init_lora_A(rank: int, in_features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh fp32 ``A`` (rank × in_features): Kaiming-uniform with a=√5, nn.Linear's own init
    (U(-1/√n, 1/√n))."""
    a = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


def svd_factors(weight: torch.Tensor, rank: int, scale: float, minor: bool = False):
    """PiSSA (``minor=False``) or MiLoRA (``minor=True``) factors of ``weight`` (m×n), in fp32.

    ``W = U·diag(S)·Vᵀ``; with the r principal (or minor) triplets, ``A = diag(√(S_r/s))·V_rᵀ``,
    ``B = U_r·diag(√(S_r/s))``, so ``s·B·A = U_r·diag(S_r)·V_rᵀ``; the base keeps the residual
    ``W − s·B·A``. Returns ``(A, B, residual)``."""
    w = weight.detach().float()
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    pick = slice(S.numel() - rank, S.numel()) if minor else slice(0, rank)
    root = (S[pick] / scale).sqrt()
    A = root[:, None] * Vh[pick]
    B = U[:, pick] * root[None, :]
    return A.contiguous(), B.contiguous(), w - scale * (B @ A)


def olora_factors(weight: torch.Tensor, rank: int, scale: float):
    """OLoRA factors of ``weight`` (m×n), in fp32: ``W = Q·R`` (reduced QR), ``B = Q[:, :r]``
    (orthonormal columns), ``A = R[:r]``; the base keeps ``W − s·B·A``. Returns ``(A, B, residual)``."""
    w = weight.detach().float()
    Q, R = torch.linalg.qr(w)
    B, A = Q[:, :rank].contiguous(), R[:rank].contiguous()
    return A, B, w - scale * (B @ A)


def init_factors(kind: str, weight: torch.Tensor, rank: int, scale: float):
    """``(A, B, residual)`` of a weight-based init (``WEIGHT_INITS``), all fp32."""
    if kind == "pissa":
        return svd_factors(weight, rank, scale)
    if kind == "milora":
        return svd_factors(weight, rank, scale, minor=True)
    if kind == "olora":
        return olora_factors(weight, rank, scale)
    raise ValueError(f"init={kind!r} is not computed from the weight (those are {list(WEIGHT_INITS)})")


def _positive_peak(rows: torch.Tensor) -> torch.Tensor:
    """Each row flipped so that its largest-|value| entry is positive (a sign for every singular
    vector that does not depend on LAPACK's choice)."""
    peak = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True))
    return rows * torch.where(peak < 0, -1.0, 1.0)


def lora_ga_factors(grad: torch.Tensor, rank: int, gamma: float = 16.0):
    """LoRA-GA factors from the full gradient ``G`` (m×n) of the base weight, in fp32.

    ``G = U·diag(S)·Vᵀ``: ``A = ζ·V[:, :r]ᵀ``, ``B = ζ·U[:, r:2r]`` with ``ζ = m^¼/√γ`` (the
    paper's stable scale). A first plain-gradient step from them moves ``B·A`` by
    ``−η·s²·ζ²·(G·AᵀA/ζ² + BBᵀ·G/ζ²)``, i.e. along the best rank-2r approximation of ``G``: the
    direction of full fine-tuning's first step. Singular vectors get canonical signs (largest
    entry positive). Returns ``(A, B)``."""
    g = grad.detach().float()
    U, _, Vh = torch.linalg.svd(g, full_matrices=False)
    zeta = g.shape[0] ** 0.25 / math.sqrt(gamma)
    A = zeta * _positive_peak(Vh[:rank])
    B = zeta * _positive_peak(U[:, rank:2 * rank].t()).t()
    return A.contiguous(), B.contiguous()


def row_norms(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """``‖W0 + s·B·A‖`` of each output row (over the input dimension), fp32, no gradient: DoRA's
    norm."""
    with torch.no_grad():
        v = weight.detach().float() + scale * (lora_B.detach().float() @ lora_A.detach().float())
        return torch.linalg.vector_norm(v, dim=1)


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                  magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """``W0 + s·B·A`` computed in fp32, returned in ``weight``'s dtype (a bf16 ``W0`` is rounded);
    with a DoRA ``magnitude``, ``m ⊙ V / ‖V‖_row`` of that ``V``."""
    delta = lora_B.detach().float() @ lora_A.detach().float()
    v = weight.detach().float() + scale * delta
    if magnitude is not None:
        v = v * (magnitude.detach().float() / torch.linalg.vector_norm(v, dim=1))[:, None]
    return v.to(weight.dtype)


class _CaptureGrad(torch.autograd.Function):
    """Identity on the module's output ``y``; its backward also hands the full gradient of the
    direction ``V`` (``(g ⊙ dy)ᵀ·x``, g = DoRA's ``m/‖V‖`` or 1) to ``module.capture``."""

    @staticmethod
    def forward(ctx, y, x, row_scale, module):
        ctx.module = module
        ctx.has_scale = row_scale is not None
        ctx.save_for_backward(x, row_scale if row_scale is not None else x.new_ones(()))
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        x, row_scale = ctx.saved_tensors
        capture = ctx.module.capture
        if capture is not None:
            d = dy.reshape(-1, dy.shape[-1]).float()
            if ctx.has_scale:
                d = d * row_scale.float()
            capture.add(d.t() @ x.reshape(-1, x.shape[-1]).float())
        return dy, None, None, None


class LowRankLinear(nn.Module):
    """``nn.Linear`` with a frozen base ``weight`` and a trainable low-rank update ``s·B·A``
    (optionally DoRA's magnitude ``lora_magnitude``).

    At init ``B = 0``, so the module computes exactly what ``base`` did (DoRA: ``m = ‖W0‖_row``,
    the same function). ``weight`` (and ``bias``) are ``base``'s own parameters, moved here so
    ZeRO-3 gathers them with the factors and checkpoints keep their plain names; ``bias`` keeps
    its ``requires_grad``. ``capture`` (set by the method for one step) makes the backward also
    form the full gradient of the direction ``W0 + s·B·A`` (LoRA-GA).

    With ``base_in_fp32`` the base is an fp32 buffer instead (taken whole from ``base``), cast to
    the input's dtype at every use: a merge into it (ReLoRA's restart, LoRA-GA's residual) is
    then not rounded to bf16, which a frozen param, having no fp32 master, would be. With
    ``engine.weight_dtype: int8`` the method stores the base as int8 codes and scales once its
    weights are in (``lowrank_pt.model.int8_weights``).
    """

    has_frozen_base = True
    """``weight`` is frozen: ``int8_weights.store_bases`` may store it in int8."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None, scaling: str = "alpha/r", dora: bool = False,
                 base_in_fp32: bool = False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank={rank} must be >= 1")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, float(alpha)
        self.scale = lora_scale(alpha, rank, scaling)
        self.dora = bool(dora)
        self.capture = None
        w = base.weight
        if base_in_fp32:
            with gathered([w], modifier_rank=0):  # a buffer is never partitioned: it takes the full value
                self.register_buffer("weight", w.detach().float().clone())
        else:
            w.requires_grad_(False)
            self.weight = w
        self.register_parameter("bias", base.bias)
        self.lora_A = nn.Parameter(init_lora_A(rank, self.in_features, generator).to(w.device, w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        if self.dora:  # ‖W0‖_row (B = 0); the method recomputes it once the stage's weights are in
            norm = (torch.empty(self.out_features) if w.device.type == "meta"
                    else torch.linalg.vector_norm(read_whole(self.weight), dim=1))
            self.lora_magnitude = nn.Parameter(norm.to(w.device, w.dtype))
        # The scale travels with the weights (checkpoints, full_state_dict) so merged_state_dict
        # needs nothing else. DeepSpeed casts params only, so it stays fp32 under bf16.
        self.register_buffer("lora_scale", torch.tensor(self.scale, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def adapter_params(self) -> list[nn.Parameter]:
        """What the adapter trains: A, B and DoRA's magnitude."""
        return [self.lora_A, self.lora_B, *([self.lora_magnitude] if self.dora else [])]

    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``W0`` in ``dtype`` (an fp32 base buffer is cast, an int8 one dequantised; a frozen
        param already is)."""
        if int8_weights.is_int8(self):
            return int8_weights.value(self, dtype)
        return self.weight if self.weight.dtype == dtype else self.weight.to(dtype)

    def base_linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x·W0ᵀ (+ bias)``; an int8 base is dequantised in forward and again in backward
        instead of being kept."""
        if not int8_weights.is_int8(self):
            return F.linear(x, self.base_weight(x.dtype), bias)
        out = int8_weights.linear(x, self)
        return out if bias is None else out + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dora:
            out = self.base_linear(x, self.bias)
            out = out + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
            return out if self.capture is None else _CaptureGrad.apply(out, x, None, self)
        # DoRA: g·(x·W0ᵀ + s·x·Aᵀ·Bᵀ) with g = m / ‖W0 + s·B·A‖_row, the norm a constant.
        base = self.base_linear(x)
        dropped = self.dropout(x)
        low = F.linear(F.linear(dropped, self.lora_A), self.lora_B)
        norm = row_norms(self.base_weight(torch.float32), self.lora_A, self.lora_B, self.scale)
        g = self.lora_magnitude / norm.to(self.lora_magnitude.dtype)
        g = g.to(x.dtype)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            out = g * (base + self.scale * low)
        else:  # as peft: the base path sees x, the direction's correction the dropped input
            out = base + (g - 1) * self.base_linear(dropped) + g * (self.scale * low)
        if self.bias is not None:
            out = out + self.bias
        return out if self.capture is None else _CaptureGrad.apply(out, x, g.detach(), self)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base linear alone, ``x·W0ᵀ + bias`` (what ``adapters_disabled`` makes ``forward``)."""
        return self.base_linear(x, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, scale={self.scale:g}" + (", dora" if self.dora else ""))


def wrap_linears(model: nn.Module, target_patterns: list[str] | None, rank: int, alpha: float,
                 dropout: float = 0.0, seed: int = 0, scaling: str = "alpha/r", dora: bool = False,
                 base_in_fp32: bool = False) -> list[str]:
    """Replace every targeted ``nn.Linear`` (``lowrank_pt.model.targets``) by a ``LowRankLinear``; return
    the wrapped names in module order. ``A`` of the i-th wrapped module is drawn from
    ``seeded_generator(seed, 0, i)``: the same on every rank, the global RNG untouched.
    """
    targets = select_linears(model, target_patterns)
    make = lambda index, _, linear: LowRankLinear(linear, rank, alpha, dropout,  # noqa: E731
                                                  generator=seeded_generator(seed, 0, index),
                                                  scaling=scaling, dora=dora, base_in_fp32=base_in_fp32)
    return list(replace_linears(model, targets, make))


def lowrank_modules(model: nn.Module) -> list[tuple[str, LowRankLinear]]:
    """The wrapped modules in module order (the index used for seeding re-inits)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block every ``LowRankLinear`` of ``model`` computes its base linear alone
    (``x·W0ᵀ + bias``: no ``s·B·A``, no DoRA magnitude), so the model is its frozen base: DPO's
    reference without a second copy. The factors stay params (ZeRO-3 still gathers them)."""
    modules = [m for _, m in lowrank_modules(model)]
    for m in modules:  # an instance attribute: module hooks (ZeRO-3's gathers) still run around it
        m.forward = m.base_forward
    try:
        yield model
    finally:
        for m in modules:
            del m.forward


def merged_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain model's state dict from a wrapped model's: ``weight + s·B·A`` (with DoRA
    ``m ⊙ V/‖V‖_row``), adapters dropped.

    ``state`` holds full tensors (e.g. ``zero_io.full_state_dict``); it is not modified. An
    int8 base is dequantised first.
    """
    state = int8_weights.dequantised(state)
    prefixes = {k[: -len(".lora_A")] for k in state if k.endswith(".lora_A")}
    out = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in prefixes and (leaf in _ADAPTER_KEYS or leaf == "lora_magnitude"):
            continue
        if prefix in prefixes and leaf == "weight":
            missing = [f"{prefix}.{k}" for k in _ADAPTER_KEYS if f"{prefix}.{k}" not in state]
            if missing:
                raise ValueError(f"merged_state_dict: {missing} missing from the state dict")
            value = merged_weight(value, state[f"{prefix}.lora_A"], state[f"{prefix}.lora_B"],
                                  float(state[f"{prefix}.lora_scale"]), state.get(f"{prefix}.lora_magnitude"))
        out[key] = value
    return out
