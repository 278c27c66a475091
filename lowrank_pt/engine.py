"""DeepSpeed engine built from our config: ZeRO stage, precision, batch, clipping, optimizer."""

from __future__ import annotations

import copy
import logging

import deepspeed
import torch
from torch.optim.lr_scheduler import LambdaLR



def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(engine_cfg, micro_batch_size: int, grad_accum: int, grad_clip: float,
                     world_size: int) -> dict:
    """The DeepSpeed config for one stage; ``engine.deepspeed`` keys are merged over it."""
    zero = {"stage": engine_cfg.zero_stage}
    if engine_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if engine_cfg.zero_stage == 3:
        # Small models: gather every layer eagerly, never keep params persistent by size alone
        # (keeps stage 3 really partitioned in tests on tiny models).
        zero["stage3_param_persistence_threshold"] = 0
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": engine_cfg.precision == "bf16"},
        "fp16": {"enabled": engine_cfg.precision == "fp16"},
        # Our optimizer is a client torch AdamW: no JIT-compiled FusedAdam on CPU machines.
        "zero_allow_untested_optimizer": True,
        # With offload on a CPU-only machine our torch AdamW already runs on the CPU; on GPUs
        # build_optimizer picks DeepSpeedCPUAdam, the fast offload path.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    return deep_merge(cfg, engine_cfg.deepspeed or {})


def build_optimizer(param_groups: list[dict], opt_cfg, offload: bool = False) -> torch.optim.Optimizer:
    if offload and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # compiled once per machine

        return DeepSpeedCPUAdam(param_groups, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps,
                                weight_decay=opt_cfg.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(
        param_groups,
        lr=opt_cfg.lr,
        betas=tuple(opt_cfg.betas),
        eps=opt_cfg.eps,
        weight_decay=opt_cfg.weight_decay,
        # Single-tensor loops: same numerics on every ZeRO stage's flat and 2-D views.
        foreach=False,
    )


def initialize(model, optimizer, lr_lambda, ds_config: dict):
    """``deepspeed.initialize`` with our optimizer and a LambdaLR over DeepSpeed's wrapper."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: LambdaLR(opt, lr_lambda),
        config=ds_config,
        dist_init_required=False,
    )
    return engine


def check_precision(precision: str) -> None:
    """fp16 needs a device that supports it; fail before any work starts."""
    if precision == "fp16":
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            raise ValueError("engine.precision=fp16 is not supported on this device; use bf16 or fp32")

