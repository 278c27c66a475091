"""The one checkpoint path: DeepSpeed's own files plus what the engine does not hold.

Layout of ``RUN_DIR/checkpoints/step_00000120/``:
    DeepSpeed's files (model states, ZeRO partitions, LR scheduler), with ``client_state`` =
        {"trainer": plain counters, "method": the method's tensors/counters, "data": cursors,
         "objective": the objective's state (DPO's reference tables)}
    rng/rank_N.pt   torch CPU RNG state of rank N (a uint8 tensor)
    rng/cuda_rank_N.pt  where CUDA is present: the CUDA RNG state of every device rank N sees
                    (a list of uint8 tensors, by device index); absent in CPU runs and in
                    checkpoints older than it (a resume then keeps the freshly seeded CUDA RNG)
    meta.json       stage, steps, tokens, model shape, method, ZeRO stage, precision, world size,
                    tokenizer sha256, and ``files``: the size and crc32 of every other file of the
                    checkpoint; written last, atomically: read before anything is built

A checkpoint is written under ``step_XXXXXXXX.partial`` and renamed when every rank has finished:
a process killed during a save leaves only a ``.partial`` directory, which resume ignores (and
the next save removes). Only names without the suffix are complete.

Integrity: ``verify`` checks a checkpoint against its meta.json (readable, every recorded file
present with its size and crc32); resume takes the newest checkpoint that verifies and warns
about each newer one it passes over, and retention never deletes the newest one that verifies.
The checksums are shared out over the ranks (file i is read by rank i mod world), at save and
at resume. crc32 (zlib) runs at ~2 GB/s on one core here, against ~0.5 GB/s for blake2b: it
catches truncation and overwritten or garbled bytes, which is the point, not tampering.
Checkpoints older than the manifest (no ``files`` in meta.json) verify on meta.json alone.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import re
import shutil
import sys
import time
import warnings
import zlib

import torch

from lowrank_pt.core import dist
from lowrank_pt.core.errors import CheckpointError
from lowrank_pt.core.failures import disk_full_message, is_write_failure

CHECKPOINTS = "checkpoints"
PARTIAL = ".partial"
META = "meta.json"
FORMAT = 2
"""meta.json format: 2 adds ``files`` (size and crc32 of every file) and the resume-compatibility keys."""
REQUIRED_META = ("stage_index", "stage_name", "stage_step", "global_step", "tokens", "model")
_TAG = re.compile(r"^step_(\d{8})$")
_CHUNK = 8 << 20


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


def candidates(run_dir: str) -> list[str]:
    """Every checkpoint dir of a run that is not a ``.partial`` save, with or without meta.json
    (one without is damaged: meta.json is written before the rename), newest first."""
    base = root(run_dir)
    if not os.path.isdir(base):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(base)
             if (m := _TAG.match(name)) and os.path.isdir(os.path.join(base, name))]
    return [os.path.join(base, name) for _, name in sorted(found, reverse=True)]


def is_checkpoint_dir(path: str) -> bool:
    """Whether ``path`` is (or was meant to be) one checkpoint: a step_N dir, or one with meta.json."""
    return os.path.isdir(path) and (bool(_TAG.match(os.path.basename(os.path.normpath(path))))
                                    or os.path.exists(os.path.join(path, META)))


# --- integrity ----------------------------------------------------------------------------------


def crc32(path: str) -> str:
    """crc32 of a file's bytes, as 8 hex digits (read in 8 MiB chunks)."""
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def listing(path: str) -> list[str]:
    """Relative paths of the files of a checkpoint dir other than meta.json, sorted."""
    out = []
    for dirpath, _, names in os.walk(path):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), path)
            if rel not in (META, META + ".tmp"):
                out.append(rel)
    return sorted(out)


def manifest(path: str) -> dict[str, dict]:
    """``{file: {"bytes": size, "crc32": hex}}`` of every file of a checkpoint dir. Collective:
    every rank lists the same (shared) dir and checksums its share, file i on rank i mod world."""
    files = listing(path)
    mine = {rel: {"bytes": os.path.getsize(os.path.join(path, rel)), "crc32": crc32(os.path.join(path, rel))}
            for i, rel in enumerate(files) if i % dist.world_size() == dist.rank()}
    out: dict[str, dict] = {}
    for part in dist.all_gather_object(mine):
        out.update(part)
    return {rel: out[rel] for rel in files}


def _read_meta_checked(path: str) -> tuple[dict | None, str | None]:
    meta_path = os.path.join(path, META)
    if not os.path.exists(meta_path):
        return None, (f"{META} is missing (it is written last: the save did not finish, or the file was "
                      "deleted)")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError
        size = os.path.getsize(meta_path)
        return None, f"{META} is unreadable ({size} bytes: {str(e).splitlines()[0]})"
    if not isinstance(meta, dict):
        return None, f"{META} is unreadable (a {type(meta).__name__}, not an object)"
    lacking = [k for k in REQUIRED_META if k not in meta]
    if lacking:
        return None, f"{META} lacks {lacking}"
    return meta, None


def verify(path: str, checksums: bool = True, share: tuple[int, int] = (0, 1)) -> str | None:
    """What is wrong with a checkpoint dir, or None: meta.json readable, and every file it
    records present with its recorded size and (``checksums``; for the files of ``share`` =
    (rank, world): i mod world == rank) its crc32."""
    meta, problem = _read_meta_checked(path)
    if problem:
        return problem
    files = meta.get("files")
    if files is None:
        return None  # an older checkpoint: no manifest to check against
    rank, world = share
    for i, (rel, want) in enumerate(sorted(files.items())):
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        size = os.path.getsize(full)
        if size != want["bytes"]:
            return f"{rel} is {size} bytes, {META} records {want['bytes']} (truncated or overwritten)"
        if checksums and i % world == rank and crc32(full) != want["crc32"]:
            return f"{rel} fails its crc32 check (its bytes changed since the save)"
    return None


def verify_all_ranks(path: str) -> str | None:
    """``verify`` with the checksums shared out over the ranks; the same answer on every rank
    (the first problem any rank found). Collective."""
    found = dist.all_gather_object(verify(path, share=(dist.rank(), dist.world_size())))
    return next((p for p in found if p), None)


def newest_verified(run_dir: str, collective: bool = True) -> tuple[str | None, list[tuple[str, str]]]:
    """``(newest checkpoint of run_dir that verifies, [(newer damaged checkpoint, what is wrong)])``;
    None when none verifies. ``collective``: checksums shared over the ranks (every rank calls)."""
    damaged = []
    for path in candidates(run_dir):
        problem = verify_all_ranks(path) if collective else verify(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def resolve(path: str) -> str:
    """A checkpoint dir to read: a run dir's newest that verifies (each newer damaged one named in
    a warning on stderr, as resume does), or a checkpoint dir itself, which must verify. Raises
    FileNotFoundError (nothing to read) or ValueError (the given checkpoint is damaged) with what
    is wrong."""
    if is_checkpoint_dir(path) and not os.path.isdir(root(path)):
        problem = verify(path)
        if problem:
            raise ValueError(f"checkpoint {path} is damaged: {problem}; give the run dir to take its newest "
                             "checkpoint that verifies")
        return path
    found, damaged = newest_verified(path, collective=False)
    for bad, problem in damaged:
        print(f"warning: checkpoint {bad} is damaged ({problem}); "
              f"{'reading ' + found if found else 'no older one verifies'}", file=sys.stderr)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint that verifies under {path}"
                                + (f" ({len(damaged)} damaged)" if damaged else ""))
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
    try:
        if dist.rank() == 0:
            os.makedirs(base, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        dist.barrier()
        engine.save_checkpoint(base, tag=tag + PARTIAL, client_state=client_state, save_latest=False)
        save_rng(os.path.join(partial, "rng"), dist.rank())
        dist.barrier()
        files = manifest(partial)  # collective: each rank checksums its share
        if dist.rank() == 0:
            _write_json(os.path.join(partial, META), {**meta, "format": FORMAT, "files": files,
                                                      "saved_at": time.time()})
    except (OSError, RuntimeError) as e:
        if is_write_failure(e):
            raise CheckpointError(disk_full_message(e, partial)) from e
        raise
    if dist.rank() == 0:
        if os.path.exists(final):  # the same step saved again (a re-run of a finished stage)
            shutil.rmtree(final)
        os.replace(partial, final)
        retain(run_dir, keep_last)
        for stale in glob.glob(os.path.join(base, "*" + PARTIAL)):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def retain(run_dir: str, keep_last: int) -> list[str]:
    """Delete all but the ``keep_last`` newest complete checkpoints, never the newest one that
    verifies (sizes only: cheap), which a resume would need; returns the deleted dirs."""
    found = complete(run_dir)
    good = next((p for p in reversed(found) if verify(p, checksums=False) is None), None)
    doomed = [p for p in found[:-keep_last] if p != good]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def load(engine, path: str) -> dict:
    """Load engine state (module, optimizer, scheduler) and this rank's RNG; returns client state."""
    load_dir, tag = os.path.split(os.path.normpath(path))
    try:
        loaded, client_state = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                                      load_lr_scheduler_states=True)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint to load at {path}")
        load_rng(os.path.join(path, "rng"), dist.rank())
    except CheckpointError:
        raise
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"loading checkpoint {path} failed ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); resume from another checkpoint "
                              f"(resume=PATH) or move this one out of {os.path.dirname(path)}") from e
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
        warnings.warn(f"checkpoint holds CUDA RNG states of {len(states)} device(s), this process sees {count}: "
                      f"restoring the first {min(len(states), count)}", RuntimeWarning, stacklevel=2)
    for index, state in enumerate(states[:count]):  # torch.cuda.set_rng_state_all, for fewer devices too
        torch.cuda.set_rng_state(state, index)


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """Full fp32 module state dict from a checkpoint dir of any ZeRO stage and rank count."""
    # DeepSpeed's file readers import DeepSpeed (seconds): only the commands that read weights pay.
    from lowrank_pt.zero.saved import saved_weights

    return saved_weights(path)


def load_plain_weights(path: str) -> dict[str, torch.Tensor]:
    """Plain-model fp32 weights of a checkpoint dir, with the saving stage's adapters merged
    (its method's ``to_plain``), from any ZeRO stage and rank count."""
    # The methods import DeepSpeed (seconds): reading, verifying and listing checkpoints (the
    # export and generate commands) must not pay for it, so the registry comes in here.
    from lowrank_pt import methods

    meta = read_meta(path)
    method = meta.get("method", "full")
    return methods.METHODS[method].to_plain(load_weights(path),
                                            methods.parse_options(method, meta.get("method_options", {})))
