"""The method interface declares what the rest of the project asks of a method: whether its
checkpoints reshard, whether its model is a dense Llama, its FLOPs per token, and a context around
each optimizer step (``step_context``) instead of overriding ``train_step``."""

from __future__ import annotations

import contextlib

import pytest
from fixtures import spawn, tiny_engine

from lowrank_pt.config.recipe import validate
from lowrank_pt.config.schema import RunConfig, StageConfig
from lowrank_pt.core.errors import ConfigError
from lowrank_pt.methods import METHODS, Method
from lowrank_pt.methods.base import MethodOptions
from lowrank_pt.model.llama import ModelConfig, flops_per_token, resolve


class NotDense(Method):
    name = "not_dense"
    has_dense_form = False


def test_every_method_declares_the_interfaces_facts():
    for name, cls in METHODS.items():
        assert isinstance(cls.reshardable, bool) and isinstance(cls.has_dense_form, bool), name
        assert issubclass(cls.Options, MethodOptions), f"{name}: its options are a MethodOptions (check())"
        assert "train_step" not in vars(cls) or cls is Method, f"{name} overrides train_step: use step_context"
    assert not METHODS["apollo"].reshardable and not METHODS["fira"].reshardable and METHODS["galore"].reshardable
    cfg = resolve(ModelConfig(size="tiny"), vocab_size=64)
    assert Method(None, StageConfig(), None).flops_per_token(cfg) == flops_per_token(cfg) > 0


def test_a_stage_after_a_method_without_a_dense_form_is_refused(monkeypatch):
    monkeypatch.setitem(METHODS, "not_dense", NotDense)
    run = RunConfig(stages=[StageConfig(name="a", steps=2, method="not_dense"), StageConfig(name="b", steps=2)])
    with pytest.raises(ConfigError, match=r"stages\[1\] \(b\) would start from stages\[0\].method=not_dense"):
        validate(run, environment=False)
    run.stages[1].init_from = "elsewhere"  # its own weights: nothing handed over
    validate(run, environment=False)


class Recording(Method):
    """Records the order of the hooks of one optimizer step."""

    events: list

    @contextlib.contextmanager
    def step_context(self, engine, micro_batches, step):
        self.events.append("enter")
        try:
            yield
        finally:
            self.events.append("exit")

    def before_optimizer_step(self, engine, step):
        self.events.append("before_optimizer_step")


def step_context_worker(rank, world):
    from fixtures import random_batches

    method = Recording(None, StageConfig(steps=10), None)
    method.events = []
    engine, method = tiny_engine(0, "fp32", method=method, grad_accum=2)
    method.train_step(engine, random_batches(2, micro_batch_size=2, seed=0), 0)
    return method.events


def test_step_context_wraps_the_whole_step_and_its_boundary():
    assert spawn(step_context_worker, 1) == [["enter", "before_optimizer_step", "exit"]]


def test_weight_decay_reaches_matrices_built_partitioned():
    """Under ZeRO-3 the trainer builds the model partitioned: each param holds a 1-D placeholder,
    so ``p.ndim`` says nothing of its shape. The groups follow the full shape (before this, every
    matrix of a ZeRO-3 run landed in the group without weight decay)."""
    import torch
    from torch import nn

    from lowrank_pt.config.schema import OptimizerConfig

    module = nn.Module()
    module.matrix = nn.Parameter(torch.empty(0))
    module.matrix.ds_id, module.matrix.ds_shape = 0, torch.Size([4, 3])  # as deepspeed.zero.Init leaves it
    module.vector = nn.Parameter(torch.empty(0))
    module.vector.ds_id, module.vector.ds_shape = 1, torch.Size([4])
    groups = Method(None, StageConfig(optimizer=OptimizerConfig(weight_decay=0.1)), None).param_groups(module)
    assert [([p is module.matrix for p in g["params"]], g["weight_decay"]) for g in groups] == [([True], 0.1),
                                                                                                 ([False], 0.0)]
