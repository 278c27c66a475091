"""The non-finite guard: a step whose loss or gradient is not finite on one rank is skipped on every
rank, at every ZeRO stage and precision, without touching weights, moments or Adam's step count;
the LR schedule moves on; the run goes on; too many in a row stop it with a message, the
checkpoints before intact.

The faults are injected on one rank only, by test hooks: a loss whose value is NaN while its
gradient stays finite (DeepSpeed steps that at every stage: only the guard's all-reduce makes the
other rank skip too), and a NaN written into one param's local gradient before the reduction
(DeepSpeed 0.19.8 applies it at ZeRO 0 fp32)."""

from __future__ import annotations

import os

import pytest
import torch
from fixtures import TINY, random_batches, spawn, tiny_engine

NAN = float("nan")


def nan_loss_value(module, inputs, loss):
    """The loss reads NaN; its gradient is the true one (the NaN term carries none)."""
    return loss + loss.detach() * NAN


def nan_gradient(module, inputs, loss):
    """The loss is right; every gradient it sends back is NaN."""
    loss.register_hook(lambda g: g * NAN)
    return loss


def _state(engine):
    """Full fp32 weights, both moments of every param, Adam's step counts, the schedule's step
    (collective at ZeRO 1-3: every rank calls it)."""
    from lowrank_pt.zero import state as zero_io
    from lowrank_pt.zero.held import inner_optimizer

    params = list(engine.module.named_parameters())
    inner = inner_optimizer(engine)
    return {"weights": {n: zero_io.full_param(engine, p) for n, p in params},
            "moments": {(n, k): zero_io.optimizer_state(engine, p, k) for n, p in params
                        for k in ("exp_avg", "exp_avg_sq")},
            "adam_steps": sorted(float(s["step"]) for s in inner.state.values() if "step" in s),
            "lr_step": engine.lr_scheduler.last_epoch}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _every_stage(rank, world, configs):
    """Per (stage, precision): a good step, a NaN loss value on rank 1, a NaN in rank 0's local
    gradient of the final norm, a good step; what each did to the state."""
    out = {}
    for zero_stage, precision in configs:
        engine, method = tiny_engine(zero_stage, precision, grad_accum=2)
        batches = iter(random_batches(8, rank=rank, seed=zero_stage))

        def step(index, hook=None, on_rank=None, param_hook=False):
            handle = None
            if rank == on_rank and hook is not None:
                handle = engine.module.register_forward_hook(hook)
            if rank == on_rank and param_hook:
                handle = engine.module.norm.weight.register_hook(lambda g: g * NAN)
            try:
                method.train_step(engine, [next(batches), next(batches)], index)
            finally:
                if handle is not None:
                    handle.remove()
            return method.step_skipped

        step(0)
        before = _state(engine)
        skipped_loss = step(1, nan_loss_value, on_rank=1)
        after_loss = _state(engine)
        skipped_grad = step(2, on_rank=0, param_hook=True)
        after_grad = _state(engine)
        skipped_good = step(3)
        after_good = _state(engine)
        out[(zero_stage, precision)] = {
            "skipped": (skipped_loss, skipped_grad, skipped_good),
            "unchanged": [_same(before[k], s[k]) for s in (after_loss, after_grad) for k in ("weights", "moments")],
            "adam_steps": [s["adam_steps"] for s in (before, after_loss, after_grad, after_good)],
            "lr_steps": [s["lr_step"] for s in (before, after_loss, after_grad, after_good)],
            "moved": not _same(before["weights"], after_good["weights"]),
            "finite": all(bool(torch.isfinite(v).all()) for v in after_good["weights"].values()),
            "counted": method.guard.skipped,
        }
    return out


CONFIGS = [(stage, precision) for stage in (0, 1, 2, 3) for precision in ("fp32", "bf16")]


@pytest.fixture(scope="module")
def every_stage():
    return spawn(_every_stage, 2, CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=[f"zero{s}-{p}" for s, p in CONFIGS])
def test_a_nonfinite_step_is_skipped_on_every_rank(every_stage, config):
    for rank, result in enumerate(every_stage):
        r = result[config]
        assert r["skipped"] == (True, True, False), (rank, r)
        assert all(r["unchanged"]), (rank, r["unchanged"])  # weights and moments, across both skips
        before, after_loss, after_grad, after_good = r["adam_steps"]
        assert after_loss == before and after_grad == before and before  # Adam's count stays
        assert all(b == a + 1 for a, b in zip(before, after_good))  # and moves on the good step
        assert r["lr_steps"] == [r["lr_steps"][0] + i for i in range(4)]  # the schedule moves on
        assert r["moved"] and r["finite"] and r["counted"] == 2
    assert every_stage[0][config] == every_stage[1][config]


def _poisoned_run(rank, world, overrides, poison):
    """A real run where rank 0's forward is poisoned at the given (stage name, 0-based step)s;
    the TrainingError's message, or None."""
    from lowrank_pt.config.recipe import load
    from lowrank_pt.core.errors import TrainingError
    from lowrank_pt.methods.base import Method
    from lowrank_pt.trainer.trainer import Trainer

    original = Method.train_step

    def train_step(self, engine, micro_batches, step):
        hook = poison.get((self.stage.name, step)) if rank == 0 else None
        handle = engine.module.register_forward_hook(hook) if hook else None
        try:
            return original(self, engine, micro_batches, step)
        finally:
            if handle is not None:
                handle.remove()

    Method.train_step = train_step
    try:
        Trainer(load(TINY, overrides)).run_all()
    except TrainingError as err:
        return str(err)
    return None


def test_a_run_skips_goes_on_and_stops_after_too_many_in_a_row(tmp_path, data_cache):
    """One rank, ZeRO 0 fp32 (where DeepSpeed itself would apply the NaN): a lone NaN gradient in
    the first stage is skipped and logged, and the run goes on into the second stage; there, NaN
    gradients from step 5 on stop it at the third in a row, before any save of a bad state: the
    checkpoint written during the row (step 10, two skips in) holds the weights of the last
    good one (step 8) bit for bit, and none comes after."""
    from lowrank_pt.checkpoint import store as checkpoint
    from lowrank_pt.tracking import metrics

    run_dir = str(tmp_path / "run")
    overrides = [f"run_dir={run_dir}", f"data.cache_dir={data_cache}", "stages.0.steps=4", "stages.1.steps=8",
                 "train.save_every=2", "train.log_every=2", "train.max_nonfinite_steps=3",
                 "train.tensorboard=false"]
    poison = {("warmup", 1): nan_gradient, **{("main", s): nan_gradient for s in range(4, 8)}}
    message = spawn(_poisoned_run, 1, overrides, poison)[0]
    assert message is not None and "3 optimizer steps in a row" in message, message
    assert "stage 'main' step 5 to stage 'main' step 7" in message and "resume=auto" in message

    records = [r for r in metrics.read(run_dir) if "loss" in r]
    assert [(r["step"], r["guard/skipped_steps"]) for r in records if "guard/skipped_steps" in r] == [
        (2, 1), (9, 2), (10, 3)]
    assert [r["step"] for r in records if r["stage"] == "main"] == [6, 8, 9, 10]  # went on, stopped at 11
    saved = checkpoint.complete(run_dir)
    assert [os.path.basename(p) for p in saved] == ["step_00000008", "step_00000010"]
    last_good, in_the_row = (checkpoint.load_weights(p) for p in saved)
    assert all(torch.equal(last_good[n], in_the_row[n]) for n in last_good)
    assert all(bool(torch.isfinite(v).all()) for v in in_the_row.values())
