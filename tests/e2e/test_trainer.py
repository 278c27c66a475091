"""Full-rank training through the trainer at every ZeRO stage: loss falls, resume is exact."""

from __future__ import annotations

import pytest
import torch
from fixtures import final_weights, losses, run_invocations, spawn

from lowrank_pt.tracking import metrics


def recipe(run_dir: str, cache: str, zero_stage: int, precision: str, *extra: str) -> list[str]:
    """Two full-rank stages of 4 steps with different LRs, every step logged."""
    return [
        f"run_dir={run_dir}", f"data.cache_dir={cache}", f"engine.zero_stage={zero_stage}",
        f"engine.precision={precision}", "train.log_every=1", "train.eval_every=0", "train.tensorboard=false",
        "train.progress=false", "train.micro_batch_size=2", "train.grad_accum=2",
        "stages.0.steps=4", "stages.1.steps=4", *extra,
    ]


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trains_and_resumes_exactly(tmp_path, data_cache, zero_stage, precision, world_size):
    straight = str(tmp_path / "straight")
    resumed = str(tmp_path / "resumed")
    # Stop inside stage 1: the resumed run crosses the stage boundary after the restart.
    results = spawn(run_invocations, world_size, [
        recipe(straight, data_cache, zero_stage, precision),
        recipe(resumed, data_cache, zero_stage, precision, "train.stop_at_step=3"),
        recipe(resumed, data_cache, zero_stage, precision),
    ])
    assert results[0][1]["finished"] is False and results[0][1]["global_step"] == 3
    assert results[0][2]["finished"] is True and results[0][2]["global_step"] == 8

    a, b = losses(straight), losses(resumed)
    assert [s for s, _ in a] == list(range(1, 9))
    assert a == b, "resumed run's losses differ from the straight run's"
    assert a[-1][1] < a[0][1], f"loss did not fall: {a}"

    wa, wb = final_weights(straight), final_weights(resumed)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"final weight {name} differs after resume"


def test_loss_falls_over_a_longer_run(tmp_path, data_cache):
    run_dir = str(tmp_path / "run")
    spawn(run_invocations, 1, [
        recipe(run_dir, data_cache, 0, "fp32", "stages.0.steps=30", "stages.1.steps=10")
    ])
    values = [loss for _, loss in losses(run_dir)]
    first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
    assert last < first - 0.5, f"mean loss went {first:.3f} -> {last:.3f}"
    evals = [r for r in metrics.read(run_dir) if "eval/loss" in r]
    assert [r["stage"] for r in evals] == ["warmup", "main"]
    assert evals[1]["eval/loss"] < evals[0]["eval/loss"]
