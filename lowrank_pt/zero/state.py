"""Read and write parameters and optimizer moments through DeepSpeed, at every ZeRO stage.

A method that edits weights (a merge, a re-init, a zeroed factor) must write every copy DeepSpeed
keeps, or the next step silently undoes the edit. Where the copies live depends on the wrapper
DeepSpeed picked (measured on 0.19.8, CPU and gloo, 1 and 2 ranks; tests/zero check every stage):

- stage 0 fp32: the param itself is the master; moments in ``engine.optimizer.state[p]``.
- stage 0 bf16: ``FP16_UnfusedOptimizer`` keeps an fp32 master per param in ``fp32_groups``; its
  inner optimizer keys moments by that master.
- stages 1-3: flat partitions; ``deepspeed.utils.safe_*`` reach them. Getters are collective,
  setters write only the local shard: every rank calls both, with the same full value.

Two DeepSpeed 0.19.8 defects are handled here rather than in every method:
- stage 3 full setters cut the value at ``rank * partition`` without padding, so the last rank
  fails for a param whose size does not divide by the world size: we pad and write the local
  shard ourselves;
- stages 1/2 link each param to its optimizer-state fragment after the *first* param group's
  step, before later groups have state: we re-link before reading or writing moments.

Merges into frozen bases, shard by shard, are ``lowrank_pt.zero.frozen``'s.

Every function here is called on every rank with identical arguments.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_grad,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_grad,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_grad,
    safe_set_local_optimizer_state,
)

from lowrank_pt.zero.held import inner_optimizer
from lowrank_pt.zero.method_buffers import is_method_buffer
from lowrank_pt.zero.params import full_numel, full_shape, gathered, is_partitioned, local_shard, piece

MOMENTS = ("exp_avg", "exp_avg_sq")
"""The moments Adam keeps per param, by their state keys (torch's and DeepSpeed's)."""


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def _stage0_master(engine, p):
    """fp32 master of ``p`` under the stage-0 bf16/fp16 wrapper, or None where p is its own."""
    groups = getattr(engine.optimizer, "fp16_groups", None)
    if groups is None or zero_stage(engine) != 0:
        return None
    for g, group in enumerate(groups):
        for i, q in enumerate(group):
            if q is p:
                return engine.optimizer.fp32_groups[g][i]
    return None


def full_param(engine, p: torch.Tensor) -> torch.Tensor:
    """The full fp32 value of ``p`` (its master where one exists), a fresh CPU tensor, same on all ranks."""
    stage = zero_stage(engine)
    if p.requires_grad and stage >= 1:
        return safe_get_full_fp32_param(p).detach().float().cpu().clone()
    master = _stage0_master(engine, p) if p.requires_grad else None
    if master is not None:
        return master.detach().float().cpu().clone().view_as(p)
    with gathered([p]):
        return p.detach().float().cpu().clone()


def set_param(engine, p: torch.Tensor, value: torch.Tensor) -> None:
    """Write ``value`` (full shape) into the module copy of ``p`` and its fp32 master. A buffer
    (never partitioned, no master) is written whole on every rank."""
    stage = zero_stage(engine)
    value = value.detach().cpu().float()
    if stage == 3 and is_partitioned(p):
        with gathered([p], modifier_rank=0):
            if dist.get_rank() == 0:
                p.data.copy_(value.to(p.device, p.dtype))
    else:
        p.data.copy_(value.to(p.device, p.dtype).view_as(p))
    if not p.requires_grad:
        return  # frozen params have no master: the module copy is all there is
    if stage == 3:
        safe_set_local_fp32_param(p, local_shard(p, value))
        return
    if stage >= 1:
        safe_set_full_fp32_param(p, value.to(p.device))
        return
    master = _stage0_master(engine, p)
    if master is not None:
        master.data.copy_(value.to(master.device).view_as(master))


def write_before_engine(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Put the full ``value`` into ``p`` before any engine exists (weights handed over from the
    previous stage, or loaded): a partitioned param takes this rank's shard only, anything else
    the whole value. Returns what this rank now holds of it in fp32 (its shard, or the whole
    value), which ``restore_master`` puts back into the fp32 master once the engine exists.
    Every rank calls it with the same value; no communication."""
    if is_partitioned(p):
        local = local_shard(p, value)
        piece(p).data.copy_(local.to(piece(p).dtype))
        return local
    p.data.copy_(value.detach().to(p.device, p.dtype).view_as(p))
    return value.detach().float().view(p.shape)


def restore_master(engine, p: torch.Tensor, held: torch.Tensor) -> None:
    """Write the fp32 value ``write_before_engine`` returned into ``p``'s fp32 master: the
    engine built its masters from the (bf16) params, which rounded them."""
    if not p.requires_grad:
        return
    if zero_stage(engine) == 3:
        safe_set_local_fp32_param(p, held.to(piece(p).device))
    else:
        set_param(engine, p, held)


def hold_method_buffers(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Before ``deepspeed.initialize``: every param a method holds as its buffer
    (``lowrank_pt.zero.method_buffers``: GaLore's projectors) with its value as it stands. A bf16 engine casts
    every param to bf16 (DeepSpeed keeps only buffers in fp32), these too, and ZeRO-3 then
    partitions the cast value; ``restore_method_buffers`` undoes that. No communication."""
    return [(p, p.data) for p in model.parameters() if is_method_buffer(p)]


def restore_method_buffers(engine, held: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """After ``deepspeed.initialize``: each held param back in its own dtype and value, before
    anything (a checkpoint) is loaded into it. At ZeRO-3 the rank's partition is rewritten from
    the full value held (a model built under ``deepspeed.zero.Init`` held only its placeholder:
    the partition keeps its values, in the param's dtype), and the placeholder takes the dtype,
    so the next gather (which groups params by their partition's dtype) brings the full value
    back in it. Every rank calls it; no communication."""
    for p, value in held:
        dtype = value.dtype
        if not is_partitioned(p):
            if p.data is not value:
                p.data = value.to(p.device)
            continue
        whole, shard = value.numel() == full_numel(p), piece(p)
        if whole:
            shard.data = local_shard(p, value).to(dtype)
        elif shard.dtype != dtype:
            shard.data = shard.data.to(dtype)
        if whole and p.data.numel() == full_numel(p):  # a persistent param (below ZeRO-3's threshold) stays whole
            p.data = value.to(p.device).view(full_shape(p))
        elif p.dtype != dtype:  # the empty placeholder
            p.data = p.data.to(dtype)


def _relink_optimizer_states(engine) -> None:
    opt = engine.optimizer
    if zero_stage(engine) in (1, 2) and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _stage0_state(engine, p) -> dict:
    master = _stage0_master(engine, p)
    if master is not None:
        return engine.optimizer.optimizer.state.get(master, {})
    return engine.optimizer.state.get(p, {})


def optimizer_state(engine, p: torch.Tensor, key: str) -> torch.Tensor | None:
    """Full fp32 optimizer moment ``key`` ("exp_avg", "exp_avg_sq") of ``p``; None before any step."""
    if zero_stage(engine) >= 1:
        if not moments_ready(engine):
            return None
        _relink_optimizer_states(engine)
        value = safe_get_full_optimizer_state(p, key)
        return None if value is None else value.detach().float().cpu().clone()
    value = _stage0_state(engine, p).get(key)
    return None if value is None else value.detach().float().cpu().clone().view_as(p)


def set_optimizer_state(engine, p: torch.Tensor, key: str, value: torch.Tensor) -> None:
    """Write the full moment ``key`` of ``p``; each rank keeps its own shard of it."""
    value = value.detach().cpu().float()
    stage = zero_stage(engine)
    if stage >= 1 and not moments_ready(engine):
        raise RuntimeError(f"optimizer holds no {key!r} for this param yet (no step taken)")
    if stage == 3:
        safe_set_local_optimizer_state(p, local_shard(p, value), key)
        return
    if stage >= 1:
        _relink_optimizer_states(engine)
        safe_set_full_optimizer_state(p, value.to(p.device), key)
        return
    state = _stage0_state(engine, p)
    if key not in state:
        raise RuntimeError(f"optimizer holds no {key!r} for this param yet (no step taken)")
    state[key].copy_(value.to(state[key].device).view_as(state[key]))


def full_grad(engine, p: torch.Tensor) -> torch.Tensor | None:
    """The full reduced gradient of ``p`` (fp32, CPU, same on all ranks) after the boundary
    backward, before ``engine.step()``; None where ``p`` has none. Collective at stages 1-3."""
    if zero_stage(engine) == 0 and getattr(p, "_hp_grad", None) is None:
        return None if p.grad is None else p.grad.detach().float().cpu().clone()
    value = safe_get_full_grad(p)
    shape = full_shape(p)
    return None if value is None else value.detach().float().cpu().clone().reshape(shape)


def set_grad(engine, p: torch.Tensor, value: torch.Tensor) -> None:
    """Replace the reduced gradient of ``p`` (full value) after the boundary backward, before step."""
    if zero_stage(engine) == 3 and p.grad is None:
        safe_set_local_grad(p, local_shard(p, value))
        return
    hp_grad = getattr(p, "_hp_grad", None)
    if hp_grad is not None:
        # BF16_Optimizer (bf16 with fp32 gradient accumulation) steps from its fp32 accumulation
        # buffer; safe_set_full_grad would write the bf16 staging gradient, which nothing reads.
        hp_grad.copy_(value.detach().to(hp_grad.device, hp_grad.dtype).view_as(hp_grad))
        return
    dtype = p.grad.dtype if p.grad is not None else torch.float32
    safe_set_full_grad(p, value.detach().to(p.device, dtype).reshape(p.shape))


@contextlib.contextmanager
def moments_as_tensors(engine):
    """The block in which a method reads and writes Adam's moments (``optimizer_state``,
    ``set_optimizer_state``): an optimizer that stores them otherwise than as tensors named
    ``exp_avg`` / ``exp_avg_sq`` (``optim.lowbit``'s int8 codes) decodes them for its length,
    through its own ``moments_as_tensors``; others need nothing."""
    inner = inner_optimizer(engine)
    with getattr(inner, "moments_as_tensors", contextlib.nullcontext)():
        yield


def moments_ready(engine) -> bool:
    """Whether Adam's moments exist for the trainable params (the same answer on every rank);
    false before a fresh engine's first step."""
    opt = engine.optimizer
    if zero_stage(engine) == 0:
        inner = opt.optimizer if hasattr(opt, "fp32_groups") else opt
        return any("exp_avg" in s for s in inner.state.values())
    # The flat fp32 partitions the inner optimizer steps: ZeRO-3, ZeRO-1/2, BF16_Optimizer.
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        flats = getattr(opt, attr, None)
        if flats is not None:
            break
    state = opt.optimizer.state
    return bool(flats) and all(f in state and "exp_avg" in state[f] for f in flats)


def release_optimizer_state(engine) -> None:
    """Free the optimizer moments of a finished stage (the next stage builds its own optimizer):
    what its weights are read from, the params and fp32 masters, stays. Stages 1-2 also link
    each param to views of those moments (``_hp_mapping.optim_fragment``): dropped too."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    inner.state.clear()
    for p in engine.module.parameters():
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None and hasattr(mapping, "optim_fragment"):
            mapping.optim_fragment = {}


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """fp32 params (masters where they exist) and persistent buffers of ``engine.module``."""
    module = engine.module
    out = {name: full_param(engine, p) for name, p in module.named_parameters()}
    keys = set(module.state_dict().keys())
    for name, buf in module.named_buffers():
        if name in keys:
            out[name] = buf.detach().cpu().clone()
    return out


def local_gradients(engine) -> list[torch.Tensor]:
    """The gradients this rank holds for the coming optimizer step, after the boundary backward
    and before ``engine.step()`` (what DeepSpeed's own overflow checks read). Stage 0: every
    trainable param's reduced ``.grad`` (the same on every rank); stages 1-3: this rank's
    partition only (``averaged_gradients``; with optimizer offload, the fp32 partitions'
    gradients); bf16 with fp32 accumulation (``BF16_Optimizer``): its fp32 accumulation
    buffers. No communication: a caller that needs every rank's answer reduces it."""
    opt = engine.optimizer
    if zero_stage(engine) == 0:
        return [p.grad for p in engine.module.parameters() if p.requires_grad and p.grad is not None]
    flat = getattr(opt, "fp32_groups_gradients_flat", None)
    if flat is not None:
        return [g for g in flat if g is not None]
    if getattr(opt, "cpu_offload", False) or getattr(opt, "offload_optimizer", False):
        flats = getattr(opt, "single_partition_of_fp32_groups", None) or opt.fp32_partitioned_groups_flat
        return [f.grad for f in flats if f.grad is not None]
    return [g for grads in opt.averaged_gradients.values() for g in (grads or []) if g is not None]


# --- a checkpoint resumed on another world size or ZeRO stage (lowrank_pt/checkpoint/reshard.py) --
# Reading the saved shards is lowrank_pt/zero/saved.py; this seeds the fresh engine.


def seed_optimizer_state(engine, step: float) -> None:
    """Give every tensor the (fresh) engine's optimizer steps zero Adam moments and the step count
    ``step``, as its first step would have created them, so that ``set_optimizer_state`` can
    write carried moments before any step. Same call on every rank; no communication."""
    opt = engine.optimizer
    if zero_stage(engine) == 0:
        inner = opt.optimizer if hasattr(opt, "fp32_groups") else opt
        tensors = [p for group in inner.param_groups for p in group["params"]]
    else:
        inner = opt.optimizer
        for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
            tensors = getattr(opt, attr, None)
            if tensors is not None:
                break
    for t in tensors:
        inner.state[t] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(t),
                          "exp_avg_sq": torch.zeros_like(t)}
