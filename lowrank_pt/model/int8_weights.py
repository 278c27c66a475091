"""Frozen bases stored in int8 (``engine.weight_dtype: int8``).

A frozen m×n base ``W0`` becomes two frozen parameters of its module: ``weight``, int8 codes, and
``weight_scale``, one fp32 scale per block of ``BLOCK`` consecutive elements of a row
(``m × ⌈n/BLOCK⌉``; the last block of a row may be shorter), a method buffer
(``lowrank_pt.zero.method_buffers``: kept in fp32 under a bf16 engine). Both are params, so ZeRO-3
partitions them like the weights they replace and gathers them with their layer. A block's scale
is its largest |value| / 127, so its codes span [-127, 127] and an element is stored to within
half a step, ``scale/2``: 1 + 4/256 bytes per element instead of bf16's 2.

``linear`` multiplies by the base without keeping its dequantised copy: forward and backward
each dequantise it again (one m×n transient per call), so autograd saves the codes, not a 16-bit
weight per layer. A merge into the base (ReLoRA's restart, GaLore's subspace install) dequantises,
adds in fp32 and re-quantises with stochastic rounding: ``floor(x/scale + u)``, u uniform in
[0, 1), whose expectation is exactly ``x/scale``, so repeated merges do not drift by a rounding
bias. The draws come from a generator the caller seeds identically on every rank, so every rank
computes the same codes (and keeps its own shard of them at ZeRO-3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_pt.zero.frozen import frozen_part, set_frozen_part
from lowrank_pt.zero.method_buffers import method_buffer
from lowrank_pt.zero.params import gathered, partition_like, read_whole

BLOCK = 256
"""Elements of a row under one scale."""
LEVELS = 127
"""Largest code: symmetric codes in [-127, 127]."""
SCALE_KEY = "weight_scale"


def scale_shape(shape: tuple[int, int]) -> tuple[int, int]:
    m, n = shape
    return m, -(-n // BLOCK)


def stored_bytes(shape: tuple[int, int]) -> int:
    """Bytes an int8 base of ``shape`` holds: the codes and their fp32 scales."""
    rows, blocks = scale_shape(shape)
    return shape[0] * shape[1] + 4 * rows * blocks


def _blocks(w: torch.Tensor) -> torch.Tensor:
    """``w`` (m×n) as fp32 blocks ``m × ⌈n/BLOCK⌉ × BLOCK``, the last one zero-padded."""
    m, n = w.shape
    blocks = -(-n // BLOCK)
    return F.pad(w.float(), (0, blocks * BLOCK - n)).view(m, blocks, BLOCK)


def quantise(w: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of the m×n ``w``: int8 codes m×n and fp32 scales m×⌈n/BLOCK⌉.
    Round to nearest without ``generator``; stochastic rounding with draws from it (a CPU
    generator: the draws are made on the CPU, so they do not depend on the device)."""
    m, n = w.shape
    blocks = _blocks(w)
    scale = blocks.abs().amax(dim=2) / LEVELS
    x = blocks / torch.where(scale > 0, scale, 1.0)[..., None]
    if generator is None:
        codes = x.round()
    else:
        codes = torch.floor(x + torch.rand(x.shape, generator=generator).to(x.device))
    codes = codes.clamp_(-LEVELS, LEVELS).to(torch.int8).view(m, -1)[:, :n]
    return codes.contiguous(), scale


def dequantise(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The m×n base the codes and scales stand for, computed in fp32 and returned in ``dtype``."""
    m, n = codes.shape
    values = _blocks(codes) * scale.float()[..., None]
    return values.view(m, -1)[:, :n].to(dtype)


class _Int8Linear(torch.autograd.Function):
    """``x·W0ᵀ`` with ``W0`` given by its codes and scales; nothing trainable in it. Saves the
    codes (1 byte per element), not the dequantised weight."""

    @staticmethod
    def forward(ctx, x, codes, scale):
        ctx.save_for_backward(codes, scale)
        return F.linear(x, dequantise(codes, scale, x.dtype))

    @staticmethod
    def backward(ctx, dy):
        codes, scale = ctx.saved_tensors
        return dy @ dequantise(codes, scale, dy.dtype), None, None


def is_int8(module: nn.Module) -> bool:
    """Whether ``module``'s frozen base is stored as int8 codes and scales."""
    return module._parameters.get(SCALE_KEY) is not None


def linear(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``x·W0ᵀ`` (no bias) of ``module``'s int8 base (inside its forward: gathered at ZeRO-3)."""
    return _Int8Linear.apply(x, module.weight, module.weight_scale)


def value(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``module``'s int8 base, dequantised (a new tensor); its params must hold their full values
    (inside forward, or gathered)."""
    return dequantise(module.weight, module.weight_scale, dtype)


def read(module: nn.Module) -> torch.Tensor:
    """The dequantised fp32 base, a fresh CPU tensor, from anywhere (a ZeRO-3 layer is gathered
    for it: one matrix). Every rank calls it at ZeRO-3."""
    with gathered([module.weight, module.weight_scale]):
        return value(module).cpu()


def store(module: nn.Module) -> None:
    """Replace ``module.weight`` (a frozen param or buffer; a ZeRO-3 one is read whole, one matrix
    at a time) by its int8 codes and scales, rounded to nearest (the best a first quantisation
    can do), partitioned as the weight was. Every rank calls it at ZeRO-3."""
    w = module.weight
    if w.requires_grad:
        raise ValueError("int8 storage is for frozen bases (a trainable weight has masters)")
    full = w if w.device.type == "meta" else read_whole(w).to(w.device)
    codes, scale = quantise(full)
    del module.weight
    module.weight = nn.Parameter(codes, requires_grad=False)
    setattr(module, SCALE_KEY, method_buffer(scale))
    partition_like(w, [module.weight, module.weight_scale])


def assign(module: nn.Module, new: torch.Tensor, generator: torch.Generator) -> None:
    """Store ``new`` (m×n, full, the same on every rank) as ``module``'s int8 base, stochastically
    rounded; each ZeRO-3 rank writes its own shard. Outside forward and backward."""
    codes, scale = quantise(new.float(), generator)
    for p, full in ((module.weight, codes), (module.weight_scale, scale)):
        set_frozen_part(p, frozen_part(p, full))


def store_bases(model: nn.Module) -> int:
    """``store`` every frozen base of ``model`` (modules that declare ``has_frozen_base``);
    returns how many. Every rank calls it at ZeRO-3."""
    count = 0
    for m in model.modules():
        if getattr(m, "has_frozen_base", False) and not is_int8(m):
            store(m)
            count += 1
    return count


def dequantised(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (a full state dict) with every int8 weight replaced by its fp32 value and its
    scales dropped; a new dict, ``state`` unchanged. Both layouts: a frozen base's (codes under
    ``weight``, and a trained int8 weight's in a checkpoint) and a live trained one's (codes
    under ``weight_codes``, beside its placeholder ``weight`` and update count:
    ``model.int8_trained``)."""
    out = dict(state)
    for key in [k for k in state if k.endswith("." + SCALE_KEY)]:
        prefix = key[: -len(SCALE_KEY) - 1]
        codes = out.pop(f"{prefix}.weight_codes", None)
        out.pop(f"{prefix}.weight_updates", None)
        out[f"{prefix}.weight"] = dequantise(out[f"{prefix}.weight"] if codes is None else codes, out.pop(key))
    return out
