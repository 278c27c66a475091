"""Checks of the ``engine`` keys, and of raw ``engine.deepspeed`` keys against the ones lowrank_pt
generates from them (the log, meta.json and the planner follow ours)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as td

from lowrank_pt.config.checks import choice, number, world_size
from lowrank_pt.config.schema import BACKENDS, EngineConfig, RunConfig
from lowrank_pt.core.errors import ConfigError
from lowrank_pt.zero.engine import bf16_section, check_precision


def _generated_keys(run: RunConfig, index: int, world: int) -> list[tuple[str, Any, str]]:
    """The raw DeepSpeed keys our config generates for stage ``index``: (path in
    engine.deepspeed, the value we generate, the key of ours it comes from)."""
    stage = run.stages[index]
    micro, accum = stage.micro_and_accum(run.train)
    mkey = f"stages.{index}.micro_batch_size" if stage.micro_batch_size else "train.micro_batch_size"
    akey = f"stages.{index}.grad_accum" if stage.grad_accum else "train.grad_accum"
    precision = f"engine.precision={run.engine.precision}"
    masters = run.engine.master_weights
    bf16 = bf16_section(run.engine)
    return [
        ("zero_optimization.stage", run.engine.zero_stage, f"engine.zero_stage={run.engine.zero_stage}"),
        ("train_micro_batch_size_per_gpu", micro, f"{mkey}={micro}"),
        ("gradient_accumulation_steps", accum, f"{akey}={accum}"),
        ("train_batch_size", micro * accum * world,
         f"{mkey} x {akey} x ranks = {micro} x {accum} x {world} = {micro * accum * world}"),
        ("bf16.enabled", bf16["enabled"], f"{precision}, engine.master_weights={masters}"),
        ("bfloat16.enabled", bf16["enabled"], f"{precision}, engine.master_weights={masters}"),
        ("bf16.bf16_master_weights_and_grads", bf16.get("bf16_master_weights_and_grads", False),
         f"engine.master_weights={masters}"),
        ("fp16.enabled", run.engine.precision == "fp16", precision),
    ] + ([("data_types.grad_accum_dtype", run.engine.grad_accum_dtype,
           f"engine.grad_accum_dtype={run.engine.grad_accum_dtype}")] if run.engine.grad_accum_dtype and bf16["enabled"] else []
         ) + ([("zero_optimization.reduce_bucket_size", run.engine.reduce_bucket_size,
                f"engine.reduce_bucket_size={run.engine.reduce_bucket_size}")] if run.engine.reduce_bucket_size else [])


def _raw(tree: dict, dotted: str):
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


_ABSENT = object()


def validate_engine(run: RunConfig, environment: bool) -> None:
    e = run.engine
    choice("engine.zero_stage", e.zero_stage, [0, 1, 2, 3])
    choice("engine.precision", e.precision, ["fp32", "bf16", "fp16"])
    if e.offload_optimizer and e.zero_stage == 0:
        raise ConfigError("engine.offload_optimizer=true needs engine.zero_stage >= 1")
    choice("engine.master_weights", e.master_weights, ["fp32", "bf16"])
    if e.master_weights == "bf16" and e.precision != "bf16":
        raise ConfigError(f"engine.master_weights=bf16 with engine.precision={e.precision}: bf16 masters are for "
                          "bf16 training; set engine.precision=bf16 (or master_weights fp32)")
    if e.master_weights == "bf16" and e.offload_optimizer:
        raise ConfigError("engine.master_weights=bf16 with engine.offload_optimizer=true: the offloaded optimizer "
                          "(DeepSpeed's CPU Adam) keeps fp32 masters; use one or the other")
    choice("engine.weight_dtype", e.weight_dtype, ["bf16", "int8"])
    if e.weight_dtype == "int8" and e.precision != "bf16":
        raise ConfigError(f"engine.weight_dtype=int8 with engine.precision={e.precision}: int8 bases are "
                          "dequantised to bf16 in forward; set engine.precision=bf16 (or weight_dtype bf16)")
    if e.grad_accum_dtype is not None:
        choice("engine.grad_accum_dtype", e.grad_accum_dtype, ["fp32", "bf16"])
        if e.precision != "bf16":
            raise ConfigError(f"engine.grad_accum_dtype={e.grad_accum_dtype} with engine.precision={e.precision}: "
                              "the accumulation dtype is a choice of bf16 training (fp32 accumulates in fp32); "
                              "set engine.precision=bf16 or leave grad_accum_dtype null")
        if e.grad_accum_dtype == "fp32" and e.zero_stage != 1:
            raise ConfigError(f"engine.grad_accum_dtype=fp32 with engine.zero_stage={e.zero_stage}: DeepSpeed "
                              "accumulates bf16 gradients in fp32 through its BF16_Optimizer at ZeRO 1 only (at "
                              "ZeRO 0 it refuses the mix; at ZeRO 2-3 its buffers are not what the planner counts); "
                              "use zero_stage 1 or leave grad_accum_dtype null")
        if e.grad_accum_dtype == "fp32" and e.master_weights == "bf16":
            raise ConfigError("engine.grad_accum_dtype=fp32 with engine.master_weights=bf16: bf16 masters keep "
                              "bf16 gradients; use one or the other")
    if e.stage3_param_persistence_threshold is not None and e.stage3_param_persistence_threshold < 0:
        raise ConfigError(f"engine.stage3_param_persistence_threshold={e.stage3_param_persistence_threshold} "
                          "must be >= 0 (or null)")
    if e.backend is not None:
        choice("engine.backend", e.backend, BACKENDS)
    number("engine.collective_timeout_s", e.collective_timeout_s, 0, above=True)
    if e.reduce_bucket_size is not None and e.reduce_bucket_size < 1:
        raise ConfigError(f"engine.reduce_bucket_size={e.reduce_bucket_size} must be >= 1 (elements), or null")
    world = world_size()
    for index in range(len(run.stages)):
        for raw_key, value, ours in _generated_keys(run, index, world):
            theirs = _raw(e.deepspeed or {}, raw_key)
            if theirs is _ABSENT or theirs == value:
                continue
            raise ConfigError(f"engine.deepspeed.{raw_key}={theirs!r} contradicts {ours}, from which lowrank_pt "
                              f"generates it (the log, meta.json and the planner follow ours); drop "
                              f"engine.deepspeed.{raw_key} and set our key instead")
    if not environment:
        return
    if e.backend is not None:
        if not td.is_available() or not td.is_backend_available(e.backend):
            raise ConfigError(f"engine.backend={e.backend!r} is not available on this machine"
                              + (" (nccl needs CUDA GPUs; use gloo on a CPU)" if e.backend == "nccl" else "")
                              + "; null picks nccl on GPUs, gloo on a CPU")
    if e.precision == "fp16":
        try:
            check_precision(e.precision)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if e.offload_optimizer and not torch.cuda.is_available():
        raise ConfigError("engine.offload_optimizer=true moves the optimizer's states from the GPU to the host; this "
                          "machine has no GPU, so they are on the host already: drop it (DeepSpeed would build its "
                          "CPU Adam for nothing)")




def check_engine(engine_cfg: EngineConfig) -> None:
    """The checks of ``engine`` keys alone (what the planner takes as flags): ConfigError naming them."""
    validate_engine(RunConfig(engine=engine_cfg), environment=False)
