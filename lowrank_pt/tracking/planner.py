"""Per-rank memory of a training configuration, before anything runs.

The model is built on the ``meta`` device (no memory, any size) and shaped by the method's own
``prepare_model`` and ``param_groups``, so the planner sees exactly the params, frozen bases,
factors, buffers and optimizer groups a run would have. DeepSpeed's layout rules (0.19.8) then
give the bytes each rank holds. With N the elements of one optimizer param group, W the world
size, b the bytes of the training dtype (2 for bf16/fp16, 4 for fp32):

==============  ===================  ===========================  =============================
category        stage 0              stages 1-2                   stage 3
==============  ===================  ===========================  =============================
params          all params · b       frozen · b + Σ pad(N)·b      Σ⌈n/W⌉·b over every param n
master_params   bf16: N·4; fp32: 0   Σ pad(N)/W · 4               Σ Σ⌈n/W⌉·4 (fp32, bf16 masters: 0)
optimizer       2·N·4 + 4 per param  2·pad(N)/W·4 + 4 per group   2·Σ⌈n/W⌉·4 + 4 per sub-group
grads           N·b                  b · Σ n over params that     Σ Σ⌈n/W⌉·b
                                     overlap the rank's slice
                                     (+ padding on the last rank)
                                     stage 1, bf16 with fp32
                                     accumulation (BF16_Optimizer):
                                     Σ pad(N)·4 + N·b
method_buffers  persistent buffers, whole on every rank (DeepSpeed never partitions buffers)
zero_buffers    0                    0 resident (a bucket lives  reduce_bucket_size · b
                                     during backward only)
==============  ===================  ===========================  =============================

- ``pad(N)``: DeepSpeed flattens each group and pads it to a multiple of 2·W elements (4-byte
  alignment of every rank's slice), so each rank's slice is ``pad(N)/W``. Stage 3 pads each
  param to a multiple of W instead (``⌈n/W⌉`` per rank). These layout rules are
  ``lowrank_pt.zero.partition``'s (``padded_group``, ``piece_of``, ``slice_grad_elements``).
- stages 1-2 gradients: the rank copies the whole gradient of every param whose flat range
  overlaps its slice, so a param cut by a slice boundary counts on both sides, and the last rank
  also holds the group's padding as zeros: a rank holds a little more than ``pad(N)/W``.
- Adam keeps one 4-byte step counter per state entry: per param at stage 0, per flat group
  slice at stages 1-2, per sub-group (≤ ``sub_group_size`` elements) at stage 3.
- ``optimizer`` is the method's own formula, ``Method.optimizer_state_bytes`` (the row above is
  AdamW's, the base method's); a method that builds its own optimizer declares its formula
  there, and this module never names a method.

What the method changes is N and the frozen and buffer bytes:
- full: every param trainable; 2 fp32 moments per param.
- lora / relora: each wrapped m×n linear trains ``r·(m+n)`` (A: r×n, B: m×r) and keeps its m×n
  base frozen (in params, unpartitioned by the optimizer at stages 1-2); embeddings, norms and
  the head train full-rank.
- galore: each projected m×n matrix trains B of ``m×r`` (right side, m ≥ n under ``std``) or
  ``r×n`` (left), so Adam holds ``2·r·max(m, n)`` moments; the frozen base stays in params and
  the projector (r×n or m×r, ``projector_dtype``: 4 or 2 bytes) is a method buffer, held as a
  frozen param (``lowrank_pt.zero.method_buffers``): whole on every rank at stages 0-2, ``⌈n/W⌉`` per rank
  at stage 3 (partitioned like the weights). At refresh steps the full fp32
  gradient of each projected matrix is summed onto one owner rank (balanced by bytes,
  ``lowrank_pt.core.owners``): ``4·m·n`` for each owned matrix, or with ``svd: sketch`` its two
  sketches, ``4·(rows·(r+p) + (r+2p)·cols)``; reported as ``method_transient``. On the
  ``step`` forward path (``lowrank_pt.methods.galore.cost``, chosen for the tokens per micro-batch and
  accumulation given) each such matrix's W_eff is kept through every step, ``m·n·b``: ``step_cache``.

Activations are an estimate (see ``activation_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from lowrank_pt import methods
from lowrank_pt.config.recipe import OptimizerConfig, StageConfig
from lowrank_pt.core.owners import owned_bytes
from lowrank_pt.methods.base import Method
from lowrank_pt.model import int8_trained, int8_weights
from lowrank_pt.model.llama import LlamaModel
from lowrank_pt.zero.held import STATE_CATEGORIES
from lowrank_pt.zero.method_buffers import is_method_buffer
from lowrank_pt.zero.partition import (
    DEEPSPEED_REDUCE_BUCKET,
    DEEPSPEED_SUB_GROUP,
    allreduce_bucket_numel,
    default_reduce_bucket,
    group_shapes,
    padded_group,
    piece_of,
    slice_grad_elements,
)

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DEFAULT_DEVICE_BYTES = 80 * 2**30
"""The memory per GPU ``plan`` decides GaLore's ``refresh: auto`` against when not told (an 80 GB GPU)."""
AUTO_HEADROOM = 0.9
"""GaLore's ``refresh: auto`` keeps the exact refresh while its plan peaks within this share of the
memory: the rest is for the CUDA context, the allocator's fragmentation and what no plan counts."""

@dataclass
class Layout:
    """What a run holds, by shape: optimizer groups of trainable params (numels, in order),
    frozen params, persistent buffers (bytes, their own dtype), a method's frozen params held
    as its buffers ((numel, bytes per element): partitioned at ZeRO-3) and capture buffers."""

    groups: list[list[int]]
    frozen: list[int]
    buffer_bytes: int
    captures: list[int] = field(default_factory=list)
    held: list[tuple[int, int, int]] = field(default_factory=list)
    """A refresh in backward: per matrix, (elements, bytes each) of the new basis kept until the
    step, and r where its r×r fp32 change of basis is kept too (re-projected moments), else 0."""
    held_past_step: list[tuple[int, int, int]] = field(default_factory=list)
    """A sketch refresh: the same, kept from the refresh until after the optimizer step."""
    working: int = 0
    """A refresh in backward (GaLore), or an SVD refresh of a projected optimizer (fira,
    galore_weights): fp32 elements alive while one matrix's subspace is computed (the largest)."""
    working_per_token: int = 0
    """A refresh in backward under bf16/fp16: fp32 copies of the matrix's activations, m + n per token (the largest)."""
    method_params: list[tuple[int, int]] = field(default_factory=list)
    frozen_int8: list[int] = field(default_factory=list)
    """Elements of frozen bases stored as int8 codes (``engine.weight_dtype: int8``), 1 byte each
    (their fp32 scales are method buffers, in ``method_params``); also the codes of int8 weights
    the method updates."""
    int8_trained: list[int] = field(default_factory=list)
    """Elements of each trained weight stored as int8 codes (``model.int8_trained``): in ``groups``
    (their states and gradients are full-size) but holding one bf16 element each as params, and
    dequantised in fp32 one at a time at the step."""
    total_params: int = 0
    optimizer_formula: Optional[Callable[[int, int, int, int], int]] = field(default=None, repr=False)
    """``(zero_stage, world, rank, sub_group_size) -> bytes`` of optimizer state: the method's
    ``optimizer_state_bytes`` over its param groups (AdamW's when unset)."""
    every_gradient_steps: bool = False
    """Whether some steps need every gradient at once (``Method.needs_every_gradient``: a GaLore
    refresh from captured gradients, LoRA-GA's init): under per-layer updates they hold them all."""
    saved_values_per_token: int = 0
    """Values per token the method's modules keep for backward beyond the dense model's
    (``Method.saved_values_per_token``: CoLA's low-rank activations)."""
    step_cache: Callable[[int, int, int, str], int] = field(default=lambda *_: 0, repr=False)
    """``(tokens per micro-batch, accum, zero_stage, precision) -> bytes`` of weights the method keeps
    for the length of a step (``Method.step_cache_bytes``: GaLore's W_eff on its step path)."""

    @property
    def trainable(self) -> int:
        return sum(sum(g) for g in self.groups)


def layout(model_cfg, method: str = "full", options: dict | None = None, weight_decay: float = 0.0,
           state_dtype: str = "fp32", weight_dtype: str = "bf16") -> Layout:
    """The layout of ``model_cfg`` trained by ``method`` with ``options`` (its AdamW's moments in
    ``state_dtype``, its frozen bases in ``weight_dtype``), built on the meta device."""
    stage = StageConfig(method=method, steps=1, options=dict(options or {}),
                        optimizer=OptimizerConfig(weight_decay=weight_decay, state_dtype=state_dtype))
    parsed = methods.parse_options(method, stage.options)  # a ConfigError names the allowed values
    # Meta tensors allocate nothing; fork_rng keeps a method's init draws off the global RNG.
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = LlamaModel(model_cfg)
        m = methods.METHODS[method](parsed, stage, None)
        m.prepare_model(model)
        if weight_dtype == "int8" and m.has_frozen_base:
            int8_weights.store_bases(model)
        elif weight_dtype == "int8":  # the weights the method updates (ZeRO 0: config checks it)
            int8_trained.store(model)
        groups = m.param_groups(model)
    trainable_ids = {id(p) for g in groups for p in g["params"]}
    seen, frozen, method_params = set(), [], []
    frozen_int8 = []
    for p in model.parameters():
        if id(p) in seen or id(p) in trainable_ids:
            pass
        elif p.dtype == torch.int8:
            frozen_int8.append(p.numel())
        elif is_method_buffer(p):
            method_params.append((p.numel(), p.element_size()))
        else:
            frozen.append(p.numel())
        seen.add(id(p))
    buffer_bytes = 0
    captures, held, past, working, per_token = [], [], [], 0, 0
    for mod in model.modules():
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                buffer_bytes += buf.numel() * buf.element_size()
        if hasattr(mod, "capture_numel"):  # GaLore adapter: fp32 gradient or sketches at a refresh
            captures.append(mod.capture_numel)
            if mod.refresh_held is not None and mod.capture_kind == "sketch":
                past.append(mod.refresh_held)
            elif mod.refresh_held is not None:
                held.append(mod.refresh_held)
                working = max(working, mod.refresh_working)
                per_token = max(per_token, sum(mod.shape))
    shapes = group_shapes(groups)
    working = max(working, m.refresh_working_numel(shapes))
    return Layout(groups=[[p.numel() for p in g["params"]] for g in groups], frozen=frozen,
                  buffer_bytes=buffer_bytes, captures=captures, held=held, held_past_step=past, working=working,
                  working_per_token=per_token,
                  method_params=method_params, frozen_int8=frozen_int8,
                  int8_trained=int8_trained.stored_numel(model), every_gradient_steps=m.needs_every_gradient(0),
                  total_params=sum(p.numel() for n, p in model.named_parameters()  # an int8 weight counts once
                                   if not n.endswith((int8_weights.SCALE_KEY, int8_trained.CODES_KEY))),
                  optimizer_formula=lambda stage, world, rank, sub: m.optimizer_state_bytes(shapes, stage, world,
                                                                                            rank, sub),
                  saved_values_per_token=m.saved_values_per_token, step_cache=m.step_cache_bytes)


def state_bytes(lay: Layout, zero_stage: int, world: int, precision: str, rank: int = 0,
                reduce_bucket_size: int = DEEPSPEED_REDUCE_BUCKET,
                sub_group_size: int = DEEPSPEED_SUB_GROUP, fp32_grad_accumulation: bool = False,
                master_weights: str = "fp32", update: str = "step", grad_accum: int = 1) -> dict[str, int]:
    """Predicted bytes on ``rank`` by category (the categories of ``memory.state_bytes``).

    ``fp32_grad_accumulation``: bf16 with ``data_types.grad_accum_dtype: fp32`` at stage 1, where
    DeepSpeed runs its BF16_Optimizer: every rank accumulates the whole padded group in fp32 and
    the params' bf16 gradients are held beside it until the step.

    ``master_weights`` bf16 (``engine.master_weights``): no fp32 copy; at ZeRO 0 the bf16 params are
    what the optimizer updates, at ZeRO 1-2 DeepSpeed keeps the rank's master partition in bf16,
    at ZeRO 3 the rank's bf16 param partition is the master (as the fp32 one is in fp32 training).

    ``update`` per_layer (ZeRO 0, ``zero.per_layer``): at ``grad_accum`` 1 the most gradient bytes
    held at once are the largest trained tensor's; with more micro-batches, or where some steps
    need every gradient (``Layout.every_gradient_steps``), all of them, as an ordinary step."""
    master = 0 if precision == "fp32" else (2 if master_weights == "bf16" else 4)
    b = DTYPE_BYTES[precision]
    W = world if zero_stage > 0 else 1
    out = dict.fromkeys((*STATE_CATEGORIES, "zero_buffers"), 0)
    formula = lay.optimizer_formula or _adamw_formula(lay)
    out["method_buffers"] = lay.buffer_bytes + sum((piece_of(n, W) if zero_stage == 3 else n) * size
                                                   for n, size in lay.method_params)
    if zero_stage == 0:
        n = lay.trainable
        out["params"] = (n + sum(lay.frozen)) * b
        out["master_params"] = 0 if master_weights == "bf16" else n * master
        out["optimizer_states"] = formula(zero_stage, W, rank, sub_group_size)
        out["grads"] = n * b
        if update == "per_layer" and grad_accum == 1 and not lay.every_gradient_steps:
            out["grads"] = max((max(g) for g in lay.groups if g), default=0) * b
    elif zero_stage in (1, 2):
        padded = [padded_group(sum(g), W) for g in lay.groups]
        out["params"] = (sum(padded) + sum(lay.frozen)) * b
        out["master_params"] = sum(padded) // W * (master or 4)
        out["optimizer_states"] = formula(zero_stage, W, rank, sub_group_size)
        out["grads"] = sum(slice_grad_elements(g, W, rank) for g in lay.groups) * b
        if fp32_grad_accumulation and zero_stage == 1 and precision == "bf16":
            out["grads"] = sum(padded) * 4 + lay.trainable * b
    elif zero_stage == 3:
        parts = [[piece_of(n, W) for n in g] for g in lay.groups]
        slice_elems = sum(sum(p) for p in parts)
        out["params"] = (slice_elems + sum(piece_of(n, W) for n in lay.frozen)) * b
        # masters of the params' dtype are the param partitions themselves (zero.engine.share_masters)
        out["master_params"] = 0 if precision == "fp32" or master_weights == "bf16" else slice_elems * 4
        out["optimizer_states"] = formula(zero_stage, W, rank, sub_group_size)
        out["grads"] = slice_elems * b
        out["zero_buffers"] = reduce_bucket_size * b
    else:
        raise ValueError(f"zero_stage={zero_stage}: allowed 0, 1, 2, 3")
    out["params"] += sum(piece_of(n, W) if zero_stage == 3 else n for n in lay.frozen_int8)  # 1 byte each
    out["params"] -= sum(n - 1 for n in lay.int8_trained) * b  # a trained int8 weight's param: one element
    return out


def _adamw_formula(lay: Layout):
    """AdamW's formula (the base method's) for a layout built without a method."""
    shapes = [{"shapes": [(n,) for n in g]} for g in lay.groups]
    return lambda stage, world, rank, sub: Method.optimizer_state_bytes(None, shapes, stage, world, rank, sub)


def capture_bytes(lay: Layout, world: int, rank: int = 0, zero_stage: int = 0) -> int:
    """What a rank holds at a GaLore refresh's step (the tracker's ``method_transient``): what it
    owns (``owned_capture_bytes``) and what a refresh in backward kept (``kept_bytes``)."""
    return owned_capture_bytes(lay, world, rank) + kept_bytes(lay, world, zero_stage)


def owned_capture_bytes(lay: Layout, world: int, rank: int = 0) -> int:
    """fp32 full gradients or sketches summed in the backward onto each matrix's owner
    (``owners.balanced_owners`` over their sizes, module order), which computes its subspace;
    the other ranks keep nothing of that matrix. On the device."""
    return 4 * owned_bytes(lay.captures, world)[rank]


def kept_bytes(lay: Layout, world: int, zero_stage: int = 0, past_step: bool = False) -> int:
    """What a refresh in backward keeps on a rank until the step (with ``past_step``, also what a
    sketch refresh keeps until after it), in host memory: each new basis (``⌈n/W⌉`` of it at
    ZeRO-3) and, with re-projected moments, its r×r fp32 change of basis."""
    W = world if zero_stage == 3 else 1
    held = lay.held + (lay.held_past_step if past_step else [])
    return sum(piece_of(n, W) * size + 4 * r * r for n, size, r in held)


def activation_bytes(model_cfg, micro_batch: int, seq_len: int, precision: str,
                     checkpointing: bool = False, extra_values_per_token: int = 0) -> dict[str, int]:
    """Estimated activation memory of one micro-batch: ``saved`` (what autograd keeps for
    backward) and ``working`` (what is alive on top of it at the worst moment).

    Per token, for this LLaMA (SwiGLU, RMSNorm computed in fp32, fused attention that keeps no
    T×T matrix): a block saves about ``(4f + 2d + 2q + 2kv)·b + 16·d`` bytes (the MLP's four
    f-wide tensors; attention's two d-wide inputs, q and its output (q = heads × head_dim wide), k
    and v (kv wide: fewer heads under grouped-query attention); ``(4f + 6d)·b`` with multi-head
    attention; and the two fp32 vectors each RMSNorm keeps); the
    head keeps the fp32 log-probabilities, ``4·V``. Checked against autograd's saved tensors on
    CPU (within 12%, tests/unit/test_tracking.py::test_activation_estimate_matches_autograd). With
    activation checkpointing a block keeps only its input (``d·b``) and one block's activations
    are rebuilt at a time in backward. ``working``: the fp32 logits gradient (``4·V`` per token) during the head's
    backward. ``extra_values_per_token``: what a method's modules keep beyond that over the whole
    model (``Layout.saved_values_per_token``), ``b`` bytes each, a block's share rebuilt at a time
    under checkpointing.
    """
    b = DTYPE_BYTES[precision]
    d, f, L, V = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.num_layers, model_cfg.vocab_size
    q, kv = model_cfg.num_heads * model_cfg.head_dim, model_cfg.num_kv_heads * model_cfg.head_dim
    tokens = micro_batch * seq_len
    block = (4 * f + 2 * d + 2 * q + 2 * kv) * b + 16 * d + extra_values_per_token * b // L
    head = 4 * V + 3 * d * 4 + 16  # log-probs, final norm, ids and labels
    if checkpointing:
        saved = tokens * (L * d * b + head)
        working = tokens * (block + 4 * V)
    else:
        saved = tokens * (L * block + head)
        working = tokens * 4 * V
    return {"saved": saved, "working": working}


@dataclass
class Plan:
    """One rank's predicted memory (bytes) and what it was computed from."""

    inputs: dict
    bytes: dict[str, int]
    layout: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.bytes["total"]


def plan(model_cfg, method: str = "full", options: dict | None = None, zero_stage: int = 0, world: int = 1,
         micro_batch: int = 1, seq_len: int | None = None, precision: str = "bf16",
         activation_checkpointing: bool = False, rank: int = 0, weight_decay: float = 0.0,
         reduce_bucket_size: int | None = None, grad_accum: int = 1, state_dtype: str = "fp32",
         master_weights: str = "fp32", weight_dtype: str = "bf16", grad_accum_dtype: str | None = None,
         update: str = "step", lay: Layout | None = None, device_bytes: int = DEFAULT_DEVICE_BYTES) -> Plan:
    """Per-rank memory of training ``model_cfg`` (resolved) with ``method`` on ``world`` ranks
    (``lay``: its ``layout``, where the caller has it already). GaLore's ``refresh: auto`` (its
    default) is decided against ``device_bytes`` per GPU (``resolve_refresh``). ZeRO's reduce
    bucket: ``reduce_bucket_size`` elements, or the run's default for the model
    (``partition.default_reduce_bucket``)."""
    seq_len = seq_len or model_cfg.seq_len
    reduce_bucket_size = reduce_bucket_size or default_reduce_bucket(model_cfg.hidden_size)
    if method == "galore" and (options or {}).get("refresh", "auto") == "auto":  # decided, then planned
        _, auto, decided = resolve_refresh(
            model_cfg, dict(options or {}), device_bytes, zero_stage=zero_stage, world=world, micro_batch=micro_batch,
            seq_len=seq_len, precision=precision, activation_checkpointing=activation_checkpointing, rank=rank,
            weight_decay=weight_decay, reduce_bucket_size=reduce_bucket_size, grad_accum=grad_accum,
            state_dtype=state_dtype, master_weights=master_weights, weight_dtype=weight_dtype,
            grad_accum_dtype=grad_accum_dtype, update=update)
        decided.inputs["refresh_auto"] = auto
        return decided
    lay = lay or layout(model_cfg, method, options, weight_decay, state_dtype, weight_dtype)
    out = state_bytes(lay, zero_stage, world, precision, rank, reduce_bucket_size, master_weights=master_weights,
                      fp32_grad_accumulation=grad_accum_dtype == "fp32", update=update, grad_accum=grad_accum)
    act = activation_bytes(model_cfg, micro_batch, seq_len, precision, activation_checkpointing,
                           lay.saved_values_per_token)
    out["activations"] = act["saved"] + act["working"]
    out["method_transient"] = owned_capture_bytes(lay, world, rank)  # on the device
    tokens = micro_batch * seq_len
    out["refresh_working"] = 4 * (lay.working + (tokens * lay.working_per_token if precision != "fp32" else 0))
    out["refresh_kept_on_host"] = kept_bytes(lay, world, zero_stage, past_step=True)
    out["zero_transient"] = reduce_bucket_size * DTYPE_BYTES[precision] if zero_stage in (1, 2) else 0
    if zero_stage == 0 and update == "step":  # DeepSpeed's all-reduce flattens each bucket of gradients
        sizes = [n for g in lay.groups for n in g]
        out["zero_transient"] = allreduce_bucket_numel(sizes) * DTYPE_BYTES[precision]
    out["step_cache"] = lay.step_cache(tokens, grad_accum, zero_stage, precision)
    out["int8_step"] = int8_trained.largest_step_bytes(lay.int8_trained)
    resident = sum(out[c] for c in (*STATE_CATEGORIES, "zero_buffers"))
    out["resident"] = resident
    # A gradient bucket is all-reduced and freed before the step; a projected optimizer's refresh
    # runs inside the step of its matrix, while that matrix is dequantised (an int8 weight).
    out["total"] = resident + out["activations"] + out["step_cache"] + max(
        out["method_transient"] + out["refresh_working"] + out["int8_step"], out["zero_transient"])
    inputs = {"size": model_cfg.size, "method": method, "options": dict(options or {}), "zero_stage": zero_stage,
              "world": world, "micro_batch": micro_batch, "grad_accum": grad_accum, "seq_len": seq_len,
              "precision": precision,
              "activation_checkpointing": activation_checkpointing, "rank": rank, "state_dtype": state_dtype,
              "master_weights": master_weights, "weight_dtype": weight_dtype, "grad_accum_dtype": grad_accum_dtype,
              "update": update}
    info = {"total_params": lay.total_params, "trainable_params": lay.trainable, "frozen_params": sum(lay.frozen),
            "groups": len(lay.groups)}
    return Plan(inputs=inputs, bytes=out, layout=info)


def resolve_refresh(model_cfg, options: dict, device_bytes: int, **plan_kwargs) -> tuple[dict, str, Plan]:
    """GaLore's ``refresh: auto``, decided for one plan: (``options`` with ``refresh``, and ``svd``
    where the user left it unset, decided; why, in one line; the plan with them).

    The exact refresh at the step while the plan with it peaks within ``AUTO_HEADROOM`` of
    ``device_bytes``. Past that, a streaming refresh: in backward with randomized subspace
    iteration (one micro-batch per step), else sketches summed over the step's micro-batches;
    a ``svd`` the user set is kept (svd=exact or randomized with several micro-batches per step
    leaves the exact capture, the only one they allow)."""
    exact = dict(options, refresh="step")
    limit = int(AUTO_HEADROOM * device_bytes)
    exact_plan = plan(model_cfg, "galore", exact, device_bytes=device_bytes, **plan_kwargs)
    peak, gib = exact_plan.total, 2**30
    if peak <= limit:
        return exact, (f"refresh auto -> step (exact): the plan peaks at {peak / gib:.2f} GiB, within "
                       f"{AUTO_HEADROOM:.0%} of {device_bytes / gib:.1f} GiB"), exact_plan
    svd = options.get("svd")
    if plan_kwargs.get("grad_accum", 1) == 1 and svd != "sketch":
        chosen = dict(options, refresh="backward", svd=svd or "randomized")
    elif svd in (None, "sketch"):
        chosen = dict(options, refresh="step", svd="sketch")
    else:
        return exact, (f"refresh auto -> step (exact): svd={svd} with {plan_kwargs.get('grad_accum')} micro-batches "
                       f"per step has no streaming refresh; the plan peaks at {peak / gib:.2f} GiB, over "
                       f"{AUTO_HEADROOM:.0%} of {device_bytes / gib:.1f} GiB"), exact_plan
    streaming = plan(model_cfg, "galore", chosen, device_bytes=device_bytes, **plan_kwargs)
    still = "; still over it: lowrank-pt plan --fit finds the switches that fit" if streaming.total > limit else ""
    return chosen, (f"refresh auto -> {chosen['refresh']} (svd {chosen['svd']}): the exact refresh would peak at "
                    f"{peak / gib:.2f} GiB, over {AUTO_HEADROOM:.0%} of {device_bytes / gib:.1f} GiB; this peaks at "
                    f"{streaming.total / gib:.2f} GiB{still}"), streaming


def paper_accounting(model_cfg, method: str = "full", options: dict | None = None) -> int:
    """Bytes of weights + optimizer states as the GaLore paper's memory table counts them: every
    value in bf16 (2 bytes), Adam's two moments on what is trained, GaLore's projectors, no fp32
    masters, no gradients, one device."""
    lay = layout(model_cfg, method, options)
    # GaLore's published form has no B: the weights are the plain model's.
    weights = layout(model_cfg, "full").total_params if method == "galore" else lay.total_params
    projectors = sum(n for n, _ in lay.method_params)
    return 2 * (weights + 2 * lay.trainable + projectors) + lay.buffer_bytes // 2
