"""The one checkpoint path: DeepSpeed's own files plus what the engine does not hold.

Layout of ``RUN_DIR/checkpoints/step_00000120/``:
    DeepSpeed's files (model states, ZeRO partitions, LR scheduler), with ``client_state`` =
        {"trainer": plain counters, "method": the method's tensors/counters, "data": cursors}
    rng/rank_N.pt   torch CPU RNG state of rank N (a uint8 tensor)
    rng/cuda_rank_N.pt  where CUDA is present: the CUDA RNG state of every device rank N sees
                    (a list of uint8 tensors, by device index); absent in CPU runs and in
                    checkpoints older than it (a resume then keeps the freshly seeded CUDA RNG)
    meta.json       stage, steps, tokens, model shape: read before anything is built

A checkpoint is written under ``step_XXXXXXXX.partial`` and renamed when every rank has finished:
a process killed during a save leaves only a ``.partial`` directory, which resume ignores (and
the next save removes). Only names without the suffix are complete.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import time

import torch

from lowrank_pt import dist, methods

CHECKPOINTS = "checkpoints"
PARTIAL = ".partial"
_TAG = re.compile(r"^step_(\d{8})$")


def root(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS)


def complete(run_dir: str) -> list[str]:
    """Complete checkpoint dirs of a run, oldest first."""
    base = root(run_dir)
    if not os.path.isdir(base):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(base) if (m := _TAG.match(name))]
    return [os.path.join(base, name) for _, name in sorted(found)
            if os.path.exists(os.path.join(base, name, "meta.json"))]


def newest(run_dir: str) -> str | None:
    found = complete(run_dir)
    return found[-1] if found else None


def resolve(path: str) -> str:
    """A checkpoint dir from a run dir (its newest) or a checkpoint dir itself."""
    if os.path.exists(os.path.join(path, "meta.json")):
        return path
    found = newest(path)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint under {path}")
    return found


def read_meta(path: str) -> dict:
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, run_dir: str, global_step: int, meta: dict, client_state: dict, keep_last: int) -> str:
    """Save on every rank; returns the complete checkpoint dir. Collective."""
    tag = f"step_{global_step:08d}"
    base = root(run_dir)
    partial = os.path.join(base, tag + PARTIAL)
    final = os.path.join(base, tag)
    if dist.rank() == 0:
        os.makedirs(base, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(base, tag=tag + PARTIAL, client_state=client_state, save_latest=False)
    save_rng(os.path.join(partial, "rng"), dist.rank())
    dist.barrier()
    if dist.rank() == 0:
        _write_json(os.path.join(partial, "meta.json"), {**meta, "saved_at": time.time()})
        if os.path.exists(final):  # the same step saved again (a re-run of a finished stage)
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in complete(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in glob.glob(os.path.join(base, "*" + PARTIAL)):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def load(engine, path: str) -> dict:
    """Load engine state (module, optimizer, scheduler) and this rank's RNG; returns client state."""
    load_dir, tag = os.path.split(os.path.normpath(path))
    loaded, client_state = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
    load_rng(os.path.join(path, "rng"), dist.rank())
    return client_state or {}


def save_rng(rng_dir: str, rank: int) -> None:
    """This rank's RNG states: the CPU generator (the format every checkpoint has) and, where
    CUDA is present, the generator of every CUDA device (dropout and sampling on a GPU)."""
    os.makedirs(rng_dir, exist_ok=True)
    torch.save(torch.get_rng_state(), os.path.join(rng_dir, f"rank_{rank}.pt"))
    if torch.cuda.is_available():
        torch.save(list(torch.cuda.get_rng_state_all()), os.path.join(rng_dir, f"cuda_rank_{rank}.pt"))


def load_rng(rng_dir: str, rank: int) -> None:
    """Restore what ``save_rng`` wrote for ``rank``; a missing file leaves that generator as it is
    (older checkpoints hold no CUDA state). CUDA states are restored when CUDA is present, device
    by device for the devices both runs see (a resume on fewer visible devices warns)."""
    cpu = os.path.join(rng_dir, f"rank_{rank}.pt")
    if os.path.exists(cpu):
        torch.set_rng_state(torch.load(cpu, weights_only=True))
    cuda = os.path.join(rng_dir, f"cuda_rank_{rank}.pt")
    if not (os.path.exists(cuda) and torch.cuda.is_available()):
        return
    states = torch.load(cuda, weights_only=True)
    count = torch.cuda.device_count()
    if len(states) != count:
        import warnings

        warnings.warn(f"checkpoint holds CUDA RNG states of {len(states)} device(s), this process sees {count}: "
                      f"restoring the first {min(len(states), count)}", RuntimeWarning, stacklevel=2)
    for index, state in enumerate(states[:count]):  # torch.cuda.set_rng_state_all, for fewer devices too
        torch.cuda.set_rng_state(state, index)


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """Full fp32 module state dict from a checkpoint dir of any ZeRO stage and rank count."""
    load_dir, tag = os.path.split(os.path.normpath(path))
    if glob.glob(os.path.join(path, "*optim_states.pt")) and not glob.glob(os.path.join(path, "mp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(load_dir, tag=tag)
    else:
        files = sorted(glob.glob(os.path.join(path, "*model_states.pt")))
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_plain_weights(path: str) -> dict[str, torch.Tensor]:
    """Plain-model fp32 weights of a checkpoint dir, with the saving stage's adapters merged
    (its method's ``to_plain``), from any ZeRO stage and rank count."""
    meta = read_meta(path)
    method = meta.get("method", "full")
    return methods.METHODS[method].to_plain(load_weights(path),
                                            methods.parse_options(method, meta.get("method_options", {})))
