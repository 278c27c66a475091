"""A stage's ready engine: the model built (partitioned as it is built at ZeRO-3), prepared by its
method, given its starting weights, wrapped by DeepSpeed, its fp32 masters exact.

The order matters, and this is the one place that holds it:

1. build the model under ``partitioned_build`` (ZeRO-3: no rank ever holds the whole model);
2. ``method.prepare_model`` (adapters, frozen bases) before any weight is written;
3. the starting weights, streamed one param at a time into each rank's shard (``load_streamed``);
4. on a fresh start, the method's weight-dependent inits (LoRA's pissa, ...) see those weights;
   then the method stores its frozen bases in int8 where the run asks for it;
5. the optimizer over the method's param groups, and ``deepspeed.initialize``, after which
   ``engine.initialize`` puts back what it rounded: the method's buffers, and at bf16 the masters
   DeepSpeed made from the rounded params, from the fp32 values held in step 3 (a resumed
   checkpoint overwrites them anyway).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable

import torch

from lowrank_pt.core import dist
from lowrank_pt.core.errors import ConfigError
from lowrank_pt.core.host import release_host_heap
from lowrank_pt.zero import state as zero_io
from lowrank_pt.zero.engine import bf16_params, initialize, partitioned_build
from lowrank_pt.zero.params import full_shape

Weights = Iterable[tuple[str, torch.Tensor]]
"""``(name, full value)`` pairs of the plain model, in any order."""


def materialise(build_model: Callable[[], torch.nn.Module], method, ds_config: dict, total_steps: int,
                weights: Callable[[torch.nn.Module, list[str]], Weights] | None = None, fresh: bool = True):
    """The ready engine of a stage. ``build_model()`` makes the plain model; ``weights(model,
    plain names)`` (optional) gives its starting weights, else the fresh init stays; ``fresh``:
    not a resume (a checkpoint is loaded into the engine afterwards, so the method's
    weight-dependent inits do not run). Every rank calls it with the same arguments."""
    with partitioned_build(ds_config):
        model = build_model()
        plain = [name for name, _ in model.named_parameters()]
        method.prepare_model(model)
    source = weights(model, plain) if weights is not None else None
    held = load_streamed(model, source, plain) if source is not None else {}
    if fresh:
        held.update(method.after_weights_loaded(model))
    method.store_bases(model)  # int8 bases: after the inits that read them, before a checkpoint's values
    del source  # the last reference to a previous stage's engine, where the weights came from one
    gc.collect()
    release_host_heap()
    engine_cfg = method.run.engine
    optimizer = method.make_optimizer(model)
    engine = initialize(model, optimizer, method.lr_lambda(total_steps), ds_config, masters=held,
                        cast_to=torch.bfloat16 if bf16_params(engine_cfg) else None)
    release_host_heap()  # the per-param copies DeepSpeed flattened into its buffers
    return engine


def load_streamed(model, source: Weights, plain: list[str]) -> dict[int, torch.Tensor]:
    """Load ``(name, full value)`` pairs of the plain model into ``model`` (built, and prepared by
    its method, not yet in an engine) as they come: a ZeRO-3 partitioned param takes its shard.
    Every name of ``plain`` (the params of the model before its method prepared it; the
    method's own additions keep their fresh values) must arrive and fit its shape. Returns, by
    param id, the fp32 value each trainable param now holds on this rank, for the masters."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    held, seen = {}, set()
    for name, value in source:
        target = params.get(name, buffers.get(name))
        if target is None:
            if name.endswith("lm_head.weight") and model.cfg.tie_embeddings:
                continue  # tied to embed_tokens.weight, which carries it
            raise ValueError(f"weights to load hold {name!r}, which the model has not")
        shape = full_shape(target)
        if tuple(value.shape) != shape:
            raise ValueError(f"{name}: weights to load have shape {tuple(value.shape)}, the model {shape}")
        local = zero_io.write_before_engine(target, value)
        if name in params and target.requires_grad:
            held[id(target)] = local
        seen.add(name)
    missing = [n for n in plain if n not in seen]
    if missing:
        raise ValueError(f"weights to load lack {missing[:5]}")
    return held


def weights_from_rank0(read: Callable[[], dict[str, torch.Tensor]], model, plain: list[str],
                       zero_stage: int, where: str) -> Weights:
    """The plain weights ``read()`` returns, for ``load_streamed``. Stages 0-2 hold the whole model
    on every rank anyway: each rank reads them. At ZeRO-3 on several ranks only rank 0 reads
    them and hands each param over in turn by broadcast, so the other ranks hold one param at a
    time, never the model. ``where`` names the source in the error of weights that do not fit."""
    if zero_stage != 3 or dist.world_size() == 1:
        return iter(read().items())
    shapes = {name: full_shape(p) for name, p in model.named_parameters()}
    weights, problem = {}, None
    if dist.rank() == 0:
        weights = read()
        wrong = [f"{n}: {tuple(weights[n].shape)} there, {shapes[n]} here" for n in plain
                 if n in weights and tuple(weights[n].shape) != shapes[n]]
        missing = [n for n in plain if n not in weights]
        if wrong or missing:
            problem = f"{where}: weights do not fit the model ({(wrong + missing)[:3]})"
    problem = dist.broadcast_object(problem, src=0)
    if problem:
        raise ConfigError(problem)

    def stream():
        for name in plain:
            value = weights.pop(name).float().contiguous() if dist.rank() == 0 else torch.empty(shapes[name])
            dist.broadcast_(value, src=0)
            yield name, value

    return stream()
