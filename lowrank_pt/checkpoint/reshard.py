"""Resume a checkpoint on another world size or ZeRO stage: converted on the fly at resume.

DeepSpeed's own ``load_checkpoint`` needs the world size and ZeRO stage that saved: each rank
reads its own flat partition. Its universal checkpoint (``ds_to_universal`` + the
``load_universal_checkpoint`` config key) converts ZeRO 1-3 shards into per-param files, but
not a ZeRO 0 checkpoint (no shards), and loads only into ZeRO 1-3 engines. So the conversion is
ours, through the two places that know DeepSpeed's layout: ``zero.saved.saved_optimizer_state``
rebuilds each trainable param's full fp32 master and Adam moments from the saved files (any
stage, any rank count), and the fresh engine of this run takes them with the setters every
method's edits already use (``zero_io.set_param``, ``set_optimizer_state``), so each rank keeps
only its own shard of the new layout. Nothing is written to disk.

What is carried, exactly: every param (fp32 masters; frozen ones too: the bases, GaLore's
projectors), every persistent buffer (GaLore's decay factors, LoRA's scales), both Adam moments and Adam's step, the LR
scheduler, the method's counters (ReLoRA's restarts, GaLore's refreshes), the trainer's
counters. The data cursor counts windows of one global order that does not depend on the
world size (``data/loader.py``): it continues at the same window, so no window is repeated or
skipped; with the same global batch (micro_batch_size x grad_accum x world size) every step
reads exactly the windows the uninterrupted run would have. Not carried: the RNG of ranks the
saving run did not have (they keep this run's seeding; dropout masks differ), and the
reduction order, so losses continue closely but not bit for bit.
"""

from __future__ import annotations

import glob
import os

from lowrank_pt import methods
from lowrank_pt.checkpoint import store as checkpoint
from lowrank_pt.core import dist
from lowrank_pt.core.errors import ConfigError
from lowrank_pt.zero import saved as zero_checkpoint
from lowrank_pt.zero import state as zero_io


def layout_changes(meta: dict, zero_stage: int, world_size: int) -> list[str]:
    """What differs between the layout a checkpoint was saved with and this run's (empty: none)."""
    changes = []
    if meta.get("world_size") not in (None, world_size):
        changes.append(f"world size {meta['world_size']} -> {world_size} rank(s)")
    if meta.get("zero_stage") not in (None, zero_stage):
        changes.append(f"engine.zero_stage {meta['zero_stage']} -> {zero_stage}")
    return changes


def check(meta: dict, path: str, zero_stage: int, world_size: int, precision: str) -> None:
    """Before any work: a resume on another layout is one we can convert, or a ConfigError
    saying why not. Reads meta.json and lists files only."""
    changes = layout_changes(meta, zero_stage, world_size)
    if not changes:
        return
    what = "; ".join(changes)
    method = meta.get("method", "full")
    if method in methods.METHODS and not methods.METHODS[method].reshardable:
        raise ConfigError(f"resuming {path} on another world size or ZeRO stage ({what}) is not supported for "
                          f"method {method}: its optimizer keeps state beyond Adam's moments, laid out by the saving "
                          "ZeRO partitions; resume with the checkpoint's world size and engine.zero_stage")
    if meta.get("state_dtype", "fp32") != "fp32":
        raise ConfigError(f"resuming {path} on another world size or ZeRO stage ({what}) is supported for fp32 "
                          f"optimizer states only (the checkpoint's are {meta['state_dtype']}: their blocks follow "
                          "the saving partitions); resume with the checkpoint's world size and engine.zero_stage")
    if precision != "fp32":
        raise ConfigError(f"resuming {path} on another world size or ZeRO stage ({what}) is supported for fp32 only "
                          f"(engine.precision is {precision}; bf16 conversion is untested); resume with the "
                          "checkpoint's world size and engine.zero_stage")
    shards = glob.glob(os.path.join(path, "*_optim_states.pt"))
    saved_stage, saved_world = meta.get("zero_stage"), meta.get("world_size")
    expected = 0 if saved_stage == 0 else saved_world
    if saved_stage is not None and saved_world is not None and len(shards) != expected:
        raise ConfigError(f"resuming {path} on another layout ({what}) needs its optimizer shards: meta.json records "
                          f"ZeRO {saved_stage} on {saved_world} rank(s), which writes {expected} "
                          f"*_optim_states.pt file(s), but the checkpoint holds {len(shards)}")


def load(engine, path: str, method, say=print) -> dict:
    """Load checkpoint ``path`` into ``engine`` (fresh: built, no step taken) and this rank's RNG;
    returns the client state. On the layout that saved it this is ``checkpoint.load``; on another
    world size or ZeRO stage the state is converted (and said so). Collective."""
    meta = checkpoint.read_meta(path)
    changes = layout_changes(meta, zero_io.zero_stage(engine), dist.world_size())
    if not changes:
        return checkpoint.load(engine, path)
    say(f"resuming {path} on another layout ({'; '.join(changes)}): converting its fp32 masters, Adam "
        "moments, buffers, LR schedule and counters to this run's partitions")
    module = engine.module
    names_of = {id(p): name for name, p in module.named_parameters()}
    order = [names_of[id(p)] for group in method.param_groups(module) for p in group["params"]]
    client = zero_checkpoint.load_into_fresh_engine(engine, path, order, checkpoint.load_weights(path))
    checkpoint.load_rng(os.path.join(path, "rng"), dist.rank())
    client["data"] = retarget_cursors(client.get("data", {}), dist.world_size(), say)
    dist.barrier()
    return client


def retarget_cursors(data_state: dict, world_size: int, say=print) -> dict:
    """Data cursors saved on another world size, for this one. A cursor counts windows (or
    examples) of a global order every rank shares, consumed ``world_size x micro_batch_size``
    per batch: the position stays, only the slicing per rank changes."""
    out = {}
    for key, cursor in data_state.items():
        cursor = dict(cursor)
        if isinstance(cursor, dict) and cursor.get("world_size") not in (None, world_size):
            say(f"data cursor at item {cursor.get('position')} of epoch {cursor.get('epoch')} of the global order, "
                f"saved on {cursor['world_size']} rank(s): continues there, sliced over {world_size}")
            cursor["world_size"] = world_size
        out[key] = cursor
    return out
