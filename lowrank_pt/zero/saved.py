"""What DeepSpeed's checkpoint files hold, read without an engine: the full fp32 masters and Adam
moments of every trainable param, whatever ZeRO stage and rank count saved them.

``lowrank_pt.checkpoint.reshard`` resumes a checkpoint on another world size or ZeRO stage from these; writing
them into a live engine is ``zero_io``'s (``seed_optimizer_state``, ``set_optimizer_state``). The
layout rules are DeepSpeed's ``zero_to_fp32``'s, whose own functions do the cutting.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os

import torch
from deepspeed.utils import zero_to_fp32 as z

from lowrank_pt.zero import state as zero_io
from lowrank_pt.zero.state import MOMENTS

DEEPSPEED_KEYS = {
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
    "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
    "checkpoint_parallel_dimensions", "ds_config", "ds_version", "universal_checkpoint_info",
}
"""Keys DeepSpeed 0.19.8 writes into the model states; the rest is our ``client_state``."""


def _zero_flat_moments(optim: list[dict], key: str) -> list[list[torch.Tensor]]:
    """Per rank, per param group: the flat fp32 tensor ``key`` ("fp32" for the masters, or a
    moment) of a ZeRO 1-3 checkpoint's optimizer shards, laid out as the masters are (the
    moments are the inner optimizer's state of the very flat partitions it steps)."""
    out = []
    for sd in optim:
        if sd["zero_stage"] == 3:
            flats = sd["fp32_flat_groups"]
            state = sd["optimizer_state_dict"]["state"]
            out.append(list(flats) if key == "fp32" else [state[i][key] for i in range(len(flats))])
            continue
        flats = sd["single_partition_of_fp32_groups"]  # saved without the alignment padding
        base = sd["base_optimizer_state"]
        states = base if isinstance(base, list) else [base["state"][i] for i in range(len(flats))]
        out.append(list(flats) if key == "fp32" else [s[key][: f.numel()] for s, f in zip(states, flats)])
    return out


def saved_optimizer_state(path: str, names: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """``({name: {"fp32": master, "exp_avg": ..., "exp_avg_sq": ...}}, Adam's step)``: the full
    fp32 master and moments of every trainable param, read from the files of the checkpoint dir
    ``path`` whatever ZeRO stage and rank count saved it. ZeRO 1-3: the shards are put together
    in the layout DeepSpeed's ``zero_to_fp32`` rebuilds the masters from (its own functions do
    the cutting, so its layout rules hold for the moments too). ZeRO 0 (fp32): the torch
    optimizer state in the model states, whose params are ``names`` in param-group order.
    Reads files only: no engine, no communication."""
    model_files = z.get_model_state_files(path)
    optim_files = sorted(glob.glob(os.path.join(path, "*_optim_states.pt")), key=z.natural_keys)
    if not optim_files:  # ZeRO 0: the optimizer state sits in the model states
        saved = torch.load(model_files[0], map_location="cpu", weights_only=False)["optimizer"]
        order = [i for group in saved["param_groups"] for i in group["params"]]
        if len(order) != len(names):
            raise ValueError(f"{path}: the optimizer state holds {len(order)} params, this model trains {len(names)}")
        masters = torch.load(model_files[0], map_location="cpu", weights_only=False)["module"]
        out = {name: {"fp32": masters[name].float(), **{k: saved["state"][i][k].float() for k in MOMENTS}}
               for name, i in zip(names, order)}
        step = max(float(saved["state"][i]["step"]) for i in order)
        return out, step
    model_states = z.parse_model_states(model_files)
    optim = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in optim_files]
    world = len(optim)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key in ("fp32", *MOMENTS):
        flats, merged = _zero_flat_moments(optim, key), {}
        with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 prints its progress
            if optim[0]["zero_stage"] == 3:
                z._zero3_merge_trainable_params(merged, world, flats, model_states)
            else:
                z._zero2_merge_trainable_params(merged, world, flats, model_states,
                                                optim[0].get("param_alignment_paddings"))
        for name, value in z.to_torch_tensor(merged).items():
            out.setdefault(name, {})[key] = value.float().clone()
    if optim[0]["zero_stage"] == 3:
        steps = [s["step"] for s in optim[0]["optimizer_state_dict"]["state"].values()]
    else:
        base = optim[0]["base_optimizer_state"]
        steps = [s["step"] for s in (base if isinstance(base, list) else base["state"].values())]
    return out, max(float(s) for s in steps)


def load_into_fresh_engine(engine, path: str, order: list[str], weights: dict[str, torch.Tensor]) -> dict:
    """Put the checkpoint ``path``, saved on another world size or ZeRO stage, into ``engine``
    (fresh: built, no step taken): every param's fp32 master (``weights`` for frozen ones: the
    checkpoint's plain weights), both Adam moments and the step, persistent buffers, the LR
    schedule's position and DeepSpeed's step counters. ``order``: the trainable params' names in
    param-group order (what a ZeRO 0 checkpoint's optimizer state is keyed by). Returns the
    client state (what is not DeepSpeed's). Every rank calls it; each keeps its own shard."""
    optimizer_state, step = saved_optimizer_state(path, order)
    zero_io.seed_optimizer_state(engine, step)
    module = engine.module
    for name, p in module.named_parameters():
        carried = optimizer_state.get(name) if p.requires_grad else None
        if p.requires_grad and carried is None:
            raise ValueError(f"{path}: no optimizer state for trainable {name}")
        zero_io.set_param(engine, p, carried["fp32"] if carried else weights[name])
        for key in MOMENTS if carried else ():
            zero_io.set_optimizer_state(engine, p, key, carried[key])
    persistent = set(module.state_dict().keys())
    for name, buf in module.named_buffers():
        if name in persistent:
            buf.data.copy_(weights[name].to(buf.device, buf.dtype))
    saved = torch.load(sorted(glob.glob(os.path.join(path, "*model_states.pt")))[0], map_location="cpu",
                       weights_only=False)
    _load_schedule(engine, saved)
    return {k: v for k, v in saved.items() if k not in DEEPSPEED_KEYS}


def _load_schedule(engine, saved: dict) -> None:
    """The LR scheduler's position and the LR each param group steps with next (a fresh
    optimizer holds the first step's), and DeepSpeed's step counters. Our scheduler is a
    LambdaLR over the method's stateless schedule, rebuilt from the config: only its position
    is state. (Its saved per-group lists follow the saving wrapper's param groups, which ZeRO 3
    counts differently from ZeRO 0-2: LambdaLR.load_state_dict would misalign them.)"""
    scheduler, state = engine.lr_scheduler, saved.get("lr_scheduler")
    if scheduler is not None and state is not None:
        scheduler.last_epoch = int(state["last_epoch"])
        scheduler._step_count = int(state.get("_step_count", scheduler.last_epoch + 1))
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if key in saved:
            setattr(engine, key, saved[key])


def saved_weights(path: str) -> dict[str, torch.Tensor]:
    """Full fp32 module state dict of the DeepSpeed checkpoint dir ``path``, whatever ZeRO stage
    and rank count saved it (ZeRO 1-3: rebuilt from the optimizer shards' fp32 masters by
    DeepSpeed's ``zero_to_fp32``; ZeRO 0: the module states). Reads files only."""
    load_dir, tag = os.path.split(os.path.normpath(path))
    sharded = glob.glob(os.path.join(path, "*optim_states.pt"))
    if sharded and not glob.glob(os.path.join(path, "mp_rank_*_optim_states.pt")):
        state = z.get_fp32_state_dict_from_zero_checkpoint(load_dir, tag=tag)
    else:
        files = sorted(glob.glob(os.path.join(path, "*model_states.pt")))
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
