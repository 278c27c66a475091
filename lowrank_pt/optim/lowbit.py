"""AdamW with low-bit moments (``optimizer.state_dtype``), stepping whatever tensors DeepSpeed hands
it: the 2-D params at ZeRO 0, the flat fp32 partitions at ZeRO 1-3.

- ``fp32``: the moments as torch's AdamW keeps them; the arithmetic is torch's single-tensor
  AdamW, op for op, so the steps are the same to the bit.
- ``bf16``: both moments stored in bf16 (rounded to nearest); 2 bytes per moment instead of 4.
  DeepSpeed's moment getters and setters (``zero.state.optimizer_state``) see them as ordinary
  state tensors of the param's shape.
- ``int8``: both moments quantised blockwise, 8-bit Adam's scheme: blocks of ``BLOCK`` values,
  each scaled by its largest magnitude, coded on a dynamic (exponent + fraction) map, signed for
  the first moment and unsigned for the second. The quantiser is torchao's (``quant_utils``: the
  map, the block scaling, the code search, the decode); this module only lays the codes out over
  a tensor of any size (padded to whole blocks) and steps in fp32 between decode and encode.
  A moment costs ``pad(n, BLOCK)`` bytes of codes plus 4 bytes of scale per block.

Every step decodes a tensor's moments to fp32, applies AdamW in fp32 and encodes them again, a
piece of ``CHUNK`` elements at a time (so its working copies stay small whatever the tensor), so
the arithmetic is fp32; only storage is low-bit. A bf16 param (training without fp32 masters) takes
its update with stochastic rounding (``round_to_bf16``), so updates smaller than half a bf16 step
are kept in expectation instead of being lost. State tensors are plain tensors (codes, scales, the
step), so checkpoints load with ``weights_only`` and resume to the bit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch

STATE_DTYPES = ("fp32", "bf16", "int8")
BLOCK = 256
"""Values per quantisation block (8-bit Adam's and torchao's)."""
CHUNK = 4096 * BLOCK
"""Elements a step works on at a time (a whole number of blocks): its fp32 temporaries stay small."""
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (fp32) rounded to bf16 stochastically: up (away from zero) with probability equal to
    the dropped low 16 bits' share of one bf16 step, so the expectation is ``x`` exactly.
    Random bits come from ``generator`` (the optimizers pass ``rounding_generator``'s; default:
    torch's global CPU generator)."""
    bits = x.detach().float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, generator=generator).to(bits.device)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def rounding_generator(step: int, *key: int) -> torch.Generator:
    """The random bits of one stochastic rounding, seeded by the optimizer step and what is rounded
    (a tensor's index, an element offset): every rank draws the same bits for the same elements, so
    ZeRO-0 replicas stay identical; the bits do not depend on the order tensors are stepped in, so
    per-layer updates equal an ordinary step; and a resumed run draws what the straight run did."""
    seed = int(step)
    for k in key:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**61 - 1)
    return torch.Generator().manual_seed(seed)


def _quant_utils():
    # torchao is imported on first use only: it takes seconds to import and is needed only by
    # int8 states. Its compiled extensions serve GPU kernels this module does not call, and its
    # import logs about them (and torch about an enum it registers) on every rank: kept quiet.
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        from torchao.optim import quant_utils
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return quant_utils


_MAPS: dict[bool, torch.Tensor] = {}


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 values an 8-bit code stands for (times its block's scale)."""
    if signed not in _MAPS:
        _MAPS[signed] = torch.tensor(_quant_utils().create_dynamic_map(signed=signed), dtype=torch.float32)
    return _MAPS[signed]


def padded(n: int) -> int:
    """Elements of a moment's codes: ``n`` padded to whole blocks."""
    return -(-n // BLOCK) * BLOCK


def encode(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8 [padded(n)], scales fp32 [padded(n) / BLOCK])`` of the flattened ``x``."""
    q = _quant_utils()
    flat = x.detach().float().reshape(-1)
    if flat.numel() % BLOCK:
        flat = torch.cat([flat, flat.new_zeros(padded(flat.numel()) - flat.numel())])
    scaled, scales = q.scale_tensor(flat, BLOCK)
    return q.quantize_8bit_with_qmap(scaled, dynamic_map(signed).to(flat.device)), scales


def decode(codes: torch.Tensor, scales: torch.Tensor, signed: bool, numel: int) -> torch.Tensor:
    """The first ``numel`` fp32 values ``encode`` coded (1-D)."""
    if codes.numel() == 0:  # a flat with no Adam moments (Muon's, Dion's matrices only)
        return torch.zeros(0, dtype=torch.float32, device=codes.device)
    values = _quant_utils().dequant_with_qmap(codes, dynamic_map(signed).to(codes.device), scales)
    return values[:numel]


def tensor_bytes(numel: int, state_dtype: str) -> int:
    """Bytes of one state tensor of ``numel`` elements stored in ``state_dtype`` (int8: the codes
    padded to whole blocks and one fp32 scale per block)."""
    if state_dtype == "fp32":
        return 4 * numel
    if state_dtype == "bf16":
        return 2 * numel
    if state_dtype == "int8":
        return padded(numel) + 4 * (padded(numel) // BLOCK)
    raise ValueError(f"state_dtype={state_dtype!r}: allowed {STATE_DTYPES}")


def state_bytes(numel: int, state_dtype: str) -> int:
    """Bytes of the state of one stepped tensor of ``numel`` elements: both moments and Adam's
    4-byte step counter (what the memory tracker counts, what the planner predicts)."""
    return 2 * tensor_bytes(numel, state_dtype) + 4


def load_keeping_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict, load) -> None:
    """``load(state_dict)`` (torch's ``Optimizer.load_state_dict``), then every state tensor put
    back as it was saved. torch casts each state tensor to its param's dtype: int8 codes to 4-byte
    floats, and next to a bf16 param (bf16 masters) fp32 scales and moments to bf16, which would
    lose bits and break a bit-identical resume."""
    saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved = {pid: {k: v for k, v in s.items() if torch.is_tensor(v) and k != "step"}
             for pid, s in state_dict["state"].items()}
    load(state_dict)
    for pid, p in zip(saved_ids, params):
        for key, value in saved.get(pid, {}).items():
            optimizer.state[p][key] = value.detach().to(p.device).clone()


def decode_state(state: dict, key: str, signed: bool, state_dtype: str, numel: int) -> None:
    """Put the fp32 values of ``state[key]`` (1-D, ``numel`` elements) under ``key``, from how
    ``store_state`` stored them in ``state_dtype`` (a state without them is left alone)."""
    if state_dtype == "bf16" and key in state:
        state[key] = state[key].float()
    elif state_dtype == "int8" and f"{key}_codes" in state:
        state[key] = decode(state[f"{key}_codes"], state[f"{key}_scales"], signed, numel)


def store_state(state: dict, key: str, signed: bool, state_dtype: str) -> None:
    """Store the fp32 ``state[key]`` in ``state_dtype``: bf16 under the same name, int8 as
    ``{key}_codes`` and ``{key}_scales`` (the reverse of ``decode_state``)."""
    if state_dtype == "bf16" and key in state:
        state[key] = state[key].to(torch.bfloat16)
    elif state_dtype == "int8" and key in state:
        state[f"{key}_codes"], state[f"{key}_scales"] = encode(state.pop(key), signed)


def decode_moments(state: dict, state_dtype: str, shape: tuple[int, ...]) -> None:
    """Add fp32 ``exp_avg`` / ``exp_avg_sq`` of ``shape`` to a state holding them stored in
    ``state_dtype`` (bf16 tensors under those names, or int8 ``*_codes`` and ``*_scales``)."""
    for key, signed in zip(MOMENT_KEYS, (True, False)):
        decode_state(state, key, signed, state_dtype, math.prod(shape))
        if key in state:
            state[key] = state[key].view(shape)


def store_moments(state: dict, state_dtype: str) -> None:
    """Store the fp32 ``exp_avg`` / ``exp_avg_sq`` of ``state`` in ``state_dtype`` (the reverse of
    ``decode_moments``; a state with none is left alone)."""
    for key, signed in zip(MOMENT_KEYS, (True, False)):
        store_state(state, key, signed, state_dtype)


class LowBitAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with moments stored as ``state_dtype`` (see the module doc)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 state_dtype: str = "int8"):
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype={state_dtype!r}: allowed {STATE_DTYPES}")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"LowBitAdamW: bad lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.state_dtype = state_dtype
        self.index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        """Each tensor's place among those it was built with, which keys its stochastic rounding."""

    def load_state_dict(self, state_dict: dict) -> None:
        load_keeping_dtypes(self, state_dict, super().load_state_dict)

    @contextlib.contextmanager
    def moments_as_tensors(self):
        """Inside the block every int8 state also holds its two moments decoded, as fp32 tensors
        ``exp_avg`` and ``exp_avg_sq`` shaped like its param: what DeepSpeed's state getters and
        setters (``zero.state``) look up, so a method's edits of moments (ReLoRA's pruning,
        GaLore's re-projection) work on int8 states too. On exit they are encoded back and
        dropped; only the blocks an edit changed are encoded again, so the others keep their codes
        and scales bit for bit. Other state dtypes keep such tensors already: nothing to do. The
        decoded moments are a transient of 8 bytes per stepped element."""
        decoded = []
        if self.state_dtype == "int8":
            for p, state in self.state.items():
                if "exp_avg_codes" not in state:
                    continue
                for key, signed in zip(MOMENT_KEYS, (True, False)):
                    values = decode(state[f"{key}_codes"], state[f"{key}_scales"], signed, p.numel())
                    state[key] = values.view_as(p)
                decoded.append(state)
        try:
            yield
        finally:
            for state in decoded:
                for key, signed in zip(MOMENT_KEYS, (True, False)):
                    self._encode_changed_blocks(state, key, signed, state.pop(key).reshape(-1))

    @staticmethod
    def _encode_changed_blocks(state: dict, key: str, signed: bool, value: torch.Tensor) -> None:
        """Store ``value`` (a whole decoded moment, edited or not) into the codes, re-encoding
        only the blocks whose values changed: an untouched block keeps its codes and scale bit
        for bit (re-encoding it would rescale it: the map's largest code is not exactly 1)."""
        codes, scales = state[f"{key}_codes"], state[f"{key}_scales"]
        n = value.numel()
        changed = value != decode(codes, scales, signed, n)
        if not bool(changed.any()):
            return
        blocks = torch.cat([changed, changed.new_zeros(codes.numel() - n)]).view(-1, BLOCK).any(dim=1)
        new_codes, new_scales = encode(value, signed)
        codes.view(-1, BLOCK)[blocks] = new_codes.view(-1, BLOCK)[blocks]
        scales[blocks] = new_scales[blocks]

    def _moments(self, state: dict, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both moments of elements ``[lo, hi)`` in fp32 (views of fp32 state, else decoded copies)."""
        if self.state_dtype == "int8":
            end = lo + padded(hi - lo)  # ``lo`` is a block boundary: whole blocks up to the end
            return tuple(decode(state[f"{key}_codes"][lo:end], state[f"{key}_scales"][lo // BLOCK:end // BLOCK],
                                signed, hi - lo) for key, signed in zip(MOMENT_KEYS, (True, False)))
        return tuple(state[key].view(-1)[lo:hi].float() for key in MOMENT_KEYS)

    def _store(self, state: dict, lo: int, hi: int, m: torch.Tensor, v: torch.Tensor) -> None:
        for key, value, signed in zip(MOMENT_KEYS, (m, v), (True, False)):
            if self.state_dtype == "int8":
                codes, scales = encode(value, signed)
                state[f"{key}_codes"][lo:lo + codes.numel()] = codes
                state[f"{key}_scales"][lo // BLOCK:lo // BLOCK + scales.numel()] = scales
            elif self.state_dtype == "bf16":
                state[key].view(-1)[lo:hi] = value

    def _init_state(self, p: torch.Tensor) -> dict:
        state = {"step": torch.tensor(0.0)}
        if self.state_dtype == "int8":
            n = padded(p.numel())
            for key in MOMENT_KEYS:
                state[f"{key}_codes"] = torch.zeros(n, dtype=torch.uint8, device=p.device)
                state[f"{key}_scales"] = torch.zeros(n // BLOCK, dtype=torch.float32, device=p.device)
        else:
            dtype = torch.float32 if self.state_dtype == "fp32" else torch.bfloat16
            for key in MOMENT_KEYS:
                state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g, group in enumerate(self.param_groups):
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                # A tensor this optimizer was built with keeps its index (per-layer updates step it
                # alone); ZeRO 1-2 hand it flat partitions in their place, keyed by their group.
                key = self.index.get(id(p), -1 - 1000 * g - i)
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p))
                state["step"] += 1
                step = float(state["step"])
                step_size = lr / (1 - beta1 ** step)
                bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
                flat, grads = p.view(-1), p.grad.view(-1)
                # In pieces of CHUNK elements: the fp32 working copies (gradient, decoded moments,
                # the weight of a bf16 param, the codes' search) stay a few MB whatever the tensor.
                for lo in range(0, flat.numel(), CHUNK):
                    hi = min(lo + CHUNK, flat.numel())
                    grad = grads[lo:hi].float()
                    m, v = self._moments(state, lo, hi)
                    # torch.optim.AdamW's single-tensor arithmetic, in fp32 whatever the storage.
                    weight = flat[lo:hi] if p.dtype == torch.float32 else flat[lo:hi].float()
                    if wd != 0:
                        weight.mul_(1 - lr * wd)
                    m.lerp_(grad, 1 - beta1)
                    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
                    weight.addcdiv_(m, denom, value=-step_size)
                    self._store(state, lo, hi, m, v)
                    if p.dtype == torch.bfloat16:
                        flat[lo:hi] = round_to_bf16(weight, rounding_generator(step, key, lo))
                    elif p.dtype != torch.float32:
                        flat[lo:hi] = weight
        return loss
