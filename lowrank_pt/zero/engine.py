"""DeepSpeed engine built from our config: ZeRO stage, precision, batch, clipping, optimizer."""

from __future__ import annotations

import contextlib
import copy
import logging

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from torch.optim.lr_scheduler import LambdaLR

from lowrank_pt.core import dist
from lowrank_pt.zero import state as zero_io
from lowrank_pt.zero.params import full_numel
from lowrank_pt.zero.partition import default_reduce_bucket


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def reduce_bucket_elements(engine_cfg, hidden_size: int) -> int:
    """The reduce bucket a run's DeepSpeed config gets (elements): ``engine.deepspeed``'s own
    ``zero_optimization.reduce_bucket_size``, else ``engine.reduce_bucket_size``, else
    ``partition.default_reduce_bucket``. What the trainer configures and the planner counts."""
    raw = (engine_cfg.deepspeed or {}).get("zero_optimization", {}).get("reduce_bucket_size")
    if raw is not None:
        return int(raw)
    if engine_cfg.reduce_bucket_size is not None:
        return int(engine_cfg.reduce_bucket_size)
    return default_reduce_bucket(hidden_size)


def deepspeed_config(engine_cfg, micro_batch_size: int, grad_accum: int, grad_clip: float,
                     world_size: int, hidden_size: int | None = None) -> dict:
    """The DeepSpeed config for one stage; ``engine.deepspeed`` keys are merged over it. With
    ``hidden_size`` (the model's), ZeRO 1-3 get ``reduce_bucket_elements``; without, DeepSpeed's
    default bucket."""
    zero = {"stage": engine_cfg.zero_stage}
    if hidden_size is not None and engine_cfg.zero_stage > 0:
        zero["reduce_bucket_size"] = reduce_bucket_elements(engine_cfg, hidden_size)
    if engine_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    threshold = getattr(engine_cfg, "stage3_param_persistence_threshold", None)
    if engine_cfg.zero_stage == 3 and threshold is not None:
        zero["stage3_param_persistence_threshold"] = int(threshold)
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": bf16_section(engine_cfg),
        "fp16": {"enabled": engine_cfg.precision == "fp16"},
        # Our optimizer is a client torch AdamW: no JIT-compiled FusedAdam on CPU machines.
        "zero_allow_untested_optimizer": True,
        # With offload on a CPU-only machine our torch AdamW already runs on the CPU; on GPUs
        # optim.adamw.build_optimizer picks DeepSpeedCPUAdam, the fast offload path.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if getattr(engine_cfg, "grad_accum_dtype", None) and cfg["bf16"]["enabled"]:
        # (bf16 masters at ZeRO 0 run no bf16 wrapper: DeepSpeed sees an fp32 model, and the bf16
        # params' gradients accumulate in bf16 by themselves)
        cfg["data_types"] = {"grad_accum_dtype": engine_cfg.grad_accum_dtype}
    return deep_merge(cfg, engine_cfg.deepspeed or {})


def bf16_section(engine_cfg) -> dict:
    """DeepSpeed's bf16 keys. bf16 masters at ZeRO 1-3: its bf16_master_weights_and_grads (the
    rank's partitions of masters and gradients in bf16); bf16_optimizer_states too, which only
    tells DeepSpeed the client optimizer keeps its states where the params are (ours decides their
    dtype: optimizer.state_dtype) instead of demanding its CPU Adam. At ZeRO 0 DeepSpeed has no bf16
    master option: the engine runs without a precision wrapper over a model built in bf16, and the
    client optimizer updates those params (``bf16_params``)."""
    if engine_cfg.precision != "bf16":
        return {"enabled": False}
    if engine_cfg.master_weights == "bf16":
        if engine_cfg.zero_stage == 0:
            return {"enabled": False}
        return {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    return {"enabled": True}


def bf16_params(engine_cfg) -> bool:
    """Whether the model itself is cast to bf16 before the engine (bf16 masters at ZeRO 0)."""
    return engine_cfg.precision == "bf16" and engine_cfg.master_weights == "bf16" and engine_cfg.zero_stage == 0


def _deepspeed_persistence_default() -> int:
    """DeepSpeed's own ``stage3_param_persistence_threshold`` default (1e5 in 0.19.8)."""
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig  # inside the try: a moved module

        return int(DeepSpeedZeroConfig.model_fields["param_persistence_threshold"].default)
    except Exception:  # noqa: BLE001 - a moved field: the documented value
        return 100_000


def with_persistence_threshold(model, ds_config: dict) -> dict:
    """``ds_config`` with ZeRO-3's persistence threshold for ``model``: an explicit value (from
    ``engine.stage3_param_persistence_threshold`` or ``engine.deepspeed``) is kept; otherwise
    DeepSpeed's default, unless no param of ``model`` reaches it. Such a model (the tiny test
    sizes) would stay entirely unpartitioned under ZeRO-3, and the tests that check partitioned
    params, shards and stage-3 gathers would check nothing: there 0 partitions every param.
    A real model has matrices far above the default and keeps it, so its norm weights stay
    whole on every rank instead of being gathered at every use."""
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") != 3 or "stage3_param_persistence_threshold" in zero:
        return ds_config
    # A param built under deepspeed.zero.Init holds an empty placeholder: its size is ds_numel.
    largest = max((full_numel(p) for p in model.parameters()), default=0)
    if largest >= _deepspeed_persistence_default():
        return ds_config
    return deep_merge(ds_config, {"zero_optimization": {"stage3_param_persistence_threshold": 0}})


def partitioned_build(ds_config: dict):
    """The context to build (and wrap) the model in. At ZeRO-3 it is ``deepspeed.zero.Init``:
    each param is partitioned over the ranks as soon as its module is built, so no rank ever
    holds the whole model (a 7B model is ~27 GB in fp32 on every rank otherwise, before ZeRO
    partitions anything). Params come out in the run's precision (zero.Init casts them; DeepSpeed
    does not cast a zero.Init model again). Elsewhere nothing: stages 0-2 hold the whole model
    on every rank by design."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        return contextlib.nullcontext()
    return deepspeed.zero.Init(config_dict_or_path=ds_config)


def initialize(model, optimizer, lr_lambda, ds_config: dict, masters: dict[int, torch.Tensor] | None = None,
               cast_to: torch.dtype | None = None):
    """``deepspeed.initialize`` with our optimizer and a LambdaLR over DeepSpeed's wrapper, and
    what it rounds put back: the method's buffers (a bf16 engine casts GaLore's fp32 projectors)
    and, from ``masters`` (param id -> the fp32 value this rank wrote before the engine existed,
    ``state.write_before_engine``), the fp32 masters DeepSpeed made from bf16 params. ``cast_to``:
    the dtype the model is cast to first, where no DeepSpeed wrapper does it (``bf16_params``)."""
    dist.check_deepspeed()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    held = zero_io.hold_method_buffers(model)  # a bf16 engine would cast GaLore's fp32 projectors
    if cast_to is not None:  # bf16 masters at ZeRO 0: the params themselves are what the optimizer updates
        for p in model.parameters():  # float params only, as DeepSpeed's bf16 wrapper casts (buffers
            if p.is_floating_point():  # and int8 bases keep theirs)
                p.data = p.data.to(cast_to)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: LambdaLR(opt, lr_lambda),
        config=with_persistence_threshold(model, ds_config),
        dist_init_required=False,
    )
    share_masters(engine)
    zero_io.restore_method_buffers(engine, held)
    if masters and (ds_config.get("bf16", {}).get("enabled") or ds_config.get("fp16", {}).get("enabled")):
        for p in engine.module.parameters():
            if id(p) in masters:
                zero_io.restore_master(engine, p, masters[id(p)])
    return engine


def share_masters(engine) -> None:
    """ZeRO-3 where the master partitions have the param partitions' dtype (fp32 training, or bf16
    with bf16 masters: ``bf16_master_weights_and_grads``; no offload): each sub-group's master
    partition becomes the rank's param partition itself instead of a second copy of it, 4 (fp32)
    or 2 (bf16) bytes per trained parameter less. DeepSpeed 0.19.8 means to share them where the
    two have one dtype and device, but compares ``tensor.device`` with a device *name*, which
    torch answers False, so it always copies. The master tensors stay the objects the optimizer
    and its state know; only their storage changes, and DeepSpeed's copy of the updated masters
    into the params after each step becomes a copy onto itself. Every rank calls it; no
    communication."""
    opt = engine.optimizer
    masters = getattr(opt, "fp32_partitioned_groups_flat", None)
    params = getattr(opt, "fp16_partitioned_groups_flat", None)
    if not masters or not params or getattr(opt, "offload_optimizer", False):
        return
    for master, param in zip(masters, params):
        if (param is not None and master.dtype == param.dtype and master.device == param.device
                and master.numel() == param.numel() and master.data_ptr() != param.data_ptr()):
            master.data = param.data


def check_precision(precision: str) -> None:
    """fp16 needs a device that supports it; fail before any work starts."""
    if precision == "fp16":
        if not get_accelerator().is_fp16_supported():
            raise ValueError("engine.precision=fp16 is not supported on this device; use bf16 or fp32")

