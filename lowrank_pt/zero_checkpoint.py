"""What DeepSpeed's checkpoint files hold, read without an engine: the full fp32 masters and Adam
moments of every trainable param, whatever ZeRO stage and rank count saved them.

``lowrank_pt.reshard`` resumes a checkpoint on another world size or ZeRO stage from these; writing
them into a live engine is ``zero_io``'s (``seed_optimizer_state``, ``set_optimizer_state``). The
layout rules are DeepSpeed's ``zero_to_fp32``'s, whose own functions do the cutting.
"""

from __future__ import annotations

import contextlib

import torch

from lowrank_pt.zero_io import MOMENTS


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
    import glob
    import io
    import os

    from deepspeed.utils import zero_to_fp32 as z

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
