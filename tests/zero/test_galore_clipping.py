"""GaLore with gradient clipping on: DeepSpeed clips the norm of what it trains (B's projected
gradient α·G·Qᵀ and the full-rank params' gradients), not the norm of the full gradient G."""

from __future__ import annotations

import math

import pytest
import torch
from fixtures import random_batches, spawn, tiny_engine

CLIP = 1e-3  # far below the gradient norm: every step is clipped


def full_grad(engine, p) -> torch.Tensor:
    """The reduced gradient of ``p`` before the optimizer step, at any ZeRO stage."""
    if engine.zero_optimization_stage() == 0:
        return p.grad.detach().float().clone()
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(p).detach().float().clone()


def clip_worker(rank, world, zero_stage):
    from lowrank_pt.config.recipe import OptimizerConfig, ScheduleConfig, StageConfig
    from lowrank_pt.methods.galore.method import GaLore, GaLoreOptions

    stage = StageConfig(method="galore", steps=100, optimizer=OptimizerConfig(lr=1e-2, grad_clip=CLIP),
                        schedule=ScheduleConfig(kind="constant"))
    assert GaLore.default_grad_clip == 0.0 and GaLore(GaLoreOptions(), StageConfig(), None).grad_clip() == 0.0

    class Recording(GaLore):
        """Records the gradients DeepSpeed is about to clip (B's already replaced at a refresh)."""

        def before_optimizer_step(self, engine, step):
            self.full_grads = {n: a.capture.grad.clone() for n, a in self.adapters.items()  # one rank: the mean
                               if a.capture is not None and a.capture.grad is not None}
            super().before_optimizer_step(engine, step)
            self.pre_clip = {n: full_grad(engine, p) for n, p in engine.module.named_parameters() if p.requires_grad}

    method = Recording(GaLoreOptions(rank=4, update_proj_gap=2), stage, None)
    assert method.grad_clip() == CLIP
    engine, method = tiny_engine(zero_stage, "fp32", method=method, grad_clip=method.grad_clip())
    seen = {}
    if zero_stage == 0:  # the stage-0 engine clips p.grad in place right before the optimizer step
        inner_step = engine.optimizer.step

        def step(*args, **kwargs):
            seen["post_clip"] = {n: p.grad.detach().float().clone() for n, p in engine.module.named_parameters()
                                 if p.requires_grad and p.grad is not None}
            return inner_step(*args, **kwargs)

        engine.optimizer.step = step
    out = []
    for step_index, batch in enumerate(random_batches(3, rank=rank)):
        method.full_grads = {}
        method.train_step(engine, [batch], step_index)
        trained_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in method.pre_clip.values()))
        record = {"trained_norm": trained_norm, "refresh": method.is_refresh_step(step_index)}
        if method.full_grads:
            b_norm = math.sqrt(sum(float(method.pre_clip[f"{n}.galore_b"].pow(2).sum()) for n in method.full_grads))
            g_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in method.full_grads.values()))
            record.update(b_norm=b_norm, g_norm=g_norm)
        if zero_stage == 0:
            ratios = [float((seen["post_clip"][n].flatten() @ g.flatten()) / (g.flatten() @ g.flatten()))
                      for n, g in method.pre_clip.items() if float(g.abs().max()) > 0]
            record["clip_coefs"] = ratios
        else:
            record["engine_norm"] = float(engine.get_global_grad_norm())
        out.append(record)
    return out


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_galore_clips_the_norm_of_what_it_trains(zero_stage):
    records = spawn(clip_worker, 1, zero_stage)[0]
    assert [r["refresh"] for r in records] == [True, False, True]
    for r in records:
        if zero_stage == 0:  # every trained gradient scaled by one coefficient: CLIP / trained norm
            expected = CLIP / (r["trained_norm"] + 1e-6)
            assert r["clip_coefs"] and all(c == pytest.approx(expected, rel=1e-4) for c in r["clip_coefs"])
        else:  # DeepSpeed's global norm is the norm of the trained gradients
            assert r["engine_norm"] == pytest.approx(r["trained_norm"], rel=1e-4)
        if r["refresh"]:
            # B's gradient is α·G·Qᵀ: its norm is at most α·‖G‖ (α = 0.25), so clipping sees far
            # less than the full gradient's norm.
            assert 0 < r["b_norm"] <= 0.25 * r["g_norm"] * (1 + 1e-5)
