"""Which checkpoint a run continues from, and whether this run may continue it.

``resume=auto`` (and ``resume=RUN_DIR``) takes the newest checkpoint that verifies, warning about
each newer damaged one; ``resume=CHECKPOINT`` must verify; ``resume=never`` refuses a run dir that
holds checkpoints. A resume must keep what the checkpoint's state depends on: the stage's method,
the precision, the model's shape and the tokenizer; another world size or ZeRO stage is converted
at load where ``reshard.check`` allows it. Everything here reads only, before any write.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from lowrank_pt.checkpoint import reshard
from lowrank_pt.checkpoint import store as checkpoint
from lowrank_pt.core.errors import ConfigError
from lowrank_pt.model.llama import shape_difference


def find(run, world_size: int, warn: Callable[[str], None]) -> str | None:
    """The checkpoint ``run`` continues from, verified and compatible with ``run`` (``check_run``),
    or None. Collective (checksums are shared over the ranks); reads only."""
    if run.resume == "never":
        if checkpoint.candidates(run.run_dir):
            raise ConfigError(f"resume=never but {run.run_dir} holds checkpoints; use another run_dir")
        return None
    if run.resume != "auto" and not os.path.isdir(checkpoint.root(run.resume)):
        path = os.path.normpath(run.resume)  # one checkpoint dir
        if not checkpoint.is_checkpoint_dir(path):
            raise ConfigError(f"resume={run.resume}: neither a checkpoint dir (checkpoints/step_N) nor a run dir "
                              "with checkpoints/")
        problem = checkpoint.verify_all_ranks(path)
        if problem:
            raise ConfigError(f"resume={run.resume}: this checkpoint is damaged: {problem}; point resume at "
                              "another checkpoint dir (or at its run dir: the newest that verifies)")
        check_run(run, world_size, checkpoint.read_meta(path), path)
        return path
    source = run.run_dir if run.resume == "auto" else run.resume
    path, damaged = checkpoint.newest_verified(source)
    if path is None and damaged:
        listed = "; ".join(f"{os.path.basename(p)}: {why}" for p, why in damaged)
        raise ConfigError(f"no checkpoint under {checkpoint.root(source)} verifies ({listed}); move the damaged "
                          "ones away, or start a new run_dir (resume=never)")
    for bad, why in damaged:
        warn(f"checkpoint {bad} is damaged ({why}): skipped; resuming from {os.path.basename(path)}")
    if path is None and run.resume != "auto":
        raise ConfigError(f"resume={run.resume}: no complete checkpoint under {checkpoint.root(source)}")
    if path is not None:
        check_run(run, world_size, checkpoint.read_meta(path), path)
    return path


def check_run(run, world_size: int, meta: dict, path: str) -> None:
    """The stage's method and the precision are the checkpoint's (older checkpoints lack some:
    not checked); another layout is one ``reshard`` converts."""
    changes = []
    index = meta["stage_index"]
    if index < len(run.stages) and meta.get("method") not in (None, run.stages[index].method):
        changes.append(f"stages.{index}.method ({meta.get('stage_name')}) is {run.stages[index].method} here "
                       f"but {meta['method']} in the checkpoint")
    if meta.get("precision") not in (None, run.engine.precision):
        changes.append(f"engine.precision is {run.engine.precision} here but {meta['precision']} in the checkpoint")
    if index < len(run.stages) and meta.get("state_dtype", "fp32") != run.stages[index].optimizer.state_dtype:
        changes.append(f"stages.{index}.optimizer.state_dtype is {run.stages[index].optimizer.state_dtype} here but "
                       f"{meta.get('state_dtype', 'fp32')} in the checkpoint")
    if changes:
        raise ConfigError(f"resuming {path} would change what its state was saved with: {'; '.join(changes)}; "
                          "resume with the checkpoint's settings, or start a new run_dir (init_from takes its weights)")
    reshard.check(meta, path, run.engine.zero_stage, world_size, run.engine.precision)


def check_tokenizer_fits(run, model_cfg, tokenizer) -> None:
    """The model has a row for every token (open models pad theirs: Qwen2), and every stage's
    ``init_from`` was trained with this tokenizer (``check_init_from_tokenizer``)."""
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is below the tokenizer's {tokenizer.vocab_size}; "
                          "leave it null to take the tokenizer's")
    for stage in run.stages:
        check_init_from_tokenizer(stage, tokenizer)


def check_init_from_tokenizer(stage, tokenizer) -> None:
    """``stages.N.init_from``'s weights were trained with this run's tokenizer: a checkpoint's
    recorded sha256, or the tokenizer files of a Hugging Face dir (tokenizer.json with
    tokenizer_config.json, or tokenizer.model), unless ``init_from_tokenizer: any``. A source that
    records none is not checked."""
    from lowrank_pt.data import load_tokenizer
    from lowrank_pt.data.hf_tokenizer import is_hf_tokenizer

    if not stage.init_from or stage.init_from_tokenizer == "any":
        return
    source = Path(stage.init_from)
    if (source / "config.json").is_file():  # a Hugging Face dir: either of the forms it ships
        shipped = [p for p in (source, source / "tokenizer.model")
                   if (is_hf_tokenizer(p) if p == source else p.is_file())]
        hashes = {load_tokenizer(p).sha256: str(p) for p in shipped}
    else:
        meta = checkpoint.read_meta(checkpoint.resolve(str(source)))
        hashes = {meta["tokenizer_sha256"]: meta.get("tokenizer")} if meta.get("tokenizer_sha256") else {}
    if hashes and tokenizer.sha256 not in hashes:
        saved, where = next(iter(hashes.items()))
        raise ConfigError(f"stages ({stage.name}).init_from={stage.init_from} was trained with the tokenizer {where} "
                          f"(sha256 {saved[:12]}…), this run tokenizes with {tokenizer.path} (sha256 "
                          f"{tokenizer.sha256[:12]}…): its ids would mean other pieces. Set data.tokenizer to "
                          f"that tokenizer, or stages.N.init_from_tokenizer: any to train over it anyway")


def check_model(meta: dict, path: str, model_cfg, tokenizer) -> None:
    """The checkpoint's weights fit this model, and its token ids mean this run's pieces (the
    same tokenizer file, by sha256)."""
    differs = shape_difference(meta.get("model", {}), model_cfg, there="in the checkpoint")
    if differs:
        raise ConfigError(f"checkpoint model shape differs: {differs}; use another run_dir or the same model")
    saved = meta.get("tokenizer_sha256")
    if saved is not None and saved != tokenizer.sha256:
        raise ConfigError(f"resuming {path} would change the tokenizer: the checkpoint was trained with "
                          f"{meta.get('tokenizer')} (sha256 {saved[:12]}…), this run's data section gives "
                          f"{tokenizer.path} (sha256 {tokenizer.sha256[:12]}…); resume with the "
                          "checkpoint's data settings (data.tokenizer, data.vocab_size, data.source, ...)")
