"""The stage's AdamW: which implementation steps the tensors DeepSpeed hands the optimizer."""

from __future__ import annotations

import torch

from lowrank_pt.optim.lowbit import LowBitAdamW


def build_optimizer(param_groups: list[dict], opt_cfg, offload: bool = False,
                    zero_stage: int | None = None, master_weights: str = "fp32") -> torch.optim.Optimizer:
    """The stage's AdamW.

    - offload on a GPU machine: DeepSpeed's CPU Adam (the fast offload path);
    - CUDA at ZeRO stage 0 (``zero_stage=0``, no offload): torch AdamW with ``fused=True``, one
      kernel per param group instead of a loop of ~10 kernels per tensor. Same update formula
      in fp32; the kernel orders the arithmetic differently, so results differ from the
      single-tensor path by float rounding (a few ulp per step), and they are deterministic
      (no atomics): a resumed GPU run still equals an uninterrupted one bit for bit.
      tools/gpu_check.py measures the difference on the GPU.
    - everywhere else (CPU, and ZeRO 1-3, whose optimizer sees one flat tensor per group, so
      there is no per-tensor loop to fuse): single-tensor loops (``foreach=False``), the exact
      path every CPU test checks, with the same numerics on every stage's flat and 2-D views.
    - ``optimizer.state_dtype`` bf16 or int8, or ``engine.master_weights`` bf16 (config refuses
      both with offload): ``LowBitAdamW``, the same arithmetic in fp32 with its moments stored as
      asked and bf16 weights updated with stochastic rounding.
    """
    if offload and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # compiled once per machine

        return DeepSpeedCPUAdam(param_groups, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps,
                                weight_decay=opt_cfg.weight_decay, adamw_mode=True)
    if opt_cfg.state_dtype != "fp32" or master_weights == "bf16":
        return LowBitAdamW(param_groups, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps,
                           weight_decay=opt_cfg.weight_decay, state_dtype=opt_cfg.state_dtype)
    fused = torch.cuda.is_available() and zero_stage == 0 and not offload
    return torch.optim.AdamW(
        param_groups,
        lr=opt_cfg.lr,
        betas=tuple(opt_cfg.betas),
        eps=opt_cfg.eps,
        weight_decay=opt_cfg.weight_decay,
        foreach=False,
        fused=fused or None,
    )
